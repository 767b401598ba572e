"""From the detectors' findings to one verdict: the root cause, its symptoms, the other findings and
the timeline around the incident.

The rules, in order:

1. Findings of one kind about one rank (or one node) are one finding, whatever detectors saw it:
   their evidence is pooled, the earliest time and the highest confidence kept. A finding of a kind
   that names no rank (one of several silent ranks) joins the same kind's finding that names one.
2. Among the faults (what can end or hang a job) the earliest is the root; at equal times the one
   nearer the hardware (:data:`PRIORITY`). Every later fault and every symptom (a collective timeout,
   a lost peer, a stop) of another rank is a symptom of it: in a synchronous job, one rank's failure
   fails the others.
3. A finding that *explains* the root (:data:`EXPLAINS`: a GPU XID on the root rank's node shortly
   before its crash, memory pressure before a SIGKILL) becomes the root, and the former root its
   symptom; memory pressure and a SIGKILL are together an ``oom_killed``.
4. With no fault, the strongest anomaly (a straggler, data starvation, throttling) is the root.
   Anomalies that are not the root and explain nothing are ``other_findings``.
5. Collective timeouts with nobody missing and nothing else: ``collective_timeout`` is the root,
   at low confidence. Only symptoms of something unseen, or a rank that logged an error and stopped:
   ``unknown``, with that evidence. Nothing at all: ``healthy``.
"""

from __future__ import annotations

import time as _time
from collections.abc import Iterable
from dataclasses import replace

from mlops_obs.rca.detectors import Context, run_all
from mlops_obs.rca.facts import JobFacts
from mlops_obs.rca.metrics import MetricEvidence
from mlops_obs.rca.model import CONFIDENCE, NODE_KINDS, Finding, Report
from mlops_obs.rca.sources import Source
from mlops_obs.rca.times import epoch, stamp

PRIORITY = {
    k: i
    for i, k in enumerate(
        (
            "node_down",
            "gpu_xid",
            "gpu_ecc",
            "oom_killed",
            "disk_full",
            "oom",
            "nan_loss",
            "crash",
            "stall",
            "collective_timeout",
            "unknown",
            "thermal_throttle",
            "node_memory_pressure",
            "data_starvation",
            "straggler",
        )
    )
}
EXPLAINS: dict[str, frozenset[str]] = {
    "node_down": frozenset(("crash", "stall", "collective_timeout", "unknown")),
    "gpu_xid": frozenset(("crash", "stall", "collective_timeout", "oom", "nan_loss", "unknown")),
    "gpu_ecc": frozenset(("crash", "stall", "collective_timeout", "nan_loss", "unknown")),
    "disk_full": frozenset(("crash", "unknown")),
    "oom_killed": frozenset(("crash",)),
    "node_memory_pressure": frozenset(("crash",)),
    "thermal_throttle": frozenset(("straggler",)),
    "data_starvation": frozenset(("straggler",)),
}
EXPLAIN_BEFORE_SECONDS = 900.0
EXPLAIN_AFTER_SECONDS = 120.0  # alerts and scrapes lag the fault they report
TIMELINE_BEFORE_SECONDS = 30.0
TIMELINE_AFTER_SECONDS = 10.0
TIMELINE_MAX_SECONDS = 600.0
TIMELINE_EVENTS = 200


def _conf(f: Finding) -> int:
    return CONFIDENCE.index(f.confidence) if f.confidence in CONFIDENCE else 0


def merge(findings: Iterable[Finding]) -> list[Finding]:
    """Rule 1: one finding per (kind, rank) or (kind, node), evidence pooled."""
    by: dict[tuple[str, int | None, str | None], Finding] = {}
    for f in findings:
        k = f.key()
        have = by.get(k)
        if have is None:
            by[k] = replace(f, evidence=list(f.evidence))
            continue
        by[k] = _pool(have, f)
    out = list(by.values())
    # A same-kind finding with no rank (several candidates) joins one that names the rank.
    for f in [x for x in out if x.rank is None and x.node is None]:
        named = [x for x in out if x is not f and x.kind == f.kind and x.rank is not None and x.role == f.role]
        if len(named) == 1:
            out.remove(f)
            out[out.index(named[0])] = _pool(named[0], f, keep_first=True)
    return out


def _pool(a: Finding, b: Finding, keep_first: bool = False) -> Finding:
    best, other = (a, b) if keep_first or _conf(a) >= _conf(b) else (b, a)
    refs = {e.ref for e in best.evidence}
    evidence = list(best.evidence) + [e for e in other.evidence if e.ref not in refs]
    times = [t for t in (a.time, b.time) if t]
    return replace(
        best,
        evidence=evidence,
        time=min(times) if times else None,
        confidence=CONFIDENCE[max(_conf(a), _conf(b))],
        step=best.step if best.step is not None else other.step,
        node=best.node or other.node,
        tags=a.tags | b.tags,
        magnitude=max(a.magnitude, b.magnitude),
    )


def _order(f: Finding) -> tuple[str, int, int]:
    return f.time or "9999", PRIORITY.get(f.kind, 99), -_conf(f)


def _explains(e: Finding, root: Finding, facts: JobFacts) -> bool:
    if root.kind not in EXPLAINS.get(e.kind, ()) or e is root:
        return False
    if e.kind in ("oom_killed", "node_memory_pressure") and "sigkill" not in root.tags:
        return False
    if e.kind == "node_down" and root.kind == "crash" and not root.tags & {"sigkill", "silent"}:
        return False  # a rank that said why it crashed did not crash because its node went away
    same_place = (e.rank is not None and e.rank == root.rank) or (
        e.node is not None and (e.node == root.node or (root.rank is not None and e.node in _nodes(facts, root.rank)))
    )
    if root.rank is None and root.node is None:
        same_place = True  # a job-wide fault (every rank hung) is explained by any node's
    if not same_place or not e.time or not root.time:
        return False
    dt = epoch(e.time) - epoch(root.time)
    return -EXPLAIN_BEFORE_SECONDS <= dt <= EXPLAIN_AFTER_SECONDS


def _nodes(facts: JobFacts, rank: int) -> set[str]:
    r = facts.ranks.get(rank)
    return r.nodes if r else set()


def _explained(root: Finding, e: Finding, facts: JobFacts) -> tuple[Finding, Finding | None]:
    """Rule 3: the new root and what becomes of the old one (a symptom, or nothing when absorbed)."""
    if e.kind in ("oom_killed", "node_memory_pressure"):
        summary = (
            f"rank {root.rank} was killed (SIGKILL) while {e.node or 'its node'} was out of memory: "
            "the kernel's OOM killer"
        )
        return replace(
            root,
            kind="oom_killed",
            summary=summary,
            evidence=[*root.evidence, *e.evidence],
            confidence="high" if e.confidence == "high" else "medium",
        ), None
    if e.rank is None and root.rank is not None and e.node in _nodes(facts, root.rank):
        e = replace(e, rank=root.rank)  # the rank on that node that failed right after it is the one it hit
    if e.role == root.role == "anomaly" and e.rank == root.rank:
        return replace(e, evidence=[*e.evidence, *root.evidence]), None
    step = e.step if e.step is not None else (root.step if e.rank == root.rank else None)
    symptom = replace(root, role="symptom")
    return replace(e, role=root.role, step=step, evidence=[*e.evidence, *root.evidence]), symptom


def decide(findings: list[Finding], facts: JobFacts) -> Report:
    merged = merge(findings)
    faults = sorted((f for f in merged if f.role == "fault"), key=_order)
    anomalies = [f for f in merged if f.role == "anomaly"]
    symptoms = sorted((f for f in merged if f.role == "symptom"), key=_order)
    root: Finding | None = None
    if faults:
        root = faults[0]
        later = faults[1:]
    elif anomalies:
        root = max(anomalies, key=lambda f: (_conf(f), -PRIORITY.get(f.kind, 99), f.magnitude))
        later = []
    else:
        timeouts = [s for s in symptoms if s.kind == "collective_timeout"]
        if timeouts:
            first = timeouts[0]
            ranks = sorted(s.rank for s in timeouts if s.rank is not None)
            root = Finding(
                "collective_timeout",
                "fault",
                None,
                f"ranks {', '.join(map(str, ranks))} timed out in a collective and no rank is missing from "
                "it, nor did any fail first",
                first.time,
                "low",
                None,
                first.step,
                [e for s in timeouts[:6] for e in s.evidence[:1]],
            )
            symptoms = [s for s in symptoms if s.kind != "collective_timeout"]
            later = []
        elif symptoms:
            return Report(
                facts.job,
                "unknown",
                _unknown(symptoms),
                symptoms,
                [],
                [],
                "ranks failed on a peer, and nothing says which peer or why",
            )
        else:
            return Report(facts.job, "healthy", None, [], [], [], _healthy_summary(facts))
    rest = [f for f in merged if f is not root and f.role in ("fault", "anomaly")]
    root = _attribute(root, later, facts)
    explainers = sorted((e for e in rest if _explains(e, root, facts)), key=_order)
    if explainers:
        e = explainers[0]
        root, old = _explained(root, e, facts)
        rest = [x for x in rest if x is not e]
        later = [x for x in later if x is not e]
        if old is not None:
            symptoms = [old, *symptoms]
    others: list[Finding] = []
    for f in rest:
        if f.role == "anomaly":
            if _explains(f, root, facts):
                root = replace(root, evidence=[*root.evidence, *f.evidence])
            else:
                others.append(f)
        elif f.rank is not None and f.rank == root.rank:
            root = replace(root, evidence=[*root.evidence, *[e for e in f.evidence if e not in root.evidence]])
        else:
            symptoms.append(replace(f, role="symptom"))
    symptoms = _one_per_rank([s for s in symptoms if s.rank is None or s.rank != root.rank])
    verdict = "unknown" if root.kind == "unknown" else "fault"
    return Report(facts.job, verdict, root, symptoms, sorted(others, key=_order), [])


def _attribute(root: Finding, later: list[Finding], facts: JobFacts) -> Finding:
    """A node-level root (an XID line of no rank) takes the rank of the node's first rank to fail
    right after it: that rank was on the failing part."""
    if root.rank is not None or root.node is None or root.kind not in NODE_KINDS or not root.time:
        return root
    for f in later:
        if f.rank is not None and f.time and root.node in _nodes(facts, f.rank):
            if 0 <= epoch(f.time) - epoch(root.time) <= EXPLAIN_AFTER_SECONDS:
                return replace(root, rank=f.rank, step=root.step if root.step is not None else f.step)
            break
    return root


def _one_per_rank(symptoms: list[Finding]) -> list[Finding]:
    out: dict[tuple[int | None, str | None], Finding] = {}
    for s in sorted(symptoms, key=_order):
        k = (s.rank, s.node if s.rank is None else None)
        if k not in out:
            out[k] = s
    return sorted(out.values(), key=_order)


def _unknown(symptoms: list[Finding]) -> Finding:
    first = symptoms[0]
    return Finding(
        "unknown",
        "fault",
        None,
        "ranks failed on a peer's failure, but no rank's own failure was found",
        first.time,
        "low",
        None,
        None,
        [e for s in symptoms[:6] for e in s.evidence[:1]],
    )


def _healthy_summary(facts: JobFacts) -> str:
    ranks = facts.ranks.values()
    done = [r for r in ranks if r.finished]
    steps = [r.last_step for r in ranks if r.last_step is not None]
    at = f", last step {max(steps)}" if steps else ""
    if ranks and len(done) == len(facts.ranks):
        return f"every rank ({len(done)}) finished{at}; no fault found"
    return f"{len(done)} of {len(facts.ranks)} ranks finished, the others still logging{at}; no fault found"


def timeline_window(report: Report, facts: JobFacts) -> tuple[str, str] | None:
    """The window the timeline shows: around the root cause through its symptoms, or the job's end."""
    if report.root is not None and report.root.time:
        t0 = epoch(report.root.time)
        ends = [epoch(s.time) for s in report.symptoms if s.time]
        t1 = min(max([t0, *ends]) + TIMELINE_AFTER_SECONDS, t0 + TIMELINE_MAX_SECONDS)
        return stamp(t0 - TIMELINE_BEFORE_SECONDS), stamp(t1)
    if facts.last:
        t = epoch(facts.last)
        return stamp(t - TIMELINE_BEFORE_SECONDS), stamp(t + 0.001)
    return None


def pick_timeline(
    events: list[dict[str, object]], report: Report, limit: int = TIMELINE_EVENTS
) -> list[dict[str, object]]:
    """At most ``limit`` events: every non-log event and warning or worse first, then the root rank's
    lines, then the rest nearest the root cause's time; shown in time order."""
    if len(events) <= limit:
        return events
    root = report.root
    t0 = root.time if root and root.time else str(events[-1]["@timestamp"])
    center = epoch(t0)

    def weight(ev: dict[str, object]) -> tuple[int, float]:
        notable = ev.get("kind") != "log" or ev.get("level") in ("warning", "error", "critical")
        mine = root is not None and root.rank is not None and ev.get("rank") == root.rank
        return (0 if notable else 1 if mine else 2), abs(epoch(str(ev["@timestamp"])) - center)

    keep = sorted(range(len(events)), key=lambda i: weight(events[i]))[:limit]
    return [events[i] for i in sorted(keep)]


def analyse(
    source: Source,
    job: str,
    *,
    since: str | None = None,
    until: str | None = None,
    metrics: MetricEvidence | None = None,
    now: str | None = None,
    facts: JobFacts | None = None,
) -> tuple[Report, JobFacts]:
    """The whole analysis of one job: facts from ``source``, every detector, the verdict, the timeline."""
    facts = facts if facts is not None else source.facts(job, since, until)
    ctx = Context(facts, metrics, now or until or stamp(_time.time()))
    report = decide(run_all(ctx), facts)
    window = timeline_window(report, facts)
    if window is not None:
        lo, hi = window
        if since is not None and since > lo:
            lo = since
        if until is not None and until < hi:
            hi = until
        report.timeline = pick_timeline(source.window(job, facts.nodes, lo, hi), report)
    return report, facts
