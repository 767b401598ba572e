"""The read side over the store: one time order across ranks and alerts, every filter agreeing with
EventQuery.matches, follow reading only what is new, per-rank facts equal to a full scan's."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest

from mlops_obs.logs.backend import Backend, open_source
from mlops_obs.logs.sink import LEVEL_RANK
from mlops_obs.logs.source import EventQuery, RankFacts
from mlops_obs.logs.store import EventStore
from tests.conftest import wait_for

LEVELS = ("debug", "info", "info", "info", "warning", "error", "critical")


def _ts(sec: int, usec: int = 0) -> str:
    return f"2026-05-06T07:{sec // 60:02d}:{sec % 60:02d}.{usec:06d}Z"


def _events(rng: random.Random, n: int, rank: int, first: int) -> list[dict[str, Any]]:
    out = []
    for i in range(first, first + n):
        fields: dict[str, Any] = {"step": i} if rng.random() < 0.7 else {}
        out.append({"_id": f"r{rank}fileid0000000000-{i * 10}", "@timestamp": _ts(rng.randrange(3000), rank),
                    "kind": "log", "job": "job-a" if rank < 3 else "job-b", "rank": rank, "node": f"n{rank % 2}",
                    "level": rng.choice(LEVELS), "message": f"rank {rank} line {i}" + (" NCCL" if i % 9 == 0 else ""),
                    "seq": i, "source": f"/logs/j-rank{rank}.jsonl", "offset": i * 10, "fields": fields})  # fmt: skip
    return out


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A store of 4 ranks over 2 jobs, each rank's events put in several calls (so several chunks per
    rank, their time ranges overlapping), plus alerts."""
    rng = random.Random(13)
    every: list[dict[str, Any]] = []
    with EventStore(tmp_path) as s:
        for part in range(5):
            for rank in range(4):
                evs = _events(rng, 60, rank, part * 60)
                s.put(evs)
                every += evs
        alerts = [{"_id": f"alert-{i}", "@timestamp": _ts(100 * i), "kind": "alert", "job": "job-a", "rank": None,
                   "node": "n0", "level": "critical", "message": f"[FIRING] A{i}", "source": "alertmanager",
                   "offset": 0, "fields": {"alertname": f"A{i}"}} for i in range(5)]  # fmt: skip
        s.put(alerts)
        every += [dict(a, seq=None) for a in alerts]
    every.sort(key=lambda e: (e["@timestamp"], e["source"], e["offset"]))
    return tmp_path, every


QUERIES = [
    EventQuery(),
    EventQuery(job="job-a"),
    EventQuery(job="job-a", ranks=(2, 0)),
    EventQuery(node="n1", min_level="warning"),
    EventQuery(kind="alert"),
    EventQuery(kind="log", min_level="error", since=_ts(600), until=_ts(1800)),
    EventQuery(text="nccl", ranks=(1,)),
    EventQuery(job="job-b", limit=7),
    EventQuery(since="2026-05-06T08:30:00+01:00", limit=0),
]


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: repr(q)[10:60])
def test_events_in_time_order_and_filtered_as_matches_says(
    filled: tuple[Path, list[dict[str, Any]]], query: EventQuery
) -> None:
    path, every = filled
    want = [e for e in every if query.matches(e)][: query.limit]
    source = open_source(Backend(store=path))
    try:
        got = list(source.events(query))
    finally:
        source.close()
    assert got == want
    assert query.limit == 0 or got, "a query that selects nothing checks nothing"


def test_follow_yields_what_is_there_then_only_what_is_new(tmp_path: Path) -> None:
    with EventStore(tmp_path) as s:
        s.put([{"_id": "a-0", "@timestamp": _ts(5), "job": "j", "rank": 0, "message": "old", "source": "/a"}])
        source = open_source(Backend(store=tmp_path))
        stop = threading.Event()
        got: list[dict[str, Any]] = []
        t = threading.Thread(target=lambda: got.extend(source.follow(EventQuery(job="j"), stop, poll_interval=0.02)))
        t.start()
        try:
            wait_for(lambda: len(got) == 1)
            late = {"_id": "a-10", "@timestamp": _ts(1), "job": "j", "rank": 0, "message": "late", "source": "/a",
                    "offset": 10}  # fmt: skip
            s.put([late, {"_id": "b-0", "@timestamp": _ts(9), "job": "other", "message": "not mine", "source": "/b"}])
            wait_for(lambda: len(got) == 2)
            s.put([{"_id": "a-20", "@timestamp": _ts(7), "job": "j", "rank": 0, "message": "new", "source": "/a",
                    "offset": 20}])  # fmt: skip
            wait_for(lambda: len(got) == 3)
        finally:
            stop.set()
            t.join(timeout=30)
            source.close()
    assert not t.is_alive()
    assert [e["message"] for e in got] == ["old", "late", "new"]  # arrival order; each once


def _facts_by_scan(every: list[dict[str, Any]], job: str, lo: str | None, hi: str | None) -> list[RankFacts]:
    logs = [e for e in every if e["job"] == job and e["kind"] == "log" and (lo is None or e["@timestamp"] >= lo)
            and (hi is None or e["@timestamp"] < hi)]  # fmt: skip
    out = []
    for rank in sorted({e["rank"] for e in logs}):
        mine = [e for e in logs if e["rank"] == rank]
        errors = [e for e in mine if LEVEL_RANK.get(e["level"], 0) >= LEVEL_RANK["error"]]
        stepped = [e for e in mine if isinstance(e["fields"].get("step"), int)]
        last = max(stepped, key=lambda e: e["@timestamp"]) if stepped else None
        out.append(RankFacts(job=job, rank=rank, nodes=tuple(sorted({e["node"] for e in mine})), events=len(mine),
                             first_time=min(e["@timestamp"] for e in mine),
                             last_time=max(e["@timestamp"] for e in mine),
                             first_error=errors[0] if errors else None,
                             last_step=last["fields"]["step"] if last else None,
                             last_step_time=last["@timestamp"] if last else None))  # fmt: skip
    return out


@pytest.mark.parametrize(("lo", "hi"), [(None, None), (_ts(700), _ts(2100)), (_ts(2990), None)])
def test_rank_facts_equal_a_full_scan(
    filled: tuple[Path, list[dict[str, Any]]], lo: str | None, hi: str | None
) -> None:
    path, every = filled
    source = open_source(Backend(store=path))
    try:
        for job in ("job-a", "job-b"):
            facts = source.rank_facts(job, since=lo, until=hi)
            assert facts == _facts_by_scan(every, job, lo, hi)
            assert facts and all(f.first_error is not None for f in facts if lo is None)
    finally:
        source.close()


def test_a_reader_never_creates_a_store(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no event store"):
        open_source(Backend(store=tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()
    from mlops_obs.logs.opensearch import OpenSearchSource

    src = open_source(Backend.from_config({"opensearch": "http://127.0.0.1:9", "opensearch.index-prefix": "p",
                                           "opensearch.max-body-bytes": 1 << 20, "opensearch.retention": 86400.0,
                                           "opensearch.timeout": 1.0, "opensearch.backoff-max": 1.0}))  # fmt: skip
    assert isinstance(src, OpenSearchSource)  # connects on the first read, creates nothing
    src.close()


@pytest.mark.parametrize(
    ("kw", "why"),
    [({"min_level": "loud"}, "level must be one of"), ({"kind": "metric"}, "kind must be one of"),
     ({"since": "yesterday"}, "event query"), ({"ranks": ("x",)}, "event query"), ({"limit": -1}, "non-negative")],
)  # fmt: skip
def test_bad_queries_are_one_line_errors(kw: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        EventQuery(**kw)
    assert "\n" not in str(info.value)
