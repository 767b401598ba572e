"""``mlops-obs ship``: follow log files into the embedded store (default) or OpenSearch.

``--once`` ships everything present now, waits for the acknowledgements, and exits 0: the way to
collect a finished job's logs. Without it the shipper follows the files until SIGTERM/SIGINT.
Secrets are never settings: the OpenSearch password comes from ``--opensearch.password-file`` or the
``MLOPS_OBS_OPENSEARCH_PASSWORD`` environment variable. A ``--source`` that matches no file yet is
followed anyway (the job may not have started) with a one-line warning.

Exit codes: 0 done or stopped; 1 the sink, the checkpoint or the state directory cannot be used (a
damaged store, another shipper holding the state directory, ``--once`` unable to write its
checkpoint), said in one line and put into ``stats.json`` for the sidecar; 2 a bad setting.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import sys
from pathlib import Path
from typing import Any

from mlops_obs.config import (
    COMMON_SETTINGS,
    ConfigError,
    Setting,
    int_parser,
    list_parser,
    parse_bool,
    parse_duration,
    parse_optional_path,
)
from mlops_obs.logs.opensearch import OPENSEARCH_SETTINGS, OPENSEARCH_URL_SETTING
from mlops_obs.logs.store import STORE_RETENTION_SETTING

DEFAULT_STORE = Path("mlops-obs-store")
DEFAULT_OPENSEARCH_STATE = Path("mlops-obs-ship-state")

SHIP_SETTINGS: tuple[Setting, ...] = (
    Setting("source", list_parser(), [], "Glob of log files to follow (include rotated names, e.g. 'logs/*.jsonl*').",
            kind="list", metavar="GLOB"),
    Setting("store", parse_optional_path, None,
            "Embedded store directory (the default sink; ./mlops-obs-store when no OpenSearch URL is given).",
            metavar="DIR"),
    OPENSEARCH_URL_SETTING,
    Setting("state", parse_optional_path, None,
            "Checkpoint directory (default: <store>/shipper-state, or ./mlops-obs-ship-state for OpenSearch). "
            "Point the sidecar's --shipper.state-dir here.", metavar="DIR"),
    Setting("once", parse_bool, False, "Ship everything present now, wait for acknowledgements, exit.", kind="bool"),
    Setting("ship.exclude", list_parser(), [], "Glob of files not to ship.", kind="list", metavar="GLOB"),
    Setting("ship.batch-events", int_parser(1, 100_000), 5000, "Most events per batch (one store transaction).",
            metavar="N"),
    Setting("ship.max-line-bytes", int_parser(1024), 1 << 20,
            "Longer lines are shipped in parts of this size, flagged 'split'.", metavar="BYTES"),
    Setting("ship.redact", parse_bool, True, "Redact secrets in raw lines and other programs' JSON records.",
            kind="bool"),
    Setting("ship.poll-interval", parse_duration, 0.1, "How often to look for new lines when idle.",
            metavar="DURATION"),
    STORE_RETENTION_SETTING,
    *OPENSEARCH_SETTINGS,
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + SHIP_SETTINGS)


def run(cfg: dict[str, Any]) -> int:
    from mlops_obs.logs import configure, get_logger
    from mlops_obs.logs.backend import Backend, open_sink
    from mlops_obs.logs.shipper import Shipper, ShipperOptions, StateDirBusy, record_failure
    from mlops_obs.logs.sink import Stats
    from mlops_obs.logs.store import retention_from_config

    configure(cfg["log.level"], cfg["log.format"], stream=sys.stderr)
    log = get_logger(component="shipper")
    if not cfg["source"]:
        raise ConfigError("source", "give at least one --source GLOB")
    try:
        backend = Backend.from_config(cfg, default_store=DEFAULT_STORE, default_state=DEFAULT_OPENSEARCH_STATE)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # an unreadable password file
        print(f"mlops-obs ship: error: {e}", file=sys.stderr)
        return 1
    for pattern in cfg["source"]:
        if not glob.glob(os.path.expanduser(pattern), recursive=True):
            print(f"mlops-obs ship: warning: --source {pattern!r} matches no file yet; following it anyway",
                  file=sys.stderr)  # fmt: skip
    store_dir = backend.store
    retention = retention_from_config(cfg, store_dir, log)
    if store_dir is not None:
        state_dir: Path = cfg["state"] or store_dir / "shipper-state"
    else:
        assert backend.opensearch is not None and backend.opensearch.state_dir is not None
        state_dir = backend.opensearch.state_dir  # the checkpoint beside the dead-letter file
    opts = ShipperOptions(
        sources=cfg["source"],
        state_dir=state_dir,
        batch_events=cfg["ship.batch-events"],
        max_line_bytes=cfg["ship.max-line-bytes"],
        poll_interval=cfg["ship.poll-interval"],
        redact=cfg["ship.redact"],
        # never ship our own database (a --source of "/data/**" would otherwise feed back into itself)
        exclude=[*cfg["ship.exclude"], *([str(store_dir / "**")] if store_dir else [])],
    )
    stats = Stats()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"mlops-obs ship: error: cannot create state directory {str(state_dir)!r}: {e.strerror}", file=sys.stderr)
        return 1
    sink = None
    try:
        sink = open_sink(backend, log=log, stats=stats)
        shipper = Shipper(opts, sink, log=log, stats=stats)
    except (OSError, ValueError) as e:
        if sink is not None:
            sink.close()
        if not isinstance(e, StateDirBusy):  # the holder is running and writing its own stats
            record_failure(state_dir, f"{type(e).__name__}: {e}")
        print(f"mlops-obs ship: error: {e}", file=sys.stderr)
        return 1

    def _stop(signum: int, frame: Any) -> None:
        shipper.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("shipper starting", sources=cfg["source"], sink=str(backend), state=str(state_dir), once=cfg["once"])
    if retention is not None and not cfg["once"]:
        retention.start()
    try:
        shipper.run(once=cfg["once"])
    except (OSError, ValueError) as e:  # a damaged store, --once without a checkpoint: said in stats.json too
        print(f"mlops-obs ship: error: {e}", file=sys.stderr)
        return 1
    finally:
        shipper.close()
        if retention is not None and cfg["once"]:
            retention.run_pass()  # a `ship --once` from cron keeps the store trimmed too
        elif retention is not None:
            retention.stop()
    s = shipper.stats
    log.info("shipper stopped", lines_read=s.lines_read, events_shipped=s.events_shipped, retries=s.retries,
             dead_letters=s.dead_letters)  # fmt: skip
    return 0
