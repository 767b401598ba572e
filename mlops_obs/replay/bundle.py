"""``replay --bundle FILE``: an incident bundle (:mod:`mlops_obs.rca.bundle`) read as a logs
:class:`~mlops_obs.logs.source.Source`, so a bundle replays through the same
:func:`~mlops_obs.replay.timeline.job_timeline` (filters, a job's node alerts, limit) as a store.

A bundle's ``events.ndjson`` is already in timeline order (``mlops-obs bundle`` writes it so); every
reading streams it from the archive through :func:`~mlops_obs.replay.files.reordered`, so a bundle
made elsewhere and slightly out of order still comes out in order, and memory stays bounded by that
buffer whatever the bundle's size. :meth:`BundleSource.rank_facts` is one more pass over the stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlops_obs.logs.sink import LEVEL_RANK
from mlops_obs.logs.source import EventQuery, RankFacts
from mlops_obs.rca.bundle import Bundle
from mlops_obs.replay.files import reordered


class BundleSource:
    """The events of one bundle, read-only; :meth:`follow` is refused (a bundle does not grow)."""

    def __init__(self, path: Path | str) -> None:
        self.bundle = Bundle(path)  # BundleError (one line) for a missing, corrupt or foreign file

    def events(self, query: EventQuery) -> Iterator[dict[str, Any]]:
        matching = (ev for ev in reordered(self.bundle.events()) if query.matches(ev))
        if query.limit is None:
            return matching
        return (ev for _, ev in zip(range(query.limit), matching, strict=False))

    def follow(self, query: EventQuery, stop: threading.Event, poll_interval: float = 0.25) -> Iterator[dict[str, Any]]:
        raise ValueError("a bundle does not grow: --follow reads a store or OpenSearch")

    def rank_facts(self, job: str, *, since: str | None = None, until: str | None = None) -> list[RankFacts]:
        """Per rank, from one pass over the job's log events in ``[since, until)``."""
        acc: dict[int | None, dict[str, Any]] = {}
        floor = LEVEL_RANK["error"]
        for ev in self.events(EventQuery(job=job, kind="log", since=since, until=until)):
            rank = ev.get("rank") if type(ev.get("rank")) is int else None
            ts = ev["@timestamp"]
            a = acc.get(rank)
            if a is None:
                a = acc[rank] = {"nodes": set(), "n": 0, "first": ts, "last": ts, "error": None, "step": None}
            a["n"] += 1
            a["first"], a["last"] = min(a["first"], ts), max(a["last"], ts)
            if isinstance(ev.get("node"), str):
                a["nodes"].add(ev["node"])
            if a["error"] is None and LEVEL_RANK.get(ev.get("level") or "", 0) >= floor:
                a["error"] = ev
            fields = ev.get("fields")
            step = fields.get("step") if type(fields) is dict else None
            if type(step) is int and (a["step"] is None or ts >= a["step"][0]):
                a["step"] = (ts, step)
        return [
            RankFacts(job=job, rank=rank, nodes=tuple(sorted(a["nodes"])), events=a["n"], first_time=a["first"],
                      last_time=a["last"], first_error=a["error"], last_step=a["step"][1] if a["step"] else None,
                      last_step_time=a["step"][0] if a["step"] else None)
            for rank, a in sorted(acc.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        ]  # fmt: skip

    def close(self) -> None:
        self.bundle.close()
