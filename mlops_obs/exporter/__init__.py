"""The ``mlops-obs exporter`` sidecar: collectors sampled in the background, served on ``/metrics``."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

from mlops_obs import __version__, collectors
from mlops_obs.config import (
    COMMON_SETTINGS,
    ConfigError,
    Setting,
    int_parser,
    loop_duration,
    parse_bool,
    parse_listen_address,
    parse_optional_path,
    parse_str,
    resolve,
)
from mlops_obs.exporter.sampler import Sampler
from mlops_obs.exporter.server import ExporterServer
from mlops_obs.logs import configure, get_logger
from mlops_obs.web import config as web_config

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
    Setting("sampler.interval", loop_duration, 1.0, "How often collectors sample, off the scrape path.",
            metavar="DURATION"),
    Setting("collector.deadline", loop_duration, 5.0,
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
    """Collectors + sampler + HTTP server; used by the CLI, the demo and the tests.

    Raises :class:`web_config.WebConfigError` for an unusable ``web.config.file`` and ``OSError``
    when the address cannot be bound.
    """

    def __init__(self, config: Mapping[str, Any], log: Any = None) -> None:
        self.config = dict(config)
        self.sources: dict[str, str] = dict(getattr(config, "sources", {}) or {})
        self.log = log or get_logger(component="exporter")
        web = web_config.load(config.get("web.config.file"))
        # Collectors share this mapping and read their settings from it every round, so a reload
        # that updates it in place reaches them (file system paths, multiproc-dir, retention...).
        self.collectors = collectors.build(self.config)
        self.sampler = Sampler(
            self.collectors, config["sampler.interval"], config["collector.deadline"], self.log, static=_build_info()
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
            fresh = resolve(settings(), {"config.file": path}, known_keys=_all_known_keys())
            for key, value in fresh.items():
                if self.sources.get(key) != "flag":
                    cfg[key] = value
        return cfg

    def reload(self) -> tuple[bool, str]:
        """Re-read ``--config.file`` and ``--web.config.file``; on any error keep running as before.

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
            self.config.update(cfg)
            self.server.reloads.record(True)
            msg = "configuration reloaded"
            if restart:
                msg += f"; these need a restart to change: {', '.join(restart)}"
                self.log.warning("reload: settings that need a restart were not applied", keys=",".join(restart))
            self.log.info("configuration reloaded", tls=web.tls, basic_auth=bool(web.users))
            return True, msg


def _all_known_keys() -> set[str]:
    from mlops_obs import cli

    keys: set[str] = set()
    try:
        _, per_command = cli.build_parser()
    except Exception:
        return keys
    for group in per_command.values():
        keys.update(s.key for s in group)
    return keys


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(settings())


def run(cfg: Mapping[str, Any]) -> int:
    # Signals are taken synchronously with sigwait: a Python handler that set an Event could
    # deadlock on the Event's own lock if the signal landed while the main thread held it. The mask
    # is set before any thread starts, so every thread inherits it and only sigwait sees them; it is
    # restored on the way out for callers that run the command in-process.
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    try:
        return _serve(cfg, handled)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# Objects allocated between two young-generation collections. Every sampling round allocates a few
# thousand short-lived objects (samples, label dicts, NVML structures) that are still alive when
# CPython's default threshold (700) triggers a collection, so each round paid for several
# collections that scanned, and promoted, objects about to die anyway. With a larger threshold a
# collection happens every few rounds and finds only the few objects that outlive a round. Memory
# is not the cost: garbage that only the collector frees (reference cycles) is rare here, and
# waiting for this many allocations holds at most a few MB more.
GC_THRESHOLD_YOUNG = 50_000


def tune_gc() -> None:
    """Process-wide GC settings for the long-running sidecar (never applied by the library or tests).

    ``gc.freeze()`` moves everything the start-up allocated (modules, settings, collectors: tens of
    thousands of objects that live until exit) out of the collector's reach, so the rare full
    collections no longer walk them.
    """
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD_YOUNG, g1, g2)


def _serve(cfg: Mapping[str, Any], handled: set[signal.Signals]) -> int:
    configure(cfg["log.level"], cfg["log.format"])
    log = get_logger(component="exporter")
    try:
        exporter = Exporter(cfg, log)
    except web_config.WebConfigError as e:
        log.error("bad web config", error=str(e))
        return 1
    except OSError as e:
        host, port = cfg["web.listen-address"]
        log.error("cannot listen", address=f"{host}:{port}", error=e.strerror or str(e))
        return 1
    exporter.server.on_quit = lambda: os.kill(os.getpid(), signal.SIGTERM)  # to the sigwait below
    exporter.start()
    tune_gc()
    log.info(
        "exporter listening",
        url=exporter.url + cfg["web.telemetry-path"],
        collectors=",".join(c.name for c in exporter.collectors),
        tls=exporter.server.web.tls,
        basic_auth=bool(exporter.server.web.users),
        version=__version__,
        pid=os.getpid(),
    )
    while True:
        signum = signal.sigwait(handled)
        if signum == signal.SIGHUP:
            exporter.reload()
        else:
            break
    log.info("exporter stopping")
    exporter.stop()
    return 0
