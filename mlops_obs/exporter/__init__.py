"""The ``mlops-obs exporter`` sidecar: collectors sampled in the background, served on ``/metrics``."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Mapping
from typing import Any

from mlops_obs import __version__, collectors
from mlops_obs.config import (
    COMMON_SETTINGS,
    Setting,
    parse_listen_address,
    parse_str,
    positive_duration,
)
from mlops_obs.exporter.sampler import Sampler
from mlops_obs.exporter.server import ExporterServer
from mlops_obs.logs import configure, get_logger

DEFAULT_PORT = 9477


def _telemetry_path(v: Any) -> str:
    s = parse_str(v)
    if not s.startswith("/") or s.startswith("/-/") or s == "/":
        raise ValueError(f"must be an absolute path other than / and /-/..., got {v!r}")
    return s


EXPORTER_SETTINGS: tuple[Setting, ...] = (
    Setting("web.listen-address", parse_listen_address, ("0.0.0.0", DEFAULT_PORT),
            "Address to listen on for the web interface and telemetry.", metavar="HOST:PORT"),
    Setting("web.telemetry-path", _telemetry_path, "/metrics", "Path under which to expose metrics.",
            metavar="PATH"),
    Setting("sampler.interval", positive_duration, 1.0, "How often collectors sample, off the scrape path.",
            metavar="DURATION"),
    Setting("collector.deadline", positive_duration, 5.0,
            "A collector sampling for longer than this is abandoned (success 0, series dropped).",
            metavar="DURATION"),
)  # fmt: skip


def settings() -> tuple[Setting, ...]:
    return COMMON_SETTINGS + EXPORTER_SETTINGS + collectors.enable_settings() + collectors.collector_settings()


def _build_info() -> bytes:
    return (
        b"# HELP mlops_exporter_build_info The exporter's version; always 1.\n"
        b"# TYPE mlops_exporter_build_info gauge\n"
        + f'mlops_exporter_build_info{{version="{__version__}"}} 1\n'.encode()
    )


class Exporter:
    """Collectors + sampler + HTTP server; used by the CLI, the demo and the tests."""

    def __init__(self, config: Mapping[str, Any], log: Any = None) -> None:
        self.config = config
        self.log = log or get_logger(component="exporter")
        self.collectors = collectors.build(config)
        self.sampler = Sampler(self.collectors, config["sampler.interval"], config["collector.deadline"], self.log)
        self.server = ExporterServer(
            config["web.listen-address"],
            self.sampler,
            config["web.telemetry-path"],
            extra=_build_info,
            log=self.log,
        )

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> Exporter:
        self.sampler.start()
        self.server.start_background()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.sampler.stop()


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(settings())


def run(cfg: Mapping[str, Any]) -> int:
    configure(cfg["log.level"], cfg["log.format"])
    log = get_logger(component="exporter")
    try:
        exporter = Exporter(cfg, log)
    except OSError as e:
        host, port = cfg["web.listen-address"]
        log.error("cannot listen", address=f"{host}:{port}", error=e.strerror or str(e))
        return 1
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    exporter.start()
    log.info(
        "exporter listening",
        url=exporter.url + cfg["web.telemetry-path"],
        collectors=",".join(c.name for c in exporter.collectors),
        version=__version__,
    )
    stop.wait()
    log.info("exporter stopping")
    exporter.stop()
    return 0
