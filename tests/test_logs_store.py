"""The embedded event store: idempotent puts, ordered filtered queries, crash safety across processes."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlops_obs.logs.sink import format_timestamp
from mlops_obs.logs.store import EventError, EventStore


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
        assert len(s.query(text="EP")) == 10
        assert len(s.query(limit=3)) == 3
        first = s.query(limit=1)[0]
        assert first["fields"] == {"loss": 0.5, "i": 1}
        assert first["rank"] == 1 and first["offset"] == 10


def test_text_search_sees_later_writes(tmp_path: Path) -> None:
    """Events written after a text query are found by the next one (no index to fall behind)."""
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


def _ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["_id"] for e in events]


def test_partial_overlap_resend_stores_only_the_new(tmp_path: Path) -> None:
    """A re-sent range that overlaps stored chunks in part (a crash between commit and checkpoint,
    then more lines) stores exactly the events not yet there, and put() counts only those."""
    with EventStore(tmp_path) as s:
        assert s.put([ev(i) for i in range(0, 50)]) == 50
        assert s.put([ev(i) for i in range(50, 100)]) == 50
        # 40..119: 40..99 stored (spanning both chunks), 100..119 new
        assert s.put([ev(i) for i in range(40, 120)]) == 20
        # a gap filled in the middle of a range: only the missing ones count
        assert s.put([ev(i) for i in range(200, 210)]) == 10
        assert s.put([ev(i) for i in (195, 200, 205, 199, 210)]) == 3
        assert s.count() == 133
        got = sorted(int(e["_id"][2:]) for e in s.query())
        assert got == sorted(set(range(120)) | {195, 199, 210} | set(range(200, 210)))


def test_resend_of_shipper_batch_is_idempotent(tmp_path: Path) -> None:
    """Ids of the shipper's form (``<file id>-<offset>``) stored compactly are still recognised on a re-send."""

    def line_ev(off: int) -> dict[str, Any]:
        return ev(off, _id=f"0123456789abcdef0123-{off}", offset=off)

    with EventStore(tmp_path) as s:
        assert s.put([line_ev(o) for o in range(0, 3000, 10)]) == 300
        assert s.put([line_ev(o) for o in range(2500, 3500, 10)]) == 50
        assert s.count() == 350
        evs = s.query()
        assert {e["_id"] for e in evs} == {f"0123456789abcdef0123-{o}" for o in range(0, 3500, 10)}
        assert all(e["_id"].endswith(f"-{e['offset']}") for e in evs)


def test_duplicates_within_one_put_keep_the_first(tmp_path: Path) -> None:
    """The same _id twice in one call is stored once, with the first event's content."""
    with EventStore(tmp_path) as s:
        assert s.put([ev(1, message="first"), ev(2), ev(1, message="second"), ev(3), ev(2, message="x")]) == 3
        assert {e["_id"]: e["message"] for e in s.query()} == {"f-1": "first", "f-2": "step 2", "f-3": "step 3"}


def test_ids_not_of_the_prefix_number_form(tmp_path: Path) -> None:
    """Ids without a decimal suffix, with leading zeros, huge numbers or odd characters are exact identities."""
    odd = ["alert-abc123", "plain", "x-", "-5", "a-b-7", "f-007", "f-7", "z-" + "9" * 30, "n-\u0663", "q-1\n2"]
    with EventStore(tmp_path) as s:
        assert s.put([ev(i, _id=x) for i, x in enumerate(odd)]) == len(odd)
        assert s.put([ev(i, _id=x) for i, x in enumerate(odd)]) == 0
        assert s.put([ev(99, _id="f-7"), ev(98, _id="f-8")]) == 1  # f-7 is there, f-007 did not hide it
        assert sorted(_ids(s.query())) == sorted([*odd, "f-8"])


def test_level_and_text_filters_across_chunks(tmp_path: Path) -> None:
    """Level filters (warning-and-worse chunks are found by their severity) and text search work
    over many chunks of several streams, and match per event, not per chunk."""
    with EventStore(tmp_path) as s:
        for r in range(3):
            batch = [
                ev(r * 1000 + i, _id=f"r{r}-{i}", rank=r, source=f"/logs/j-rank{r}.jsonl", offset=i,
                   level="error" if i % 250 == 7 else "info",
                   message=f"NCCL timeout {i}" if i % 500 == 9 else f"step {i}")
                for i in range(1500)
            ]  # fmt: skip
            s.put(batch)
        s.put([ev(9000, _id="w-1", level="warning", message="slow"), ev(9001, _id="w-2", level=None)])
        errors = s.query(level="error")
        assert len(errors) == 18 and {e["level"] for e in errors} == {"error"}
        assert len(s.query(level=["warning", "error"])) == 19
        assert len(s.query(level="info", rank=1)) == 1500 - 6
        assert [e["_id"] for e in s.query(level="warning")] == ["w-1"]
        assert s.query(level="notice") == []
        hits = s.query(text="nccl TIMEOUT")
        assert len(hits) == 9 and all("NCCL timeout" in e["message"] for e in hits)
        assert len(s.query(text="timeout", rank=2, level="info")) == 3


def test_limit_and_order_across_streams(tmp_path: Path) -> None:
    """Events of interleaved streams come back in (@timestamp, source, offset) order, and a limit
    returns the first N of that order even when they lie in different chunks."""
    with EventStore(tmp_path) as s:
        expected = []
        for r in (2, 0, 1):
            batch = []
            for i in range(0, 600, 3):
                t = i + r  # the three streams interleave in time
                e = ev(t, _id=f"s{r}-{i}", rank=r, source=f"/logs/j-rank{r}.jsonl", offset=i,
                       **{"@timestamp": f"2026-01-01T00:{t // 60:02d}:{t % 60:02d}.000000Z"})  # fmt: skip
                batch.append(e)
                expected.append((e["@timestamp"], e["source"], e["offset"]))
            s.put(batch[:100])
            s.put(batch[100:])
        # two events with the same timestamp: source then offset break the tie
        s.put([ev(0, _id="tie-b", source="/b", offset=5, **{"@timestamp": "2026-01-01T00:00:00.000000Z"}),
               ev(0, _id="tie-a", source="/a", offset=9, **{"@timestamp": "2026-01-01T00:00:00.000000Z"})])  # fmt: skip
        expected += [("2026-01-01T00:00:00.000000Z", "/b", 5), ("2026-01-01T00:00:00.000000Z", "/a", 9)]
        expected.sort()
        order = [(e["@timestamp"], e["source"], e["offset"]) for e in s.query()]
        assert order == expected
        for n in (1, 3, 7, 250):
            assert [(e["@timestamp"], e["source"], e["offset"]) for e in s.query(limit=n)] == expected[:n]
        since = "2026-01-01T00:05:00Z"
        tail = [x for x in expected if x[0] >= "2026-01-01T00:05:00.000000Z"]
        assert [(e["@timestamp"], e["source"], e["offset"]) for e in s.query(since=since, limit=4)] == tail[:4]
        assert s.query(limit=0) == []


# The version 1 schema (one row per event), as the store created it before chunks.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id      TEXT NOT NULL UNIQUE,
    ts      TEXT NOT NULL,
    kind    TEXT NOT NULL,
    job     TEXT,
    rank    INTEGER,
    node    TEXT,
    level   TEXT,
    message TEXT NOT NULL,
    seq     INTEGER,
    source  TEXT NOT NULL,
    off     INTEGER NOT NULL,
    fields  BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts, source, off);
CREATE INDEX IF NOT EXISTS events_job ON events (job, rank, ts);
CREATE INDEX IF NOT EXISTS events_notable ON events (level, ts) WHERE level NOT IN ('debug', 'info');
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, ts) WHERE kind != 'log';
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def test_v1_store_is_migrated_on_open(tmp_path: Path) -> None:
    """A store written by the one-row-per-event schema is converted to chunks on open: same events,
    same order and filters, idempotence kept across the migration, the old tables gone."""
    import sqlite3

    import orjson

    db = sqlite3.connect(tmp_path / "events.sqlite3")
    db.executescript(V1_SCHEMA)
    rows = []
    for i in range(1, 2501):
        e = ev(i, _id=f"0123456789abcdef0123-{i * 10}", level="error" if i % 1000 == 0 else "info")
        rows.append((e["_id"], e["@timestamp"], "log", "j", e["rank"], "n1", e["level"], e["message"], i,
                     e["source"], e["offset"], orjson.dumps(e["fields"])))  # fmt: skip
    rows.append(("alert-deadbeef", "2026-01-01T00:00:30.000000Z", "alert", "j", None, None, "critical",
                 "[FIRING] RankStalled", None, "alertmanager", 0,
                 orjson.dumps({"alertname": "RankStalled"})))  # fmt: skip
    db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.execute(
        "CREATE VIRTUAL TABLE events_fts USING fts5(message, content='events', content_rowid='rowid',"
        " tokenize='trigram')"
    )
    db.execute("INSERT INTO meta VALUES ('fts_upto', 0)")
    db.commit()
    db.close()

    with EventStore(tmp_path) as s:
        assert s.count() == 2501
        assert [e["seq"] for e in s.query(level="error")] == [2000, 1000]  # ev()'s timestamps: :20 before :40
        assert [e["fields"] for e in s.query(kind="alert")] == [{"alertname": "RankStalled"}]
        got = s.query(job="j", rank=1, limit=3)
        assert [e["seq"] for e in got] == [1, 61, 121] and got[0]["fields"] == {"loss": 0.5, "i": 1}
        assert s.put([ev(7, _id="0123456789abcdef0123-70"), ev(9999, _id="0123456789abcdef0123-99990")]) == 1
        assert s.put([{"_id": "alert-deadbeef", "@timestamp": 0, "kind": "alert", "message": "again"}]) == 0
    db = sqlite3.connect(tmp_path / "events.sqlite3")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()
    assert "events" not in tables and "events_fts" not in tables and "chunks" in tables
    with EventStore(tmp_path) as s:  # opening a migrated store again changes nothing
        assert s.count() == 2502


def test_shipper_batch_matches_line_by_line_parse(tmp_path: Path) -> None:
    """The shipper's block path (JSON runs parsed straight into columns) stores exactly the events
    that parsing each line on its own gives, for a file mixing every kind of line."""
    import orjson

    from mlops_obs.logs.events import LineParser
    from mlops_obs.logs.shipper import Shipper, ShipperOptions
    from mlops_obs.logs.store import StoreSink

    ts = "2026-01-01T00:00:%02d.000000Z"
    lines = []
    for i in range(400):
        k = i % 20
        if k == 3:
            lines.append(b"NCCL WARN something odd")
        elif k == 5:
            lines.append(b"")
        elif k == 7:
            lines.append(orjson.dumps({"event": "crlf", "ts": ts % (i % 60), "level": "warn", "seq": i}) + b"\r")
        elif k == 9:
            lines.append(b"[1, 2, 3]")
        elif k == 11:
            lines.append(orjson.dumps({"msg": "other keys", "time": 1767225600 + i, "severity": "ERROR", "rank": "3"}))
        elif k == 13:
            lines.append(b'{"event": "torn')
        elif k == 15:
            # a job that is not a string (only in the last batch: it sends that batch down put()'s general path)
            rec = {"event": {"nested": i}, "ts": "yesterday", "seq": "x"}
            lines.append(orjson.dumps({**rec, "job": 5} if i > 380 else rec))
        else:
            lines.append(orjson.dumps({"event": "step", "ts": ts % (i % 60), "level": "info", "seq": i,
                                       "job": "j", "node": "n1", "step": i, "loss": 0.5}))  # fmt: skip
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "mix-rank2.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    sh = Shipper(ShipperOptions(sources=[str(logs / "*.jsonl")], state_dir=tmp_path / "st", batch_events=97),
                 StoreSink(tmp_path / "store"))  # fmt: skip
    sh.run(once=True)
    fs = next(iter(sh.files.states.values()))
    sh.close()

    parser = LineParser(str(path), fs.fid, "1970-01-01T00:00:00.000000Z", node=socket.gethostname())
    expected = []
    off = 0
    for raw in lines:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line:
            expected.append(parser.parse(line, off))
        off += len(raw) + 1
    with EventStore(tmp_path / "ref") as ref:  # the same events as dicts, through put()'s general path
        assert ref.put(expected) == len(expected)
        want = ref.query()
    with EventStore(tmp_path / "store") as s:
        got = s.query()
    assert len(got) == len(expected) == 380
    assert got == want
    assert {e["job"] for e in got} == {"j", "5", "mix"}  # a non-string job from a record is stored as text


def test_concurrent_writers_resending_overlaps_store_each_event_once(tmp_path: Path) -> None:
    """Two processes re-sending overlapping ranges of the same ids at the same time (the shipper
    after a restart and a second shipper, or the alert sink's redeliveries) end with every event
    exactly once: the overlap check runs inside each writer's exclusive transaction."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from mlops_obs.logs.store import EventStore
s = EventStore({str(tmp_path)!r})
start = int(sys.argv[1])
new = 0
for b in range(40):
    lo = (start + b * 37) % 1500
    new += s.put([{{"_id": f"0123456789abcdef0123-{{o}}", "@timestamp": "2026-01-01T00:00:00.000000Z",
                   "message": "m", "source": "/f", "offset": o}} for o in range(lo, lo + 120)])
print(new)
"""
    EventStore(tmp_path).close()
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(k)], stdout=subprocess.PIPE, text=True) for k in (0, 700)
    ]
    news = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    with EventStore(tmp_path) as s:
        ids = [e["_id"] for e in s.query()]
        assert len(ids) == len(set(ids)) == s.count() == sum(news)
        expected = {(k + b * 37) % 1500 + i for k in (0, 700) for b in range(40) for i in range(120)}
        assert {int(x.rsplit("-", 1)[1]) for x in ids} == expected


def test_parsed_events_failing_a_check_take_the_validating_path(tmp_path: Path) -> None:
    """A shipper batch whose timestamps are not canonical, whose job is not a string or whose
    offsets repeat is stored through put()'s general path: normalised, and each _id once."""
    from mlops_obs.logs.sink import ParsedEvents

    def batch(ts: str, job: Any, offs: list[int]) -> ParsedEvents:
        b = ParsedEvents()
        for o in offs:
            b.append({"@timestamp": ts, "job": job, "rank": 0, "node": "n", "level": "info", "message": "m",
                      "seq": o, "offset": o, "fields": {"o": o}})  # fmt: skip
        b.runs.append(("0123456789abcdef0123", "/logs/a.jsonl", 0, len(offs)))
        return b

    with EventStore(tmp_path) as s:
        assert s.put(batch("2026-01-01T00:00:00.000000Z", "j", [0, 10, 20])) == 3
        assert s.put(batch("2026-01-01T01:00:00+01:00", "j", [30])) == 1
        assert s.put(batch("2026-01-01T00:00:00.000000Z", 7, [40])) == 1
        assert s.put(batch("2026-01-01T00:00:00.000000Z", "j", [50, 50, 10])) == 1
        got = {e["offset"]: e for e in s.query()}
        assert sorted(got) == [0, 10, 20, 30, 40, 50]
        assert got[30]["@timestamp"] == "2026-01-01T00:00:00.000000Z" and got[40]["job"] == "7"
        assert got[10]["_id"] == "0123456789abcdef0123-10" and got[10]["source"] == "/logs/a.jsonl"
        assert got[50]["fields"] == {"o": 50}
    bad = batch("2026-01-01T00:00:00.000000Z", "j", [1, 2])
    bad.runs[0] = ("p", "/s", 0, 1)
    with pytest.raises(ValueError, match="runs cover 1 of 2"):
        bad.dicts()
