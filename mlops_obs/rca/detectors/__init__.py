"""Detectors: small pure functions, one concern each, from the job's facts to findings.

A detector is ``fn(ctx: Context) -> Iterable[Finding]`` registered with :func:`detector`. It reads
``ctx.facts`` (per-rank facts from the logs, alerts, launcher and stack events; see
:mod:`mlops_obs.rca.facts`) and, where it declares ``needs="metrics"``, ``ctx.metrics`` (the Prometheus
series, only present when the user gave ``--prometheus`` or the bundle holds series). It performs no
I/O, keeps no state, and never decides the verdict: it states what it saw, with a role (``fault``,
``anomaly``, ``symptom``), a time, a confidence and the evidence lines, and :mod:`mlops_obs.rca.verdict`
merges the findings of all detectors and sets cause apart from symptom.

Where a new detector goes: a failure *text* is a rule in :mod:`mlops_obs.rca.patterns` (the
``rank_failures`` detector turns it into a finding); a new reasoning over log facts goes in
:mod:`.logs`; over alerts in :mod:`.alerts`; over stack dumps in :mod:`.stacks`; over series in
:mod:`.metrics` (and its series in :data:`mlops_obs.rca.metrics.QUERIES` if not fetched yet). Register
it with ``@detector("name")``; import order is registry order, which matters only for ties. Each
detector has a test in ``tests/test_rca_detectors.py`` on facts built from events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mlops_obs.rca.facts import JobFacts, RankFacts
from mlops_obs.rca.metrics import MetricEvidence
from mlops_obs.rca.model import Finding
from mlops_obs.rca.times import epoch


@dataclass
class Context:
    facts: JobFacts
    metrics: MetricEvidence | None
    now: str  # the analysis' "now": --until, a bundle's end, or the wall clock

    def silent_for(self, r: RankFacts) -> float | None:
        """Seconds since the rank's last trusted event, at ``now``."""
        return epoch(self.now) - epoch(r.last) if r.last else None


Detect = Callable[[Context], Iterable[Finding]]


@dataclass(frozen=True)
class Detector:
    name: str
    needs: str  # "logs" | "metrics"
    fn: Detect


DETECTORS: list[Detector] = []


def detector(name: str, needs: str = "logs") -> Callable[[Detect], Detect]:
    def register(fn: Detect) -> Detect:
        if any(d.name == name for d in DETECTORS):
            raise ValueError(f"detector {name!r} registered twice")
        DETECTORS.append(Detector(name, needs, fn))
        return fn

    return register


def run_all(ctx: Context) -> list[Finding]:
    """Every registered detector whose evidence is present, their findings tagged with its name."""
    out: list[Finding] = []
    for d in DETECTORS:
        if d.needs == "metrics" and not ctx.metrics:
            continue
        for f in d.fn(ctx):
            f.detector = f.detector or d.name
            out.append(f)
    return out


# Registration happens on import; the order below is the registry's order.
from mlops_obs.rca.detectors import alerts, logs, metrics, stacks  # noqa: E402

__all__ = ["DETECTORS", "Context", "Detector", "alerts", "detector", "logs", "metrics", "run_all", "stacks"]
