"""``mlops-obs exporter``: run the sidecar until SIGTERM or SIGINT; SIGHUP reloads its configuration.

On SIGTERM it keeps sampling and serving for ``--web.shutdown-delay`` first: in a training pod the
sidecar is stopped together with the trainer, and the ranks' final state (a failure above all) must
still reach a scrape. A second SIGTERM, or SIGINT, stops it at once.

The machinery is :class:`mlops_obs.exporter.Exporter`; this module holds what belongs to the
long-running process alone: its settings, signal handling, exit codes and garbage-collector tuning.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import pkgutil
import signal
import time
from collections.abc import Mapping
from typing import Any

from mlops_obs import __version__
from mlops_obs.commands import signals_for_sigwait
from mlops_obs.config import ConfigError, Setting
from mlops_obs.exporter import Exporter, settings
from mlops_obs.logs import configure, get_logger
from mlops_obs.web import config as web_config


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(settings())


def known_keys() -> set[str]:
    """The settings of every command (each module of this package): a config file shared between
    commands may hold any of them. Read from the modules themselves rather than from ``cli``, which
    imports the commands. A module that cannot be loaded adds nothing (the exporter still reloads
    its own keys)."""
    import mlops_obs.commands as package

    keys: set[str] = set()
    for info in pkgutil.iter_modules(package.__path__):
        try:
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            keys.update(s.key for s in module.add_arguments(argparse.ArgumentParser()))
        except Exception:
            continue
    return keys


def run(cfg: Mapping[str, Any]) -> int:
    with signals_for_sigwait() as handled:
        return _serve(cfg, handled)


# Objects allocated between two young-generation collections. Every sampling round allocates a few
# thousand short-lived objects (samples, label dicts, NVML structures) that are still alive when
# CPython's default threshold (700) triggers a collection, so each round would pay for several
# collections that scan, and promote, objects about to die anyway. With a larger threshold a
# collection happens every few rounds and finds only the few objects that outlive a round. Memory
# is not the cost: garbage that only the collector frees (reference cycles) is rare here, and
# waiting for this many allocations holds at most a few MB more.
GC_THRESHOLD_YOUNG = 50_000


def tune_gc() -> None:
    """Process-wide GC settings for the long-running sidecar (never applied by the library or tests).

    ``gc.freeze()`` moves everything the start-up allocated (modules, settings, collectors: tens of
    thousands of objects that live until exit) out of the collector's reach, so the rare full
    collections do not walk them.
    """
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD_YOUNG, g1, g2)


def _serve(cfg: Mapping[str, Any], handled: set[signal.Signals]) -> int:
    configure(cfg["log.level"], cfg["log.format"])
    log = get_logger(component="exporter")
    try:
        exporter = Exporter(cfg, log, known_keys=known_keys)
    except web_config.WebConfigError as e:
        log.error("bad web config", error=str(e))
        return 1
    except OSError as e:
        # The user's to fix (a port in use, an address not on this machine): one line, exit 2, as in
        # every command.
        host, port = cfg["web.listen-address"]
        raise ConfigError("web.listen-address", f"cannot listen on {host}:{port}: {e.strerror or e}") from None
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
    delay = float(cfg.get("web.shutdown-delay") or 0.0)
    if signum == signal.SIGTERM and delay > 0:
        log.info("exporter stopping after the shutdown delay", delay_seconds=delay)
        _serve_for(exporter, handled, delay)
    log.info("exporter stopping")
    exporter.stop()
    return 0


def _serve_for(exporter: Exporter, handled: set[signal.Signals], seconds: float) -> None:
    """Go on serving for ``seconds`` (SIGHUP still reloads); SIGTERM or SIGINT ends the wait."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        info = signal.sigtimedwait(handled, left)
        if info is None:
            return
        if info.si_signo == signal.SIGHUP:
            exporter.reload()
        else:
            return
