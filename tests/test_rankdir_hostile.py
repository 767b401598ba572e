"""The rank directory's findings of issue 11, each as the collectors meet it: a hostile or broken file
in ``--multiproc-dir`` (which every pod on a node can write in the DaemonSet layout) costs only itself.

Each test writes the file by hand, runs the real collectors on the directory and checks that the good
rank beside it is still exported, that the bad one is not, and that the skip is counted in
``mlops_training_snapshot_errors_total{reason}`` (or ``..._dropped_series_total``). Only long-standing
entry points are used (the collectors built from their settings, ``rankdir.write`` and
``file_name``), so the same tests run against a checkout from before the rank directory was hardened.
"""

from __future__ import annotations

import os
import resource
import threading
import time
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from prometheus_client.metrics_core import Metric

from mlops_obs import rankdir
from mlops_obs.collectors.process import ProcessCollector
from mlops_obs.collectors.training import TrainingCollector

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def series(families: Iterable[Metric]) -> Series:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def snapshot(job: str, rank: int, /, **fields: Any) -> dict[str, Any]:
    now = time.time()
    base = {"v": rankdir.SCHEMA_VERSION, "job": job, "rank": rank, "world_size": 2, "node": "n", "updated": now,
            "start_time": now - 60, "steps": 5, "samples": 40, "phase_seconds": {"forward": 1.5}}  # fmt: skip
    return {**base, **fields}


def put(directory: Path, name: str, doc: Any) -> Path:
    """A file under a snapshot's name, written as a hostile pod would: any name, any JSON."""
    path = directory / f"{name}{rankdir.SUFFIX}"
    path.write_bytes(orjson.dumps(doc))
    return path


def training(directory: Path, collector: TrainingCollector | None = None) -> Series:
    c = collector or TrainingCollector({"multiproc-dir": directory, "training.retention": 900.0})
    return series(c.sample())


def steps(s: Series) -> dict[str, float]:
    """job -> steps, for every rank exported."""
    return {dict(lb)["job"]: v for (name, lb), v in s.items() if name == "mlops_training_steps_total"}


def errors(s: Series, family: str = "mlops_training_snapshot_errors_total") -> dict[str, float]:
    return {dict(lb)["reason"]: v for (name, lb), v in s.items() if name == family and v}


@pytest.fixture
def mp(tmp_path: Path) -> Path:
    d = tmp_path / "mp"
    d.mkdir()
    rankdir.write(d, "good", 0, snapshot("good", 0))  # type: ignore[arg-type]
    return d


# --- wrong types, numbers out of range --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"steps": "12"}, "wrong_type"),  # a string step count
        ({"phase_seconds": [1, 2]}, "wrong_type"),  # a list where a map belongs
        ({"badput_seconds": "x"}, "wrong_type"),
        ({"gauges": {"loss": "high"}}, "wrong_type"),
        ({"step_buckets": [1, 2, 3]}, "wrong_type"),  # not one count per bucket
        ({"rank": "0"}, "wrong_type"),
        ({"job": {"name": "x"}}, "wrong_type"),
        ({"state": True}, "wrong_type"),
        ({"state": "sleeping"}, "out_of_range"),
        ({"state": "failed", "failure": {"reason": "exception"}}, "wrong_type"),  # no detail
        ({"state": "failed", "failure": {"reason": "meteor", "detail": ""}}, "out_of_range"),
        ({"phase": {"name": "", "activity": "work", "since": 1.0}}, "out_of_range"),
        ({"phase": {"name": "x", "activity": "work", "since": "now"}}, "wrong_type"),
        ({"steps": True}, "wrong_type"),
        ({"recent_steps": 9, "step_compute_median": "fast"}, "wrong_type"),
        ({"steps": -5}, "negative_counter"),
        ({"phase_seconds": {"forward": "1.5"}}, "wrong_type"),
        ({"tokens": 1e308}, "out_of_range"),
        ({"goodput_seconds": 1e300}, "out_of_range"),
        ({"samples": 2**64 - 1}, "out_of_range"),
        ({"updated": -1.0}, "out_of_range"),
        ({"last_step_time": 1e300}, "out_of_range"),
    ],
)
def test_a_bad_field_costs_only_its_file(mp: Path, fields: dict[str, Any], reason: str) -> None:
    """One snapshot with a wrongly typed field, a negative counter or a 1e308 one: the training collector
    still succeeds, every other rank is exported, the bad file is not, and the skip is counted by reason."""
    put(mp, "bad.0", snapshot("bad", 0, **fields))
    s = training(mp)
    assert steps(s) == {"good": 5.0}
    assert errors(s) == {reason: 1.0}
    assert not any(v != v or abs(v) >= 1e300 or (n.endswith("_total") and v < 0) for (n, _), v in s.items())


def test_a_negative_or_huge_phase_drops_only_that_series(mp: Path) -> None:
    """A phase or badput kind is a series of its own: one with a negative or 1e308 value is left out and
    counted as dropped, and the rest of its file is exported."""
    put(mp, "odd.0", snapshot("odd", 0, phase_seconds={"forward": 2.0, "backward": -0.5, "optimizer": 1e308},
                              badput_seconds={"startup": -3.0, "eval": 1.0}))  # fmt: skip
    s = training(mp)
    assert steps(s) == {"good": 5.0, "odd": 5.0} and errors(s) == {}
    phases = {dict(lb)["phase"] for (n, lb), _ in s.items() if n == "mlops_training_phase_seconds_total"}
    kinds = {dict(lb)["kind"] for (n, lb), _ in s.items() if n == "mlops_training_badput_seconds_total"}
    assert phases == {"forward"} and kinds == {"eval"}
    assert errors(s, "mlops_training_snapshot_dropped_series_total") == {"negative_counter": 2, "out_of_range": 1}


def test_broken_files_are_counted_by_reason_once_per_version(mp: Path) -> None:
    """Garbage, another schema version, a JSON array: each skipped and counted once, not once per round;
    a file rewritten (a new version of it) is read and counted again."""
    (mp / f"garbage{rankdir.SUFFIX}").write_bytes(b"\x00\xff not json")
    put(mp, "future.0", {"v": 999, "job": "future"})
    put(mp, "array.0", [1, 2, 3])
    c = TrainingCollector({"multiproc-dir": mp, "training.retention": 900.0})
    for _ in range(3):
        s = training(mp, c)
    assert steps(s) == {"good": 5.0}
    assert errors(s) == {"not_json": 1.0, "unknown_version": 2.0}
    put(mp, "array.0", [1, 2, 3, 4])
    assert errors(training(mp, c)) == {"not_json": 1.0, "unknown_version": 3.0}


# --- special files, links, huge files ---------------------------------------------------------------------


def test_a_fifo_named_like_a_snapshot_hangs_neither_collector(mp: Path) -> None:
    """The training and process collectors each finish their round with a FIFO in the directory (opened
    non-blocking, refused as not a regular file), instead of waiting in open(2) for a writer forever."""
    fifo = mp / f"fifo.0{rankdir.SUFFIX}"
    os.mkfifo(fifo)
    results: dict[str, Series] = {}

    def run(name: str, collector: Any) -> None:
        results[name] = series(collector.sample())

    threads = [
        threading.Thread(target=run, args=("training", TrainingCollector({"multiproc-dir": mp})), daemon=True),
        threading.Thread(
            target=run, args=("process", ProcessCollector({"multiproc-dir": mp, "path.procfs": "/proc"})), daemon=True
        ),
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(30)
        assert sorted(results) == ["process", "training"], "a collector blocked on the FIFO"
        assert steps(results["training"]) == {"good": 5.0}
        assert errors(results["training"]) == {"not_regular_file": 1.0}
    finally:
        # Release a reader stuck on an unguarded build: a writer end opened and closed at once.
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def training_within_16_mib(directory: Path) -> Series:
    """:func:`training`, failing if the round allocated 16 MiB or more (Python allocations, traced)."""
    tracemalloc.start()
    try:
        s = training(directory)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak >> 20} MiB allocated reading the directory"
    return s


def test_a_link_to_dev_zero_is_never_read(mp: Path) -> None:
    """A symbolic link to /dev/zero under a snapshot's name is not followed: nothing is read through it
    (on an unguarded build each round reads until memory runs out), and it is counted."""
    (mp / f"zero.0{rankdir.SUFFIX}").symlink_to("/dev/zero")
    s = training_within_16_mib(mp)
    assert steps(s) == {"good": 5.0} and errors(s) == {"not_regular_file": 1.0}


def test_a_200_mb_file_is_not_read(mp: Path) -> None:
    """A 200 MB file under a snapshot's name (sparse: it takes no disk) is refused by its size, unread:
    on an unguarded build it costs 745 MB and seconds every round."""
    huge = mp / f"huge.0{rankdir.SUFFIX}"
    with open(huge, "wb") as f:
        f.write(b'{"v": 2, "job": "huge", "pad": "')
        f.truncate(200_000_000)
    s = training_within_16_mib(mp)
    assert steps(s) == {"good": 5.0} and errors(s) == {"too_large": 1.0}


# --- stale garbage --------------------------------------------------------------------------------------


def test_ten_thousand_stale_unparsable_files_are_deleted_unread(mp: Path) -> None:
    """Files older than the retention go whether they parse or not, by their mtime, without being opened
    (so they are not counted as errors either): one round clears 10k of them, the next costs nothing."""
    old = time.time() - 7200
    for i in range(10_000):
        p = mp / f"junk.{i}{rankdir.SUFFIX}"
        p.write_bytes(b"\x00garbage")
        os.utime(p, (old, old))
    c = TrainingCollector({"multiproc-dir": mp, "training.retention": 600.0})
    cpu0 = resource.getrusage(resource.RUSAGE_THREAD).ru_utime
    s = training(mp, c)
    assert sorted(os.listdir(mp)) == [rankdir.file_name("good", 0)]
    assert steps(s) == {"good": 5.0} and errors(s) == {}
    training(mp, c)
    # Generous (a busy machine): reading 10k files as JSON every round took 15% of a core.
    assert resource.getrusage(resource.RUSAGE_THREAD).ru_utime - cpu0 < 5.0


def test_a_snapshot_claiming_a_future_update_still_goes_stale(mp: Path) -> None:
    """``updated`` is what the file says; a file that nobody rewrites goes once its mtime is older than
    the retention, whatever time it claims."""
    path = put(mp, "forever.0", snapshot("forever", 0, updated=9_000_000_000.0))
    old = time.time() - 7200
    os.utime(path, (old, old))
    assert steps(training(mp)) == {"good": 5.0}
    assert not path.exists()


# --- caps on series and labels --------------------------------------------------------------------------


def test_fifty_thousand_phases_and_huge_label_values_are_capped(mp: Path) -> None:
    """50k phases and 200 kB phase or badput names are not exported: each file keeps at most 128
    phases and badput kinds (the first by name), names up to 256 characters; what was left out is counted."""
    phases = {f"p{i:05d}": 0.5 for i in range(50_000)}
    put(mp, "wide.0", snapshot("wide", 0, phase_seconds=phases, badput_seconds={"x" * 200_000: 1.0, "eval": 2.0}))
    s = training(mp)
    phase_series = [
        lb for (n, lb), _ in s.items() if n == "mlops_training_phase_seconds_total" and ("job", "wide") in lb
    ]
    assert len(phase_series) == 128
    assert {dict(lb)["phase"] for lb in phase_series} == {f"p{i:05d}" for i in range(128)}
    kinds = {dict(lb)["kind"] for (n, lb), _ in s.items() if n == "mlops_training_badput_seconds_total"}
    assert kinds == {"eval"}
    assert max(len(v) for (_, lb), _ in s.items() for _, v in lb) <= 256
    assert errors(s, "mlops_training_snapshot_dropped_series_total") == {
        "too_many_series": 50_000 - 128,
        "label_too_long": 1.0,
    }


def test_a_job_or_node_name_of_200_kb_refuses_the_file(mp: Path) -> None:
    """An identity label cannot be cut (two jobs would merge): the file is refused and counted."""
    put(mp, "longjob.0", snapshot("j" * 200_000, 0))
    put(mp, "longnode.0", snapshot("n", 0, node="n" * 200_000))
    s = training(mp)
    assert steps(s) == {"good": 5.0} and errors(s) == {"label_too_long": 2.0}


def test_a_flood_of_valid_files_is_capped_at_1024_snapshots(mp: Path) -> None:
    """Valid files by the thousand (a pod writing one per made-up rank) do not multiply the exporter's
    series without bound: 1024 snapshots are used, the most recently written, and the rest counted."""
    now = time.time()
    for i in range(1030):
        path = put(mp, f"flood.{i}", snapshot("flood", i, updated=now - 100 + i * 0.01))
        os.utime(path, (now - 100 + i * 0.01,) * 2)
    rankdir.write(mp, "good", 0, snapshot("good", 0))  # type: ignore[arg-type]
    s = training(mp)
    exported = {(dict(lb)["job"], dict(lb)["rank"]) for (n, lb), _ in s.items() if n == "mlops_training_steps_total"}
    assert exported == {("good", "0")} | {("flood", str(i)) for i in range(7, 1030)}  # the 7 oldest left out
    assert errors(s) == {"too_many_files": 7.0}


# --- duplicates ------------------------------------------------------------------------------------------


def test_two_files_with_one_identity_export_the_newest_once(mp: Path) -> None:
    """A second file claiming good/0/n (a copy, or a planted one) makes no duplicate series: the newer
    file wins, the other is counted once (not every round)."""
    older = put(mp, "copy.0", snapshot("good", 0, steps=1, updated=time.time() - 30))
    past = time.time() - 30
    os.utime(older, (past, past))
    c = TrainingCollector({"multiproc-dir": mp, "training.retention": 900.0})
    s = training(mp, c)
    assert [v for (n, lb), v in s.items() if n == "mlops_training_steps_total"] == [5.0]
    s = training(mp, c)
    assert errors(s) == {"duplicate_identity": 1.0}
    newer = put(mp, "copy.0", snapshot("good", 0, steps=9, updated=time.time() + 1))
    assert newer.exists()
    s = training(mp, c)
    assert [v for (n, lb), v in s.items() if n == "mlops_training_steps_total"] == [9.0]
    assert errors(s) == {"duplicate_identity": 2.0}  # now the rank's own file is the older one


# --- pid trust ---------------------------------------------------------------------------------------------


def test_a_snapshot_claiming_pid_1_does_not_get_pid_1s_resources(mp: Path) -> None:
    """The process collector publishes a pid as a rank's only when that process started when the snapshot
    says the rank's process started: a file claiming pid 1 (or any pid) with another start time, or
    none, gets no series; a rank's true pid and start time do."""
    me = psutil.Process()
    put(mp, "liar.0", snapshot("liar", 0, pid=1))  # started a minute ago, it says
    put(mp, "liar.1", {k: v for k, v in snapshot("liar", 1, pid=1).items() if k != "start_time"})
    put(mp, "liar.2", snapshot("liar", 2, pid=1, start_time=psutil.Process(1).create_time() + 3600))
    put(mp, "me.0", snapshot("me", 0, pid=me.pid, start_time=me.create_time()))
    s = series(ProcessCollector({"multiproc-dir": mp, "path.procfs": "/proc"}).sample())
    owners = {(dict(lb)["job"], dict(lb)["pid"]) for (n, lb), _ in s.items() if n == "mlops_process_threads"}
    assert owners == {("me", str(me.pid))}


def test_gpu_processes_are_attributed_only_to_the_rank_that_started_them(mp: Path) -> None:
    """GPU attribution follows the same rule: a GPU process under pid 1 is not labelled with the job of a
    file claiming pid 1; this test process, claimed with its true start time, is."""
    from mlops_obs.collectors.fake_nvml import FakeNvml
    from mlops_obs.collectors.gpu import GpuCollector

    me = psutil.Process()
    put(mp, "liar.0", snapshot("liar", 0, pid=1))
    put(mp, "me.0", snapshot("me", 0, pid=me.pid, start_time=me.create_time()))
    c = GpuCollector({"gpu.backend": "fake", "multiproc-dir": mp, "gpu.xid-events": False, "gpu.profile": "full"})
    try:
        c.sample()
        fake = c.nvml.lib
        assert isinstance(fake, FakeNvml)
        fake.devices[0]["processes"] = [{"pid": 1, "used_memory": 5_000_000_000}]
        fake.devices[1]["processes"] = [{"pid": me.pid, "used_memory": 1_000_000_000}]
        s = series(c.sample())
        owners = {
            dict(lb)["pid"]: (dict(lb).get("job"), dict(lb).get("rank"))
            for (n, lb), _ in s.items()
            if n == "mlops_gpu_process_memory_used_bytes"
        }
        assert owners == {"1": (None, None), str(me.pid): ("me", "0")}
    finally:
        c.close()
