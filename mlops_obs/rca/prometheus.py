"""A small Prometheus HTTP API client: ``query_range`` and ``query`` over stdlib ``urllib``.

Why not a client library: two read-only endpoints, form-encoded POSTs and one JSON shape
(https://prometheus.io/docs/prometheus/latest/querying/api/). Every failure (refused, timeout, a
non-JSON body, ``"status": "error"``) is a :class:`PrometheusError` whose ``str()`` is one line naming
the server and the query, so ``rca`` can say why it could not run and exit 4. Bodies are capped, so a
misdirected URL (a file server, a proxy's error page) cannot make the analysis hold gigabytes.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import orjson

MAX_BODY_BYTES = 64 << 20
MAX_POINTS = 11000  # Prometheus refuses a range query with more points per series than this


class PrometheusError(Exception):
    """The server could not answer; ``str()`` is one line."""


@dataclass(frozen=True)
class Series:
    """One series of a range query: its labels and its (epoch seconds, value) points in time order."""

    labels: dict[str, str]
    points: list[tuple[float, float]]

    @property
    def name(self) -> str:
        return self.labels.get("__name__", "")

    def to_json(self) -> dict[str, Any]:
        """Prometheus' own matrix element shape (values as strings, as the API sends them)."""
        return {"metric": self.labels, "values": [[t, _fmt(v)] for t, v in self.points]}

    @staticmethod
    def from_json(item: Any) -> Series:
        if not isinstance(item, dict) or not isinstance(item.get("metric"), dict):
            raise ValueError("a matrix element needs a metric object")
        raw = item.get("values")
        if raw is None and isinstance(item.get("value"), list):
            raw = [item["value"]]
        if not isinstance(raw, list):
            raise ValueError("a matrix element needs values")
        pts = [(float(t), float(v)) for t, v in raw]
        return Series({str(k): str(v) for k, v in item["metric"].items()}, pts)


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def step_for(start: float, end: float, points: int = 600, floor: float = 1.0) -> float:
    """A resolution that gives about ``points`` points over the window, never over the server's limit."""
    span = max(end - start, floor)
    return max(floor, span / points, span / (MAX_POINTS - 1))


class Prometheus:
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise PrometheusError(f"prometheus {url!r}: expected an http:// or https:// URL")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.requests = 0
        self.bytes_read = 0

    def _post(self, path: str, params: dict[str, str], what: str) -> Any:
        body = urllib.parse.urlencode(params).encode()
        req = urllib.request.Request(
            self.url + path,
            data=body,
            method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
        )
        self.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read(MAX_BODY_BYTES + 1)
        except urllib.error.HTTPError as e:
            raw = e.read(MAX_BODY_BYTES + 1) if e.fp else b""
            err = _error_text(raw) or e.reason
            raise PrometheusError(f"prometheus {self.url}: {what}: HTTP {e.code}: {err}") from None
        except urllib.error.URLError as e:
            raise PrometheusError(f"prometheus {self.url}: {what}: {e.reason}") from None
        except (TimeoutError, OSError) as e:
            raise PrometheusError(f"prometheus {self.url}: {what}: {e or type(e).__name__}") from None
        self.bytes_read += len(raw)
        if len(raw) > MAX_BODY_BYTES:
            raise PrometheusError(f"prometheus {self.url}: {what}: answer larger than {MAX_BODY_BYTES >> 20} MiB")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise PrometheusError(
                f"prometheus {self.url}: {what}: the answer is not JSON (is this Prometheus?)"
            ) from None
        if not isinstance(doc, dict) or doc.get("status") != "success":
            why = doc.get("error") if isinstance(doc, dict) else None
            raise PrometheusError(f"prometheus {self.url}: {what}: {why or 'unexpected answer'}")
        return doc.get("data")

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        data = self._post(
            "/api/v1/query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:.3f}"},
            f"query_range {expr}",
        )
        return _series(data, expr, self.url)

    def query(self, expr: str, at: float) -> list[Series]:
        data = self._post("/api/v1/query", {"query": expr, "time": f"{at:.3f}"}, f"query {expr}")
        return _series(data, expr, self.url)

    def ready(self) -> None:
        """Raise :class:`PrometheusError` unless the server answers a trivial query."""
        self.query("vector(1)", 0.0)


def _error_text(raw: bytes) -> str | None:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return str(doc.get("error")) if isinstance(doc, dict) and doc.get("error") else None


def _series(data: Any, expr: str, url: str) -> list[Series]:
    if not isinstance(data, dict) or data.get("resultType") not in ("matrix", "vector"):
        raise PrometheusError(f"prometheus {url}: {expr}: expected a matrix or vector result")
    try:
        return [Series.from_json(x) for x in data.get("result") or []]
    except (ValueError, TypeError) as e:
        raise PrometheusError(f"prometheus {url}: {expr}: malformed result: {e}") from None
