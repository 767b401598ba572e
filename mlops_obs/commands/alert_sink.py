"""``mlops-obs alert-sink``: receive Alertmanager webhooks (payload version 4) and store every alert
notification as an event (``kind="alert"``) in the embedded store or OpenSearch, so replay shows
alerts on the same timeline as the job's logs. The intake itself is :mod:`mlops_obs.logs.alerts`,
served through the project's hardened HTTP server (:mod:`mlops_obs.web`).

Only ``application/json`` is taken (a browser page cannot post it cross-site without a preflight),
each alert is checked on its own (bad ones answered 422 with reasons, good ones stored), and
``--web.config.file`` adds TLS and basic auth in the exporter-toolkit format, re-read on SIGHUP; a
file that would turn TLS or auth off is refused and the running one kept.

A store that cannot take an alert answers 503 at once (its writes are local; SQLite's busy timeout
has already waited out a lock); OpenSearch gets ``--opensearch.deadline`` before the 503.
Alertmanager retries either. Exit codes: 0 stopped by SIGTERM/SIGINT, 2 a bad setting, an unusable
web config or an address that cannot be listened on.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Mapping
from typing import Any

from mlops_obs.commands import signals_for_sigwait
from mlops_obs.config import (
    COMMON_SETTINGS,
    ConfigError,
    Setting,
    int_parser,
    parse_duration,
    parse_listen_address,
    parse_optional_path,
)
from mlops_obs.logs.opensearch import OPENSEARCH_SETTINGS, OPENSEARCH_URL_SETTING
from mlops_obs.logs.store import STORE_RETENTION_SETTING, retention_from_config

ALERT_SINK_SETTINGS: tuple[Setting, ...] = (
    Setting("web.listen-address", parse_listen_address, ("127.0.0.1", 9478),
            "Address to receive webhooks on (point Alertmanager's webhook_configs url at http://ADDR/alerts).",
            metavar="HOST:PORT"),
    Setting("web.config.file", parse_optional_path, None,
            "exporter-toolkit web configuration (TLS, client certificates, bcrypt basic auth); re-read on SIGHUP. "
            "Alertmanager's webhook_configs http_config then carries the matching tls_config / basic_auth.",
            metavar="PATH"),
    Setting("web.max-requests", int_parser(minimum=1, maximum=64), 16,
            "Webhooks handled at once; more get 503 (Alertmanager retries).", metavar="N"),
    Setting("store", parse_optional_path, None, "Directory of the embedded event store to write alerts into.",
            metavar="DIR"),
    Setting("state", parse_optional_path, None,
            "With --opensearch: directory for the dead-letter file of alerts OpenSearch rejects.", metavar="DIR"),
    Setting("opensearch.deadline", parse_duration, 10.0,
            "With --opensearch: give up one webhook after this long (answer 503; Alertmanager retries).",
            metavar="DURATION"),
    # The shipper's OpenSearch settings (URL, index prefix, credentials files, TLS), shared on purpose so
    # alerts land in the same indices as the logs and one config file serves both commands.
    STORE_RETENTION_SETTING,
    OPENSEARCH_URL_SETTING,
    *OPENSEARCH_SETTINGS,
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + ALERT_SINK_SETTINGS)


def run(cfg: Mapping[str, Any]) -> int:
    with signals_for_sigwait() as handled:
        return _serve(cfg, handled)


def _serve(cfg: Mapping[str, Any], handled: set[signal.Signals]) -> int:
    from mlops_obs.logs import configure, get_logger
    from mlops_obs.logs.alerts import AlertIntake, AlertReceiver
    from mlops_obs.logs.backend import Backend, open_sink
    from mlops_obs.web import config as web_config
    from mlops_obs.web.server import Limits

    configure(cfg["log.level"], cfg["log.format"])
    log = get_logger(component="alert-sink")
    web_file = cfg.get("web.config.file")
    try:
        web = web_config.load(web_file)
    except web_config.WebConfigError as e:
        raise ConfigError("web.config.file", str(e)) from None
    try:
        backend = Backend.from_config(cfg)
        retention = retention_from_config(cfg, backend.store, log)
        sink = open_sink(backend, log=log)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # a store directory or password file that cannot be used
        raise ConfigError("opensearch" if cfg.get("opensearch") else "store", str(e)) from None
    deadline = float(cfg["opensearch.deadline"]) if backend.opensearch is not None else 0.0
    intake = AlertIntake(sink, deadline=deadline, log=log)
    limits = Limits(max_requests=int(cfg.get("web.max-requests", 16)))
    try:
        server = AlertReceiver(cfg["web.listen-address"], intake, web=web, limits=limits, log=log)
    except OSError as e:
        sink.close()
        host, port = cfg["web.listen-address"]
        raise ConfigError("web.listen-address", f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.start()
    if retention is not None:
        retention.start()
    log.info("alert-sink listening", url=server.url + "/alerts", store=str(cfg["store"]), tls=web.tls,
             basic_auth=bool(web.users))  # fmt: skip
    try:
        while signal.sigwait(handled) == signal.SIGHUP:
            try:
                server.web = web_config.load_for_reload(server.web, web_file)
            except web_config.WebConfigError as e:
                log.error("reload failed; keeping the running web config", error=str(e))
                continue
            log.info("web config reloaded", tls=server.web.tls, basic_auth=bool(server.web.users))
    finally:
        server.stop()
        sink.close()
        if retention is not None:
            retention.stop()
    return 0
