"""HTTP front of the exporter: ``/metrics`` (telemetry path), ``/-/healthy``, ``/-/ready``, ``/``.

The handler never samples anything: it serves what the :class:`Sampler` already rendered.
"""

from __future__ import annotations

import gzip
import html
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mlops_obs import __version__
from mlops_obs.exporter.sampler import Sampler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        sampler: Sampler,
        telemetry_path: str = "/metrics",
        extra: Callable[[], bytes] | None = None,
        log: Any = None,
    ) -> None:
        self.sampler = sampler
        self.telemetry_path = telemetry_path
        self.extra = extra
        self.log = log
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host if isinstance(host, str) else host.decode()
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{shown}:{port}"

    def start_background(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="exporter-http", daemon=True)
        t.start()
        return t


class _Handler(BaseHTTPRequestHandler):
    server: ExporterServer
    protocol_version = "HTTP/1.1"
    server_version = f"mlops-obs/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:
        return None  # request logs would drown the exporter's own log

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        if "gzip" in (self.headers.get("Accept-Encoding") or "") and len(body) > 1024:
            body = gzip.compress(body, compresslevel=1)
            self.send_response(code)
            self.send_header("Content-Encoding", "gzip")
        else:
            self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        srv = self.server
        if path == srv.telemetry_path:
            body = srv.sampler.scrape()
            if srv.extra is not None:
                body += srv.extra()
            self._send(200, body, CONTENT_TYPE)
        elif path == "/-/healthy":
            self._send(200, b"Healthy.\n")
        elif path == "/-/ready":
            if srv.sampler.ready:
                self._send(200, b"Ready.\n")
            else:
                self._send(503, b"Not ready: first sampling round still running.\n")
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
