"""Alert intake: Alertmanager webhook notifications (payload version 4) stored as events of the schema
(``kind="alert"``) through a sink, so replay shows alerts on the same timeline as the job's logs.

Alertmanager re-sends a group's notification on every ``group_interval`` / ``repeat_interval`` and
after a failed delivery, so the event ``_id`` is derived from what identifies one *state change* of one
alert (its fingerprint, status and ``startsAt``): redelivery stores nothing new, while the resolve of
the same alert is a new event. The HTTP answer is sent only after the sink holds the events, so a
crash between the two makes Alertmanager retry instead of losing the alert; a sink that cannot take
them in time gets a 503, which Alertmanager also retries.

Each alert of a notification is checked on its own: the good ones are stored and the bad ones
(a rank that is not a small decimal number, a time that is not a time, labels that are not strings)
are named with their reason in a 422 answer. Alertmanager does not retry a 4xx, so one bad alert
among ten thousand neither blocks the others nor makes the notification come back forever; were it
re-sent anyway, the good ones are not doubled (their ``_id`` is the same).

:class:`AlertIntake` is everything but HTTP (body in, status and text out); :class:`AlertReceiver` is
its routes on the project's hardened server (:mod:`mlops_obs.web.server`: deadlines, a connection
budget, TLS and basic auth from ``--web.config.file``); ``mlops-obs alert-sink`` runs both.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from mlops_obs.logs.sink import Events, Sink, Stop, format_timestamp, say
from mlops_obs.web.config import WebConfig
from mlops_obs.web.server import HTTPServer, Limits, Request, Response, Route

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

SOURCE = "alertmanager"
MAX_BODY = 16 * 1024 * 1024
LEVELS = {"critical": "critical", "warning": "warning", "info": "info"}
# A rank label: ASCII digits only (str.isdigit() also takes "²" and other scripts' digits, which
# int() refuses), and few enough of them for the store's integer column and for int() to be cheap.
_RANK = re.compile(r"[0-9]{1,9}")
# Reasons named in one answer; the rest are counted (an answer is read by a person in Alertmanager's log).
MAX_REASONS = 20
JSON_TYPES = ("application/json",)


class PayloadError(ValueError):
    """A webhook body that is not an Alertmanager v4 notification; ``str()`` is the 400 answer."""


class AlertError(ValueError):
    """One alert of a notification that cannot be stored; ``str()`` is its reason."""


def event_id(fingerprint: str, status: str, starts_at: str) -> str:
    return "alert-" + hashlib.sha256(f"{fingerprint}\0{status}\0{starts_at}".encode()).hexdigest()[:32]


def _shown(v: Any) -> str:
    """A value as a reason shows it: repr, cut short (a 5000-digit rank is not echoed whole)."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _str_map(v: Any, what: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise AlertError(f"{what} must be an object")
    out = {}
    for k, x in v.items():
        if not isinstance(x, str):
            raise AlertError(f"{what}.{k} must be a string, got {type(x).__name__}")
        out[str(k)] = x
    return out


def _time(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise AlertError(f"{what} is missing")
    try:
        return format_timestamp(v)
    except (ValueError, OverflowError):
        raise AlertError(f"{what} is not an RFC 3339 time: {_shown(v)}") from None


def _rank(labels: Mapping[str, str]) -> int | None:
    s = labels.get("rank")
    if s is None or s == "":
        return None
    if _RANK.fullmatch(s) is None:
        raise AlertError(f"labels.rank must be a decimal number of at most 9 digits, got {_shown(s)}")
    return int(s)


def _envelope(payload: Any) -> tuple[list[Any], str, str, str]:
    """The notification's alerts, receiver, group key and status, or :class:`PayloadError`."""
    if not isinstance(payload, Mapping):
        raise PayloadError("body must be a JSON object")
    version = str(payload.get("version", ""))
    if version != "4":
        raise PayloadError(f'unsupported webhook payload version {version!r} (expected "4")')
    items = payload.get("alerts")
    if not isinstance(items, list):
        raise PayloadError("alerts must be a list")
    return items, str(payload.get("receiver", "")), str(payload.get("groupKey", "")), str(payload.get("status") or "")


def alert_event(a: Any, receiver: str, group_key: str, group_status: str) -> dict[str, Any]:
    """The event (store schema, ``kind="alert"``) of one alert of a notification, or :class:`AlertError`."""
    if not isinstance(a, Mapping):
        raise AlertError("must be an object")
    labels = _str_map(a.get("labels"), "labels")
    annotations = _str_map(a.get("annotations"), "annotations")
    status = a.get("status") or group_status
    if status not in ("firing", "resolved"):
        raise AlertError(f"status must be firing or resolved, got {_shown(status)}")
    starts_at = a.get("startsAt")
    started = _time(starts_at, "startsAt")
    ends_at = a.get("endsAt")
    fingerprint = a.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        # Alertmanager always sends one; derive a stable stand-in from the label set otherwise.
        fingerprint = hashlib.sha256(orjson.dumps(labels, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    # A resolve happened at endsAt; a firing notification is about the alert that started at startsAt.
    when = started
    if status == "resolved" and isinstance(ends_at, str) and ends_at[:4] > "0001":
        when = _time(ends_at, "endsAt")
    alertname = labels.get("alertname", "")
    severity = labels.get("severity", "")
    summary = annotations.get("summary") or annotations.get("description") or alertname
    return {
        "_id": event_id(fingerprint, status, str(starts_at)),
        "@timestamp": when,
        "kind": "alert",
        "job": labels.get("job"),
        "rank": _rank(labels),
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
            "generatorURL": a.get("generatorURL") if isinstance(a.get("generatorURL"), str) else None,
            "groupKey": group_key,
            "labels": labels,
            "annotations": annotations,
        },
    }


def alert_events(payload: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The events of every good alert in one notification and, per bad one, ``"alerts[i]: reason"``;
    :class:`PayloadError` when the notification itself is not one."""
    items, receiver, group_key, group_status = _envelope(payload)
    events, rejected = [], []
    for i, a in enumerate(items):
        try:
            events.append(alert_event(a, receiver, group_key, group_status))
        except AlertError as e:
            rejected.append(f"alerts[{i}]: {e}")
    return events, rejected


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
            events, rejected = alert_events(orjson.loads(raw))
        except orjson.JSONDecodeError as e:
            return 400, f"body is not JSON: {e}"
        except PayloadError as e:
            say(self.log, "warning", "rejected webhook", error=str(e))
            return 400, str(e)
        new = 0
        if events:
            try:
                new = send_within(self.sink, events, self.deadline)
            except Exception as e:  # the sink is unhappy: 5xx makes Alertmanager retry later
                say(self.log, "error", "cannot store alerts", error=f"{type(e).__name__}: {e}")
                return 503, f"cannot store alerts: {type(e).__name__}"
        total = len(events) + len(rejected)
        if not rejected:
            say(self.log, "info", "alerts received", alerts=total, new=new)
            return 200, f"stored {new} of {total}"
        say(self.log, "warning", "rejected alerts", alerts=total, new=new, rejected=len(rejected), first=rejected[0])
        lines = rejected[:MAX_REASONS]
        if len(rejected) > MAX_REASONS:
            lines.append(f"... and {len(rejected) - MAX_REASONS} more")
        head = f"stored {new} of {total}; rejected {len(rejected)} (not retried by Alertmanager):"
        return 422, "\n".join([head, *lines])


def is_json(content_type: str | None) -> bool:
    """Whether a request's ``Content-Type`` is JSON. Only JSON is taken: ``text/plain``, form and
    multipart bodies are what a web page can make a browser send cross-site without a preflight, so
    accepting them would let any page the operator visits forge alerts."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() in JSON_TYPES


class AlertReceiver(HTTPServer):
    """The alert intake's routes on the shared server: ``POST /alerts`` (or ``/``), ``GET /-/healthy``
    and ``/-/ready``. Binds in the constructor (``OSError``)."""

    def __init__(
        self,
        address: tuple[str, int],
        intake: AlertIntake,
        *,
        web: WebConfig | None = None,
        limits: Limits | None = None,
        log: Any = None,
    ) -> None:
        self.intake = intake
        routes = (
            Route("/alerts", self._post, ("POST",), blocking=True, max_body=MAX_BODY),
            Route("/", self._post, ("POST",), blocking=True, max_body=MAX_BODY),
            Route("/-/healthy", lambda _: Response(200, b"OK\n")),
            Route("/-/ready", lambda _: Response(200, b"OK\n")),
        )
        super().__init__(address, routes, web=web, limits=limits or Limits(max_requests=16), log=log,
                         name="alert-sink-http")  # fmt: skip

    def _post(self, request: Request) -> Response:
        if not is_json(request.headers.get("content-type")):
            return Response(415, b"Content-Type must be application/json (Alertmanager's webhook).\n")
        code, text = self.intake.handle(request.body)
        return Response(code, text.encode() + b"\n")

    def start(self) -> AlertReceiver:
        self.start_background()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
