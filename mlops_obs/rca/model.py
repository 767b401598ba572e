"""The analysis' vocabulary: evidence lines, findings, and the report in the JSON shape ``rca --json``
prints (docs/rca.md describes every key)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Every kind a root cause, a symptom or another finding may have.
FAULT_KINDS = (
    "nan_loss",
    "crash",
    "stall",
    "straggler",
    "data_starvation",
    "oom",
    "oom_killed",
    "collective_timeout",
    "gpu_xid",
    "gpu_ecc",
    "thermal_throttle",
    "node_memory_pressure",
    "disk_full",
    "node_down",
)
SYMPTOM_KINDS = ("collective_timeout", "peer_lost", "terminated", *FAULT_KINDS)
NODE_KINDS = frozenset(("gpu_xid", "gpu_ecc", "thermal_throttle", "node_memory_pressure", "disk_full", "node_down"))
CONFIDENCE = ("low", "medium", "high")
SOURCES = ("log", "alert", "metric", "stack", "launcher")
TEXT_CHARS = 400


def clip(text: str, n: int = TEXT_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass(frozen=True)
class Evidence:
    source: str  # log | alert | metric | stack | launcher
    time: str | None
    rank: int | None
    text: str
    ref: str  # the event's _id, or the query

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "time": self.time, "rank": self.rank, "text": clip(self.text), "ref": self.ref}


def event_evidence(ev: Mapping[str, Any], text: str | None = None) -> Evidence:
    """An evidence line for a stored event (its kind is its source: log, alert, stack, launcher)."""
    kind = str(ev.get("kind") or "log")
    rank = ev.get("rank")
    return Evidence(
        source=kind if kind in SOURCES else "log",
        time=str(ev.get("@timestamp")),
        rank=rank if type(rank) is int else None,
        text=text if text is not None else str(ev.get("message") or ""),
        ref=str(ev.get("_id")),
    )


@dataclass
class Finding:
    """One thing a detector found. ``role``: ``fault`` (can end or hang a job), ``anomaly`` (costs
    time but ends nothing), ``symptom`` (a rank failing because of another)."""

    kind: str
    role: str
    rank: int | None
    summary: str
    time: str | None
    confidence: str = "medium"
    node: str | None = None
    step: int | None = None
    evidence: list[Evidence] = field(default_factory=list)
    detector: str = ""
    magnitude: float = 0.0  # how strong, for ranking anomalies of one kind (a 4x straggler over a 1.6x one)
    tags: frozenset[str] = frozenset()  # facts a detector knows and the verdict's rules read ("sigkill")

    def key(self) -> tuple[str, int | None, str | None]:
        return self.kind, self.rank, self.node if self.rank is None else None

    def to_root(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rank": self.rank,
            "node": self.node,
            "step": self.step,
            "time": self.time,
            "summary": self.summary,
            "confidence": self.confidence,
            "evidence": [e.to_json() for e in self.evidence],
        }

    def to_symptom(self) -> dict[str, Any]:
        text = self.evidence[0].text if self.evidence else self.summary
        return {"kind": self.kind, "rank": self.rank, "time": self.time, "text": clip(text)}

    def to_other(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "time": self.time, "summary": self.summary}


@dataclass
class Report:
    job: str
    verdict: str  # fault | healthy | unknown
    root: Finding | None
    symptoms: list[Finding]
    others: list[Finding]
    timeline: list[dict[str, Any]]
    summary: str = ""  # one line for the terminal when there is no root cause

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "verdict": self.verdict,
            "root_cause": self.root.to_root() if self.root else None,
            "symptoms": [s.to_symptom() for s in self.symptoms],
            "other_findings": [o.to_other() for o in self.others],
            "timeline": self.timeline,
        }
