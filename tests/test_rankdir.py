"""The rank directory: the snapshot's schema and its versions, hostile files that cost only
themselves, stale files deleted whoever reads, and one directory shared by the exporter's collectors."""

from __future__ import annotations

import os
import threading
import time
import typing
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from mlops_obs import collectors, rankdir
from mlops_obs.collectors.process import ProcessCollector
from mlops_obs.config import resolve
from mlops_obs.exporter import settings
from mlops_obs.instrument import TrainingMonitor
from mlops_obs.rankdir import RankDirectory, cadence
from mlops_obs.rankdir.files import Unreadable, read_bytes


def _write(directory: Path, job: str, rank: int, **fields: Any) -> Path:
    snap: dict[str, Any] = {"v": rankdir.SCHEMA_VERSION, "job": job, "rank": rank, "updated": time.time(), **fields}
    rankdir.write(directory, job, rank, snap)  # type: ignore[arg-type]
    return directory / rankdir.file_name(job, rank)


# --- the schema ------------------------------------------------------------------------------------


def test_the_monitor_writes_exactly_the_schemas_fields(tmp_path: Path) -> None:
    """The typed schema is the writer's: every key the SDK writes is declared, every declared key written."""
    with TrainingMonitor("j", 0, 1, tmp_path, flush_interval=60) as m, m.step(samples=1):
        pass
    written = rankdir.read(tmp_path / rankdir.file_name("j", 0))
    assert written is not None and written["v"] == rankdir.SCHEMA_VERSION == 3
    assert set(written) == set(typing.get_type_hints(rankdir.Snapshot))


@pytest.mark.parametrize("job", [".", "..", ".hidden", "", "a/../b"])
def test_a_job_name_never_makes_a_dot_file_the_sidecar_skips(tmp_path: Path, job: str) -> None:
    """Found by hypothesis: job ``.`` wrote ``..0.rank.json``, a dot file, which the listing skips."""
    path = _write(tmp_path, job, 0)
    assert not path.name.startswith(".") and "/" not in path.name
    assert [(s["job"], s["rank"]) for s in RankDirectory(tmp_path).snapshots()] == [(job, 0)]


def test_version_2_is_read_as_the_current_version_and_others_are_not() -> None:
    """The previous version's ``closed`` becomes finished (it could not tell a crash), its compute-time
    median keeps its meaning under the new name; any other version, or a document that is not an
    object, is not a snapshot."""
    v2 = rankdir.parse({"v": 2, "job": "j", "rank": 0, "updated": 5.0, "closed": True, "recent_steps": 9,
                        "recent_step_median": 0.25})  # fmt: skip
    assert v2 == {"v": 3, "job": "j", "rank": 0, "updated": 5.0, "recent_steps": 9, "state": "finished",
                  "end_time": 5.0, "failure": None, "phase": None, "step_compute_median": 0.25,
                  "step_median": None}  # fmt: skip
    running = rankdir.parse({"v": 2, "job": "j", "closed": "yes"})  # not a boolean: not closed
    assert running is not None and (running["state"], running["end_time"]) == ("running", None)
    assert "pid_ns" not in running  # nothing says which pid namespace: never taken for vanished
    current = {"v": 3, "job": "j", "recent_steps": 3, "step_compute_median": 0.2}
    assert rankdir.parse(current) is current
    for other in ({"v": 1, "recent_step_seconds": [0.1]}, {"v": 4}, {"job": "j"}, [1, 2], "v", None):
        assert rankdir.parse(other) is None


def test_two_writers_in_one_process_never_tear_the_snapshot(tmp_path: Path) -> None:
    """A monitor's flush thread and an explicit flush() or close() can write the same rank's snapshot at
    once. Each writer has its own temp file, so every rename puts a whole snapshot in place: a reader
    never sees a torn file, and no writer's rename fails. (With one temp file per process, two writers
    truncated and wrote it together and renamed a mix of both: the restart test's rank vanished from
    the sidecar until the rank wrote again, its 149 series against 111.)"""
    path = tmp_path / rankdir.file_name("j", 1)
    stop = threading.Event()
    torn: list[bytes] = []
    failures: list[OSError] = []

    def writer(pad: int) -> None:
        snap: Any = {"v": rankdir.SCHEMA_VERSION, "job": "j", "rank": 1, "pad": "x" * pad}
        for _ in range(1500):
            try:
                rankdir.write(tmp_path, "j", 1, snap)
            except OSError as e:
                failures.append(e)

    def reader() -> None:
        while not stop.is_set():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if rankdir.read(path) is None:
                torn.append(data[:80])

    threads = [threading.Thread(target=writer, args=(pad,)) for pad in (10, 20_000)]
    watch = threading.Thread(target=reader)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watch.join()
    assert failures == [] and torn == []
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


# --- hostile files -----------------------------------------------------------------------------------


def test_links_and_special_files_under_a_snapshots_name_are_skipped_and_counted(tmp_path: Path) -> None:
    """A symbolic link (to a good snapshot elsewhere, or to /dev/zero) and a FIFO named like a snapshot
    are never opened through: the real snapshot beside them is read, the others counted as skipped."""
    mp, elsewhere = tmp_path / "mp", tmp_path / "elsewhere"
    mp.mkdir()
    elsewhere.mkdir()
    _write(mp, "real", 0, steps=3)
    target = _write(elsewhere, "linked", 0, steps=99)
    (mp / rankdir.file_name("linked", 0)).symlink_to(target)
    (mp / rankdir.file_name("zero", 0)).symlink_to("/dev/zero")
    os.mkfifo(mp / rankdir.file_name("fifo", 0))
    ranks = RankDirectory(mp)
    assert [(s["job"], s["steps"]) for s in ranks.snapshots()] == [("real", 3)]
    assert ranks.errors == {"not_regular_file": 3}
    ranks.snapshots()
    assert ranks.errors == {"not_regular_file": 3}  # counted once, not every round
    assert target.exists() and (mp / rankdir.file_name("fifo", 0)).exists()  # skipped, never deleted


def test_opening_a_fifo_never_waits(tmp_path: Path) -> None:
    """Even handed a FIFO directly (one swapped in after the listing), the read returns at once: opened
    non-blocking, refused as not a regular file."""
    fifo = tmp_path / "x.rank.json"
    os.mkfifo(fifo)
    result: list[BaseException] = []

    def read() -> None:
        try:
            read_bytes(fifo)
        except Unreadable as e:
            result.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert [str(e) for e in result] == ["not a regular file"]
    with pytest.raises(Unreadable):
        read_bytes(tmp_path / "missing.rank.json")


def test_an_oversized_file_is_skipped_without_being_read_whole(tmp_path: Path) -> None:
    big = tmp_path / rankdir.file_name("big", 0)
    big.write_bytes(b'{"v": 2, "job": "big", "pad": "' + b"x" * (rankdir.MAX_BYTES + 10) + b'"}')
    _write(tmp_path, "small", 0)
    ranks = RankDirectory(tmp_path)
    assert [s["job"] for s in ranks.snapshots()] == ["small"]
    assert ranks.errors == {"too_large": 1} and big.exists()
    with pytest.raises(Unreadable, match="larger than 10 bytes"):
        read_bytes(big, max_bytes=10)


def test_stale_files_are_deleted_whether_they_parse_or_not(tmp_path: Path) -> None:
    """A file that is not a snapshot (garbage, another schema version) is kept while it is recent and
    deleted once older than the retention, by its mtime, without being read; a snapshot by its
    ``updated`` field too. A file not yet stale is read (and counted) once per version."""
    now = time.time()
    garbage, future, recent = (tmp_path / rankdir.file_name(j, 0) for j in ("garbage", "future", "recent"))
    garbage.write_bytes(b"\x00not json")
    future.write_bytes(b'{"v": 99}')
    recent.write_bytes(b"{}")
    old = now - 3600
    for p in (garbage, future):
        os.utime(p, (old, old))
    dead = _write(tmp_path, "dead", 0, updated=now - 7200)
    live = _write(tmp_path, "live", 0)
    ranks = RankDirectory(tmp_path, retention=600)
    assert [s["job"] for s in ranks.snapshots(now=now)] == ["live"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recent.name, live.name])
    assert not dead.exists() and ranks.errors == {"unknown_version": 1}  # the stale ones were never read
    ranks.snapshots(now=now)
    assert ranks.errors == {"unknown_version": 1}  # read again (its mtime had not settled), not counted again
    old_recent = time.time() - 1
    os.utime(recent, (old_recent, old_recent))  # another version, settled: from now on known by its stamp
    ranks.snapshots(now=now)
    ranks.snapshots(now=now)
    assert ranks.errors == {"unknown_version": 2}
    assert RankDirectory(tmp_path, retention=None).snapshots(now=now + 10**6) != []  # None deletes nothing
    assert recent.exists() and live.exists()


def test_stale_snapshots_go_even_when_only_the_process_collector_reads(tmp_path: Path) -> None:
    """Deleting stale files is the directory's, not the training collector's: with the training collector
    off, the process collector's reads still clear a dead rank's file."""
    dead = _write(tmp_path, "dead", 0, pid=1, updated=time.time() - 7200)
    cfg = resolve(settings(), {"multiproc-dir": str(tmp_path), "training.retention": "10m"}, environ={})
    ProcessCollector(cfg).sample()
    assert not dead.exists()


# --- one directory for the exporter ---------------------------------------------------------------------


def test_collectors_share_the_exporters_one_rank_directory(tmp_path: Path) -> None:
    cfg = resolve(
        settings(),
        {"multiproc-dir": str(tmp_path), "training.retention": "5m", "gpu.backend": "fake", "collector.host": False},
        environ={},
    )
    ranks = RankDirectory.from_config(cfg)
    built = collectors.build(cfg, ranks)
    try:
        readers = {c.name: c for c in built if c.name in ("training", "process", "gpu")}
        assert sorted(readers) == ["gpu", "process", "training"]
        assert all(c.ranks is ranks for c in built)
        assert readers["gpu"].attributor.ranks.ranks is ranks  # type: ignore[attr-defined]
        assert (ranks.path, ranks.retention) == (str(tmp_path), 300.0)
    finally:
        for c in built:
            c.close()


def test_a_reload_points_the_rank_directory_elsewhere(tmp_path: Path, start_exporter: Any) -> None:
    """``multiproc-dir`` and ``training.retention`` are the exporter's settings; a reload of the config file
    moves the one directory every collector reads."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    _write(first, "one", 0)
    _write(second, "two", 0)
    conf = tmp_path / "exporter.yml"
    conf.write_text(yaml.safe_dump({"multiproc-dir": str(first), "collector.gpu": False, "collector.host": False}))
    ex = start_exporter(**{"config.file": conf})
    assert [s["job"] for s in ex.ranks.snapshots()] == ["one"]
    conf.write_text(yaml.safe_dump({"multiproc-dir": str(second), "training.retention": "1h"}))
    ok, msg = ex.reload()
    assert ok, msg
    assert [s["job"] for s in ex.ranks.snapshots()] == ["two"] and ex.ranks.retention == 3600.0
    assert all(c.ranks is ex.ranks for c in ex.collectors)


# --- the sidecar's cadence, read by the ranks ----------------------------------------------------------


def test_cadence_round_trip_and_next_flush(tmp_path: Path) -> None:
    """The rank flushes FLUSH_MARGIN before the sidecar's round ahead of each scrape; over 15 s, on an even
    division of the interval; without a cadence (or an idle sidecar) at the fallback."""

    now = 1_000_000.0
    cadence.write(tmp_path, cadence.make(15.0, now + 10.0, 0.2, now))
    c = cadence.read(tmp_path, now)
    assert c is not None and c["scrape_interval"] == 15.0
    assert cadence.next_flush(c, now, 15.0) == pytest.approx(10.0 - 0.2 - cadence.FLUSH_MARGIN)
    assert cadence.next_flush(c, now + 9.6, 15.0) == pytest.approx(15.0 - 0.05)  # just missed: the next one
    slow = cadence.make(60.0, now + 40.0, 0.2, now)
    assert cadence.next_flush(slow, now, 15.0) == pytest.approx(40.0 - 45.0 - 0.2 - cadence.FLUSH_MARGIN + 15.0)
    assert cadence.next_flush(None, now, 99.0) == cadence.MAX_FLUSH_INTERVAL
    assert cadence.next_flush(cadence.make(None, None, 0.1, now), now, 5.0) == 5.0
    fast = cadence.make(0.001, now + 0.001, 0.0, now)
    assert cadence.next_flush(fast, now, 5.0) >= cadence.MIN_FLUSH_INTERVAL


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"v": 2, "scrape_interval": 15, "next_scrape": 1000010, "lead": 0.1, "updated": 1000000}',
        b'{"v": 1, "scrape_interval": "15", "next_scrape": 1000010, "lead": 0.1, "updated": 1000000}',
        b'{"v": 1, "scrape_interval": 15, "next_scrape": null, "lead": 0.1, "updated": 1000000}',
        b'{"v": 1, "scrape_interval": -1, "next_scrape": 1000010, "lead": 0.1, "updated": 1000000}',
        b'{"v": 1, "scrape_interval": 15, "next_scrape": 1000010, "lead": 0.1, "updated": 1}',  # sidecar gone
        b'{"v": 1, "scrape_interval": 15, "next_scrape": 1000010, "lead": true, "updated": 1000000}',
        b"[" * 5000,
    ],
)
def test_a_bad_or_stale_cadence_file_is_ignored(tmp_path: Path, content: bytes) -> None:

    (tmp_path / cadence.CADENCE_FILE).write_bytes(content)
    assert cadence.read(tmp_path, 1_000_000.0) is None


def test_a_cadence_file_that_is_a_link_or_fifo_is_not_followed(tmp_path: Path) -> None:

    target = tmp_path / "elsewhere.json"
    target.write_bytes(orjson.dumps(cadence.make(15.0, 1_000_010.0, 0.1, 1_000_000.0)))
    (tmp_path / cadence.CADENCE_FILE).symlink_to(target)
    assert cadence.read(tmp_path, 1_000_000.0) is None
    (tmp_path / cadence.CADENCE_FILE).unlink()
    os.mkfifo(tmp_path / cadence.CADENCE_FILE)
    assert cadence.read(tmp_path, 1_000_000.0) is None  # returns at once: opened without waiting
    (tmp_path / cadence.CADENCE_FILE).unlink()
    # The sidecar's write replaces a planted link instead of writing through it.
    (tmp_path / cadence.CADENCE_FILE).symlink_to(target)
    cadence.write(tmp_path, cadence.make(None, None, 0.1, 1_000_000.0))
    assert not (tmp_path / cadence.CADENCE_FILE).is_symlink()
    assert orjson.loads(target.read_bytes())["scrape_interval"] == 15.0


def test_a_monitor_follows_the_sidecars_cadence(tmp_path: Path) -> None:
    """By default the flush thread waits for the sidecar's next round; a fixed interval overrides it."""

    now = time.time()
    cadence.write(tmp_path, cadence.make(15.0, now + 7.0, 0.2, now))
    with TrainingMonitor("j", 0, 1, tmp_path) as m:
        assert 6.0 < m._flush_wait() < 7.0
    with TrainingMonitor("j", 1, 1, tmp_path, flush_interval=0.5) as m:
        assert m._flush_wait() == 0.5
    (tmp_path / cadence.CADENCE_FILE).unlink()
    with TrainingMonitor("j", 2, 1, tmp_path) as m:
        assert m._flush_wait() == cadence.MAX_FLUSH_INTERVAL


def test_a_listing_is_handed_out_again_only_to_callers_that_accept_its_age(tmp_path: Path) -> None:
    """``max_age``: the GPU collector's pid index and the housekeeping sweep take the last scan's result
    when it is young enough; a caller without it (the training collector) always sees the directory."""
    _write(tmp_path, "j", 0)
    ranks = RankDirectory(tmp_path)
    assert [s["rank"] for s in ranks.snapshots()] == [0]
    _write(tmp_path, "j", 1)
    assert [s["rank"] for s in ranks.snapshots(max_age=3600.0)] == [0]  # the last scan's result
    assert sorted(s["rank"] for s in ranks.snapshots()) == [0, 1]  # a scan
    assert sorted(s["rank"] for s in ranks.snapshots(max_age=3600.0)) == [0, 1]
    (tmp_path / rankdir.file_name("j", 1)).unlink()
    assert sorted(s["rank"] for s in ranks.snapshots(max_age=0.0)) == [0]
    ranks.configure(tmp_path / "elsewhere", None)  # another directory: nothing of the old one is reused
    assert ranks.snapshots(max_age=3600.0) == []
