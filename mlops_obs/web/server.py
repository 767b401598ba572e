"""The one HTTP/1.1 server of the project: asyncio connections, h11 parsing, routes in, bytes out.

Why this shape: a sidecar port is reachable by everything on the pod network, and the threaded
``http.server`` it replaces gave a thread to every connection, so ~170 clients trickling a header
line every few seconds exhausted it. Here an idle or slow connection is a few KiB of buffers on one
event loop, and every HTTP rule (framing, ``Content-Length``, chunked bodies, keep-alive, HEAD)
is h11's, the parser uvicorn builds on, not ours. Our part is the policy:

* **Deadlines.** A connection's first request line and headers (TLS handshake included) must be
  complete within ``header_timeout`` of the accept, in total, however the bytes trickle in. A
  kept-alive connection may sit idle for ``idle_timeout``; from the first byte of its next request
  the same header deadline runs. A body has ``body_timeout`` in total, a response ``write_timeout``.
* **A connection budget that sheds the idle.** At ``max_connections`` open, a new connection
  closes the one that has waited longest for a request (an idle keep-alive, a slow client), never
  one being served, so a health check or a scrape always gets in. The budget also stays under the
  process's file-descriptor limit.
* **Bodies.** A body is read only when its route takes one, up to the route's ``max_body``; a
  larger one is answered 413 and the connection closed, so its bytes are never parsed as a
  request. A response sent before a body was read (401, 404, 503) drains a small body or closes.
* **Malformed requests** (no HTTP version, ``Content-Length: abc``, oversized headers) get the
  400/413/431 h11 names and the connection is closed.
* **Basic auth** through :class:`~mlops_obs.web.config.WebConfig`: cached verdicts on the loop,
  the bcrypt checks on one worker thread, at most ``auth_queue`` waiting (503 beyond), so a flood
  of wrong passwords costs at most one core and never blocks the loop that serves scrapes.
* **Concurrency.** At most ``max_requests`` requests in a handler at once (``--web.max-requests``):
  one more gets 503 at once. A body is read before its request takes a slot, so clients trickling
  bodies hold none; the bodies being received hold at most ``max_body_buffer`` bytes together.
  Handlers marked ``blocking`` (file I/O, stores, reloads) run on worker threads; the others run on
  the loop and must only read memory.
* **Content negotiation.** gzip only when ``Accept-Encoding`` gives it a non-zero weight.

The loop runs on its own thread, so the threaded rest of the exporter (and the tests) use it the
way they used ``ThreadingHTTPServer``: construct (binds), :meth:`start_background`, :meth:`shutdown`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import resource
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import h11

from mlops_obs.web.config import WebConfig
from mlops_obs.web.headers import accepts_gzip, basic_credentials

TEXT = "text/plain; charset=utf-8"
# A body on a request whose route takes none (or got an early answer) is read and dropped up to
# this size so the connection stays usable; a larger one closes the connection.
DISCARD_BODY = 64 * 1024
_RECV = 65536
# Bodies shorter than this are not worth a gzip header (and most are error messages).
GZIP_MIN = 1024
# How long, and for how many bytes, a connection closed on an error keeps reading what the client
# still sends, so that its answer is not lost to a reset (see ``_close_with``).
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 * 1024
# File descriptors kept free of the connection budget: logs, the files collectors open, NVML.
_FD_RESERVE = 64


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    path: str
    query: str
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    client: str
    user: str | None = None  # the basic-auth user, when the port has users


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: dict[str, str] = field(default_factory=dict)
    # The gzip of ``body`` when the handler has a cheaper way to it than compressing it whole
    # (the exporter's :class:`~mlops_obs.exporter.server.PieceGzip`).
    gzipped: Callable[[], bytes] | None = None


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class Route:
    path: str
    handler: Handler
    methods: tuple[str, ...] = ("GET", "HEAD")
    blocking: bool = False  # run on a worker thread: the handler may wait on files, locks, stores
    max_body: int = 0  # largest request body the handler takes; over it: 413, connection closed


@dataclass(frozen=True)
class Limits:
    max_requests: int = 40  # requests in a handler at once; 0: no limit
    max_connections: int = 1024  # open connections; a new one sheds the longest-waiting idle one
    header_timeout: float = 10.0  # request line + headers (+ TLS handshake on a new connection), in total
    idle_timeout: float = 120.0  # a kept-alive connection waiting for its next request
    body_timeout: float = 30.0
    write_timeout: float = 30.0
    max_header_bytes: int = 16 * 1024
    auth_workers: int = 1  # bcrypt checks at once
    auth_queue: int = 16  # bcrypt checks waiting; more get 503
    max_body_buffer: int = 64 * 1024 * 1024  # request body bytes held at once, all connections; more: 503, closed


class _Closing(Exception):
    """Answer with this response, then close the connection (the request's bytes cannot be trusted)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Conn:
    __slots__ = ("client", "transport")

    def __init__(self, transport: asyncio.WriteTransport, client: str) -> None:
        self.transport = transport
        self.client = client


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _fd_budget() -> int:
    """How many connections the process's descriptor limit allows, after raising the soft limit to
    the hard one (what Go does at start for node_exporter)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        elif soft == resource.RLIM_INFINITY:
            return 1 << 20
    except (ValueError, OSError):
        return 1024
    return max(16, soft - _FD_RESERVE)


class HTTPServer:
    """Serves ``routes`` (path -> :class:`Route`) on ``address``; binds in the constructor (``OSError``)."""

    def __init__(
        self,
        address: tuple[str, int],
        routes: Iterable[Route] = (),
        *,
        web: WebConfig | None = None,
        limits: Limits = Limits(),
        log: Any = None,
        server_header: str = "mlops-obs",
        name: str = "http",
    ) -> None:
        self.web = web or WebConfig()
        self.log = log
        self.limits = limits
        self.name = name
        self.server_header = server_header
        self.routes = {r.path: r for r in routes}
        self.max_requests = limits.max_requests
        self.max_connections = min(limits.max_connections, _fd_budget())
        self._in_flight = 0
        self._auth_waiting = 0
        self._body_bytes = 0  # request body bytes received and not yet handed to a handler
        self._conns: dict[_Conn, None] = {}
        self._waiting: OrderedDict[_Conn, None] = OrderedDict()  # connections between requests, oldest first
        self._date = (0, b"")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Future[None] | None = None
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._bcrypt: concurrent.futures.ThreadPoolExecutor | None = None
        self.socket = _listen(address)

    # --- public, thread-safe -------------------------------------------------------------------------

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.server_address
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1" if host != "::" else "::1"
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.web.tls else 'http'}://{shown}:{port}"

    @property
    def connections(self) -> int:
        return len(self._conns)

    def set_max_requests(self, n: int) -> None:
        self.max_requests = n

    def start_background(self) -> threading.Thread:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self.name, daemon=True)
        self._thread.start()
        ready.wait()
        return self._thread

    def shutdown(self) -> None:
        """Stop accepting, close every connection, and wait for the loop's thread to end."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_resolve, stop)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def server_close(self) -> None:
        self.socket.close()

    # --- the loop ------------------------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        workers = self.max_requests if self.max_requests > 0 else 32
        self._workers = concurrent.futures.ThreadPoolExecutor(min(workers, 64), thread_name_prefix=self.name)
        self._bcrypt = concurrent.futures.ThreadPoolExecutor(self.limits.auth_workers, thread_name_prefix="bcrypt")
        try:
            loop.run_until_complete(self._main(ready))
        finally:
            ready.set()
            self._workers.shutdown(wait=False, cancel_futures=True)
            self._bcrypt.shutdown(wait=False, cancel_futures=True)
            loop.close()

    async def _main(self, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        server = await asyncio.start_server(self._connection, sock=self.socket, backlog=1024, limit=_RECV)
        ready.set()
        try:
            await self._stop
        finally:
            server.close()
            for conn in list(self._conns):
                conn.transport.abort()
            tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _admit(self, conn: _Conn) -> bool:
        if len(self._conns) >= self.max_connections:
            victim = next(iter(self._waiting), None)
            if victim is None:
                return False  # every connection is being served: the newcomer waits its turn elsewhere
            self._forget(victim)
            victim.transport.abort()
        self._conns[conn] = None
        self._waiting[conn] = None
        return True

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn, None)
        self._waiting.pop(conn, None)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = _Conn(writer.transport, str(peer[0]) if peer else "")
        if not self._admit(conn):
            writer.transport.abort()
            return
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            await self._serve(conn, reader, writer)
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
            pass  # the client's problem: a slow or vanished client, a failed handshake
        except asyncio.CancelledError:
            pass  # the server is stopping; ending normally keeps asyncio from logging the cancellation
        except Exception as e:
            if self.log is not None:
                self.log.error("http connection failed", client=conn.client, error=f"{type(e).__name__}: {e}")
        finally:
            self._forget(conn)
            writer.transport.abort()

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.header_timeout
        ctx = self.web.ssl_context
        if ctx is not None:
            async with asyncio.timeout_at(deadline):
                await writer.start_tls(ctx)
        h = self._parser()
        first = True
        while True:
            try:
                event = await self._read_head(h, reader, deadline if first else None)
            except h11.RemoteProtocolError as e:
                await self._close_with(conn, reader, writer, e.error_status_hint, "Malformed request.")
                return
            except TimeoutError:
                if h.trailing_data[0] or first:  # a request had begun, or never came on a new connection
                    await self._close_with(conn, reader, writer, 408, "Request header deadline exceeded.")
                return
            if not isinstance(event, h11.Request):
                return  # the client closed
            first = False
            self._waiting.pop(conn, None)
            try:
                keep = await self._exchange(h, event, conn, reader, writer)
            except _Closing as e:  # raised only before an answer was written
                await self._close_with(conn, reader, writer, e.status, str(e))
                return
            except h11.RemoteProtocolError as e:
                await self._close_with(conn, reader, writer, e.error_status_hint, "Malformed request body.")
                return
            if not keep:
                return
            h = self._parser(*h.trailing_data)  # with what the client pipelined after this request
            self._waiting[conn] = None  # the newest of the waiting: shed last

    def _parser(self, pending: bytes = b"", closed: bool = False) -> h11.Connection:
        """A fresh h11 parser for one request.

        h11 parses; the answers are written here (they are always ours, with a Content-Length), so
        one parser a request spares h11's response bookkeeping on every scrape.
        """
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        if pending:
            h.receive_data(pending)
        if closed:
            h.receive_data(b"")
        return h

    async def _read_head(self, h: h11.Connection, reader: asyncio.StreamReader, deadline: float | None) -> Any:
        """The next event before the request's body: a Request, or ConnectionClosed.

        ``deadline`` (loop time) bounds the whole head; ``None`` means a kept-alive connection,
        which may wait ``idle_timeout`` for a first byte, then has ``header_timeout`` for the rest.
        """
        loop = asyncio.get_running_loop()
        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event
            if deadline is None:
                if h.trailing_data[0]:
                    deadline = loop.time() + self.limits.header_timeout
                else:
                    async with asyncio.timeout(self.limits.idle_timeout):
                        data = await reader.read(_RECV)
                    h.receive_data(data)
                    if data:
                        deadline = loop.time() + self.limits.header_timeout
                    continue
            async with asyncio.timeout_at(deadline):
                data = await reader.read(_RECV)
            h.receive_data(data)

    async def _exchange(
        self,
        h: h11.Connection,
        event: h11.Request,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; whether the connection may carry another."""
        if event.http_version not in (b"1.1", b"1.0"):
            raise _Closing(505, "HTTP version not supported; use HTTP/1.1.")
        # h11 caps a head only while it is incomplete; one that arrived whole is measured here.
        if len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) > self.limits.max_header_bytes:
            raise _Closing(431, "Request header fields too large.")
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("latin-1")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            k, v = name.decode("latin-1"), value.decode("latin-1")
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        if target.startswith("/"):
            path, _, query = target.partition("?")
        elif target.startswith(("http://", "https://")):  # absolute form, as a proxy would send
            parts = urlsplit(target)
            path, query = parts.path or "/", parts.query
        elif target == "*" and method == "OPTIONS":
            path, query = "*", ""
        else:
            raise _Closing(400, "Malformed request target.")
        declared = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        has_body = chunked or (declared is not None and int(declared) > 0)

        route = self.routes.get(path)
        allowed = route is not None and (method in route.methods or (method == "HEAD" and "GET" in route.methods))
        # The handler gets the body when its route takes one; any other body is read and dropped
        # after the answer (up to DISCARD_BODY) so that it is never parsed as a request.
        takes_body = route is not None and allowed and route.max_body > 0
        limit = route.max_body if route is not None and takes_body else DISCARD_BODY
        if declared is not None and int(declared) > limit:
            raise _Closing(413, f"Request body over {limit} bytes.")

        response: Response | None = None
        user: str | None = None
        slot = False
        try:
            if self.web.users:
                verdict, user = await self._authorise(headers.get("authorization"))
                if verdict is None:
                    response = Response(503, b"Authentication is busy; retry.\n", headers={"Retry-After": "1"})
                elif not verdict:
                    response = Response(401, b"Unauthorized\n", headers={"WWW-Authenticate": 'Basic realm="mlops-obs"'})
            if response is None and route is None:
                response = Response(404, b"Not found.\n")
            elif response is None and not allowed:
                assert route is not None
                allow = ", ".join(route.methods)
                response = Response(405, b"Method not allowed.\n", headers={"Allow": allow})
            elif response is None:
                assert route is not None
                # The body is read before the request takes a handler slot, so clients that trickle
                # bodies hold no slot (only their own connection, until body_timeout, and their bytes
                # within max_body_buffer); the check before the read spares reading a body for nothing.
                body = b""
                if not self._busy():
                    if takes_body and has_body:
                        body = await self._read_body(h, reader, writer, limit)
                    elif not has_body:
                        await self._finish_request(h, reader)
                if self._busy():
                    response = Response(
                        503, b"Too many concurrent requests; see --web.max-requests.\n", headers={"Retry-After": "1"}
                    )
                else:
                    self._in_flight += 1
                    slot = True
                    request = Request(method, target, path, query, headers, body, conn.client, user)
                    response = await self._call(route, request)
            # h11 says whether the client keeps the connection (HTTP/1.1 without Connection: close).
            keep = h.their_state is h11.DONE
            if h.their_state not in (h11.DONE, h11.MUST_CLOSE):
                # An early answer: drop a small body so the connection stays usable, or close.
                small = chunked or int(declared or 0) <= DISCARD_BODY
                keep = small and not h.they_are_waiting_for_100_continue and h11.MUST_CLOSE not in h.states.values()
                if keep:
                    try:
                        await self._read_body(h, reader, writer, DISCARD_BODY)
                    except _Closing:
                        keep = False
                    keep = keep and h.their_state is h11.DONE
            self._send(writer, method, headers, response, keep)
        finally:
            if slot:
                self._in_flight -= 1
        if writer.transport.get_write_buffer_size():  # the socket did not take it all at once
            async with asyncio.timeout(self.limits.write_timeout):
                await writer.drain()
        return keep

    def _busy(self) -> bool:
        return bool(self.max_requests) and self._in_flight >= self.max_requests

    async def _authorise(self, header: str | None) -> tuple[bool | None, str | None]:
        """(verdict, user): ``True``/``False``, or ``None`` when too many checks are already waiting."""
        creds = basic_credentials(header)
        if creds is None:
            return False, None
        user, password = creds
        web = self.web
        verdict = web.cached(user, password)
        if verdict is None:
            if self._auth_waiting >= self.limits.auth_queue:
                return None, user
            self._auth_waiting += 1
            try:
                loop = asyncio.get_running_loop()
                verdict = await loop.run_in_executor(self._bcrypt, web.verify, user, password)
            finally:
                self._auth_waiting -= 1
        return verdict, user

    async def _read_body(
        self, h: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int
    ) -> bytes:
        if h.they_are_waiting_for_100_continue:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        parts: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout
        try:
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    try:
                        async with asyncio.timeout_at(deadline):
                            data = await reader.read(_RECV)
                    except TimeoutError:
                        raise _Closing(408, "Request body deadline exceeded.") from None
                    h.receive_data(data)
                    continue
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    self._body_bytes += len(event.data)
                    if size > limit:
                        raise _Closing(413, f"Request body over {limit} bytes.")
                    if self._body_bytes > self.limits.max_body_buffer:
                        raise _Closing(503, "Too many request bodies being received; retry.")
                    parts.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return b"".join(parts)
                else:  # ConnectionClosed mid-body
                    raise ConnectionResetError("client closed during the body")
        finally:
            self._body_bytes -= size

    async def _finish_request(self, h: h11.Connection, reader: asyncio.StreamReader) -> None:
        event = h.next_event()
        if not isinstance(event, h11.EndOfMessage):
            raise _Closing(400, "Malformed request.")

    async def _call(self, route: Route, request: Request) -> Response:
        try:
            if route.blocking:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._workers, route.handler, request)
            return route.handler(request)
        except Exception as e:
            if self.log is not None:
                self.log.error("http handler failed", path=route.path, error=f"{type(e).__name__}: {e}")
            return Response(500, b"Internal error; see the server's log.\n")

    def _http_date(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode())
        return self._date[1]

    def _send(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        request_headers: Mapping[str, str],
        response: Response,
        keep: bool,
    ) -> None:
        body = response.body
        head = [
            b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\nContent-Type: %s\r\n"
            % (response.status, _reason(response.status), self.server_header.encode(), self._http_date(),
               response.content_type.encode())
        ]  # fmt: skip
        if len(body) > GZIP_MIN:
            head.append(b"Vary: Accept-Encoding\r\n")
            if accepts_gzip(request_headers.get("accept-encoding")):
                body = response.gzipped() if response.gzipped is not None else gzip.compress(body, compresslevel=1)
                head.append(b"Content-Encoding: gzip\r\n")
        head.append(b"Content-Length: %d\r\n" % len(body))
        # Header names and values were checked when the web config was loaded; handlers' are ours.
        for k, v in (*self.web.headers.items(), *response.headers.items()):
            head.append(f"{k}: {v}\r\n".encode("latin-1"))
        head.append(b"\r\n" if keep else b"Connection: close\r\n\r\n")
        if method != "HEAD":
            head.append(body)  # headers and body in one write: one segment for a typical scrape
        writer.write(b"".join(head))

    async def _close_with(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, message: str
    ) -> None:
        """A hand-written answer for a request h11 could not (or we would not) parse, then a lingering close.

        Why linger: closing a socket with unread bytes in it makes the kernel send a reset, and a
        reset can destroy the answer before the client reads it. So the sending side is shut and
        what the client still sends is read and dropped, for a bounded time and size. Meanwhile the
        connection counts as idle: the budget may shed it.
        """
        body = (message + "\n").encode()
        head = (
            b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, _reason(status), self.server_header.encode(), self._http_date(), len(body))
        )
        if writer.is_closing():
            return
        writer.write(head + body)
        self._waiting[conn] = None
        try:
            async with asyncio.timeout(LINGER_SECONDS):
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                received = 0
                while received < LINGER_BYTES and (data := await reader.read(_RECV)):
                    received += len(data)
        except (TimeoutError, ConnectionError, OSError):
            pass


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _listen(address: tuple[str, int]) -> socket.socket:
    host, port = address
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
