"""Security and operation: TLS, mTLS and bcrypt basic auth from an exporter-toolkit web config,
the telemetry path, the max-requests bound, and reloading by POST /-/reload and SIGHUP."""

from __future__ import annotations

import base64
import gzip
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from mlops_obs.children import free_port
from mlops_obs.exporter.sampler import Sampler
from mlops_obs.exporter.server import ExporterServer
from mlops_obs.web import config as web_config
from tests.test_config import alias_bomb
from tests.test_web_server import talk

WAIT = 20.0
PASSWORD = "s3cret-scrape"
# Cost 4 keeps the tests fast; production hashes use 10 or more (htpasswd -nBC 10).
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


def _openssl_self_signed(directory: Path, name: str, cn: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("certs")
    server_crt, server_key = _openssl_self_signed(d, "server", "localhost")
    client_crt, client_key = _openssl_self_signed(d, "client", "prometheus")
    return {"dir": d, "server_crt": server_crt, "server_key": server_key, "client_crt": client_crt,
            "client_key": client_key}  # fmt: skip


def write_web_config(path: Path, certs: dict[str, Path] | None, users: bool = True, mtls: bool = False) -> Path:
    lines = []
    if certs is not None:
        lines += ["tls_server_config:", f"  cert_file: {certs['server_crt'].name}",
                  f"  key_file: {certs['server_key'].name}"]  # fmt: skip
        if mtls:
            lines += ["  client_auth_type: RequireAndVerifyClientCert", f"  client_ca_file: {certs['client_crt'].name}"]
    if users:
        lines += ["basic_auth_users:", f"  prometheus: '{HASH}'"]
    lines += ["http_server_config:", "  headers:", "    X-Content-Type-Options: nosniff"]
    path.write_text("\n".join(lines) + "\n")
    return path


def client_context(certs: dict[str, Path], with_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["server_crt"]))
    if with_client_cert:
        ctx.load_cert_chain(certs["client_crt"], certs["client_key"])
    return ctx


def get(url: str, auth: tuple[str, str] | None = None, ctx: ssl.SSLContext | None = None,
        method: str = "GET") -> tuple[int, bytes, Any]:  # fmt: skip
    req = urllib.request.Request(url, method=method)
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=WAIT, context=ctx) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def base_overrides(**extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"collector.gpu": False, "collector.host": False, "collector.process": False}
    values.update(extra)
    return values


def test_tls_and_basic_auth(start_exporter: Callable[..., Any], certs: dict[str, Path]) -> None:
    """Right password over TLS: 200; wrong or no password: 401 with a challenge; plain HTTP: refused."""
    wc = write_web_config(certs["dir"] / "web-auth.yml", certs)
    ex = start_exporter(**base_overrides(**{"web.config.file": wc}))
    assert ex.url.startswith("https://")
    ctx = client_context(certs)
    code, body, headers = get(ex.url + "/metrics", ("prometheus", PASSWORD), ctx)
    assert code == 200 and b"mlops_exporter_build_info" in body
    assert headers["X-Content-Type-Options"] == "nosniff"
    code, _, headers = get(ex.url + "/metrics", ("prometheus", "wrong"), ctx)
    assert code == 401 and "Basic" in headers["WWW-Authenticate"]
    assert get(ex.url + "/metrics", ("nobody", PASSWORD), ctx)[0] == 401
    assert get(ex.url + "/metrics", None, ctx)[0] == 401
    assert get(ex.url + "/-/healthy", None, ctx)[0] == 401  # exporter-toolkit guards every path
    # The cached successful check still answers correctly, twice.
    assert get(ex.url + "/-/healthy", ("prometheus", PASSWORD), ctx)[0] == 200
    assert get(ex.url + "/-/healthy", ("prometheus", PASSWORD), ctx)[0] == 200

    host, port = ex.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=WAIT)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        conn.request("GET", "/metrics")
        conn.getresponse()
    conn.close()
    # The server survives the bad client.
    assert get(ex.url + "/-/healthy", ("prometheus", PASSWORD), ctx)[0] == 200


def test_mutual_tls_requires_a_client_certificate(start_exporter: Callable[..., Any], certs: dict[str, Path]) -> None:
    wc = write_web_config(certs["dir"] / "web-mtls.yml", certs, users=False, mtls=True)
    ex = start_exporter(**base_overrides(**{"web.config.file": wc}))
    assert get(ex.url + "/metrics", ctx=client_context(certs, with_client_cert=True))[0] == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        get(ex.url + "/metrics", ctx=client_context(certs, with_client_cert=False))


def test_basic_auth_without_tls(start_exporter: Callable[..., Any], tmp_path: Path) -> None:
    wc = write_web_config(tmp_path / "web.yml", None)
    ex = start_exporter(**base_overrides(**{"web.config.file": wc}))
    assert get(ex.url + "/metrics")[0] == 401
    assert get(ex.url + "/metrics", ("prometheus", PASSWORD))[0] == 200


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("basic_auth_user:\n  a: b\n", "unknown key 'basic_auth_user'"),
        ("basic_auth_users:\n  a: plaintext\n", "'a' has no bcrypt hash"),
        ("tls_server_config:\n  cert_file: x.crt\n", "cert_file and key_file are both required"),
        ("tls_server_config:\n  cert_file: x.crt\n  key_file: x.key\n", "cannot load"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: SSL3\n", "min_version must be one of"),
        ("- a\n", "must hold a mapping"),
    ],
)
def test_bad_web_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "web.yml"
    p.write_text(text)
    with pytest.raises(web_config.WebConfigError, match=message.replace("(", r"\(")) as e:
        web_config.load(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_custom_telemetry_path(start_exporter: Callable[..., Any]) -> None:
    ex = start_exporter(**base_overrides(**{"web.telemetry-path": "/custom/metrics"}))
    assert get(ex.url + "/custom/metrics")[0] == 200
    assert get(ex.url + "/metrics")[0] == 404
    assert get(ex.url + "/custom/metrics", method="POST")[0] == 405


def test_max_requests_bound_answers_503() -> None:
    """Over --web.max-requests, a request is refused at once with 503, and served again afterwards."""

    class _Log:
        def __getattr__(self, name: str) -> Callable[..., None]:
            return lambda *a, **k: None

    entered, release = threading.Event(), threading.Event()

    def slow_reload() -> tuple[bool, str]:
        entered.set()
        release.wait(WAIT)
        return True, "done"

    sampler = Sampler([], interval=1.0, deadline=1.0, log=_Log())
    server = ExporterServer(
        ("127.0.0.1", 0), sampler, log=_Log(), max_requests=1, on_reload=slow_reload, lifecycle=True
    )
    server.start_background()
    try:
        results: list[int] = []
        t = threading.Thread(target=lambda: results.append(get(server.url + "/-/reload", method="POST")[0]))
        t.start()
        assert entered.wait(WAIT)
        code, body, headers = get(server.url + "/metrics")
        assert code == 503 and b"max-requests" in body and headers["Retry-After"] == "1"
        release.set()
        t.join(WAIT)
        assert results == [200]
        # The reload handler frees its slot just after its response is written, so this client can be
        # a moment ahead of the release: the slot must come back, not necessarily at once.
        deadline = time.monotonic() + WAIT
        while (code := get(server.url + "/metrics")[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert code == 200
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_post_reload_applies_new_web_config_and_keeps_old_on_error(
    start_exporter: Callable[..., Any], tmp_path: Path
) -> None:
    wc = tmp_path / "web.yml"
    wc.write_text("http_server_config:\n  headers:\n    X-Test: one\n")
    ex = start_exporter(**base_overrides(**{"web.config.file": wc, "web.enable-lifecycle": True}))
    assert get(ex.url + "/metrics")[0] == 200
    assert get(ex.url + "/-/reload")[0] == 405  # a GET must not reload

    write_web_config(wc, None)
    code, body, _ = get(ex.url + "/-/reload", method="POST")
    assert code == 200 and b"reloaded" in body
    assert get(ex.url + "/metrics")[0] == 401
    assert get(ex.url + "/metrics", ("prometheus", PASSWORD))[0] == 200

    wc.write_text("basic_auth_users:\n  prometheus: not-a-hash\n")
    code, body, _ = get(ex.url + "/-/reload", method="POST", auth=("prometheus", PASSWORD))
    assert code == 500 and b"no bcrypt hash" in body
    # Still guarded by the last good configuration.
    assert get(ex.url + "/metrics")[0] == 401
    assert get(ex.url + "/metrics", ("prometheus", PASSWORD))[0] == 200


@pytest.fixture
def cli_exporter(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], str]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("MLOPS_OBS_")}
        p = subprocess.Popen(
            [sys.executable, "-m", "mlops_obs", "exporter", f"--web.listen-address=127.0.0.1:{port}",
             "--no-collector.gpu", "--no-collector.process", "--sampler.interval=0.2s", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )  # fmt: skip
        procs.append(p)
        return p, f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(WAIT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_status(url: str, expected: int, auth: tuple[str, str] | None = None) -> None:
    deadline = time.monotonic() + WAIT
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = get(url, auth)[0]
            if last == expected:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} never answered {expected} (last: {last})")


def test_sighup_reloads_web_and_config_file(cli_exporter: Any, tmp_path: Path) -> None:
    """The real command: SIGHUP re-reads the web config and the YAML config file; SIGTERM exits 0."""
    wc = tmp_path / "web.yml"
    wc.write_text("{}\n")
    cf = tmp_path / "exporter.yml"
    cf.write_text(f"web:\n  config.file: {wc}\n  telemetry-path: /metrics\n")
    proc, url = cli_exporter(f"--config.file={cf}")
    wait_status(url + "/metrics", 200)

    write_web_config(wc, None)
    # The listen address is a flag, which a file never overrides; enabling collectors needs a restart.
    cf.write_text(
        f"web:\n  config.file: {wc}\n  telemetry-path: /prom\n  listen-address: 127.0.0.1:1\n"
        "collector:\n  training: false\n"
    )
    proc.send_signal(signal.SIGHUP)
    wait_status(url + "/prom", 200, ("prometheus", PASSWORD))
    assert get(url + "/prom")[0] == 401
    assert get(url + "/metrics", ("prometheus", PASSWORD))[0] == 404

    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=WAIT)[0].decode()
    assert proc.returncode == 0
    assert "were not applied" in out and "collector.training" in out
    assert "web.listen-address" not in out.split("were not applied", 1)[1]


def test_bad_web_config_at_start_exits_non_zero(cli_exporter: Any, tmp_path: Path) -> None:
    wc = tmp_path / "web.yml"
    wc.write_text("basic_auth_users:\n  alice: hunter2\n")
    proc, _ = cli_exporter(f"--web.config.file={wc}")
    out = proc.communicate(timeout=WAIT)[0].decode()
    assert proc.returncode == 1
    assert "alice" in out and "no bcrypt hash" in out
    assert "Traceback" not in out


def test_prometheus_scrapes_through_tls_and_basic_auth(
    start_exporter: Callable[..., Any], certs: dict[str, Path], tmp_path: Path
) -> None:
    """A real Prometheus, configured as users would (https, ca_file, basic_auth), scrapes the exporter."""
    from mlops_obs.children.prometheus import PrometheusProcess
    from tests.conftest import require_binary

    require_binary("prometheus")
    wc = write_web_config(certs["dir"] / "web-prom.yml", certs)
    ex = start_exporter(**base_overrides(**{"web.config.file": wc}))
    target = ex.url.split("//", 1)[1]
    (tmp_path / "password").write_text(PASSWORD)

    class SecurePrometheus(PrometheusProcess):
        def config(self) -> dict[str, Any]:
            cfg = super().config()
            cfg["scrape_configs"][0].update(
                {
                    "scheme": "https",
                    "tls_config": {"ca_file": str(certs["server_crt"]), "server_name": "localhost"},
                    "basic_auth": {"username": "prometheus", "password_file": str(tmp_path / "password")},
                }
            )
            return cfg

    with SecurePrometheus(tmp_path / "prom", [target]) as prom:
        prom.wait_for('mlops_exporter_build_info{job="mlops-obs"}', timeout=WAIT)
        health = prom.targets_health()
        assert [t["health"] for t in health] == ["up"], health


def test_node_exporter_accepts_the_same_web_config(certs: dict[str, Path], tmp_path: Path) -> None:
    """The file format is exporter-toolkit's: node_exporter serves with the very file we load."""
    from tests.conftest import require_binary

    binary = require_binary("prometheus-node-exporter")
    wc = write_web_config(certs["dir"] / "web-node.yml", certs)
    assert web_config.load(wc).tls
    port = free_port()
    p = subprocess.Popen(
        [binary, f"--web.config.file={wc}", f"--web.listen-address=127.0.0.1:{port}",
         "--collector.disable-defaults", "--collector.loadavg"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url, ctx = f"https://127.0.0.1:{port}/metrics", client_context(certs)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                code = get(url, ("prometheus", PASSWORD), ctx)[0]
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and p.poll() is None, "node_exporter did not start"
                time.sleep(0.05)
        assert code == 200
        assert get(url, ("prometheus", "wrong"), ctx)[0] == 401
    finally:
        p.terminate()
        p.wait(WAIT)


def test_reload_reaches_collector_settings(start_exporter: Callable[..., Any], tmp_path: Path) -> None:
    """A reload re-reads --config.file: new file-system paths and deadline apply without a restart."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "logs").mkdir()
    cf = tmp_path / "exporter.yml"
    cf.write_text(f"host:\n  filesystem-paths: [{tmp_path / 'ckpt'}]\n")
    ex = start_exporter(**base_overrides(**{"collector.host": True, "config.file": cf, "web.enable-lifecycle": True}))
    wait_status(ex.url + "/-/ready", 200)
    assert f'path="{tmp_path / "ckpt"}"'.encode() in get(ex.url + "/metrics")[1]

    cf.write_text(f"host:\n  filesystem-paths: [{tmp_path / 'logs'}]\ncollector:\n  deadline: 3s\n")
    code, body, _ = get(ex.url + "/-/reload", method="POST")
    assert code == 200 and b"restart" not in body, body
    assert ex.sampler.deadline == 3.0
    want = f'path="{tmp_path / "logs"}"'.encode()
    deadline = time.monotonic() + WAIT
    while want not in (metrics := get(ex.url + "/metrics")[1]):
        assert time.monotonic() < deadline, "new path never reported"
        time.sleep(0.05)
    assert f'path="{tmp_path / "ckpt"}"'.encode() not in metrics

    cf.write_text("host:\n  filesystem-paths: {not: a list}\n")
    code, body, _ = get(ex.url + "/-/reload", method="POST")
    assert code == 500 and b"host.filesystem-paths" in body


# --- hostile clients (issue 11, "HTTP") --------------------------------------------------------------------


def _raw(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def _read_status(sock: socket.socket) -> bytes:
    """The status line of the first answer on ``sock``, or b"" when the server closed without one."""
    f = sock.makefile("rb")
    try:
        return f.readline().rstrip()
    except (ConnectionResetError, TimeoutError):
        return b""


def test_slow_header_clients_do_not_lock_out_health_checks_or_scrapes(start_exporter: Callable[..., Any]) -> None:
    """500 connections that each trickle header lines: /-/healthy and /metrics still answer (under 1 s
    here, measured by benchmarks/bench_http.py; the margin below is for a busy machine)."""
    ex = start_exporter(**base_overrides())
    addr = _raw(ex.url)
    slow: list[socket.socket] = []
    try:
        for i in range(500):
            s = socket.create_connection(addr, timeout=WAIT)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow-%d: 1\r\n" % i)
            slow.append(s)
        for s in slow:
            s.sendall(b"X-Still-Here: 1\r\n")
        for path in ("/-/healthy", "/metrics"):
            t0 = time.monotonic()
            code, body, _ = get(ex.url + path)
            assert code == 200 and body
            assert time.monotonic() - t0 < 5.0
    finally:
        for s in slow:
            s.close()


def test_idle_tcp_connections_on_the_tls_port_lock_out_no_one(
    start_exporter: Callable[..., Any], certs: dict[str, Path]
) -> None:
    """Connections that never start a TLS handshake (no credentials needed) do not keep Prometheus out."""
    wc = write_web_config(certs["dir"] / "web-idle.yml", certs)
    ex = start_exporter(**base_overrides(**{"web.config.file": wc}))
    idle = [socket.create_connection(_raw(ex.url), timeout=WAIT) for _ in range(300)]
    try:
        assert get(ex.url + "/metrics", ("prometheus", PASSWORD), client_context(certs))[0] == 200
    finally:
        for s in idle:
            s.close()


def test_a_request_smuggled_in_an_oversized_body_never_runs(start_exporter: Callable[..., Any]) -> None:
    """A POST /-/reload hidden in a >64 KiB POST /-/healthy body is not served as the next request."""
    ex = start_exporter(**base_overrides(**{"web.enable-lifecycle": True}))
    reloads: list[int] = []
    real = ex.server.on_reload
    ex.server.on_reload = lambda: (reloads.append(1), real())[1]
    smuggled = b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    body = smuggled + b"x" * (70_000 - len(smuggled))
    answer = talk(_raw(ex.url), b"POST /-/healthy HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert answer.count(b"HTTP/1.1 ") == 1
    assert reloads == []
    assert get(ex.url + "/-/reload", method="POST")[0] == 200  # the endpoint itself works
    assert reloads == [1]


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET /metrics\r\n\r\n", b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"],
    ids=["no-version", "bad-content-length"],
)
def test_malformed_requests_are_answered_400(start_exporter: Callable[..., Any], request_bytes: bytes) -> None:
    ex = start_exporter(**base_overrides())
    with socket.create_connection(_raw(ex.url), timeout=WAIT) as s:
        s.sendall(request_bytes)
        assert _read_status(s).startswith(b"HTTP/1.1 400")


def test_gzip_with_zero_weight_gets_identity(start_exporter: Callable[..., Any]) -> None:
    ex = start_exporter(**base_overrides(**{"collector.host": True}))
    wait_status(ex.url + "/-/ready", 200)
    for accept, encoded in (("gzip;q=0", False), ("gzip;q=0.5", True), ("identity, gzip;q=0", False)):
        req = urllib.request.Request(ex.url + "/metrics", headers={"Accept-Encoding": accept})
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            body = r.read()
            assert (r.headers.get("Content-Encoding") == "gzip") is encoded, accept
        assert (gzip.decompress(body) if encoded else body).startswith(b"# HELP")


def test_a_password_over_72_bytes_is_401_and_the_connection_lives(
    start_exporter: Callable[..., Any], tmp_path: Path
) -> None:
    wc = write_web_config(tmp_path / "web.yml", None)
    ex = start_exporter(**base_overrides(**{"web.config.file": wc}))
    conn = http.client.HTTPConnection(*_raw(ex.url), timeout=WAIT)
    for password in ("x" * 73, PASSWORD + "y" * 70, PASSWORD):
        token = base64.b64encode(f"prometheus:{password}".encode()).decode()
        conn.request("GET", "/-/healthy", headers={"Authorization": "Basic " + token})
        r = conn.getresponse()
        r.read()
        assert r.status == (200 if password == PASSWORD else 401)
    conn.close()


def _auth_seconds(url: str, user: str, password: str) -> float:
    t0 = time.perf_counter()
    assert get(url, (user, password))[0] == 401
    return time.perf_counter() - t0


def test_wrong_user_and_wrong_password_cost_the_same(start_exporter: Callable[..., Any], tmp_path: Path) -> None:
    """With a cost-12 hash, an unknown user is checked at cost 12 too: timing does not tell users apart."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=12)).decode()
    wc = tmp_path / "web.yml"
    wc.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    ex = start_exporter(**base_overrides(**{"web.config.file": wc}))
    url = ex.url + "/-/healthy"
    # Fresh passwords every time: a refused pair is remembered, and must not make this test vacuous.
    # Interleaved, and the fastest of each kept: a busy machine only ever adds time.
    wrong_user: list[float] = []
    wrong_password: list[float] = []
    for i in range(4):
        wrong_user.append(_auth_seconds(url, f"nobody{i}", f"guess{i}"))
        wrong_password.append(_auth_seconds(url, "prometheus", f"guess{i}"))
    assert min(wrong_password) > 0.02  # a real cost-12 check happened
    ratio = min(wrong_user) / min(wrong_password)
    assert 0.5 < ratio < 2.0, (wrong_user, wrong_password)


def test_wrong_password_flood_does_not_slow_scrapes(cli_exporter: Any, tmp_path: Path) -> None:
    """16 clients sending wrong passwords as fast as they can (cost-10 hashes): scrapes with the right
    one (verified once, then cached) stay fast, because the checks run on one worker off the loop."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    wc = tmp_path / "web.yml"
    wc.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    _, url = cli_exporter(f"--web.config.file={wc}")
    wait_status(url + "/metrics", 200, ("prometheus", PASSWORD))
    stop = threading.Event()
    refused: list[int] = []

    def flood(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                refused.append(get(url + "/metrics", ("prometheus", f"wrong-{n}-{i}"))[0])
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass

    threads = [threading.Thread(target=flood, args=(n,), daemon=True) for n in range(16)]
    for t in threads:
        t.start()
    try:
        while len(refused) < 16:
            time.sleep(0.01)
        latencies = []
        for _ in range(20):
            t0 = time.perf_counter()
            assert get(url + "/metrics", ("prometheus", PASSWORD))[0] == 200
            latencies.append(time.perf_counter() - t0)
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT)
    assert 401 in refused
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.1, latencies
    assert latencies[-1] < 1.0, latencies


def test_lifecycle_endpoints_are_off_by_default(cli_exporter: Any) -> None:
    proc, url = cli_exporter()
    wait_status(url + "/-/healthy", 200)
    for path in ("/-/reload", "/-/quit"):
        code, body, _ = get(url + path, method="POST")
        assert code == 403 and b"--web.enable-lifecycle" in body
    assert proc.poll() is None


def test_quit_with_lifecycle_enabled_stops_the_exporter(cli_exporter: Any) -> None:
    proc, url = cli_exporter("--web.enable-lifecycle")
    wait_status(url + "/-/healthy", 200)
    assert get(url + "/-/reload", method="POST")[0] == 200
    assert get(url + "/-/quit", method="GET")[0] == 405
    code, body, _ = get(url + "/-/quit", method="POST")
    assert code == 200 and b"Goodbye" in body
    assert proc.wait(WAIT) == 0


# --- reloads (issue 11, "Reload") ---------------------------------------------------------------------------


def _reload_metrics(
    url: str, auth: tuple[str, str] | None = None, ctx: ssl.SSLContext | None = None
) -> dict[str, float]:
    body = get(url + "/metrics", auth, ctx)[1].decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in body.splitlines()
        if line.startswith("mlops_web_config_last_reload")
    }


def test_an_empty_web_config_on_sighup_keeps_tls_and_auth(cli_exporter: Any, certs: dict[str, Path]) -> None:
    """A web config truncated to nothing (or to comments) while TLS and auth are on is refused on
    SIGHUP: the port stays guarded, the refusal is logged and shows in the reload metrics."""
    wc = write_web_config(certs["dir"] / "web-sighup.yml", certs)
    proc, url = cli_exporter(f"--web.config.file={wc}")
    url = url.replace("http://", "https://")
    ctx = client_context(certs)
    auth = ("prometheus", PASSWORD)
    wait_status_tls = time.monotonic() + WAIT
    while True:
        try:
            if get(url + "/-/healthy", auth, ctx)[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < wait_status_tls, "exporter never came up"
        time.sleep(0.05)
    first = _reload_metrics(url, auth, ctx)
    assert first["mlops_web_config_last_reload_successful"] == 1

    for text in ("", "# all commented out\n# tls_server_config:\n"):
        wc.write_text(text)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while _reload_metrics(url, auth, ctx)["mlops_web_config_last_reload_successful"] != 0:
            assert time.monotonic() < deadline, "the failed reload never showed"
            time.sleep(0.05)
        assert get(url + "/metrics", None, ctx)[0] == 401
        write_web_config(wc, certs)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while (m := _reload_metrics(url, auth, ctx))["mlops_web_config_last_reload_successful"] != 1:
            assert time.monotonic() < deadline, "the good reload never showed"
            time.sleep(0.05)
        assert (
            m["mlops_web_config_last_reload_success_timestamp_seconds"]
            >= first["mlops_web_config_last_reload_success_timestamp_seconds"]
        )
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=WAIT)[0].decode()
    assert out.count("reload failed") == 2 and "is empty" in out


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("http_server_config:\n  headers:\n    X-A: b\n", "turn basic authentication off"),
        ("{}\n", "turn basic authentication off"),
    ],
)
def test_a_reload_that_would_drop_auth_is_refused(
    start_exporter: Callable[..., Any], tmp_path: Path, text: str, why: str
) -> None:
    wc = write_web_config(tmp_path / "web.yml", None)
    ex = start_exporter(**base_overrides(**{"web.config.file": wc}))
    wc.write_text(text)
    ok, message = ex.reload()
    assert not ok and why in message
    assert get(ex.url + "/metrics")[0] == 401
    assert ex.server.reloads.successful is False


def test_a_reload_that_would_drop_tls_or_client_certificates_is_refused(certs: dict[str, Path], tmp_path: Path) -> None:
    tls = web_config.load(write_web_config(certs["dir"] / "web-a.yml", certs, users=False))
    mtls = web_config.load(write_web_config(certs["dir"] / "web-b.yml", certs, users=False, mtls=True))
    plain = write_web_config(certs["dir"] / "web-c.yml", None)
    with pytest.raises(web_config.WebConfigError, match="turn TLS off"):
        web_config.load_for_reload(tls, plain)
    with pytest.raises(web_config.WebConfigError, match="turn TLS off"):
        web_config.load_for_reload(tls, None)
    with pytest.raises(web_config.WebConfigError, match="client certificates"):
        web_config.load_for_reload(mtls, certs["dir"] / "web-a.yml")
    assert web_config.load_for_reload(tls, certs["dir"] / "web-b.yml").tls  # strengthening is fine


def test_a_yaml_alias_bomb_in_the_web_config_is_refused(cli_exporter: Any, tmp_path: Path) -> None:
    wc = tmp_path / "web.yml"
    wc.write_text(f"http_server_config:\n  headers:\n    X-Bomb: {alias_bomb()}\n")
    with pytest.raises(web_config.WebConfigError, match="aliases"):
        web_config.load(wc)
    proc, _ = cli_exporter(f"--web.config.file={wc}")
    out = proc.communicate(timeout=WAIT)[0].decode()
    assert proc.returncode == 1 and "aliases" in out and "Traceback" not in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("basic_auth_users:\n  a: '$2b$04$short'\n", "invalid bcrypt hash"),
        ("basic_auth_users:\n  a: '$2b$17$" + "a" * 53 + "'\n", "has cost 17"),
        ("http_server_config:\n  headers:\n    'Bad Header': x\n", "bad header"),
        ("http_server_config:\n  headers:\n    Content-Length: '0'\n", "is set by the server"),
    ],
)
def test_more_web_configs_that_are_refused(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "web.yml"
    p.write_text(text)
    with pytest.raises(web_config.WebConfigError, match=message) as e:
        web_config.load(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_reload_metrics_are_served(start_exporter: Callable[..., Any]) -> None:
    before = time.time()
    ex = start_exporter(**base_overrides())
    m = _reload_metrics(ex.url)
    assert m["mlops_web_config_last_reload_successful"] == 1
    assert before - 1 <= m["mlops_web_config_last_reload_success_timestamp_seconds"] <= time.time() + 1
