"""Run Debian's ``prometheus-alertmanager`` as a child process on a free loopback port.

Used by the end-to-end tests (and handy for local trials): a given config, a private storage directory,
clustering switched off (its gossip port would collide between parallel runs), and a small API client.
Never a system service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from mlops_obs.children import ChildServer, find_binary, http_get


def alertmanager_binary() -> str | None:
    return find_binary("prometheus-alertmanager", "alertmanager")


class AlertmanagerProcess(ChildServer):
    name = "alertmanager"
    binaries = ("prometheus-alertmanager", "alertmanager")
    apt_package = "prometheus-alertmanager"

    def __init__(self, workdir: Path, config: dict[str, Any], *, binary: str | None = None) -> None:
        super().__init__(workdir, binary)
        self._config = config

    def config(self) -> dict[str, Any]:
        return self._config

    def flags(self, config_path: Path) -> list[str]:
        return [
            f"--config.file={config_path}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ]

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts Alertmanager currently holds (API v2)."""
        code, body = http_get(self.url + "/api/v2/alerts", timeout=10)
        if code != 200:
            raise RuntimeError(f"alertmanager /api/v2/alerts failed ({code}): {body[:200]!r}")
        return list(orjson.loads(body))
