"""``mlops-obs alert-sink``: an Alertmanager webhook (payload version 4) receiver that stores every alert
notification as an event, so replay shows alerts on the same timeline as the job's logs.

Alertmanager re-sends a group's notification on every ``group_interval`` / ``repeat_interval`` and
after a failed delivery, so the event ``_id`` is derived from what identifies one *state change* of one
alert (its fingerprint, status and ``startsAt``): redelivery stores nothing new, while the resolve of
the same alert is a new event. The HTTP answer is sent only after the store committed, so a crash
between the two makes Alertmanager retry instead of losing the alert.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from mlops_obs.config import (
    COMMON_SETTINGS,
    ConfigError,
    Setting,
    parse_duration,
    parse_listen_address,
    parse_optional_path,
)
from mlops_obs.logs.ship_command import SHIP_SETTINGS

SOURCE = "alertmanager"
MAX_BODY = 16 * 1024 * 1024
LEVELS = {"critical": "critical", "warning": "warning", "info": "info"}

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
    *(s for s in SHIP_SETTINGS if s.key == "opensearch" or s.key.startswith("opensearch.")),
)  # fmt: skip


class PayloadError(ValueError):
    """A webhook body that is not an Alertmanager v4 notification; ``str()`` is the 400 answer."""


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + ALERT_SINK_SETTINGS)


def event_id(fingerprint: str, status: str, starts_at: str) -> str:
    return "alert-" + hashlib.sha256(f"{fingerprint}\0{status}\0{starts_at}".encode()).hexdigest()[:32]


def _str_map(v: Any, what: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise PayloadError(f"{what} must be an object")
    return {str(k): str(x) for k, x in v.items()}


def alert_events(payload: Any) -> list[dict[str, Any]]:
    """Events (store schema, ``kind="alert"``) for every alert in one notification, or :class:`PayloadError`."""
    if not isinstance(payload, Mapping):
        raise PayloadError("body must be a JSON object")
    version = str(payload.get("version", ""))
    if version != "4":
        raise PayloadError(f'unsupported webhook payload version {version!r} (expected "4")')
    items = payload.get("alerts")
    if not isinstance(items, list):
        raise PayloadError("alerts must be a list")
    receiver = str(payload.get("receiver", ""))
    group_key = str(payload.get("groupKey", ""))
    events = []
    for i, a in enumerate(items):
        if not isinstance(a, Mapping):
            raise PayloadError(f"alerts[{i}] must be an object")
        labels = _str_map(a.get("labels"), f"alerts[{i}].labels")
        annotations = _str_map(a.get("annotations"), f"alerts[{i}].annotations")
        status = str(a.get("status") or payload.get("status") or "")
        if status not in ("firing", "resolved"):
            raise PayloadError(f"alerts[{i}].status must be firing or resolved, got {status!r}")
        starts_at = a.get("startsAt")
        if not isinstance(starts_at, str) or not starts_at:
            raise PayloadError(f"alerts[{i}].startsAt is missing")
        fingerprint = a.get("fingerprint")
        if not isinstance(fingerprint, str) or not fingerprint:
            # Alertmanager always sends one; derive a stable stand-in from the label set otherwise.
            fingerprint = hashlib.sha256(orjson.dumps(labels, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
        ends_at = a.get("endsAt")
        # A resolve happened at endsAt; a firing notification is about the alert that started at startsAt.
        when = ends_at if status == "resolved" and isinstance(ends_at, str) and ends_at[:4] > "0001" else starts_at
        alertname = labels.get("alertname", "")
        severity = labels.get("severity", "")
        rank_s = labels.get("rank")
        summary = annotations.get("summary") or annotations.get("description") or alertname
        events.append(
            {
                "_id": event_id(fingerprint, status, starts_at),
                "@timestamp": when,
                "kind": "alert",
                "job": labels.get("job"),
                "rank": int(rank_s) if rank_s is not None and rank_s.lstrip("-").isdigit() else None,
                "node": labels.get("node") or labels.get("instance"),
                "level": "info" if status == "resolved" else LEVELS.get(severity, "warning"),
                "message": f"[{status.upper()}] {alertname}: {summary}",
                "seq": None,
                "source": f"{SOURCE}/{receiver}" if receiver else SOURCE,
                "offset": 0,
                "fields": {
                    "alertname": alertname,
                    "severity": severity,
                    "status": status,
                    "fingerprint": fingerprint,
                    "startsAt": starts_at,
                    "endsAt": ends_at,
                    "generatorURL": a.get("generatorURL"),
                    "groupKey": group_key,
                    "labels": labels,
                    "annotations": annotations,
                },
            }
        )
    return events


class OpenSearchPut:
    """``put(events)`` over the shipper's OpenSearch sink, bounded in time: the sink retries forever (right
    for the shipper, which just stops reading), but a webhook must be answered, and a 503 makes
    Alertmanager redeliver later, which ``create`` with our ``_id`` makes harmless."""

    def __init__(self, sink: Any, deadline: float) -> None:
        self.sink = sink
        self.deadline = deadline

    def put(self, events: list[dict[str, Any]]) -> int:
        from mlops_obs.logs.shipper import Stop

        stop = threading.Event()
        timer = threading.Timer(self.deadline, stop.set)
        timer.daemon = True
        timer.start()
        try:
            self.sink.send(events, stop)
        except Stop:
            raise TimeoutError(f"OpenSearch did not accept the alerts within {self.deadline:g}s") from None
        finally:
            timer.cancel()
        return len(events)  # OpenSearch answers 409 for a redelivery; it is not told apart here

    def close(self) -> None:
        self.sink.close()


class AlertSink:
    """The HTTP receiver; ``sink`` is anything with ``put(events) -> int`` (the event store)."""

    def __init__(self, address: tuple[str, int], sink: Any, log: Any = None) -> None:
        self.sink = sink
        self.log = log
        self.received = 0
        self.stored = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _answer(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path in ("/-/healthy", "/-/ready"):
                    self._answer(200, b"OK\n")
                else:
                    self._answer(404, b"POST Alertmanager webhooks to /alerts\n")

            def do_POST(self) -> None:
                if self.path.split("?", 1)[0] not in ("/", "/alerts"):
                    self._answer(404, b"POST Alertmanager webhooks to /alerts\n")
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length < 0 or length > MAX_BODY:
                    self._answer(413 if length > MAX_BODY else 400, b"bad Content-Length\n")
                    return
                raw = self.rfile.read(length)
                code, msg = outer.handle(raw)
                self._answer(code, msg.encode() + b"\n")

        self.httpd = ThreadingHTTPServer(address, Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def handle(self, raw: bytes) -> tuple[int, str]:
        try:
            events = alert_events(orjson.loads(raw))
        except orjson.JSONDecodeError as e:
            return 400, f"body is not JSON: {e}"
        except PayloadError as e:
            if self.log:
                self.log.warning("rejected webhook", error=str(e))
            return 400, str(e)
        try:
            new = int(self.sink.put(events))
        except Exception as e:  # the store is unhappy: 5xx makes Alertmanager retry later
            if self.log:
                self.log.error("cannot store alerts", error=f"{type(e).__name__}: {e}")
            return 503, f"cannot store alerts: {type(e).__name__}"
        self.received += len(events)
        self.stored += new
        if self.log:
            self.log.info("alerts received", alerts=len(events), new=new)
        return 200, f"stored {new} of {len(events)}"

    def start_background(self) -> AlertSink:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="alert-sink", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def run(cfg: Mapping[str, Any]) -> int:
    from mlops_obs.logs import configure, get_logger
    from mlops_obs.logs.store import EventStore

    configure(cfg["log.level"], cfg["log.format"])
    log = get_logger(component="alert-sink")
    store: Any
    if cfg.get("opensearch") and cfg.get("store"):
        raise ConfigError("store", "give either --store or --opensearch, not both")
    if cfg.get("opensearch"):
        from mlops_obs.logs.opensearch import OpenSearchSink, settings_from_config

        if not cfg.get("state"):
            raise ConfigError("state", "--opensearch needs --state DIR for the dead-letter file")
        try:
            Path(cfg["state"]).mkdir(parents=True, exist_ok=True)
            os_settings = settings_from_config(dict(cfg), Path(cfg["state"]))
        except (OSError, ValueError) as e:
            raise ConfigError("opensearch", str(e)) from None
        store = OpenSearchPut(OpenSearchSink(os_settings, log), float(cfg["opensearch.deadline"]))
    elif cfg.get("store"):
        try:
            store = EventStore(Path(cfg["store"]))
        except OSError as e:
            raise ConfigError("store", str(e)) from None
    else:
        raise ConfigError("store", "give --store DIR or --opensearch URL (where alerts are written)")
    try:
        server = AlertSink(cfg["web.listen-address"], store, log)
    except OSError as e:
        store.close()
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
        store.close()
    return 0
