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

# Registration happens on import; the order below is the registry's order.
from mlops_obs.rca.detectors import alerts, logs, metrics, stacks
from mlops_obs.rca.detectors.registry import DETECTORS, Context, Detector, detector, run_all

__all__ = ["DETECTORS", "Context", "Detector", "alerts", "detector", "logs", "metrics", "run_all", "stacks"]
