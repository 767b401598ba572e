"""Folding the hot path's clock readings into step, phase and goodput figures.

The training thread only appends readings (see :mod:`mlops_obs.instrument.monitor`): a step's or a
phase's entry as a positive ``perf_counter()`` reading, its exit negated (``(end,)`` for a step that
raised), and (time, seconds) reports of collective and data-wait time. The functions here turn one
batch of those readings into totals; the monitor cuts the batch and holds the lock. Well-formed
readings (the common case) are folded with C-level ``map``/``sum``, about a tenth of a microsecond
per reading; a stray exit or a re-entry is paired one by one instead. An interval still open at the
end of a batch carries over to the next, with the collective (and, for a step, data-wait) time
reported in it so far.
"""

from __future__ import annotations

import bisect
import operator
from collections import deque
from collections.abc import Iterable
from itertools import compress
from math import fsum
from typing import Any, Protocol

from mlops_obs.rankdir import STEP_BUCKETS

_bisect = bisect.bisect_left

Reports = list[tuple[float, float]]  # (perf_counter time, seconds) of collective or data-wait time


class PhaseState(Protocol):
    """What the fold keeps per phase: folded ``with`` time, and an interval open at the last fold."""

    folded: float
    open_start: float | None
    open_coll: float


class StepTotals:
    """The step figures the fold accumulates (all ``perf_counter`` based; wall time is the monitor's)."""

    __slots__ = (
        "buckets",
        "failed_step_seconds",
        "failed_steps",
        "first_step_perf",
        "goodput_seconds",
        "last_step_perf",
        "open_step",
        "recent",
        "recent_wall",
        "step_seconds_sum",
        "steps",
    )

    def __init__(self, window: int) -> None:
        self.steps = 0
        self.failed_steps = 0
        self.failed_step_seconds = 0.0
        self.step_seconds_sum = 0.0
        self.goodput_seconds = 0.0
        self.first_step_perf = 0.0
        self.last_step_perf = 0.0
        self.buckets = [0] * (len(STEP_BUCKETS) + 1)  # successful steps per STEP_BUCKETS bucket; last +Inf
        self.recent: deque[float] = deque(maxlen=max(1, window))  # per-step compute time, oldest first
        self.recent_wall: deque[float] = deque(maxlen=max(1, window))  # per-step wall time, oldest first
        self.open_step: tuple[float, float, float] | None = None  # (start, collective, data wait) so far


def _attribute(
    reports: Iterable[tuple[float, float]],
    starts: list[float],
    ends: list[float],
    open_start: float | None,
    into: list[float],
    sign: float,
    opened: float,
) -> float:
    """Add ``sign * seconds`` of each report to the closed interval its time fell in (``into[k]`` for
    ``starts[k]..ends[k]``, both sorted); a report after ``open_start`` belongs to the interval still
    open, and is added to ``opened``, which is returned. A report in no interval is dropped."""
    for t, s in reports:
        if open_start is not None and t > open_start:
            opened += s
            continue
        k = _bisect(starts, t) - 1
        if k >= 0 and t <= ends[k]:
            into[k] += sign * s
    return opened


def fold_phase(p: PhaseState, items: list[float], coll: Reports, marks: Reports | None) -> None:
    """Fold one phase's readings into ``p.folded``, net of the collective time reported inside it.

    ``marks`` (for the data-wait phase only) receives each closed interval as (end, net seconds), for
    the steps' fold to find the data wait inside each step.
    """
    carried = p.open_start is not None
    if carried:
        items.insert(0, p.open_start)  # type: ignore[arg-type]
    open_start: float | None = items.pop() if len(items) % 2 else None
    starts, ends = items[0::2], items[1::2]  # entries, negated exits
    if (starts and not (min(starts) > 0.0 and max(ends) < 0.0)) or (open_start is not None and open_start < 0.0):
        if open_start is not None:
            items.append(open_start)
        starts, ends, open_start = phase_pairs(items)  # a stray exit or a re-entry: pair one by one
        items = starts + ends
        carried = carried and bool(starts) and starts[0] == p.open_start
    open_coll = p.open_coll if (carried and not starts) else 0.0
    if not coll and marks is None:
        net = -fsum(items)  # the sum of (exit - entry), exactly rounded
        if starts and carried:
            net -= p.open_coll
        p.folded += net
    else:
        endt = list(map(operator.neg, ends))
        nets = list(map(operator.sub, endt, starts))
        if starts and carried:
            nets[0] -= p.open_coll
        # Collective time reported inside an interval is not this phase's.
        open_coll = _attribute(coll, starts, endt, open_start, nets, -1.0, open_coll)
        p.folded += fsum(nets)
        if marks is not None:
            marks.extend(zip(endt, nets))
    p.open_start = open_start
    p.open_coll = open_coll


def fold_steps(t: StepTotals, items: list[Any], coll: Reports, marks: Reports) -> None:
    """Fold step readings into ``t``: counts, durations, histogram, goodput and the recent-step rings."""
    prev = t.open_step
    if prev is not None:
        items.insert(0, prev[0])
    starts, ends = items[0::2], items[1::2]  # entries, negated exits (a failed step's exit: (end,))
    open_start: float | None = starts.pop() if len(starts) > len(ends) else None
    failed: list[bool] | None = None
    try:
        ok = (open_start is None or open_start > 0.0) and (not ends or (min(starts) > 0.0 and max(ends) < 0.0))
    except TypeError:  # a tuple among them
        ok = False
    if not ok:
        starts, ends, open_start, failed = step_pairs(items)
    carried = prev is not None and bool(starts) and starts[0] == prev[0]
    negdurs = list(map(operator.add, ends, starts))  # entry - exit: minus each step's duration
    n = len(negdurs)
    cded: list[float] | None = None  # collective time reported inside each step
    dw: list[float] | None = None  # data wait reported inside each step
    open_c = open_dw = 0.0
    if prev is not None and open_start is not None and open_start == prev[0]:
        open_c, open_dw = prev[1], prev[2]
    if coll or marks or carried:
        endt = list(map(operator.neg, ends))
        cded, dw = [0.0] * n, [0.0] * n
        if carried and prev is not None:
            cded[0] += prev[1]
            dw[0] += prev[2]
        open_c = _attribute(coll, starts, endt, open_start, cded, 1.0, open_c)
        open_dw = _attribute(marks, starts, endt, open_start, dw, 1.0, open_dw)
    if open_start is not None:
        t.open_step = (open_start, open_c, open_dw)
        if not t.first_step_perf:
            t.first_step_perf = open_start
    else:
        t.open_step = None
    if not n:
        return
    if not t.first_step_perf:
        t.first_step_perf = starts[0]
    if failed is not None and any(failed):  # count the failed ones apart
        keep = [not f for f in failed]
        t.failed_steps += n - sum(keep)
        t.failed_step_seconds -= fsum(compress(negdurs, failed))
        negdurs = list(compress(negdurs, keep))
        ends = list(compress(ends, keep))
        cded = list(compress(cded, keep)) if cded is not None else None
        dw = list(compress(dw, keep)) if dw is not None else None
        n = len(negdurs)
        if not n:
            return
    total = -fsum(negdurs)
    t.steps += n
    t.step_seconds_sum += total
    t.goodput_seconds += total - fsum(dw) if dw is not None else total
    _count_buckets(t.buckets, negdurs)
    # The recent rings: wall time (what a stall threshold multiplies), and compute time, that is step
    # time less the collective waits inside it (what the straggler score compares).
    w = t.recent.maxlen or n
    last = negdurs[-w:]
    t.recent_wall.extend(map(operator.neg, last))
    if cded is not None:
        t.recent.extend(map(operator.sub, map(operator.neg, last), cded[-w:]))
    else:
        t.recent.extend(map(operator.neg, last))
    t.last_step_perf = -ends[-1]


def _count_buckets(b: list[int], negdurs: list[float]) -> None:
    """Add negated step durations to the per-bucket counts ``b``: sort once (C), then one bisect per
    bucket bound instead of one per step; "duration <= bound" is "entry - exit >= -bound"."""
    n = len(negdurs)
    ds = sorted(negdurs)
    below = 0
    for i, bound in enumerate(STEP_BUCKETS):
        upto = n - _bisect(ds, -bound)
        b[i] += upto - below
        below = upto
    b[-1] += n - below


def phase_pairs(items: list[float]) -> tuple[list[float], list[float], float | None]:
    """(entries, negated exits, entry still open) of one phase's readings, tolerating a stray exit
    (dropped) or a re-entry before the exit (the later entry wins: it restarted the phase)."""
    starts: list[float] = []
    ends: list[float] = []
    start: float | None = None
    for x in items:
        if x > 0.0:
            start = x
        elif start is not None:
            starts.append(start)
            ends.append(x)
            start = None
    return starts, ends, start


def step_pairs(items: list[Any]) -> tuple[list[float], list[float], float | None, list[bool]]:
    """:func:`phase_pairs` for step readings, where a failed step's exit is ``(end,)``: also says
    which of the pairs failed."""
    starts: list[float] = []
    ends: list[float] = []
    failed: list[bool] = []
    start: float | None = None
    for x in items:
        if x.__class__ is tuple:
            if start is not None:
                starts.append(start)
                ends.append(-x[0])
                failed.append(True)
                start = None
        elif x > 0.0:
            start = x
        elif start is not None:
            starts.append(start)
            ends.append(x)
            failed.append(False)
            start = None
    return starts, ends, start, failed
