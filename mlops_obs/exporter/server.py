"""HTTP front of the exporter: the telemetry path, ``/-/healthy``, ``/-/ready``, ``POST /-/reload``, ``/``.

The handler never samples anything: it serves what the :class:`Sampler` already rendered, and the
gzip of an unchanged body is reused. TLS is negotiated on the connection's own thread (not in the
accept loop, where one slow or hostile client would stall every other), basic auth follows
exporter-toolkit's rules (every path, bcrypt, ``WWW-Authenticate`` on 401), and at most
``max_requests`` requests are served at once: over that, 503 at once instead of piling up threads,
as node_exporter's ``--web.max-requests`` does. Open connections are capped at four times that (at
least 16), and idle or slow ones are dropped after ``REQUEST_TIMEOUT`` seconds, so a flood of
sockets cannot hold threads forever.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import html
import socket
import ssl
import struct
import threading
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mlops_obs import __version__
from mlops_obs.exporter.sampler import Sampler
from mlops_obs.exporter.web_config import WebConfig

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_TIMEOUT = 30.0


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        sampler: Sampler,
        telemetry_path: str = "/metrics",
        extra: Callable[[], bytes] | None = None,
        log: Any = None,
        web: WebConfig | None = None,
        max_requests: int = 40,
        on_reload: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        self.sampler = sampler
        self.telemetry_path = telemetry_path
        self.extra = extra
        self.log = log
        self.web = web or WebConfig()
        self.on_reload = on_reload
        self.connections = 0
        self._conn_lock = threading.Lock()
        self.set_max_requests(max_requests)
        self._gzip_cache: tuple[bytes, bytes] | None = None
        self._gzip = PieceGzip()
        super().__init__(address, _Handler)

    def set_max_requests(self, n: int) -> None:
        self.max_requests = n
        self.slots: threading.BoundedSemaphore | None = threading.BoundedSemaphore(n) if n > 0 else None
        # Open connections (each holds a thread, idle keep-alives included) are capped too, so a
        # flood of idle sockets cannot exhaust threads before any request is even read.
        self.max_connections = 0 if n == 0 else max(16, 4 * n)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            if self.max_connections and self.connections >= self.max_connections:
                self.shutdown_request(request)
                return
            self.connections += 1
        try:
            super().process_request(request, client_address)
        except Exception:
            with self._conn_lock:
                self.connections -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self.connections -= 1

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host if isinstance(host, str) else host.decode()
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"{'https' if self.web.tls else 'http'}://{shown}:{port}"

    def start_background(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="exporter-http", daemon=True)
        t.start()
        return t

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        ctx = self.web.ssl_context
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failed handshake or a client that went away is the client's problem: no traceback on stderr."""
        if self.log is not None:
            import sys

            err = sys.exc_info()[1]
            if not isinstance(err, OSError):
                self.log.error("http handler failed", client=str(client_address[0]), error=repr(err))

    def body_gzip(self, body: bytes) -> bytes:
        cached = self._gzip_cache
        if cached is not None and cached[0] is body:
            return cached[1]
        parts_of = getattr(self.sampler, "parts", None)
        parts = parts_of(body) if parts_of is not None else None
        z = self._gzip.compress(parts) if parts is not None else gzip.compress(body, compresslevel=1)
        self._gzip_cache = (body, z)
        return z


_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"  # deflate, no name, no mtime, fastest, OS unknown
_GZIP_LAST_BLOCK = zlib.compressobj(1, zlib.DEFLATED, -15).flush()  # an empty final block


class PieceGzip:
    """One gzip member for a body joined from pieces, compressing only the pieces that changed.

    Why: every scrape after a sampling round has a new body (~200 KB for 8 GPUs), and compressing
    it whole cost more CPU than the collectors' rounds of most collectors, though most of it (the GPU
    text, between counter refreshes) is the same object as last time. Each piece is compressed on
    its own by a fresh compressor ending in a sync flush: byte-aligned, with no back-reference
    into another piece, so the compressed pieces concatenate into one valid deflate stream. The
    CRC-32 runs over the pieces in order, resumed from the first one that changed. The decoded
    body is the same bytes; only a little compression across pieces is given up.
    """

    def __init__(self) -> None:
        self._pieces: list[tuple[bytes, bytes, int]] = []  # (piece, its deflate blocks, CRC after it)
        self._lock = threading.Lock()

    def compress(self, pieces: tuple[bytes, ...]) -> bytes:
        with self._lock:  # scrapes from two connections at once: one fills the cache, the other reuses it
            old = self._pieces
            new: list[tuple[bytes, bytes, int]] = []
            crc = 0
            same = True  # every piece so far is the very object of last time: its CRC chain holds
            cache = {id(p): (p, z) for p, z, _ in old}
            for i, piece in enumerate(pieces):
                if same and i < len(old) and old[i][0] is piece:
                    new.append(old[i])
                    crc = old[i][2]
                    continue
                same = False
                hit = cache.get(id(piece))
                if hit is not None and hit[0] is piece:
                    z = hit[1]
                else:
                    c = zlib.compressobj(1, zlib.DEFLATED, -15)
                    z = c.compress(piece) + c.flush(zlib.Z_SYNC_FLUSH)
                crc = zlib.crc32(piece, crc)
                new.append((piece, z, crc))
            self._pieces = new
        size = sum(map(len, pieces)) & 0xFFFFFFFF
        return b"".join((_GZIP_HEADER, *(z for _, z, _ in new), _GZIP_LAST_BLOCK, struct.pack("<II", crc, size)))


class _Handler(BaseHTTPRequestHandler):
    server: ExporterServer
    protocol_version = "HTTP/1.1"
    server_version = f"mlops-obs/{__version__}"

    def setup(self) -> None:
        self.request.settimeout(REQUEST_TIMEOUT)
        # Without this, the body written after the headers waits for the client's delayed ACK
        # (Nagle): 40 ms a scrape on Linux.
        try:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        return None  # request logs would drown the exporter's own log

    def _send(
        self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8", headers: dict[str, str] | None = None
    ) -> None:
        gz = "gzip" in (self.headers.get("Accept-Encoding") or "") and len(body) > 1024
        if gz:
            body = self.server.body_gzip(body) if code == 200 else gzip.compress(body, compresslevel=1)
        self.send_response(code)
        if gz:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in self.server.web.headers.items():
            self.send_header(k, v)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        # Headers and body in one write: one segment on the wire for a typical scrape.
        if self.command != "HEAD":
            self.__dict__["_headers_buffer"].append(b"\r\n" + body)
            self.flush_headers()
        else:
            self.end_headers()

    def _authorised(self) -> bool:
        web = self.server.web
        if not web.users:
            return True
        auth = self.headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                sep = ""
            if sep and web.check(user, password):
                return True
        self._send(401, b"Unauthorized\n", headers={"WWW-Authenticate": 'Basic realm="mlops-obs"'})
        return False

    def _guarded(self, serve: Callable[[], None]) -> None:
        slots = self.server.slots
        if slots is not None and not slots.acquire(blocking=False):
            self._send(503, b"Too many concurrent requests; see --web.max-requests.\n", headers={"Retry-After": "1"})
            return
        try:
            if self._authorised():
                serve()
        finally:
            if slots is not None:
                slots.release()

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _post(self) -> None:
        # Drain a body, if any, so the connection stays usable.
        n = int(self.headers.get("Content-Length") or 0)
        if 0 < n <= 65536:
            self.rfile.read(n)
        path = self.path.split("?", 1)[0]
        if path == "/-/reload":
            if self.server.on_reload is None:
                self._send(501, b"Reload is not supported here.\n")
                return
            ok, message = self.server.on_reload()
            self._send(200 if ok else 500, (message.rstrip("\n") + "\n").encode())
        elif path in (self.server.telemetry_path, "/-/healthy", "/-/ready", "/"):
            self._send(405, b"Method not allowed.\n", headers={"Allow": "GET, HEAD"})
        else:
            self._send(404, b"Not found.\n")

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        srv = self.server
        if path == srv.telemetry_path:
            body = srv.sampler.scrape()
            if srv.extra is not None:
                body += srv.extra()  # a new object each time, so no gzip reuse: prefer Sampler(static=...)
            self._send(200, body, CONTENT_TYPE)
        elif path == "/-/healthy":
            self._send(200, b"Healthy.\n")
        elif path == "/-/ready":
            if srv.sampler.ready:
                self._send(200, b"Ready.\n")
            else:
                self._send(503, b"Not ready: first sampling round still running.\n")
        elif path == "/-/reload":
            self._send(405, b"Use POST to reload.\n", headers={"Allow": "POST"})
        elif path == "/":
            self._send(200, _landing(srv).encode(), "text/html; charset=utf-8")
        else:
            self._send(404, b"Not found.\n")


def _landing(srv: ExporterServer) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{'ok' if s.success else html.escape(s.error or 'not yet sampled')}"
        f"</td><td>{s.duration * 1000:.2f} ms</td></tr>"
        for name, s in srv.sampler.states.items()
    )
    tp = html.escape(srv.telemetry_path)
    return (
        "<!doctype html><html><head><title>mlops-obs exporter</title></head><body>"
        f"<h1>mlops-obs exporter {__version__}</h1>"
        f'<p><a href="{tp}">Metrics</a> · <a href="/-/healthy">Health</a> · <a href="/-/ready">Readiness</a></p>'
        f"<table><tr><th>collector</th><th>state</th><th>last sample</th></tr>{rows}</table>"
        "</body></html>"
    )
