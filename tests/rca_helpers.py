"""Store-schema events of a training job, written the way the workload, torch and the alert sink write
them, for the root-cause tests of the kinds this CPU machine cannot produce (GPU XIDs, OOM kills,
NCCL timeouts, full disks) and of the store's fast path at scale."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mlops_obs.rca.sources import EventStream
from mlops_obs.rca.times import stamp

T0 = 1_800_000_000.0


@dataclass
class Job:
    name: str = "j"
    world: int = 4
    step_s: float = 0.05
    nodes: dict[int, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    _offsets: dict[str, int] = field(default_factory=dict)

    def node(self, rank: int) -> str:
        return self.nodes.get(rank, "n1")

    def ev(
        self,
        rank: int | None,
        t: float,
        message: str,
        level: str = "info",
        *,
        kind: str = "log",
        node: str | None = None,
        source: str | None = None,
        job: str | None = "",
        **fields: Any,
    ) -> dict[str, Any]:
        src = source or (f"/logs/{self.name}-rank{rank}.jsonl" if rank is not None else f"/logs/{kind}.log")
        off = self._offsets.get(src, 0)
        self._offsets[src] = off + 100
        e = {"_id": f"{abs(hash(src)) % 10**8}-{off}", "@timestamp": stamp(T0 + t), "kind": kind,
             "job": self.name if job == "" else job, "rank": rank,
             "node": node if node is not None else (self.node(rank) if rank is not None else None), "level": level,
             "message": message, "seq": None, "source": src, "offset": off, "fields": fields}  # fmt: skip
        self.events.append(e)
        return e

    def start(self, t: float = 0.0) -> None:
        for r in range(self.world):
            self.ev(r, t + 0.001 * r, "rank starting", world_size=self.world, backend="gloo", pid=1000 + r)

    def steps(self, first: int, last: int, t: float, ranks: Iterable[int] | None = None) -> float:
        """Step lines ``first..last`` for ``ranks`` (all), a step every ``step_s`` from ``t``; the end time."""
        for s in range(first, last + 1):
            for r in ranks if ranks is not None else range(self.world):
                self.ev(r, t + 0.0002 * r, "step", step=s, loss=2.3 - s * 0.001)
            t += self.step_s
        return t

    def finish(self, t: float) -> None:
        for r in range(self.world):
            self.ev(r, t, "training finished", steps=0)

    def alert(self, t: float, name: str, *, status: str = "firing", rank: int | None = None, node: str | None = None,
              job: str | None = None, severity: str = "warning") -> dict[str, Any]:  # fmt: skip
        labels = {"alertname": name, "severity": severity}
        if rank is not None:
            labels["rank"] = str(rank)
        if node is not None:
            labels["node"] = node
        if job is not None:
            labels["job"] = job
        return self.ev(rank, t, f"[{status.upper()}] {name}: {name} fired", "warning", kind="alert", node=node,
                       source="alertmanager/sink", job=job, alertname=name, status=status, labels=labels,
                       fingerprint=f"fp-{name}-{node}-{rank}", startsAt=stamp(T0 + t))  # fmt: skip

    def source(self) -> EventStream:
        evs = sorted(self.events, key=lambda e: (e["@timestamp"], e["source"], e["offset"]))
        return EventStream(lambda: evs, self.name)
