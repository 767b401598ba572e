"""``mlops-obs alert-sink``: receive Alertmanager webhooks (payload version 4) and store every alert
notification as an event (``kind="alert"``) in the embedded store or OpenSearch, so replay shows
alerts on the same timeline as the job's logs. The intake itself is :mod:`mlops_obs.logs.alerts`.

A store that cannot take an alert answers 503 at once (its writes are local; SQLite's busy timeout
has already waited out a lock); OpenSearch gets ``--opensearch.deadline`` before the 503.
Alertmanager retries either. Exit codes: 0 stopped by SIGTERM/SIGINT, 2 a bad setting or an address
that cannot be listened on.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Mapping
from typing import Any

from mlops_obs.config import (
    COMMON_SETTINGS,
    ConfigError,
    Setting,
    parse_duration,
    parse_listen_address,
    parse_optional_path,
)
from mlops_obs.logs.opensearch import OPENSEARCH_SETTINGS, OPENSEARCH_URL_SETTING

ALERT_SINK_SETTINGS: tuple[Setting, ...] = (
    Setting("web.listen-address", parse_listen_address, ("127.0.0.1", 9478),
            "Address to receive webhooks on (point Alertmanager's webhook_configs url at http://ADDR/alerts).",
            metavar="HOST:PORT"),
    Setting("store", parse_optional_path, None, "Directory of the embedded event store to write alerts into.",
            metavar="DIR"),
    Setting("state", parse_optional_path, None,
            "With --opensearch: directory for the dead-letter file of alerts OpenSearch rejects.", metavar="DIR"),
    Setting("opensearch.deadline", parse_duration, 10.0,
            "With --opensearch: give up one webhook after this long (answer 503; Alertmanager retries).",
            metavar="DURATION"),
    # The shipper's OpenSearch settings (URL, index prefix, credentials files, TLS), shared on purpose so
    # alerts land in the same indices as the logs and one config file serves both commands.
    OPENSEARCH_URL_SETTING,
    *OPENSEARCH_SETTINGS,
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + ALERT_SINK_SETTINGS)


def run(cfg: Mapping[str, Any]) -> int:
    from mlops_obs.logs import configure, get_logger
    from mlops_obs.logs.alerts import AlertIntake, AlertReceiver
    from mlops_obs.logs.backend import Backend, open_sink

    configure(cfg["log.level"], cfg["log.format"])
    log = get_logger(component="alert-sink")
    try:
        backend = Backend.from_config(cfg)
        sink = open_sink(backend, log=log)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # a store directory or password file that cannot be used
        raise ConfigError("opensearch" if cfg.get("opensearch") else "store", str(e)) from None
    deadline = float(cfg["opensearch.deadline"]) if backend.opensearch is not None else 0.0
    try:
        server = AlertReceiver(cfg["web.listen-address"], AlertIntake(sink, deadline=deadline, log=log))
    except OSError as e:
        sink.close()
        raise ConfigError("web.listen-address", f"cannot listen: {e.strerror or e}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start_background()
    log.info("alert-sink listening", url=server.url + "/alerts", store=str(cfg["store"]))
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        sink.close()
    return 0
