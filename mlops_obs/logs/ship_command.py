"""``mlops-obs ship``: follow log files into the embedded store (default) or OpenSearch.

``--once`` ships everything present now, waits for the acknowledgements, and exits 0: the way to
collect a finished job's logs. Without it the shipper follows the files until SIGTERM/SIGINT.
Secrets are never settings: the OpenSearch password comes from ``--opensearch.password-file`` or the
``MLOPS_OBS_OPENSEARCH_PASSWORD`` environment variable.
"""

from __future__ import annotations

import argparse
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
    parse_optional_str,
    parse_str,
)


def _parse_url(v: Any) -> str | None:
    s = parse_optional_str(v)
    if s is None:
        return None
    if not s.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {s!r}")
    return s.rstrip("/")


SHIP_SETTINGS: tuple[Setting, ...] = (
    Setting("source", list_parser(), [], "Glob of log files to follow (include rotated names, e.g. 'logs/*.jsonl*').",
            kind="list", metavar="GLOB"),
    Setting("store", parse_optional_path, None,
            "Embedded store directory (the default sink; ./mlops-obs-store when no OpenSearch URL is given).",
            metavar="DIR"),
    Setting("opensearch", _parse_url, None, "OpenSearch URL to ship to instead of the embedded store.",
            metavar="URL"),
    Setting("state", parse_optional_path, None,
            "Checkpoint directory (default: <store>/shipper-state, or ./mlops-obs-ship-state for OpenSearch). "
            "Point the sidecar's --shipper.state-dir here.", metavar="DIR"),
    Setting("once", parse_bool, False, "Ship everything present now, wait for acknowledgements, exit.", kind="bool"),
    Setting("ship.exclude", list_parser(), [], "Glob of files not to ship.", kind="list", metavar="GLOB"),
    Setting("ship.batch-events", int_parser(1, 100_000), 5000, "Most events per batch (one store transaction).",
            metavar="N"),
    Setting("ship.max-line-bytes", int_parser(1024), 1 << 20,
            "Longer lines are shipped in parts of this size, flagged 'split'.", metavar="BYTES"),
    Setting("ship.redact", parse_bool, True, "Redact secrets in raw (non-JSON) lines.", kind="bool"),
    Setting("ship.poll-interval", parse_duration, 0.1, "How often to look for new lines when idle.",
            metavar="DURATION"),
    Setting("opensearch.index-prefix", parse_str, "mlops-logs",
            "Daily indices <prefix>-YYYY.MM.DD, chosen from each event's own timestamp."),
    Setting("opensearch.max-body-bytes", int_parser(1024), 5 << 20, "Cap on one _bulk request body.",
            metavar="BYTES"),
    Setting("opensearch.retention", parse_duration, 30 * 86400.0, "ISM policy: delete indices older than this.",
            metavar="DURATION"),
    Setting("opensearch.timeout", parse_duration, 30.0, "Timeout of one _bulk request.", metavar="DURATION"),
    Setting("opensearch.backoff-max", parse_duration, 10.0, "Longest pause between retries.", metavar="DURATION"),
    Setting("opensearch.username", parse_optional_str, None, "Basic-auth user."),
    Setting("opensearch.password-file", parse_optional_path, None, "File holding the basic-auth password.",
            metavar="PATH"),
    Setting("opensearch.ca-file", parse_optional_path, None, "CA bundle to verify the server.", metavar="PATH"),
    Setting("opensearch.client-cert", parse_optional_path, None, "Client certificate (mTLS).", metavar="PATH"),
    Setting("opensearch.client-key", parse_optional_path, None, "Client key (mTLS).", metavar="PATH"),
    Setting("opensearch.insecure-skip-verify", parse_bool, False, "Do not verify the server certificate.",
            kind="bool"),
    Setting("opensearch.setup", parse_bool, True, "Install the index template and ISM policy at start.",
            kind="bool"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + SHIP_SETTINGS)


def run(cfg: dict[str, Any]) -> int:
    from mlops_obs.logs import configure, get_logger
    from mlops_obs.logs.shipper import Shipper, ShipperOptions, StoreSink

    configure(cfg["log.level"], cfg["log.format"], stream=sys.stderr)
    log = get_logger(component="shipper")
    if not cfg["source"]:
        raise ConfigError("source", "give at least one --source GLOB")
    if cfg["store"] is not None and cfg["opensearch"] is not None:
        raise ConfigError("store", "give --store or --opensearch, not both")
    store_dir: Path | None = cfg["store"]
    if cfg["opensearch"] is None and store_dir is None:
        store_dir = Path("mlops-obs-store")
    state_dir = cfg["state"] or (store_dir / "shipper-state" if store_dir else Path("mlops-obs-ship-state"))
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
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        if store_dir is not None:
            sink: Any = StoreSink(store_dir, log=log)
        else:
            from mlops_obs.logs.opensearch import OpenSearchSink, settings_from_config

            sink = OpenSearchSink(settings_from_config(cfg, state_dir), log=log)
        shipper = Shipper(opts, sink, log=log)
    except (OSError, ValueError) as e:
        print(f"mlops-obs ship: error: {e}", file=sys.stderr)
        return 1
    if hasattr(sink, "stats"):
        sink.stats = shipper.stats

    def _stop(signum: int, frame: Any) -> None:
        shipper.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("shipper starting", sources=cfg["source"], sink=str(store_dir or cfg["opensearch"]),
             state=str(state_dir), once=cfg["once"])  # fmt: skip
    try:
        shipper.run(once=cfg["once"])
    finally:
        shipper.close()
    s = shipper.stats
    log.info("shipper stopped", lines_read=s.lines_read, events_shipped=s.events_shipped, retries=s.retries,
             dead_letters=s.dead_letters)  # fmt: skip
    return 0
