"""How a replay looks: one line per event in aligned columns, repeated lines folded, gaps in a
process's ``seq`` marked, alerts set apart with their state; or ``--json``, one stored event a line.

Pure functions and one small state machine (:class:`Renderer`: fed events in timeline order, it gives
back the lines to print now), so every rule here is tested without a terminal or a store.

The columns: time (UTC, ``HH:MM:SS.ffffff``, a ``~`` after it when the event's time is not its own
but a bound, see ``fields.ts_source`` in :mod:`mlops_obs.logs.parse`; a ``--- date ---`` line when the
day changes), who (``rank N``, ``launcher``, the node of an alert or a node's line), the level, the
message (a multi-line event's further lines indented below it), the key fields as ``k=v``.

Folding: an event like the one before it (same kind and level, same message once digits are masked:
``[rank3]: ... peer [127.0.0.1]:20651`` and ``[rank5]: ... :20317`` are alike) within
:data:`FOLD_WINDOW` seconds of the first of the run is not printed; when the run ends one line says
``x37 similar on ranks 0,2-7``. The first of a run is printed at once, so ``--follow`` shows every new
kind of line without waiting.

Clocks: nodes' clocks differ. Given each node's clock bound (``|offset| + max error`` from the
kernel's adjtimex figures the sidecar exports, :func:`clock_header`), an event whose node differs from
the event printed before it, less than the two nodes' bounds apart, gets a ``?`` after its time: the
order of those two across nodes is not known. A node without a known bound counts as 0 (its own
clock is the reference there).

Gaps: every process writes its records with a ``seq`` counting up from 1 (the job-side logger, the
launcher); where the next ``seq`` of the same source jumps, a line says how many records are missing
(``rank 3: 12 lines lost between seq 40 and 53``). A ``seq`` that goes down is a restarted process:
no gap. Gaps are only looked for when nothing filters events out by content (``--level``,
``--grep``), as those make jumps of their own.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from mlops_obs.logs.parse import TRUSTED_TS_SOURCES

KEYS = ("_id", "@timestamp", "kind", "job", "rank", "node", "level", "message", "seq", "source", "offset", "fields")
"""The store's schema, in its order: what ``--json`` writes for each event."""
FOLD_WINDOW = 2.0
"""Seconds from the first event of a run of similar ones within which later ones fold into it."""
WHO_WIDTH = 10
LEVEL_WIDTH = 5
FIELDS_MAX = 240
"""Most characters of ``k=v`` fields on a line; a value is cut at :data:`VALUE_MAX`."""
VALUE_MAX = 80

_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_LEVELS: dict[str | None, tuple[str, str]] = {
    "debug": ("DEBUG", _DIM),
    "info": ("INFO", ""),
    "warning": ("WARN", "\x1b[33m"),
    "error": ("ERROR", "\x1b[31m"),
    "critical": ("CRIT", "\x1b[1;31m"),
}
_ALERT_STYLE = {"firing": "\x1b[1;35m", "resolved": "\x1b[32m"}
_HIDDEN = frozenset(("ts_source", "run_id", "labels", "annotations", "groupKey", "generatorURL", "fingerprint",
                     "startsAt", "endsAt", "alertname", "status", "raw", "block", "lines"))  # fmt: skip
_ALERT_LABELS = ("severity", "node", "gpu", "job", "rank", "mountpoint", "device")
_DIGITS = re.compile(r"\d+")


def json_line(ev: Mapping[str, Any]) -> bytes:
    """One event as the store keeps it (the keys of :data:`KEYS`, in that order), with its newline."""
    return orjson.dumps({k: ev.get(k) for k in KEYS}, default=str) + b"\n"


def ranges(numbers: Iterable[int]) -> str:
    """``0,2-7,9``: sorted, distinct, consecutive runs joined."""
    out: list[str] = []
    run: list[int] = []
    for n in sorted(set(numbers)):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [n]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def who(ev: Mapping[str, Any]) -> str:
    """The process or place an event is from, as the who column shows it (the launcher's records
    about a rank are the launcher's: their rank is a key field)."""
    if ev.get("kind") == "launcher":
        return "launcher"
    rank = ev.get("rank")
    if type(rank) is int:
        return f"rank {rank}"
    node = ev.get("node")
    if node:
        return str(node)
    src = str(ev.get("source") or "")
    return src.rsplit("/", 1)[-1] or "-"


def _seconds(ts: str) -> float:
    try:
        return _dt.datetime.fromisoformat(ts[:26]).replace(tzinfo=_dt.UTC).timestamp()
    except ValueError:
        return 0.0


def _value(v: Any) -> str:
    s = v if isinstance(v, str) else orjson.dumps(v, default=str).decode()
    if len(s) > VALUE_MAX:
        s = s[: VALUE_MAX - 3] + "..."
    if isinstance(v, str) and (not s or any(c in s for c in ' "=\n\t')):
        s = orjson.dumps(s).decode()
    return s


def key_fields(ev: Mapping[str, Any]) -> str:
    """The event's fields worth a glance, ``k=v`` (scalars only; an alert's labels that place it)."""
    fields = ev.get("fields")
    if not isinstance(fields, Mapping):
        return ""
    parts: list[str] = []
    if ev.get("kind") == "alert":
        labels = fields.get("labels")
        if isinstance(labels, Mapping):
            parts += [f"{k}={_value(labels[k])}" for k in _ALERT_LABELS if labels.get(k) not in (None, "")]
    else:
        if ev.get("kind") == "launcher" and type(ev.get("rank")) is int:
            parts.append(f"rank={ev['rank']}")
        for k, v in fields.items():
            if k in _HIDDEN or isinstance(v, dict | list) or v is None:
                continue
            parts.append(f"{k}={_value(v)}")
    out = " ".join(parts)
    return out if len(out) <= FIELDS_MAX else out[: FIELDS_MAX - 3] + "..."


def _approximate(ev: Mapping[str, Any]) -> bool:
    fields = ev.get("fields")
    src = fields.get("ts_source") if isinstance(fields, Mapping) else None
    return src is not None and src not in TRUSTED_TS_SOURCES


def _paint(text: str, style: str, color: bool) -> str:
    return f"{style}{text}{_RESET}" if color and style else text


def alert_state(ev: Mapping[str, Any]) -> str:
    fields = ev.get("fields")
    status = fields.get("status") if isinstance(fields, Mapping) else None
    if isinstance(status, str) and status:
        return status
    msg = str(ev.get("message", ""))
    return "resolved" if msg.startswith("[RESOLVED]") else "firing"


def clock_header(bounds: Mapping[str, float]) -> str:
    """The line saying which nodes' clock bounds the ``?`` marks come from."""
    if not bounds:
        return "clock bounds: none known (no node's adjtimex figures in Prometheus)"
    parts = ", ".join(f"{node} \u00b1{b * 1000:.3g} ms" for node, b in sorted(bounds.items()))
    return f"clock bounds (|offset| + max error): {parts}; '?' after a time: order across nodes uncertain"


def event_lines(ev: Mapping[str, Any], *, color: bool = False, uncertain: bool = False) -> list[str]:
    """The lines one event prints as (several for a multi-line message); ``uncertain``: its order
    against the event before it, from another node, is within their clocks' bounds."""
    ts = str(ev.get("@timestamp") or "")
    mark = "~" if _approximate(ev) else "?" if uncertain else " "
    clock = (ts[11:26] if len(ts) >= 26 else ts).ljust(15) + mark
    name, style = _LEVELS.get(ev.get("level"), (str(ev.get("level") or "-").upper()[:LEVEL_WIDTH], ""))
    head = f"{_paint(clock, _DIM, color)} {who(ev)[:24]:<{WHO_WIDTH}} {_paint(f'{name:<{LEVEL_WIDTH}}', style, color)} "
    indent = " " * (len(clock) + 1 + WHO_WIDTH + 1 + LEVEL_WIDTH + 1)
    message = str(ev.get("message") or "")
    if ev.get("kind") == "alert":
        state = alert_state(ev)
        fields = ev.get("fields")
        alertname = fields.get("alertname") if isinstance(fields, Mapping) else None
        text = re.sub(r"^\[(FIRING|RESOLVED)\]\s*", "", message)
        if alertname and text.startswith(f"{alertname}: "):
            text = text[len(alertname) + 2 :]
        label = f"ALERT {state.upper()} {alertname or ''}".rstrip()
        message = f"{_paint(label, _ALERT_STYLE.get(state, _ALERT_STYLE['firing']), color)} {text}"
    first, *rest = message.split("\n")
    extra = key_fields(ev)
    lines = [head + first + (f"  {_paint(extra, _DIM, color)}" if extra else "")]
    lines += [indent + line for line in rest]
    return lines


def _signature(ev: Mapping[str, Any]) -> tuple[Any, ...] | None:
    if ev.get("kind") == "alert":
        return None  # each alert state change is worth its own line
    first = str(ev.get("message") or "").split("\n", 1)[0]
    return ev.get("kind"), ev.get("level"), _DIGITS.sub("#", first)


@dataclass
class _Run:
    sig: tuple[Any, ...]
    start: float
    folded: int = 0
    ranks: set[int] = field(default_factory=set)
    others: set[str] = field(default_factory=set)
    last_ts: str = ""


@dataclass
class Renderer:
    """Lines for events fed in timeline order (see the module docstring for folding and gaps)."""

    color: bool = False
    fold: bool = True
    gaps: bool = True
    fold_window: float = FOLD_WINDOW
    _run: _Run | None = None
    clock_bounds: Mapping[str, float] = field(default_factory=dict)
    _seq: dict[str, int] = field(default_factory=dict)
    _day: str = ""
    _last: tuple[str, float] | None = None  # (node, time) of the event printed last

    def feed(self, ev: Mapping[str, Any]) -> list[str]:
        out: list[str] = []
        gap = self._gap(ev) if self.gaps else None
        sig = _signature(ev) if self.fold else None
        ts = str(ev.get("@timestamp") or "")
        run = self._run
        if (
            run is not None
            and gap is None
            and sig == run.sig
            and ts[:10] == self._day
            and _seconds(ts) - run.start <= self.fold_window
        ):
            run.folded += 1
            rank = ev.get("rank")
            if type(rank) is int:
                run.ranks.add(rank)
            else:
                run.others.add(who(ev))
            run.last_ts = ts
            return out
        out += self.end()
        if ts[:10] != self._day:
            self._day = ts[:10]
            out.append(_paint(f"--- {self._day} ---", _DIM, self.color))
        if gap is not None:
            out.append(gap)
        out += event_lines(ev, color=self.color, uncertain=self._uncertain(ev, ts))
        self._run = _Run(sig, _seconds(ts)) if sig is not None else None
        return out

    def end(self) -> list[str]:
        """The line closing the current run of similar events, if any folded into it."""
        run, self._run = self._run, None
        if run is None or not run.folded:
            return []
        where = []
        if run.ranks:
            where.append(f"{'rank' if len(run.ranks) == 1 else 'ranks'} {ranges(run.ranks)}")
        if run.others:
            where.append(", ".join(sorted(run.others)))
        pad = " " * 17
        line = f"{pad}x{run.folded} similar" + (f" on {' and '.join(where)}" if where else "")
        return [_paint(f"{line} until {run.last_ts[11:26]}", _DIM, self.color)]

    def _uncertain(self, ev: Mapping[str, Any], ts: str) -> bool:
        """Whether this event's order against the one printed before it, from another node, is
        within the two nodes' clock bounds (always False without bounds)."""
        if not self.clock_bounds:
            return False
        node, t = str(ev.get("node") or ""), _seconds(ts)
        last, self._last = self._last, (node, t)
        if last is None or not node or not last[0] or last[0] == node:
            return False
        bound = self.clock_bounds.get(node, 0.0) + self.clock_bounds.get(last[0], 0.0)
        return abs(t - last[1]) < bound

    def _gap(self, ev: Mapping[str, Any]) -> str | None:
        seq = ev.get("seq")
        if type(seq) is not int:
            return None
        src = str(ev.get("source") or "")
        last = self._seq.get(src)
        self._seq[src] = seq
        if last is None or seq <= last + 1:
            return None
        lost = seq - last - 1
        text = f"{who(ev)}: {lost} line{'s' if lost != 1 else ''} lost between seq {last} and {seq}"
        return " " * 17 + _paint(text, "\x1b[1;33m", self.color)
