"""The embedded event store: idempotent puts, ordered filtered queries, crash safety across processes."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlops_obs.logs.store import EventError, EventStore, format_timestamp


def ev(i: int, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "_id": f"f-{i}",
        "@timestamp": f"2026-01-01T00:00:{i % 60:02d}.{i:06d}Z",
        "kind": "log",
        "job": "j",
        "rank": i % 2,
        "node": "n1",
        "level": "info",
        "message": f"step {i}",
        "seq": i,
        "source": "/logs/j-rank0.jsonl",
        "offset": i * 10,
        "fields": {"loss": 0.5, "i": i},
    }
    base.update(kw)
    return base


def test_put_is_idempotent_on_id(tmp_path: Path) -> None:
    """A repeated _id is ignored and put() returns only how many were new."""
    with EventStore(tmp_path) as s:
        assert s.put([ev(1), ev(2)]) == 2
        assert s.put([ev(2), ev(3), ev(3)]) == 1
        assert s.count() == 3
        assert s.put([]) == 0


def test_identical_content_different_ids_both_kept(tmp_path: Path) -> None:
    """Two identical lines (same content, same millisecond) are two events: identity is the _id."""
    a = ev(1)
    b = dict(a, _id="f-999", offset=999)
    with EventStore(tmp_path) as s:
        assert s.put([a, b]) == 2
        assert [e["_id"] for e in s.query()] == ["f-1", "f-999"]


def test_query_filters_and_order(tmp_path: Path) -> None:
    """Filters combine; results come in (@timestamp, source, offset) order with fields restored."""
    with EventStore(tmp_path) as s:
        s.put([ev(i) for i in range(10, 0, -1)])
        s.put([ev(100, level="error", message="NCCL watchdog timeout", rank=1)])
        s.put([ev(101, kind="alert", level="critical", message="RankStalled", rank=None, seq=None, source="am")])
        allev = s.query()
        assert [e["@timestamp"] for e in allev] == sorted(e["@timestamp"] for e in allev)
        assert [e["seq"] for e in s.query(job="j", rank=0)] == [2, 4, 6, 8, 10]
        assert [e["_id"] for e in s.query(level="error")] == ["f-100"]
        assert [e["_id"] for e in s.query(level=["error", "critical"])] == ["f-100", "f-101"]
        assert [e["_id"] for e in s.query(kind="alert")] == ["f-101"]
        assert [e["seq"] for e in s.query(since="2026-01-01T00:00:03Z", until="2026-01-01T00:00:05Z")] == [3, 4]
        assert [e["_id"] for e in s.query(text="watchdog")] == ["f-100"]
        assert [e["_id"] for e in s.query(text="WATCHDOG TIME")] == ["f-100"]  # case-insensitive substring
        assert len(s.query(text="EP")) == 10  # short text falls back to a scan
        assert len(s.query(limit=3)) == 3
        first = s.query(limit=1)[0]
        assert first["fields"] == {"loss": 0.5, "i": 1}
        assert first["rank"] == 1 and first["offset"] == 10


def test_fts_catches_up_with_later_writes(tmp_path: Path) -> None:
    """Text search indexes on demand, so events written after a text query are still found."""
    with EventStore(tmp_path) as s:
        s.put([ev(1, message="alpha beta")])
        assert len(s.query(text="alpha")) == 1
        s.put([ev(2, message="alpha gamma")])
        assert len(s.query(text="alpha")) == 2
        assert len(s.query(text="gamma")) == 1


def test_timestamps_are_normalised(tmp_path: Path) -> None:
    """datetime, epoch seconds and ISO with offsets all become the canonical UTC form."""
    assert format_timestamp("2026-01-01T01:00:00+01:00") == "2026-01-01T00:00:00.000000Z"
    assert format_timestamp(0) == "1970-01-01T00:00:00.000000Z"
    assert format_timestamp(dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) == "2026-01-01T00:00:00.000000Z"
    with EventStore(tmp_path) as s:
        s.put([ev(1, **{"@timestamp": "2026-01-01T00:00:00Z"})])
        assert s.query()[0]["@timestamp"] == "2026-01-01T00:00:00.000000Z"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"_id": None}, "_id"),
        ({"@timestamp": "yesterday"}, "@timestamp"),
        ({"kind": "metric"}, "kind"),
        ({"rank": "zero"}, "rank"),
        ({"fields": [1, 2]}, "fields"),
    ],
)
def test_bad_event_rejected_whole_batch(tmp_path: Path, bad: dict[str, Any], why: str) -> None:
    """A malformed event raises a one-line error naming the field, and nothing of the batch is written."""
    with EventStore(tmp_path) as s:
        with pytest.raises(EventError, match=why):
            s.put([ev(1), ev(2, **bad)])
        assert s.count() == 0


def test_committed_batches_survive_kill9_of_writer(tmp_path: Path) -> None:
    """A writer process killed mid-stream leaves every committed batch intact and the file usable."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from mlops_obs.logs.store import EventStore
s = EventStore({str(tmp_path)!r})
i = 0
while True:
    s.put([{{"_id": f"x-{{i + k}}", "@timestamp": "2026-01-01T00:00:00.000000Z", "message": "m",
             "source": "s", "offset": i + k}} for k in range(100)])
    i += 100
    print(i, flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    committed = 0
    for out in proc.stdout:
        committed = int(out)
        if committed >= 3000:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with EventStore(tmp_path) as s:
        n = s.count()
        assert n >= committed and n % 100 == 0  # whole batches only
        assert s.put([{"_id": "after", "@timestamp": 0, "message": "m", "source": "s", "offset": 0}]) == 1
