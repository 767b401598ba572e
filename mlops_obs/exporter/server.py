"""The exporter's HTTP front: the telemetry path, ``/-/healthy``, ``/-/ready``, the lifecycle API, ``/``.

Served by :class:`mlops_obs.web.server.HTTPServer` (deadlines, connection budget, TLS, basic auth,
``--web.max-requests``, content negotiation: see there); this module only says what each path
answers. The handlers never sample anything: they serve what the :class:`Sampler` already
rendered, on the event loop, and the gzip of an unchanged body is reused. ``POST /-/reload`` and
``POST /-/quit`` exist only with ``--web.enable-lifecycle`` (Prometheus' flag), since anyone who
reaches the port could otherwise make the process re-read files or exit; SIGHUP reloads either way.
"""

from __future__ import annotations

import asyncio
import gzip
import html
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mlops_obs import __version__
from mlops_obs.exporter.sampler import Sampler
from mlops_obs.web.config import ReloadStatus, WebConfig
from mlops_obs.web.server import HTTPServer, Limits, Request, Response, Route

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTML = "text/html; charset=utf-8"
LIFECYCLE_OFF = b"Lifecycle API is not enabled; start with --web.enable-lifecycle.\n"


class ExporterServer(HTTPServer):
    """The exporter's routes on the shared server; binds in the constructor (``OSError``)."""

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
        *,
        lifecycle: bool = False,
        on_quit: Callable[[], None] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.sampler = sampler
        self.extra = extra
        self.on_reload = on_reload
        self.on_quit = on_quit
        self.lifecycle = lifecycle
        self.reloads = ReloadStatus()
        self._joined: tuple[bytes, bytes, bytes, tuple[bytes, ...] | None] | None = None
        self._gzip_cache: tuple[bytes, bytes] | None = None
        self._gzip = PieceGzip()
        super().__init__(
            address,
            web=web,
            limits=replace(limits or Limits(), max_requests=max_requests),
            log=log,
            server_header=f"mlops-obs/{__version__}",
            name="exporter-http",
        )
        self.telemetry_path = telemetry_path

    @property
    def telemetry_path(self) -> str:
        return self._telemetry_path

    @telemetry_path.setter
    def telemetry_path(self, path: str) -> None:
        self._telemetry_path = path
        lifecycle = ("POST", "PUT")
        self.routes = {
            r.path: r
            for r in (
                # On a worker thread: a scrape that finds stale data waits (at most the collector
                # deadline) for the round it asks for, and must not hold up the event loop meanwhile.
                Route(path, self._metrics, blocking=True),
                Route("/-/healthy", lambda _: Response(200, b"Healthy.\n")),
                Route("/-/ready", self._ready),
                Route("/", self._landing),
                Route("/-/reload", self._reload, lifecycle, blocking=True, max_body=4096),
                Route("/-/quit", self._quit, lifecycle, max_body=4096),
            )
        }

    def _scrape(self) -> tuple[bytes, tuple[bytes, ...] | None]:
        """The body (the sampler's, then the reload status) and the pieces it was joined from."""
        body = self.sampler.scrape()
        parts_of = getattr(self.sampler, "parts", None)
        parts = parts_of(body) if parts_of is not None else None
        tail = self.reloads.text
        if self.extra is not None:
            tail = tail + self.extra()  # a new object each time, so no gzip reuse: prefer Sampler(static=...)
        joined = self._joined
        if joined is not None and joined[0] is body and joined[1] is tail:
            return joined[2], joined[3]
        full = body + tail
        pieces = (*parts, tail) if parts is not None else None
        self._joined = (body, tail, full, pieces)
        return full, pieces

    def body_gzip(self, body: bytes, pieces: tuple[bytes, ...] | None = None) -> bytes:
        cached = self._gzip_cache
        if cached is not None and cached[0] is body:
            return cached[1]
        z = self._gzip.compress(pieces) if pieces is not None else gzip.compress(body, compresslevel=1)
        self._gzip_cache = (body, z)
        return z

    def _metrics(self, _: Request) -> Response:
        body, pieces = self._scrape()
        return Response(200, body, CONTENT_TYPE, gzipped=lambda: self.body_gzip(body, pieces))

    def _ready(self, _: Request) -> Response:
        if self.sampler.ready:
            return Response(200, b"Ready.\n")
        return Response(503, b"Not ready: first sampling round still running.\n")

    def _landing(self, _: Request) -> Response:
        return Response(200, _landing(self).encode(), HTML)

    def _reload(self, _: Request) -> Response:
        if not self.lifecycle:
            return Response(403, LIFECYCLE_OFF)
        if self.on_reload is None:
            return Response(501, b"Reload is not supported here.\n")
        ok, message = self.on_reload()
        return Response(200 if ok else 500, (message.rstrip("\n") + "\n").encode())

    def _quit(self, _: Request) -> Response:
        if not self.lifecycle:
            return Response(403, LIFECYCLE_OFF)
        if self.on_quit is None:
            return Response(501, b"Quit is not supported here.\n")
        # The handler runs on the server's loop: the callback (which stops this very server) runs on
        # its next turn, once the answer below has been written.
        asyncio.get_running_loop().call_soon(self.on_quit)
        return Response(200, b"Requesting termination... Goodbye!\n")


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
