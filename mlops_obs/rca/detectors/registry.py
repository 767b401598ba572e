"""The detector registry: what a detector is, how it registers, and running them all.

Kept apart from the package's ``__init__`` so that detector modules import it without importing the
package that imports them.
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
