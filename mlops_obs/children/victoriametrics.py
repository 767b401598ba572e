"""Run Debian's ``victoria-metrics`` (single node) and its ``vmalert`` as child processes on free loopback ports.

The central-store test remote-writes into VictoriaMetrics and lets vmalert evaluate our rule files there,
to check that the rules and dashboards answer the same as on Prometheus. Configured by flags only (the
YAML file :class:`ChildServer` writes is unused). Never system services.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import orjson

from mlops_obs.children import ChildServer, http_get


class VictoriaMetricsProcess(ChildServer):
    name = "victoria-metrics"
    binaries = ("victoria-metrics", "victoria-metrics-prod")
    apt_package = "victoria-metrics"

    def config(self) -> dict[str, Any]:
        return {}

    def flags(self, config_path: Path) -> list[str]:
        return [
            f"-storageDataPath={self.workdir / 'data'}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            "-retentionPeriod=1d",
            # Answer with the newest samples (the default hides the last 30 s, for slow remote writers) and
            # never from the rollup cache, so a comparison with Prometheus sees the data both hold.
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-loggerLevel=WARN",
        ]

    @property
    def write_url(self) -> str:
        """Where Prometheus' ``remote_write`` sends samples."""
        return self.url + "/api/v1/write"

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        """An instant query (Prometheus' HTTP API, MetricsQL) at unix time ``at``; raises on an error answer."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
        code, body = http_get(url, timeout=30)
        data = orjson.loads(body)
        if code != 200 or data.get("status") != "success":
            raise RuntimeError(f"victoria-metrics {expr!r} failed ({code}): {data.get('error', body[:300])}")
        return list(data["data"]["result"])


class VmalertProcess(ChildServer):
    """vmalert with the given flags (``mixin.remote_write.vmalert_args``), flushing its results at once."""

    name = "vmalert"
    binaries = ("vmalert", "vmalert-prod")
    apt_package = "victoria-metrics"

    def __init__(self, workdir: Path, args: list[str], *, binary: str | None = None) -> None:
        super().__init__(workdir, binary)
        self.args = list(args)

    def config(self) -> dict[str, Any]:
        return {}

    def flags(self, config_path: Path) -> list[str]:
        return [*self.args, f"-httpListenAddr=127.0.0.1:{self.port}", "-remoteWrite.flushInterval=200ms",
                "-loggerLevel=WARN"]  # fmt: skip
