"""Fault tests of the shipper: kill -9 of the real ``mlops-obs ship`` process at every phase, a soak
with rotation and repeated kills, a sink outage across a restart; each ends in exact reconciliation."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import threading
import time
from pathlib import Path

import orjson

from tests.conftest import wait_for
from tests.fake_opensearch import FakeOpenSearch
from tests.logs_helpers import (
    kill9,
    line,
    reconcile,
    run_ship,
    ship_cmd,
    start_ship,
    store_count,
    store_events,
)


def _write(path: Path, stream: str, first: int, n: int) -> int:
    with open(path, "ab") as f:
        f.write(b"".join(line(stream, s) for s in range(first, first + n)))
    return first + n - 1


PHASES = ["read", "sent", "acked", "checkpoint"]


def test_kill_at_each_phase_then_restart_reconciles(tmp_path: Path) -> None:
    """SIGKILL at every phase, twice each, at random batches, the job writing on between crashes,
    a restart after each: every line once, none twice."""
    rng = random.Random(5)
    logs, store, state = tmp_path / "logs", tmp_path / "store", tmp_path / "state"
    logs.mkdir()
    expected = {"a": _write(logs / "a.log", "a", 1, 3000), "b": _write(logs / "b.log", "b", 1, 2000)}
    cmd = ship_cmd([str(logs / "*.log")], store=store, state=state, once=True, extra=["--ship.batch-events", "500"])
    plan = PHASES * 2
    rng.shuffle(plan)
    killed = []
    for phase in plan:
        r = run_ship(cmd, fault=f"{phase}:{rng.randint(1, 3)}")
        assert r.returncode in (0, -9), r.stderr
        if r.returncode == -9:
            killed.append(phase)
        expected["a"] = _write(logs / "a.log", "a", expected["a"] + 1, 1200)
        expected["b"] = _write(logs / "b.log", "b", expected["b"] + 1, 300)
    assert sorted(set(killed)) == sorted(PHASES), f"not every phase was hit: {killed}"
    r = run_ship(cmd)
    assert r.returncode == 0, r.stderr
    reconcile(store_events(store), expected)


def test_kill_while_request_in_flight_against_opensearch(tmp_path: Path) -> None:
    """kill -9 while _bulk was applied but not yet answered; the restart's 409s make it exact."""
    fake = FakeOpenSearch().start()
    try:
        fake.timeout_sleep = 30.0  # the answer never arrives before the kill
        fake.request_faults.append("timeout")
        logs, state = tmp_path / "logs", tmp_path / "state"
        logs.mkdir()
        expected = {"a": _write(logs / "a.log", "a", 1, 1500)}
        cmd = ship_cmd([str(logs / "*.log")], opensearch=fake.url, state=state, once=True)
        proc = start_ship(cmd)
        wait_for(lambda: fake.count() >= 1500, timeout=60)  # written, answer pending
        kill9(proc)
        r = run_ship(cmd)
        assert r.returncode == 0, r.stderr
        assert fake.statuses[409] >= 1500
        reconcile(fake.all_docs().values(), expected)
    finally:
        fake.stop()


def test_outage_with_restart_while_down(tmp_path: Path) -> None:
    """Sink down, shipper killed and restarted while it is down, sink back: exact reconciliation."""
    fake = FakeOpenSearch().start()
    port = fake.port
    logs, state = tmp_path / "logs", tmp_path / "state"
    logs.mkdir()
    expected = {"a": _write(logs / "a.log", "a", 1, 1000)}
    cmd = ship_cmd([str(logs / "*.log")], opensearch=fake.url, state=state,
                   extra=["--opensearch.backoff-max", "200ms", "--opensearch.timeout", "2s"])  # fmt: skip
    proc = start_ship(cmd)
    try:
        wait_for(lambda: fake.count() >= 1000)
        fake.stop()
        expected["a"] = _write(logs / "a.log", "a", 1001, 2000)
        time.sleep(1.0)  # retrying against a closed port
        kill9(proc)
        proc = start_ship(cmd)
        expected["a"] = _write(logs / "a.log", "a", 3001, 500)
        time.sleep(1.0)
        fake2 = FakeOpenSearch(port)
        fake2.indices = fake.indices  # the same "cluster" back on the same port
        fake2.start()
        try:
            wait_for(lambda: fake2.count() >= 3500, timeout=60)
            kill9(proc)
            reconcile(fake2.all_docs().values(), expected)
        finally:
            fake2.stop()
    finally:
        kill9(proc)


def test_soak_rotation_and_repeated_kills(tmp_path: Path) -> None:
    """>= 200k lines over 4 files rotating (rename, copytruncate) with >= 10 random kill -9s."""
    rng = random.Random(5)
    logs, store, state = tmp_path / "logs", tmp_path / "store", tmp_path / "state"
    logs.mkdir()
    streams = ["r0", "r1", "r2", "r3"]
    total_per_stream = 50_000
    expected = dict.fromkeys(streams, 0)
    done = threading.Event()

    def writer() -> None:
        rot = dict.fromkeys(streams, 0)
        seqs = dict.fromkeys(streams, 0)
        while min(seqs.values()) < total_per_stream:
            for i, s in enumerate(streams):
                path = logs / f"{s}.log"
                n = min(1000, total_per_stream - seqs[s])
                if n:
                    seqs[s] = _write(path, s, seqs[s] + 1, n)
                    expected[s] = seqs[s]
                if path.exists() and path.stat().st_size > 1_500_000:
                    rot[s] += 1
                    dst = logs / f"{s}.log.{rot[s]}"
                    if i % 2 == 0:
                        os.rename(path, dst)  # rename + create (next write creates)
                    else:
                        shutil.copyfile(path, dst)  # copytruncate
                        os.truncate(path, 0)
            time.sleep(0.25)  # ~16k lines/s: writing spans the kills
        done.set()

    cmd = ship_cmd([str(logs / "*.log*")], store=store, state=state, extra=["--ship.poll-interval", "20ms"])
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    kills = 0
    progress = []
    stats = state / "stats.json"

    def running(pid: int) -> bool:  # the shipper is in its loop: it wrote its stats file
        try:
            return bool(orjson.loads(stats.read_bytes())["pid"] == pid)
        except (OSError, ValueError, KeyError):
            return False

    while not done.is_set() or kills < 10:
        proc = start_ship(cmd)
        wait_for(lambda p=proc: running(p.pid) or p.poll() is not None, timeout=60)
        time.sleep(rng.uniform(0.0, 0.4))  # a random point of the shipping loop
        kill9(proc)
        kills += 1
        progress.append(store_count(store))
    t.join()
    r = run_ship([*cmd, "--once"], timeout=170)
    assert r.returncode == 0, r.stderr
    assert kills >= 10
    assert sum(expected.values()) >= 200_000
    assert len(list(logs.glob("*.log.*"))) >= 8, "the files did not rotate"
    # the kills interrupted real shipping, not start-ups: the store grew between kills
    assert sum(1 for a, b in itertools.pairwise(progress) if b > a) >= 5, progress
    reconcile(store_events(store), expected)
