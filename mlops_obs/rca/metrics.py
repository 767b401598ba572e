"""Metric evidence around an incident: which series are fetched, and the arithmetic the metric
detectors share (counter increases across resets, per-step rates, phase shares).

Four range queries cover a job, whatever its size: every training series of the job (one selector on
``job``, histogram buckets left out), then, for the exporters that served those series (their
``instance`` label), the GPU series, the node series and ``up``. The training selector takes every
``mlops_training_*`` name rather than a fixed list, so series added later (rank lifecycle, current
phase: see docs/alerts.md) arrive without a change here, and an older exporter that lacks some is
simply missing them: every helper below answers "no evidence" for an absent series.

The window starts before the job's first event (:data:`LOOKBACK_SECONDS`), so a counter that existed
before the job gives its increase from its value then, and one that first appears inside the window
(an XID counter starts at 1) counts from zero.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlops_obs.rca.prometheus import Prometheus, Series, step_for

LOOKBACK_SECONDS = 600.0
AFTER_SECONDS = 300.0


@dataclass(frozen=True)
class Query:
    name: str
    template: str  # {job} and {instances} are filled in, already escaped for PromQL
    scope: str  # "job" | "instances"


QUERIES: tuple[Query, ...] = (
    Query("training", '{{__name__=~"mlops_training_.+",__name__!~".+_bucket",job="{job}"}}', "job"),
    Query(
        "gpu",
        '{{__name__=~"mlops_gpu_(utilization_ratio|temperature_celsius|slowdown_temperature_celsius|'
        'throttle_seconds_total|ecc_errors_total|xid_errors_total|lost)",instance=~"{instances}"}}',
        "instances",
    ),
    Query(
        "node",
        '{{__name__=~"mlops_node_(pressure_memory_stalled_seconds_total|memory_available_bytes|'
        'memory_total_bytes|filesystem_avail_bytes|filesystem_size_bytes)",instance=~"{instances}"}}',
        "instances",
    ),
    Query("up", 'up{{instance=~"{instances}"}}', "instances"),
)


def promql_string(s: str) -> str:
    """``s`` inside a double-quoted PromQL string."""
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class MetricEvidence:
    """The fetched series by query name, with the queries and the window they came from."""

    series: dict[str, list[Series]] = field(default_factory=dict)
    queries: dict[str, str] = field(default_factory=dict)
    start: float = 0.0
    end: float = 0.0
    step: float = 1.0

    def named(self, metric: str, **labels: str) -> list[Series]:
        return [
            s
            for group in self.series.values()
            for s in group
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def ref(self, metric: str) -> str:
        """The query that brought ``metric`` (an evidence line's ``ref``)."""
        for name, group in self.series.items():
            if any(s.name == metric for s in group):
                return self.queries.get(name, metric)
        return metric

    def per_rank(self, metric: str, **labels: str) -> dict[int, Series]:
        out: dict[int, Series] = {}
        for s in self.named(metric, **labels):
            r = s.labels.get("rank", "")
            if r.lstrip("-").isdigit():
                out[int(r)] = s
        return out

    def __bool__(self) -> bool:
        return any(self.series.values())

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "query": self.queries.get(name, ""),
                "start": self.start,
                "end": self.end,
                "step": self.step,
                "result": [s.to_json() for s in group],
            }
            for name, group in self.series.items()
        ]

    @staticmethod
    def from_json(items: Iterable[Mapping[str, Any]]) -> MetricEvidence:
        ev = MetricEvidence()
        for it in items:
            name = str(it["name"])
            ev.series[name] = [Series.from_json(x) for x in it.get("result") or []]
            ev.queries[name] = str(it.get("query") or "")
            ev.start, ev.end, ev.step = float(it["start"]), float(it["end"]), float(it["step"])
        return ev


def fetch(prom: Prometheus, job: str, first: float, last: float) -> MetricEvidence:
    """Every query of :data:`QUERIES` over ``[first - LOOKBACK, last + AFTER]`` (capped at the
    server's point limit); raises :class:`~mlops_obs.rca.prometheus.PrometheusError`."""
    start, end = first - LOOKBACK_SECONDS, last + AFTER_SECONDS
    step = step_for(start, end)
    ev = MetricEvidence(start=start, end=end, step=step)
    instances: set[str] = set()
    for q in QUERIES:
        if q.scope == "instances":
            if not instances:
                continue
            expr = q.template.format(instances=promql_string("|".join(re.escape(i) for i in sorted(instances))))
        else:
            expr = q.template.format(job=promql_string(job))
        got = prom.query_range(expr, start, end, step)
        ev.series[q.name] = got
        ev.queries[q.name] = expr
        if q.name == "training":
            instances = {s.labels["instance"] for s in got if s.labels.get("instance")}
    return ev


# --- arithmetic over points ------------------------------------------------------------------------


def increase(points: list[tuple[float, float]], appeared: bool = False) -> float:
    """A counter's increase over its points, across resets; ``appeared``: the series began inside
    the window, so its first value counts from zero."""
    vals = [v for _, v in points if not math.isnan(v)]
    if not vals:
        return 0.0
    total = vals[0] if appeared else 0.0
    for a, b in itertools.pairwise(vals):
        total += b - a if b >= a else b
    return total


def window_increase(ev: MetricEvidence, s: Series) -> float:
    """:func:`increase`, counting from zero when the series first appears after the window's start."""
    appeared = bool(s.points) and s.points[0][0] > ev.start + 2 * ev.step
    return increase(s.points, appeared)


def rate_points(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Per-second rate between consecutive points where the counter moved or stood (resets skipped)."""
    out = []
    for (t0, a), (t1, b) in itertools.pairwise(points):
        if t1 > t0 and b >= a:
            out.append((t1, (b - a) / (t1 - t0)))
    return out


def ratio_points(num: list[tuple[float, float]], den: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Δnum/Δden at each time both counters moved (a step time from ``_sum`` over ``_count``)."""
    d = dict(den)
    out = []
    prev: tuple[float, float, float] | None = None
    for t, a in num:
        b = d.get(t)
        if b is None:
            continue
        if prev is not None and b > prev[2] and a >= prev[1]:
            out.append((t, (a - prev[1]) / (b - prev[2])))
        prev = (t, a, b)
    return out


def phase_totals(ev: MetricEvidence) -> dict[int, dict[str, float]]:
    """Per rank, seconds spent in each phase over the window."""
    totals: dict[int, dict[str, float]] = {}
    for s in ev.named("mlops_training_phase_seconds_total"):
        r, phase = s.labels.get("rank", ""), s.labels.get("phase", "")
        if r.lstrip("-").isdigit() and phase:
            totals.setdefault(int(r), {})[phase] = window_increase(ev, s)
    return totals


def phase_shares(ev: MetricEvidence) -> dict[int, dict[str, float]]:
    """Per rank, each phase's share of the rank's time in phases over the window (the step phases
    plus the data wait before each step, which the step's own duration does not include)."""
    out: dict[int, dict[str, float]] = {}
    for r, phases in phase_totals(ev).items():
        whole = sum(phases.values())
        if whole > 0:
            out[r] = {p: v / whole for p, v in phases.items()}
    return out


def steps_done(ev: MetricEvidence) -> dict[int, float]:
    """Steps each rank completed over the window."""
    return {r: window_increase(ev, s) for r, s in ev.per_rank("mlops_training_steps_total").items()}


def last_value(s: Series) -> float | None:
    vals = [v for _, v in s.points if not math.isnan(v)]
    return vals[-1] if vals else None
