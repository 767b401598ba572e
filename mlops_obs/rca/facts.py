"""Per-rank facts of one job, reduced from its events: what the detectors reason over.

For every rank: its first and last trustworthy times, the last completed step and when (the
heartbeat), the step cadence of its log, its classified failure lines (first error, collective
timeouts, exit records), whether it finished, and a thinned step/loss series for the report. For the
job: alerts, launcher and stack events, node-level lines, and the ranks' nodes.

:class:`FactsBuilder` is order-independent and idempotent: every fact is a minimum, a maximum, a
bounded set keyed by ``_id`` or a count, so a source may feed only the events a fact depends on (the
store's fast path: error chunks, each rank's last chunks, non-log kinds) in any order, and feeding an
event twice changes nothing. Memory is bounded per rank whatever the job's size.

Times: a JSON record carries the time it was written; a raw line carries the time its envelope
(CRI, Docker) or its own text gives, else only a bound the shipper put on it (``fields.ts_source``:
``followed``, ``neighbour``, ``mtime``; see :mod:`mlops_obs.logs.parse`). Such a bound orders nothing:
:func:`trusted` says which times do, and a rank whose only evidence is untrusted is placed at its last
trusted time ("went silent then").
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlops_obs.logs.parse import TRUSTED_TS_SOURCES
from mlops_obs.rca.patterns import Signal, classify, rank_of, step_of
from mlops_obs.rca.times import epoch

MAX_SIGNALS_PER_RANK = 16
"""Classified lines kept per rank (the earliest): a rank that prints a timeout a second for an hour
keeps its first ones, which are the ones that date the fault."""
MAX_JOB_EVENTS = 2000
"""Alerts, launcher, stack and node-level events kept for the job (the earliest)."""
RECENT_PROGRESS = 64
"""Last progress events kept per rank: enough for the cadence and the step interval."""
SERIES_POINTS = 400
"""Points of the step/loss series kept per rank for the report (thinned evenly as it grows)."""

PRECISE_TS_SOURCES = TRUSTED_TS_SOURCES
"""``fields.ts_source`` values that date an event from the line itself (CRI/Docker prefixes, a record's own time)."""
FINISH_MESSAGES = frozenset(("training finished", "rank finished", "finished"))


def trusted(event: Mapping[str, Any]) -> bool:
    """Whether the event's ``@timestamp`` is when it happened (not a bound a shipper put on it): its
    ``fields.ts_source`` says so; without one, a record's own time is, a raw line's is not."""
    fields = event.get("fields")
    if not isinstance(fields, Mapping):
        return True
    src = fields.get("ts_source")
    if src is not None:
        return src in PRECISE_TS_SOURCES
    return not fields.get("raw")


@dataclass(frozen=True)
class Noted:
    """A classified event: the event, what it says, and whether its time can be used for order."""

    event: Mapping[str, Any]
    signal: Signal
    trusted: bool

    @property
    def time(self) -> str:
        return str(self.event["@timestamp"])

    @property
    def id(self) -> str:
        return str(self.event.get("_id"))

    @property
    def step(self) -> int | None:
        return step_of(self.event)


def _key(ev: Mapping[str, Any]) -> tuple[str, str, int]:
    off = ev.get("offset")
    return str(ev.get("@timestamp")), str(ev.get("source") or ""), off if type(off) is int else 0


class _Earliest:
    """The ``cap`` earliest classified events, unique by ``_id``."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.items: list[tuple[tuple[str, str, int], str, Noted]] = []
        self.ids: set[str] = set()
        self.seen = 0  # how many distinct ones were offered (the count, beyond the kept ones)

    def add(self, n: Noted) -> None:
        if n.id in self.ids:
            return
        self.seen += 1
        item = (_key(n.event), n.id, n)
        if len(self.items) >= self.cap:
            if item[:2] >= self.items[-1][:2]:
                return
            _, gone, _ = self.items.pop()
            self.ids.discard(gone)
        bisect.insort(self.items, item, key=lambda x: x[:2])
        self.ids.add(n.id)

    def __iter__(self) -> Iterator[Noted]:
        return (x[2] for x in self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class RankFacts:
    rank: int
    nodes: set[str] = field(default_factory=set)
    first: str | None = None  # first trusted time
    last: str | None = None  # last trusted time: when the rank went silent, if it did
    last_event: Mapping[str, Any] | None = None
    n_events: int = 0
    world_size: int | None = None
    finished: str | None = None  # time of its clean finish
    signals: _Earliest = field(default_factory=lambda: _Earliest(MAX_SIGNALS_PER_RANK))
    # (time, step, _id, loss) of the last progress events (a completed step logged at info)
    recent: list[tuple[str, int, str, float | None]] = field(default_factory=list)
    series: list[tuple[float, int, float | None]] = field(default_factory=list)
    series_stride: int = 1
    series_seen: int = 0

    # --- what the detectors ask ---------------------------------------------------------------------

    @property
    def node(self) -> str | None:
        return sorted(self.nodes)[0] if self.nodes else None

    @property
    def last_step(self) -> int | None:
        """The last completed step the rank logged."""
        return max((s for _, s, _, _ in self.recent), default=None)

    @property
    def last_step_time(self) -> str | None:
        """When the rank last logged a completed step: its heartbeat in the logs."""
        return self.recent[-1][0] if self.recent else None

    @property
    def step_gap(self) -> int | None:
        """How many steps apart its step lines are (1: every step is logged)."""
        steps = sorted({s for _, s, _, _ in self.recent})
        gaps = [b - a for a, b in itertools.pairwise(steps) if b > a]
        return min(gaps) if gaps else None

    @property
    def step_interval(self) -> float | None:
        """Median seconds per step over its recent step lines."""
        pts = sorted({(t, s) for t, s, _, _ in self.recent})
        rates = []
        for (t0, s0), (t1, s1) in itertools.pairwise(pts):
            if s1 > s0:
                rates.append((epoch(t1) - epoch(t0)) / (s1 - s0))
        if not rates:
            return None
        rates.sort()
        return rates[len(rates) // 2]

    def first_signal(self, *roles: str) -> Noted | None:
        """The earliest classified event with one of ``roles``, trusted times first."""
        found = [n for n in self.signals if n.signal.role in roles]
        if not found:
            return None
        good = [n for n in found if n.trusted]
        return good[0] if good else found[0]

    def of_kind(self, *kinds: str) -> list[Noted]:
        return [n for n in self.signals if n.signal.kind in kinds]


@dataclass
class JobFacts:
    job: str
    ranks: dict[int, RankFacts] = field(default_factory=dict)
    alerts: _Earliest = field(default_factory=lambda: _Earliest(MAX_JOB_EVENTS))
    launcher: _Earliest = field(default_factory=lambda: _Earliest(MAX_JOB_EVENTS))
    stacks: _Earliest = field(default_factory=lambda: _Earliest(MAX_JOB_EVENTS))
    unranked: _Earliest = field(default_factory=lambda: _Earliest(MAX_JOB_EVENTS))  # node/job-level lines
    first: str | None = None
    last: str | None = None
    n_events: int = 0
    world_size: int | None = None

    @property
    def nodes(self) -> set[str]:
        return {n for r in self.ranks.values() for n in r.nodes}

    def rank(self, r: int) -> RankFacts:
        got = self.ranks.get(r)
        if got is None:
            got = self.ranks[r] = RankFacts(r)
        return got

    @property
    def expected_ranks(self) -> list[int]:
        """Every rank of the job: the ones seen, and up to the world size the ranks announced."""
        ws = self.world_size or 0
        return sorted(set(self.ranks) | set(range(ws)))

    def median_step_interval(self) -> float | None:
        xs = sorted(x for x in (r.step_interval for r in self.ranks.values()) if x is not None)
        return xs[len(xs) // 2] if xs else None


def _noted(ev: Mapping[str, Any], sig: Signal | None = None) -> Noted:
    return Noted(ev, sig or Signal("event", "info"), trusted(ev))


class FactsBuilder:
    """Reduce events (any order, any repetition) to :class:`JobFacts`."""

    def __init__(self, job: str) -> None:
        self.facts = JobFacts(job)
        self._counted: set[str] = set()
        self.count_events = True  # a source that knows the counts (chunk metadata) turns this off

    def add_all(self, events: Iterable[Mapping[str, Any]]) -> JobFacts:
        for ev in events:
            self.add(ev)
        return self.facts

    def add(self, ev: Mapping[str, Any]) -> None:
        f = self.facts
        kind = ev.get("kind", "log")
        ts = ev.get("@timestamp")
        if not isinstance(ts, str):
            return
        if kind == "alert":
            f.alerts.add(_noted(ev))
            return
        if kind == "stack":
            f.stacks.add(_noted(ev))
            return
        sig = classify(ev)
        if kind == "launcher":
            f.launcher.add(_noted(ev, sig))
        rank = rank_of(ev)
        if rank is None:
            if sig is not None and kind != "launcher":
                f.unranked.add(_noted(ev, sig))
            return
        r = f.rank(rank)
        node = ev.get("node")
        if isinstance(node, str) and node:
            r.nodes.add(node)
        fields = ev.get("fields")
        fields = fields if isinstance(fields, Mapping) else {}
        ws = fields.get("world_size")
        if type(ws) is int and ws > 0:
            r.world_size = ws
            f.world_size = max(f.world_size or 0, ws)
        good = trusted(ev)
        if self.count_events:
            r.n_events += 1
            f.n_events += 1
        if good:
            if r.first is None or ts < r.first:
                r.first = ts
            if r.last is None or ts > r.last or (ts == r.last and _key(ev) > _key(r.last_event or {})):
                r.last, r.last_event = ts, ev
            if f.first is None or ts < f.first:
                f.first = ts
            if f.last is None or ts > f.last:
                f.last = ts
        if sig is not None and kind != "launcher":
            r.signals.add(Noted(ev, sig, good))
        level = ev.get("level")
        msg = ev.get("message")
        if good and level in (None, "debug", "info") and kind == "log":
            if msg in FINISH_MESSAGES and (r.finished is None or ts > r.finished):
                r.finished = ts
            step = fields.get("step")
            if type(step) is int:
                self._progress(r, ts, step, str(ev.get("_id")), fields.get("loss"))

    def _progress(self, r: RankFacts, ts: str, step: int, eid: str, loss: Any) -> None:
        lv = float(loss) if isinstance(loss, int | float) and not isinstance(loss, bool) else None
        if isinstance(loss, str) and loss.lower() in ("nan", "inf", "-inf"):
            lv = float(loss)
        item = (ts, step, eid, lv)
        rec = r.recent
        if any(x[2] == eid for x in rec):
            return
        if len(rec) < RECENT_PROGRESS or item > rec[0]:
            bisect.insort(rec, item)
            if len(rec) > RECENT_PROGRESS:
                del rec[0]
        # The report's series: every stride-th step line, the stride doubling as it fills (order of
        # arrival does not matter for a thinning that keeps an even spread).
        r.series_seen += 1
        if r.series_seen % r.series_stride == 0:
            r.series.append((epoch(ts), step, lv))
            if len(r.series) > SERIES_POINTS:
                r.series.sort()
                r.series = r.series[::2]
                r.series_stride *= 2


def earliest(items: Iterable[Noted], n: int) -> list[Noted]:
    return heapq.nsmallest(n, items, key=lambda x: _key(x.event))
