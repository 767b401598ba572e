"""The exporter sidecar: collectors sampled in the background, served on ``/metrics``.

:class:`Exporter` wires the pieces: one :class:`~mlops_obs.rankdir.RankDirectory` shared by the
collectors that read the ranks, the collectors themselves (:mod:`mlops_obs.collectors`), the
:class:`~mlops_obs.exporter.sampler.Sampler` that runs them off the scrape path, and the HTTP server.
The ``mlops-obs exporter`` command (flags, signals, process settings) is
:mod:`mlops_obs.commands.exporter`.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from mlops_obs import __version__, collectors
from mlops_obs.config import (
    COMMON_SETTINGS,
    ConfigError,
    Setting,
    int_parser,
    loop_duration,
    node_name,
    parse_bool,
    parse_duration,
    parse_listen_address,
    parse_optional_path,
    parse_str,
    resolve,
)
from mlops_obs.exporter.sampler import HOUSEKEEPING_INTERVAL, Sampler
from mlops_obs.exporter.server import ExporterServer
from mlops_obs.logs import get_logger
from mlops_obs.rankdir import DEFAULT_RETENTION, RankDirectory, cadence
from mlops_obs.web import config as web_config

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

DEFAULT_PORT = 9477


def needs_restart(key: str) -> bool:
    """Settings a reload cannot change in a running process: a new socket, a new set of threads."""
    return (
        key in ("web.listen-address", "web.enable-lifecycle")
        or key.startswith("log.")
        or (key.startswith("collector.") and key != "collector.deadline")
    )


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
    Setting("web.config.file", parse_optional_path, None,
            "exporter-toolkit web configuration (TLS, client certificates, bcrypt basic auth). "
            "Re-read on SIGHUP (and POST /-/reload with --web.enable-lifecycle).", metavar="PATH"),
    Setting("web.max-requests", int_parser(minimum=0), 40,
            "Requests served at once; more get 503 at once. 0 means no limit.", metavar="N"),
    Setting("web.enable-lifecycle", parse_bool, False,
            "Serve POST /-/reload and POST /-/quit (off: anyone who reaches the port could use them).",
            kind="bool"),
    Setting("sampler.interval", loop_duration, 1.0,
            "The most often collectors sample, off the scrape path: they sample just ahead of each expected "
            "scrape (the interval learned from the scrapes), and not while nothing scrapes.", metavar="DURATION"),
    Setting("collector.deadline", loop_duration, 5.0,
            "A collector sampling for longer than this is abandoned (success 0, series dropped).",
            metavar="DURATION"),
    # The ranks' snapshot directory, read by the training, process and gpu collectors.
    Setting("multiproc-dir", parse_optional_path, None,
            "Directory the training ranks write their snapshots to (shared with the workload).", metavar="DIR"),
    Setting("training.retention", parse_duration, DEFAULT_RETENTION,
            "Forget (and delete) a rank's snapshot this long after its last update.", metavar="DURATION"),
    Setting("web.shutdown-delay", parse_duration, 0.0,
            "On SIGTERM, keep sampling and serving this long before stopping (a second SIGTERM or SIGINT "
            "stops at once). In a training pod set it to one scrape interval, so that Prometheus scrapes "
            "the ranks' final state after the trainer exits.", metavar="DURATION"),
)  # fmt: skip


def settings() -> tuple[Setting, ...]:
    return COMMON_SETTINGS + EXPORTER_SETTINGS + collectors.enable_settings() + collectors.collector_settings()


def _build_info() -> bytes:
    return (
        b"# HELP mlops_exporter_build_info The exporter's version; always 1.\n"
        b"# TYPE mlops_exporter_build_info gauge\n"
        + f'mlops_exporter_build_info{{version="{__version__}"}} 1\n'.encode()
    )


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _node_info(node: str) -> bytes:
    """The node this sidecar runs on (``config.node_name``): the rules join node names through it
    instead of putting a target label on every series."""
    return (
        b"# HELP mlops_exporter_node_info The node this exporter runs on; always 1.\n"
        b"# TYPE mlops_exporter_node_info gauge\n"
        + f'mlops_exporter_node_info{{node="{_label_value(node)}"}} 1\n'.encode()
    )


def static_text() -> bytes:
    """What every scrape ends with besides the collectors' families: build and node info."""
    return _build_info() + _node_info(node_name())


class Exporter:
    """Rank directory + collectors + sampler + HTTP server; used by the CLI, the demo and the tests.

    ``known_keys`` gives the settings of the other commands, which a config file shared between
    commands may hold; a reload re-reads the file with them.

    Raises :class:`web_config.WebConfigError` for an unusable ``web.config.file`` and ``OSError``
    when the address cannot be bound.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        log: FilteringBoundLogger | None = None,
        known_keys: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.config = dict(config)
        self.sources: dict[str, str] = dict(getattr(config, "sources", {}) or {})
        self.log: FilteringBoundLogger = log or get_logger(component="exporter")
        self._known_keys = known_keys
        web = web_config.load(config.get("web.config.file"))
        self.ranks = RankDirectory.from_config(self.config)
        # Collectors share this mapping and read their settings from it every round, so a reload
        # that updates it in place reaches them (file system paths, deadlines...).
        self.collectors = collectors.build(self.config, self.ranks)
        self.sampler = Sampler(
            self.collectors,
            config["sampler.interval"],
            config["collector.deadline"],
            self.log,
            static=static_text(),
            # Stale rank files go while nothing scrapes too; while something does, the rounds' scans did it.
            housekeeping=[functools.partial(self.ranks.snapshots, max_age=HOUSEKEEPING_INTERVAL)],
            on_cadence=self._publish_cadence,
        )
        try:
            self.server = ExporterServer(
                config["web.listen-address"],
                self.sampler,
                config["web.telemetry-path"],
                log=self.log,
                web=web,
                max_requests=int(config.get("web.max-requests", 40)),
                on_reload=self.reload,
                lifecycle=bool(config.get("web.enable-lifecycle")),
            )
        except OSError:
            self.sampler.stop()  # releases what the collectors opened (NVML, threads)
            raise
        self._reload_lock = threading.Lock()

    def _publish_cadence(self, interval: float | None, next_scrape: float | None, lead: float) -> None:
        """Write the sampling cadence where the ranks read it, so their flushes land just before our
        rounds (:mod:`mlops_obs.rankdir.cadence`); nothing until the ranks created the directory."""
        path = self.ranks.path
        if path is None or not os.path.isdir(path):
            return
        cadence.write(path, cadence.make(interval, next_scrape, lead, time.time()))

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

    def _reresolve(self) -> dict[str, Any]:
        """The configuration as it would be resolved now: same flags, fresh env and config file."""
        cfg = dict(self.config)
        path = self.config.get("config.file")
        if path:
            fresh = resolve(settings(), {"config.file": path}, known_keys=self._known_keys())
            for key, value in fresh.items():
                if self.sources.get(key) != "flag":
                    cfg[key] = value
        return cfg

    def reload(self) -> tuple[bool, str]:
        """Re-read ``--config.file`` and ``--web.config.file``; on any error keep the running configuration.

        Returns ``(ok, one-line message)`` for ``POST /-/reload`` and the SIGHUP log line.
        """
        with self._reload_lock:
            try:
                cfg = self._reresolve()
                web = web_config.load_for_reload(self.server.web, cfg.get("web.config.file"))
            except (ConfigError, web_config.WebConfigError) as e:
                self.server.reloads.record(False)
                self.log.error("reload failed; keeping the running configuration", error=str(e))
                return False, f"reload failed: {e}"
            restart = sorted(k for k in cfg if needs_restart(k) and cfg[k] != self.config.get(k))
            for k in restart:
                cfg[k] = self.config.get(k)
            self.server.web = web
            self.server.telemetry_path = cfg["web.telemetry-path"]
            if int(cfg.get("web.max-requests", 40)) != self.server.max_requests:
                self.server.set_max_requests(int(cfg.get("web.max-requests", 40)))
            self.sampler.interval = cfg["sampler.interval"]
            self.sampler.deadline = cfg["collector.deadline"]
            self.ranks.configure(cfg.get("multiproc-dir"), cfg.get("training.retention", DEFAULT_RETENTION))
            self.config.update(cfg)
            self.server.reloads.record(True)
            msg = "configuration reloaded"
            if restart:
                msg += f"; these need a restart to change: {', '.join(restart)}"
                self.log.warning("reload: settings that need a restart were not applied", keys=",".join(restart))
            self.log.info("configuration reloaded", tls=web.tls, basic_auth=bool(web.users))
            return True, msg
