"""Run Debian's ``prometheus`` binary as a child process on a free loopback port.

Used by ``mlops-obs demo`` and by the integration tests: a generated config, a private TSDB
directory, and a small client for the HTTP API. Never a system service.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from mlops_obs.children import ChildServer, http_get


class PrometheusProcess(ChildServer):
    name = "prometheus"
    binaries = ("prometheus",)
    apt_package = "prometheus"

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        *,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        alertmanagers: Sequence[str] = (),
        job_name: str = "mlops-obs",
        binary: str | None = None,
    ) -> None:
        super().__init__(workdir, binary)
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.rule_files = list(rule_files)
        self.alertmanagers = list(alertmanagers)
        self.job_name = job_name

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "scrape_configs": [
                {
                    "job_name": self.job_name,
                    "scrape_interval": self.scrape_interval,
                    "scrape_timeout": self.scrape_interval,
                    # Our series carry the training job's own `job` label; keep it (as for Pushgateway).
                    "honor_labels": True,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        if self.rule_files:
            cfg["rule_files"] = [str(p) for p in self.rule_files]
        if self.alertmanagers:
            cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": self.alertmanagers}]}]}
        return cfg

    def flags(self, config_path: Path) -> list[str]:
        return [
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    # --- HTTP API ---------------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        code, body = http_get(url, timeout=10)
        data = orjson.loads(body)
        if code != 200 or data.get("status") != "success":
            raise RuntimeError(f"prometheus {path} failed ({code}): {data.get('error', body[:200])}")
        return data["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def wait_for(
        self, expr: str, ok: Callable[[list[dict[str, Any]]], bool] = bool, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if ok(result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{expr!r} never satisfied the condition; last result: {result}")

    def targets_health(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])
