"""The shared HTTP server (asyncio + h11): deadlines, the connection budget, bodies, malformed requests,
content negotiation, HEAD, 100-continue, worker-thread handlers, and property tests of request parsing."""

from __future__ import annotations

import base64
import gzip
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlops_obs.web.server import DISCARD_BODY, HTTPServer, Limits, Request, Response, Route

WAIT = 20.0
BIG = b"0123456789abcdef" * 4096  # 64 KiB: compressible, over the gzip threshold


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def read_reply(f: BinaryIO, head_only: bool = False) -> Reply | None:
    """One response from a buffered socket file; ``None`` when the server closed first."""
    line = f.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split(" ", 2)
    assert parts[0] == "HTTP/1.1", line
    headers: dict[str, str] = {}
    while (h := f.readline()) not in (b"\r\n", b""):
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    n = 0 if head_only else int(headers.get("content-length", "0"))
    return Reply(int(parts[1]), headers, f.read(n))


def exchange(addr: tuple[str, int], data: bytes, replies: int = 1, head_only: bool = False) -> list[Reply | None]:
    with socket.create_connection(addr, timeout=WAIT) as s:
        s.sendall(data)
        f = s.makefile("rb")
        return [read_reply(f, head_only) for _ in range(replies)]


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the server closed ``s``: reads (discarding any answer) until EOF or a reset."""
    try:
        while s.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


class Recorder:
    """Which requests reached a handler, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def echo(self, r: Request) -> Response:
        self.seen.append((r.method, r.path, r.body))
        return Response(200, f"{r.method} {r.path} {len(r.body)}\n".encode())

    def wait(self, r: Request) -> Response:
        self.entered.set()
        self.release.wait(WAIT)
        return Response(200, b"waited\n")


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[HTTPServer, Recorder]]]:
    servers: list[HTTPServer] = []
    recorders: list[Recorder] = []

    def start(**limits: Any) -> tuple[HTTPServer, Recorder]:
        rec = Recorder()
        routes = [
            Route("/-/healthy", lambda _: Response(200, b"Healthy.\n")),
            Route("/big", lambda _: Response(200, BIG)),
            Route("/echo", rec.echo, ("GET", "POST"), max_body=1024),
            Route("/upload", rec.echo, ("POST",), max_body=256 * 1024),
            Route("/wait", rec.wait, blocking=True),
            Route("/boom", lambda _: 1 / 0),  # type: ignore[arg-type,return-value]
        ]
        server = HTTPServer(("127.0.0.1", 0), routes, limits=Limits(**limits))
        server.start_background()
        servers.append(server)
        recorders.append(rec)
        return server, rec

    yield start
    for rec in recorders:
        rec.release.set()
    for s in servers:
        s.shutdown()
        s.server_close()


GET_HEALTHY = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n"


def test_header_deadline_is_total_not_per_line(serve: Any) -> None:
    """A client trickling header lines is cut at the deadline from its first byte, however often it sends."""
    server, _ = serve(header_timeout=1.0)
    with socket.create_connection(server.server_address, timeout=WAIT) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /-/healthy HTTP/1.1\r\n")
        answer = b""
        while time.monotonic() - t0 < WAIT:
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            s.settimeout(0.2)
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk:
                break
        elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 1.0 <= elapsed < 1.0 + 10.0  # far less than "reset by each line" would allow


def test_a_new_connection_must_send_its_request_in_time(serve: Any) -> None:
    server, _ = serve(header_timeout=0.5)
    with socket.create_connection(server.server_address, timeout=WAIT) as s:
        t0 = time.monotonic()
        assert closed_by_peer(s)
        assert time.monotonic() - t0 < 0.5 + 10.0


def test_connection_budget_sheds_the_longest_waiting_connection(serve: Any) -> None:
    """At the budget, a newcomer is served and the connection idle the longest is closed."""
    server, _ = serve(max_connections=8)
    addr = server.server_address
    idle = [socket.create_connection(addr, timeout=WAIT) for _ in range(8)]
    try:
        deadline = time.monotonic() + WAIT
        while server.connections < 8:
            assert time.monotonic() < deadline, "idle connections never registered"
            time.sleep(0.01)
        for _ in range(3):
            (reply,) = exchange(addr, GET_HEALTHY)
            assert reply is not None and reply.status == 200
        assert closed_by_peer(idle[0])  # the oldest went first
        assert server.connections <= 8
    finally:
        for c in idle:
            c.close()


def test_connections_being_served_are_never_shed(serve: Any) -> None:
    """With every connection in a handler, a newcomer is refused rather than one of them dropped."""
    server, rec = serve(max_connections=2)
    addr = server.server_address
    busy = [socket.create_connection(addr, timeout=WAIT) for _ in range(2)]
    try:
        for b in busy:
            b.sendall(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + WAIT
        while server._in_flight < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with socket.create_connection(addr, timeout=WAIT) as extra:
            extra.sendall(GET_HEALTHY)
            assert closed_by_peer(extra)
        rec.release.set()
        for b in busy:
            reply = read_reply(b.makefile("rb"))
            assert reply is not None and reply.body == b"waited\n"
    finally:
        for b in busy:
            b.close()


def test_a_body_over_the_limit_is_never_parsed_as_a_request(serve: Any) -> None:
    """An oversized body is answered 413 and the connection closed: a request hidden in it never runs."""
    server, rec = serve()
    hidden = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nhidden"
    body = hidden + b"x" * 2000
    data = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    replies = exchange(server.server_address, data, replies=2)
    assert replies[0] is not None and replies[0].status == 413
    assert replies[0].headers["connection"] == "close"
    assert replies[1] is None
    assert rec.seen == []


def test_a_chunked_body_over_the_limit_closes_the_connection(serve: Any) -> None:
    server, rec = serve()
    chunk = b"x" * 900
    data = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"384\r\n" + chunk + b"\r\n") * 3
    data += b"0\r\n\r\n" + GET_HEALTHY
    replies = exchange(server.server_address, data, replies=2)
    assert replies[0] is not None and replies[0].status == 413
    assert replies[1] is None
    assert rec.seen == []


def test_a_small_body_on_an_early_answer_is_drained_and_the_connection_kept(serve: Any) -> None:
    """404 and 405 answers read a small body away, so the next request on the connection is served."""
    server, _ = serve()
    data = (
        b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /-/healthy HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" + GET_HEALTHY
    )
    replies = exchange(server.server_address, data, replies=3)
    assert [r.status if r else None for r in replies] == [404, 405, 200]
    assert replies[1] is not None and replies[1].headers["allow"] == "GET, HEAD"


def test_an_early_answer_to_a_large_body_closes(serve: Any) -> None:
    server, _ = serve()
    n = DISCARD_BODY + 1
    data = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n + b"x" * n + GET_HEALTHY
    replies = exchange(server.server_address, data, replies=2)
    assert replies[0] is not None and replies[0].status == 413
    assert replies[1] is None


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /-/healthy\r\n\r\n", 400),  # no HTTP version
        (b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        (b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
        (b"GET /-/healthy HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /-/healthy HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64 + b"\r\n\r\n", 400),  # TLS on a plain port
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
        (b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
        (b"GET nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ],
)
def test_malformed_requests_get_an_answer_and_a_close(serve: Any, request_bytes: bytes, status: int) -> None:
    server, _ = serve()
    replies = exchange(server.server_address, request_bytes + GET_HEALTHY, replies=2)
    assert replies[0] is not None and replies[0].status == status
    assert replies[0].headers["connection"] == "close"
    assert replies[1] is None
    (after,) = exchange(server.server_address, GET_HEALTHY)
    assert after is not None and after.status == 200


@pytest.mark.parametrize(
    ("accept", "gzipped"),
    [
        ("gzip", True),
        ("gzip, deflate", True),
        ("deflate;q=1, gzip;q=0.5", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("*;q=0", False),
        ("*, gzip;q=0", False),
        ("identity", False),
        ("br", False),
        ("", False),
        (None, False),
    ],
)
def test_content_negotiation_honours_weights(serve: Any, accept: str | None, gzipped: bool) -> None:
    server, _ = serve()
    header = b"" if accept is None else b"Accept-Encoding: " + accept.encode() + b"\r\n"
    (reply,) = exchange(server.server_address, b"GET /big HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n")
    assert reply is not None and reply.status == 200
    assert (reply.headers.get("content-encoding") == "gzip") is gzipped
    assert (gzip.decompress(reply.body) if gzipped else reply.body) == BIG
    assert reply.headers["vary"] == "Accept-Encoding"


def test_head_answers_the_get_headers_without_a_body(serve: Any) -> None:
    server, _ = serve()
    data = b"HEAD /big HTTP/1.1\r\nHost: x\r\n\r\n"
    (reply,) = exchange(server.server_address, data, head_only=True)
    assert reply is not None and reply.status == 200 and reply.headers["content-length"] == str(len(BIG))
    replies = exchange(server.server_address, data + GET_HEALTHY, replies=2, head_only=True)
    assert replies[1] is not None and replies[1].status == 200  # no stray body between the two


def test_expect_100_continue(serve: Any) -> None:
    server, rec = serve()
    with socket.create_connection(server.server_address, timeout=WAIT) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        f = s.makefile("rb")
        interim = read_reply(f)
        assert interim is not None and interim.status == 100
        s.sendall(b"hello")
        reply = read_reply(f)
        assert reply is not None and reply.status == 200 and reply.body == b"POST /echo 5\n"
    with socket.create_connection(server.server_address, timeout=WAIT) as s:  # too large: 413, no 100
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        reply = read_reply(s.makefile("rb"))
        assert reply is not None and reply.status == 413
    assert rec.seen == [("POST", "/echo", b"hello")]


def test_pipelined_requests_are_answered_in_order(serve: Any) -> None:
    server, rec = serve()
    data = b"".join(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b) for b in (b"a", b"", b"ccc")
    )
    replies = exchange(server.server_address, data + GET_HEALTHY, replies=4)
    assert [r.body if r else None for r in replies] == [b"POST /echo 1\n", b"POST /echo 0\n", b"POST /echo 3\n",
                                                         b"Healthy.\n"]  # fmt: skip
    assert [body for _, _, body in rec.seen] == [b"a", b"", b"ccc"]


def test_blocking_handlers_run_off_the_loop_and_max_requests_answers_503(serve: Any) -> None:
    server, rec = serve(max_requests=1)
    addr = server.server_address
    with socket.create_connection(addr, timeout=WAIT) as waiting:
        waiting.sendall(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        assert rec.entered.wait(WAIT)
        (reply,) = exchange(addr, GET_HEALTHY)  # the loop still answers, but the one slot is taken
        assert reply is not None and reply.status == 503 and reply.headers["retry-after"] == "1"
        rec.release.set()
        done = read_reply(waiting.makefile("rb"))
        assert done is not None and done.status == 200
    (reply,) = exchange(addr, GET_HEALTHY)
    assert reply is not None and reply.status == 200


def test_a_failing_handler_is_a_500_and_the_server_goes_on(serve: Any) -> None:
    server, _ = serve()
    replies = exchange(server.server_address, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n" + GET_HEALTHY, replies=2)
    assert [r.status if r else None for r in replies] == [500, 200]


def test_http_1_0_and_connection_close_end_the_connection(serve: Any) -> None:
    server, _ = serve()
    for data in (
        b"GET /-/healthy HTTP/1.0\r\n\r\n",
        b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ):
        replies = exchange(server.server_address, data + GET_HEALTHY, replies=2)
        assert replies[0] is not None and replies[0].status == 200
        assert replies[1] is None


def test_slow_connections_by_the_hundred_cost_no_health_check(serve: Any) -> None:
    """With 500 connections trickling headers, /-/healthy and a 64 KiB body still answer quickly.

    ``benchmarks/bench_http.py`` measures this exactly; here the margin is generous."""
    server, _ = serve()
    addr = server.server_address
    slow = []
    try:
        for i in range(500):
            s = socket.create_connection(addr, timeout=WAIT)
            s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nX-Slow-%d: 1\r\n" % i)
            slow.append(s)
        deadline = time.monotonic() + WAIT
        while server.connections < 500:
            assert time.monotonic() < deadline, f"only {server.connections} slow connections registered"
            time.sleep(0.02)
        for s in slow[::10]:
            s.sendall(b"X-More: 1\r\n")
        for path in (b"/-/healthy", b"/big"):
            t0 = time.monotonic()
            (reply,) = exchange(addr, b"GET %s HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n" % path)
            assert reply is not None and reply.status == 200
            assert time.monotonic() - t0 < 5.0
    finally:
        for s in slow:
            s.close()


# --- property tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[HTTPServer, Recorder]]:
    rec = Recorder()
    routes = [
        Route("/-/healthy", lambda _: Response(200, b"Healthy.\n")),
        Route("/echo", rec.echo, ("GET", "POST"), max_body=1024),
    ]
    server = HTTPServer(("127.0.0.1", 0), routes, limits=Limits(header_timeout=2.0))
    server.start_background()
    yield server, rec
    server.shutdown()
    server.server_close()


def _status_lines(raw: bytes) -> list[int]:
    """The statuses of the responses in ``raw``, parsed one after the other."""
    f = io.BytesIO(raw)
    out = []
    while (reply := read_reply(f)) is not None:
        out.append(reply.status)
    assert f.read() == b""
    return out


def talk(addr: tuple[str, int], data: bytes) -> bytes:
    """Send ``data``, half-close, and read until the server closes (or the client-side timeout)."""
    with socket.create_connection(addr, timeout=WAIT) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_get_a_well_formed_answer_or_a_close(shared: tuple[HTTPServer, Recorder], data: bytes) -> None:
    """Whatever a client sends, every answer starts with a status line, and the server stays up."""
    server, _ = shared
    raw = talk(server.server_address, data)
    assert all(100 <= s < 600 for s in _status_lines(raw))
    (after,) = exchange(server.server_address, GET_HEALTHY)
    assert after is not None and after.status == 200


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
_body = st.binary(max_size=1500)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """One request (bytes) and the body the echo handler should see, or ``None`` when it must be refused."""
    body = draw(_body)
    chunked = draw(st.booleans())
    extra = draw(st.lists(st.tuples(_token, _value), max_size=4))
    lines = [b"POST /echo HTTP/1.1", b"Host: x"]
    lines += [f"X-{k}: {v}".encode() for k, v in extra]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        sizes = draw(st.lists(st.integers(1, 400), max_size=6))
        chunks, rest = [], body
        for n in sizes:
            if rest:
                chunks.append(rest[:n])
                rest = rest[n:]
        if rest:
            chunks.append(rest)
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    else:
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload, (body if len(body) <= 1024 else None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(requests(), min_size=1, max_size=5))
def test_pipelined_requests_with_any_bodies(shared: tuple[HTTPServer, Recorder], reqs: list[Any]) -> None:
    """Requests on one connection are answered in order, each with exactly its own body; the first one
    over the limit is answered 413 and ends the connection, so nothing inside any body ever runs."""
    server, rec = shared
    rec.seen.clear()
    raw = talk(server.server_address, b"".join(r for r, _ in reqs))
    expected_bodies: list[bytes] = []
    expected_status: list[int] = []
    for _, body in reqs:
        if body is None:
            expected_status.append(413)
            break
        expected_bodies.append(body)
        expected_status.append(200)
    assert _status_lines(raw) == expected_status
    assert [b for _, _, b in rec.seen] == expected_bodies


def test_a_body_on_a_route_that_takes_none_is_dropped_and_the_request_served(serve: Any) -> None:
    server, _ = serve()
    data = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /" + GET_HEALTHY
    replies = exchange(server.server_address, data, replies=2)
    assert [r.status if r else None for r in replies] == [200, 200]


def test_bcrypt_checks_wait_in_a_bounded_queue(tmp_path: Any) -> None:
    """One check at a time, one more waiting: the rest get 503 at once rather than queue behind them."""
    import bcrypt

    from mlops_obs.web.config import load

    wc = tmp_path / "web.yml"
    wc.write_text(f"basic_auth_users:\n  u: '{bcrypt.hashpw(b'right', bcrypt.gensalt(rounds=12)).decode()}'\n")
    server = HTTPServer(
        ("127.0.0.1", 0),
        [Route("/-/healthy", lambda _: Response(200, b"Healthy.\n"))],
        web=load(wc),
        limits=Limits(auth_workers=1, auth_queue=1),
    )
    server.start_background()
    try:
        statuses: list[int] = []
        lock = threading.Lock()

        def attempt(i: int) -> None:
            token = base64.b64encode(f"u:wrong{i}".encode())
            (reply,) = exchange(server.server_address, b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n"
                                b"Authorization: Basic %s\r\n\r\n" % token)  # fmt: skip
            with lock:
                statuses.append(reply.status if reply else 0)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert sorted(set(statuses)) == [401, 503], statuses
    finally:
        server.shutdown()
        server.server_close()
