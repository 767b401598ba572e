"""Run Debian's ``prometheus-alertmanager`` as a child process on a free loopback port.

Used by the end-to-end tests (and handy for local trials): a given config, a private storage directory,
clustering switched off (its gossip port would collide between parallel runs), and a small API client.
Never a system service.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from mlops_obs.prometheus_server import find_binary, free_port, http_get


def alertmanager_binary() -> str | None:
    return find_binary("prometheus-alertmanager") or find_binary("alertmanager")


class AlertmanagerProcess:
    def __init__(self, workdir: Path, config: dict[str, Any], *, binary: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.config = config
        self.binary = binary or alertmanager_binary()
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> AlertmanagerProcess:
        if not self.binary:
            raise FileNotFoundError("alertmanager binary not found (apt-get install prometheus-alertmanager)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "alertmanager.yml"
        cfg_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.port = free_port()
        log = open(self.workdir / "alertmanager.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={cfg_path}",
                f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.workdir / "alertmanager.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"alertmanager exited with {self.proc.returncode}: {tail}")
            try:
                if http_get(self.url + "/-/ready", timeout=1)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError("alertmanager did not become ready")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> AlertmanagerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts Alertmanager currently holds (API v2)."""
        code, body = http_get(self.url + "/api/v2/alerts", timeout=10)
        if code != 200:
            raise RuntimeError(f"alertmanager /api/v2/alerts failed ({code}): {body[:200]!r}")
        return list(orjson.loads(body))
