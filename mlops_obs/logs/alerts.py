"""Alert intake: Alertmanager webhook notifications (payload version 4) stored as events of the schema
(``kind="alert"``) through a sink, so replay shows alerts on the same timeline as the job's logs.

Alertmanager re-sends a group's notification on every ``group_interval`` / ``repeat_interval`` and
after a failed delivery, so the event ``_id`` is derived from what identifies one *state change* of one
alert (its fingerprint, status and ``startsAt``): redelivery stores nothing new, while the resolve of
the same alert is a new event. The HTTP answer is sent only after the sink holds the events, so a
crash between the two makes Alertmanager retry instead of losing the alert; a sink that cannot take
them in time gets a 503, which Alertmanager also retries.

:class:`AlertIntake` is everything but HTTP (body in, status and text out); :class:`AlertReceiver` is
the small HTTP server in front of it (``mlops-obs alert-sink`` runs both).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import orjson

from mlops_obs.logs.sink import Events, Sink, Stop, say

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

SOURCE = "alertmanager"
MAX_BODY = 16 * 1024 * 1024
LEVELS = {"critical": "critical", "warning": "warning", "info": "info"}


class PayloadError(ValueError):
    """A webhook body that is not an Alertmanager v4 notification; ``str()`` is the 400 answer."""


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


def send_within(sink: Sink, events: Events, deadline: float) -> int:
    """One :meth:`~mlops_obs.logs.sink.Sink.send` bounded in time, for a caller that must answer: a
    sink retries for as long as it takes (right for the shipper, which just stops reading), a webhook
    cannot wait that long. ``stop`` is set after ``deadline`` seconds, or before the first attempt for
    0 (one attempt). When the sink stopped on an error of its own that error is raised, else
    ``TimeoutError``; the caller's redelivery is harmless, as sinks are idempotent on ``_id``."""
    stop = threading.Event()
    timer = None
    if deadline > 0:
        timer = threading.Timer(deadline, stop.set)
        timer.daemon = True
        timer.start()
    else:
        stop.set()
    try:
        return sink.send(events, stop)
    except Stop as e:
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise TimeoutError(f"the sink did not accept the alerts within {deadline:g}s") from None
    finally:
        if timer is not None:
            timer.cancel()


class AlertIntake:
    """Webhook bodies to events in ``sink``, each delivery bounded by ``deadline`` seconds (see
    :func:`send_within`); :meth:`handle` gives the HTTP status and text to answer with."""

    def __init__(self, sink: Sink, *, deadline: float = 0.0, log: FilteringBoundLogger | None = None) -> None:
        self.sink = sink
        self.deadline = deadline
        self.log = log

    def handle(self, raw: bytes) -> tuple[int, str]:
        try:
            events = alert_events(orjson.loads(raw))
        except orjson.JSONDecodeError as e:
            return 400, f"body is not JSON: {e}"
        except PayloadError as e:
            say(self.log, "warning", "rejected webhook", error=str(e))
            return 400, str(e)
        try:
            new = send_within(self.sink, events, self.deadline)
        except Exception as e:  # the sink is unhappy: 5xx makes Alertmanager retry later
            say(self.log, "error", "cannot store alerts", error=f"{type(e).__name__}: {e}")
            return 503, f"cannot store alerts: {type(e).__name__}"
        say(self.log, "info", "alerts received", alerts=len(events), new=new)
        return 200, f"stored {new} of {len(events)}"


class AlertReceiver:
    """The HTTP server in front of an :class:`AlertIntake`: ``POST /alerts`` (or ``/``), and
    ``GET /-/healthy`` and ``/-/ready``."""

    def __init__(self, address: tuple[str, int], intake: AlertIntake) -> None:
        self.intake = intake

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
                code, msg = intake.handle(raw)
                self._answer(code, msg.encode() + b"\n")

        self.httpd = ThreadingHTTPServer(address, Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start_background(self) -> AlertReceiver:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="alert-sink", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
