"""Incident bundles: written from a real store by the real command, read back as a store would be,
redacted, capped, and hostile archives refused in one line."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import orjson
import pytest

from mlops_obs.logs.store import EventStore
from mlops_obs.rca.bundle import Bundle, BundleError, write_bundle
from mlops_obs.rca.metrics import MetricEvidence
from mlops_obs.rca.times import epoch, stamp
from tests.rca_helpers import Job

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "rca"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "mlops_obs", *args], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)  # fmt: skip
    assert "Traceback" not in r.stderr, r.stderr
    return r


def crashed_job() -> Job:
    j = Job(name="bj", world=2)
    j.start()
    t = j.steps(0, 50, 1.0)
    j.ev(1, t, "rank failed", "error", step=51, error="RuntimeError: boom",
         api_key="sk-proj-abcdefghijklmnopqrstuvwxyz0123", url="https://bob:hunter2@db.example/x")  # fmt: skip
    j.ev(0, t + 0.2, "connecting with password=hunter2 to the store", "warning")
    j.alert(t + 1, "TrainingNonFiniteLoss", rank=1, job="bj")
    return j


def test_bundle_command_round_trip_redacted(tmp_path: Path) -> None:
    j = crashed_job()
    with EventStore(tmp_path / "store") as s:
        s.put(j.events)
        s.put([{**crashed_job().events[0], "_id": "other-1", "job": "someone-else"}])
    mp = tmp_path / "mp"
    mp.mkdir()
    (mp / "bj.0.rank.json").write_bytes(orjson.dumps({"job": "bj", "rank": 0, "steps": 51, "token": "abc123secret"}))
    (mp / "other.0.rank.json").write_bytes(orjson.dumps({"job": "other", "rank": 0}))
    (mp / "bj.1.rank.json").write_bytes(b"{torn")
    out = tmp_path / "incident.tar.gz"
    r = cli("bundle", "--store", str(tmp_path / "store"), "--job", "bj", "--multiproc-dir", str(mp), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}: {len(j.events)} events, 0 series, 1 rank snapshots" in r.stdout
    b = Bundle(out)
    m = b.manifest
    assert (m["job"], m["events"]["count"], m["truncated"], m["redacted"]) == ("bj", len(j.events), False, True)
    assert m["versions"]["mlops_obs"] and m["versions"]["python"]
    evs = list(b.events())
    in_order = sorted(j.events, key=lambda e: (e["@timestamp"], e["source"], e["offset"]))
    assert [e["_id"] for e in evs] == [e["_id"] for e in in_order]
    text = orjson.dumps(evs).decode() + orjson.dumps(b.snapshots()).decode()
    for secret in ("hunter2", "abcdefghijklmnopqrstuvwxyz0123", "abc123secret"):
        assert secret not in text
    assert list(b.snapshots()) == ["bj.0.json"]
    b.close()
    # The bundle analyses like the store did, on any machine.
    from_store = cli("rca", "--store", str(tmp_path / "store"), "--job", "bj", "--json")
    from_bundle = cli("rca", "--bundle", str(out), "--job", "bj", "--json")
    assert from_store.returncode == from_bundle.returncode == 1
    a, b2 = orjson.loads(from_store.stdout), orjson.loads(from_bundle.stdout)
    assert a["root_cause"]["kind"] == b2["root_cause"]["kind"] == "crash"
    assert (a["root_cause"]["rank"], a["root_cause"]["step"]) == (b2["root_cause"]["rank"], b2["root_cause"]["step"])


def test_size_cap_drops_the_oldest_plain_lines_first(tmp_path: Path) -> None:
    j = crashed_job()
    evs = sorted(j.events, key=lambda e: (e["@timestamp"], e["source"], e["offset"]))
    full = write_bundle(tmp_path / "full.tar.gz", "bj", evs)
    cap = full.manifest["events"]["bytes"] // 2
    w = write_bundle(tmp_path / "half.tar.gz", "bj", evs, max_bytes=cap)
    assert w.dropped > 0 and w.manifest["truncated"] and w.manifest["events"]["bytes"] <= cap
    kept = list(Bundle(tmp_path / "half.tar.gz").events())
    # Every warning, error and alert is kept; of the plain lines, the newest.
    assert {e["_id"] for e in evs if e["level"] != "info" or e["kind"] != "log"} <= {e["_id"] for e in kept}
    plain = [e for e in evs if e["level"] == "info" and e["kind"] == "log"]
    kept_plain = [e["_id"] for e in kept if e["level"] == "info" and e["kind"] == "log"]
    assert kept_plain == [e["_id"] for e in plain[len(plain) - len(kept_plain) :]]
    assert w.manifest["events"]["kept_plain_from"] == plain[-len(kept_plain)]["@timestamp"]
    with pytest.raises(BundleError, match="exceed the size cap"):
        write_bundle(tmp_path / "tiny.tar.gz", "bj", evs, max_bytes=300)
    assert not (tmp_path / "tiny.tar.gz").exists() and not list(tmp_path.glob(".tiny*"))


def test_series_travel_with_the_bundle() -> None:
    b = Bundle(FIXTURES / "strag.tar.gz")
    m = b.metrics()
    assert isinstance(m, MetricEvidence) and m.per_rank("mlops_training_steps_total")
    again = MetricEvidence.from_json(m.to_json())
    assert again.to_json() == m.to_json()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path


def test_hostile_bundles_are_refused_in_one_line(tmp_path: Path) -> None:
    good = orjson.dumps({"format": "mlops-obs-incident-bundle", "format_version": 1, "job": "bj"})
    cases: dict[str, Any] = {
        "not-gzip.tar.gz": b"just some text",
        "no-manifest.tar.gz": {"events.ndjson": b""},
        "wrong-format.tar.gz": {"manifest.json": b'{"format": "something-else"}'},
        "future.tar.gz": {"manifest.json": orjson.dumps({"format": "mlops-obs-incident-bundle", "format_version": 9})},
        "huge-manifest.tar.gz": {"manifest.json": b" " * (2 << 20)},
        "no-events.tar.gz": {"manifest.json": good},
    }
    for name, content in cases.items():
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            _tar(p, content)
        r = cli("rca", "--bundle", str(p), "--job", "bj")
        assert r.returncode == 4, (name, r.stderr)
        assert r.stderr.count("\n") == 1 and str(p) in r.stderr, (name, r.stderr)
    # Poison lines cost only themselves; a traversal name is only a name (nothing is extracted).
    lines = [b"not json", b"[1,2]", b'{"no": "timestamp"}']
    ok = crashed_job().events
    lines += [orjson.dumps(e) for e in ok]
    p = _tar(tmp_path / "poison.tar.gz", {"manifest.json": good, "events.ndjson": b"\n".join(lines) + b"\n",
                                           "../../etc/evil": b"x"})  # fmt: skip
    b = Bundle(p)
    assert len(list(b.events())) == len(ok) and b.skipped == 3
    assert not (tmp_path.parent.parent / "etc" / "evil").exists()
    r = cli("rca", "--bundle", str(p), "--job", "bj", "--json")
    assert r.returncode == 1 and orjson.loads(r.stdout)["root_cause"]["kind"] == "crash"
    r = cli("rca", "--bundle", str(p), "--job", "another")
    assert r.returncode == 4 and "holds job 'bj'" in r.stderr


def test_bundle_streams_the_store_in_time_order_without_holding_the_job(tmp_path: Path) -> None:
    """The command's path (ChunkStore.events into write_bundle) gives the job's events and its nodes'
    job-less alerts and warnings in the store's order, holding the chunks that overlap in time rather
    than the job: its peak memory is a fraction of reading the job at once."""
    import tracemalloc

    from mlops_obs.rca.sources import ChunkStore, relevant

    j = Job(name="big", world=8, step_s=0.01)
    j.start()
    t = j.steps(0, 5000, 1.0)
    j.ev(3, t, "rank failed", "error", error="RuntimeError: boom")
    j.alert(t + 1, "GpuXidCritical", node="n1")  # job-less, on the job's node: in
    j.alert(t + 1, "GpuXidCritical", node="elsewhere")  # another node: out
    j.ev(None, t - 2, "kernel: Out of memory", "error", node="n1", job=None)  # in
    j.ev(None, t - 2, "kernel: all fine", "info", node="n1", job=None)  # a plain job-less line: out
    other = Job(name="other", world=1)
    other.start()
    other.steps(0, 50, 1.0)
    with EventStore(tmp_path / "store") as s:
        for r in range(8):  # as the shipper puts them: each rank's file in its own batches
            s.put([e for e in j.events if e["rank"] == r])
        s.put([e for e in j.events if e["rank"] is None])
        s.put(other.events)
        mine = s.query(job="big")
        lo, hi = mine[0]["@timestamp"], mine[-1]["@timestamp"]
        want = mine + [
            e
            for e in s.query(since=stamp(epoch(lo) - 900), until=stamp(epoch(hi) + 900))
            if e["job"] is None and relevant(e, "big", {"n1"}) and (e["kind"] == "alert" or e["level"] == "error")
        ]
    want.sort(key=lambda e: (e["@timestamp"], e["source"], e["offset"]))
    store = ChunkStore(tmp_path / "store")
    try:
        assert [e["_id"] for e in store.events("big", None, None)] == [e["_id"] for e in want]
        tracemalloc.start()
        with EventStore(tmp_path / "store") as s:
            held = s.query(job="big")
        at_once = tracemalloc.get_traced_memory()[1]
        del held
        tracemalloc.stop()
        tracemalloc.start()
        w = write_bundle(tmp_path / "b.tar.gz", "big", store.events("big", None, None))
        streamed = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        store.close()
    assert w.events == len(want) and [e["_id"] for e in Bundle(tmp_path / "b.tar.gz").events()] == [
        e["_id"] for e in want
    ]
    assert streamed < at_once / 3, (streamed, at_once)
