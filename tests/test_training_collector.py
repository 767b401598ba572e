"""The training collector: snapshot files -> mlops_training_* families, the rank's lifecycle (vanished
ranks included), its current phase and step medians, and a hand-off directory that stays flat however
often a rank restarts."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mlops_obs import rankdir
from mlops_obs.children import http_get
from mlops_obs.collectors import training
from mlops_obs.collectors.host import CLK_TCK
from mlops_obs.collectors.training import MEDIAN_MIN_STEPS, TrainingCollector
from mlops_obs.instrument import TrainingMonitor
from mlops_obs.metrics import render
from mlops_obs.rankdir import RankDirectory
from mlops_obs.rankdir.directory import STAMP_SETTLE_NS


def _snap(job: str, rank: int, **extra: Any) -> rankdir.Snapshot:
    return {"v": rankdir.SCHEMA_VERSION, "job": job, "rank": rank, "node": "n", "updated": 0.0,  # type: ignore[typeddict-item]
            "state": "running", **extra}  # fmt: skip


def _samples(snaps: list[rankdir.Snapshot]) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = render(training.families(snaps)).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out.setdefault(smp.name, []).append((dict(smp.labels), smp.value))
    return out


def test_lifecycle_is_an_enum_with_end_time_and_failure_while_failed() -> None:
    """Three state series per rank, exactly one at 1; the end time once ended; the failure's reason and
    detail exactly while failed. What a hostile file holds instead costs only that rank's detail."""
    snaps = [
        _snap("j", 0),
        _snap("j", 1, state="finished", end_time=100.0),
        _snap("j", 2, state="failed", end_time=90.0, failure={"reason": "exception", "detail": "RuntimeError"}),
        _snap("j", 3, state="failed", end_time=95.0, failure={"reason": "signal", "detail": "SIGTERM"}),
        _snap("j", 4, state="failed", end_time="soon", failure={"reason": "meteor", "detail": 'a "b"\n' * 40}),
        _snap("j", 5, state="sleeping", end_time=5.0),
    ]
    got = _samples(snaps)
    states = {(lb["rank"], lb["state"]): v for lb, v in got["mlops_training_rank_state"]}
    assert len(states) == 18
    current = {r: st for (r, st), v in states.items() if v == 1.0}
    assert current == {"0": "running", "1": "finished", "2": "failed", "3": "failed", "4": "failed", "5": "running"}
    ends = {lb["rank"]: v for lb, v in got["mlops_training_rank_end_timestamp_seconds"]}
    assert ends == {"1": 100.0, "2": 90.0, "3": 95.0}  # rank 4's end time is not a number: none
    info = {lb["rank"]: (lb["reason"], lb["detail"], v) for lb, v in got["mlops_training_rank_failure_info"]}
    assert info["2"] == ("exception", "RuntimeError", 1.0) and info["3"] == ("signal", "SIGTERM", 1.0)
    reason, detail, _ = info["4"]
    assert reason == "unknown" and len(detail) == rankdir.schema.DETAIL_MAX and set(detail) <= set("ab_")
    assert set(info) == {"2", "3", "4"}


def test_current_phase_and_step_medians() -> None:
    """One phase series per rank with its activity; medians once the window holds enough steps; a
    version-2 snapshot has its compute median and no wall-time median."""
    phase = {"name": "collective", "activity": "collective", "since": 50.0}
    snaps = [
        _snap("j", 0, phase=phase, recent_steps=MEDIAN_MIN_STEPS, step_median=0.5, step_compute_median=0.3),
        _snap(
            "j",
            1,
            phase={"name": "x" * 500, "activity": "sleeping", "since": 60},
            recent_steps=2,
            step_median=0.5,
            step_compute_median=0.3,
        ),
        _snap(
            "j",
            2,
            phase={"name": "step", "activity": "work", "since": "now"},
            recent_steps=10,
            step_median="slow",
            step_compute_median=float("nan"),
        ),
    ]
    v2 = rankdir.parse({"v": 2, "job": "j", "rank": 3, "node": "n", "recent_steps": 9, "recent_step_median": 0.25})
    assert v2 is not None
    got = _samples([*snaps, v2])
    phases = {lb["rank"]: (lb["phase"], lb["activity"], v)
              for lb, v in got["mlops_training_current_phase_start_timestamp_seconds"]}  # fmt: skip
    assert phases == {"0": ("collective", "collective", 50.0), "1": ("x" * rankdir.PHASE_NAME_MAX, "work", 60.0)}
    assert [(lb["rank"], v) for lb, v in got["mlops_training_step_median_seconds"]] == [("0", 0.5)]
    compute = [(lb["rank"], v) for lb, v in got["mlops_training_step_compute_median_seconds"]]
    assert compute == [("0", 0.3), ("3", 0.25)]
    assert "mlops_training_finished" not in got and "mlops_training_straggler_score" not in got


def _fake_proc(root: Path, btime: int, boot_id: str) -> int:
    """A procfs tree with a boot time and boot id; returns the inode standing for its pid namespace."""
    (root / "sys/kernel/random").mkdir(parents=True)
    (root / "sys/kernel/random/boot_id").write_text(boot_id + "\n")
    (root / "stat").write_text(f"cpu 1 2 3 4\nbtime {btime}\n")
    (root / "1/ns").mkdir(parents=True)
    (root / "1/ns/pid").write_text("")
    return (root / "1/ns/pid").stat().st_ino


def _fake_pid(root: Path, pid: int, start_ticks: int, state: str = "S", nspid: str = "") -> None:
    (root / str(pid)).mkdir(exist_ok=True)
    fields = [state, *["0"] * 18, str(start_ticks), *["0"] * 5]
    (root / f"{pid}/stat").write_text(f"{pid} (python) " + " ".join(fields) + "\n")
    (root / f"{pid}/status").write_text(f"Name:\tpython\nNSpid:\t{nspid or pid}\n")


def _state_of(c: TrainingCollector) -> dict[str, tuple[str, tuple[str, str] | None, float | None]]:
    out = {}
    for s in c.judged(c.ranks.snapshots()):
        state, end, failure = training.lifecycle(s)
        out[str(s["rank"])] = (state, failure, end)
    return out


def test_a_rank_whose_process_is_gone_or_reused_is_failed_vanished(tmp_path: Path) -> None:
    """Against a procfs tree: a rank whose pid is absent, a zombie, or a process that started later is
    failed (vanished) at its last write; one alive, one from another boot, one from an SDK that does
    not say its pid namespace, and one that ended cleanly are left as they say."""
    proc, mp = tmp_path / "proc", tmp_path / "mp"
    mp.mkdir()
    ns = _fake_proc(proc, 1_000_000, "boot-a")
    start = 1_000_000 + 500 / CLK_TCK
    for pid, ticks, st in ((11, 500, "S"), (13, 500, "Z"), (14, 500 + 60 * CLK_TCK, "S"), (16, 500, "S")):
        _fake_pid(proc, pid, int(ticks), st)
    now = time.time()
    ident = {"boot_id": "boot-a", "pid_ns": ns, "start_time": start, "updated": now - 5}
    for rank, pid, extra in ((0, 11, {}), (1, 12, {}), (2, 13, {}), (3, 14, {}), (4, 12, {"boot_id": "boot-b"}),
                             (5, 12, {"pid_ns": None}), (6, 12, {"state": "finished", "end_time": now - 1}),
                             (7, 16, {})):  # fmt: skip
        rankdir.write(mp, "j", rank, _snap("j", rank, pid=pid, **{**ident, **extra}))
    c = TrainingCollector({"path.procfs": str(proc)}, RankDirectory(mp, retention=None))
    got = _state_of(c)
    vanished = ("failed", ("vanished", ""), now - 5)
    assert got == {"0": ("running", None, None), "1": vanished, "2": vanished, "3": vanished,
                   "4": ("running", None, None), "5": ("running", None, None),
                   "6": ("finished", None, now - 1), "7": ("running", None, None)}  # fmt: skip
    # The rank wrote its final snapshot and exited between the directory read and the pid check: the
    # file is read again and believed.
    (proc / "16/stat").unlink()
    rankdir.write(mp, "j", 7, _snap("j", 7, pid=16, **{**ident, "state": "finished", "end_time": now}))
    c2 = TrainingCollector({"path.procfs": str(proc)}, RankDirectory(mp, retention=None))
    stale = [s for s in RankDirectory(mp, retention=None).snapshots() if s["rank"] != 7]
    stale.append(_snap("j", 7, pid=16, **ident))
    judged = {str(s["rank"]): training.lifecycle(s)[0] for s in c2.judged(stale)}
    assert judged["7"] == "finished"
    assert render(training.families(c.judged(c.ranks.snapshots()))).count(b'reason="vanished"') == 3


def test_a_rank_in_another_pid_namespace_is_followed_by_its_outer_pid(tmp_path: Path) -> None:
    """A rank in a container numbers its pid in its own namespace (pid 7 here is the host's pid 4321):
    the sidecar never looks up its pid 7 directly, finds it by NSpid and namespace, and judges it
    vanished only once it has seen it alive and then gone. A rank it never found stays running."""
    proc, mp = tmp_path / "proc", tmp_path / "mp"
    mp.mkdir()
    _fake_proc(proc, 1_000_000, "boot-a")
    _fake_pid(proc, 7, 1, "S")  # the host's pid 7: another, older process
    _fake_pid(proc, 4321, 800, "S", nspid="4321 7")
    (proc / "4321/ns").mkdir()
    (proc / "4321/ns/pid").write_text("")
    container_ns = (proc / "4321/ns/pid").stat().st_ino
    ident = {"boot_id": "boot-a", "start_time": 1_000_000 + 800 / CLK_TCK, "updated": time.time(), "pid": 7}
    rankdir.write(mp, "j", 0, _snap("j", 0, pid_ns=container_ns, **ident))
    rankdir.write(mp, "j", 1, _snap("j", 1, pid_ns=container_ns + 1_000_003, **ident))  # never found
    c = TrainingCollector({"path.procfs": str(proc)}, RankDirectory(mp, retention=None))
    assert {r: v[0] for r, v in _state_of(c).items()} == {"0": "running", "1": "running"}
    (proc / "4321/stat").unlink()
    got = _state_of(c)
    assert (got["0"][0], got["0"][1], got["1"][0]) == ("failed", ("vanished", ""), "running")


_RANK = """
import os, sys, time
from mlops_obs.instrument import TrainingMonitor
m = TrainingMonitor("live", int(sys.argv[2]), 2, sys.argv[1], node="n", flush_interval=0.05)
with m.step(samples=1):
    pass
m.flush()
print("ready", flush=True)
time.sleep(600)
"""


def test_a_real_rank_killed_by_sigkill_is_vanished(tmp_path: Path) -> None:
    """Real processes in this pid namespace: the one killed with SIGKILL (no hook runs) is failed
    (vanished) once reaped; its live peer stays running."""
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(tmp_path), str(r)], stdout=subprocess.PIPE, text=True)
             for r in range(2)]  # fmt: skip
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        c = TrainingCollector({}, RankDirectory(tmp_path, retention=None))
        assert {r: v[0] for r, v in _state_of(c).items()} == {"0": "running", "1": "running"}
        procs[1].kill()
        procs[1].wait()
        got = _state_of(c)
        assert (got["0"][0], got["1"][:2]) == ("running", ("failed", ("vanished", "")))
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_families_from_real_monitor_snapshots_pass_the_exposition_parser(tmp_path: Path) -> None:
    for rank in range(2):
        m = TrainingMonitor("j", rank, 2, tmp_path, node="n", flush_interval=60)
        for _ in range(MEDIAN_MIN_STEPS):
            with m.step(samples=2, tokens=20), m.phase("forward"):
                m.record(loss=float("nan") if rank else 1.0, lr=0.1)
        if rank == 0:
            with m.checkpoint():
                pass
        m.close()
    snaps = sorted(RankDirectory(tmp_path).snapshots(), key=lambda s: s["rank"])
    text = render(training.families(snaps)).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("mlops_training_steps", "mlops_training_goodput_seconds", "mlops_training_badput_seconds",
                 "mlops_training_checkpoint_duration_seconds", "mlops_training_last_checkpoint_timestamp_seconds",
                 "mlops_training_step_median_seconds", "mlops_training_step_compute_median_seconds",
                 "mlops_training_rank_state", "mlops_training_current_phase_start_timestamp_seconds",
                 "mlops_training_rank_end_timestamp_seconds", "mlops_training_tokens"):  # fmt: skip
        assert fams[name].samples, name
    ckpt = {s.labels["rank"] for s in fams["mlops_training_checkpoint_duration_seconds"].samples}
    assert ckpt == {"0"}  # only the rank that saves has checkpoint series
    losses = {s.labels["rank"]: s.value for s in fams["mlops_training_loss"].samples}
    assert losses["0"] == 1.0 and losses["1"] != losses["1"]  # NaN survives the JSON hand-off
    kinds = {s.labels["kind"] for s in fams["mlops_training_badput_seconds"].samples}
    assert {"startup", "data_loading", "checkpoint_save"} <= kinds


# --- restarts ---------------------------------------------------------------------------------------


def _incarnation(directory: str, seed: int) -> None:
    """One life of rank 1: a few steps, then a clean exit or a SIGKILL (sometimes in the middle of a write)."""
    rnd = random.Random(seed)
    m = TrainingMonitor("restart", 1, 4, directory, node="n", flush_interval=0.0005)
    for _ in range(rnd.randint(MEDIAN_MIN_STEPS, 20)):
        with m.step(samples=4), m.phase("forward"):
            m.record(loss=1.0)
    m.flush()  # as the flush thread would have by now; it keeps rewriting the file until the end
    if rnd.random() < 0.5:
        m.close()
        os._exit(0)
    for _ in range(rnd.randint(0, 2000)):  # let the flush thread get somewhere, then die hard
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def test_restarting_a_rank_200_times_keeps_directory_and_scrape_flat(tmp_path: Path, start_exporter: Any) -> None:
    """The file count, directory bytes, series count and exposition size after 200 restarts equal those
    after 10: nothing per incarnation accumulates (the failure mode of prometheus_client's multiprocess
    mode, client_python#204)."""
    mp = tmp_path / "mp"
    mp.mkdir()
    for rank in (0, 2, 3):
        with TrainingMonitor("restart", rank, 4, mp, node="n", flush_interval=60) as m, m.step(samples=4):
            pass
    ex = start_exporter(**{"collector.host": False, "collector.gpu": False, "multiproc-dir": mp})
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mlops_obs.instrument", __name__])  # children fork in ~5 ms

    def restart(n: int, start: int) -> None:
        for i in range(start, start + n):
            p = ctx.Process(target=_incarnation, args=(str(mp), i))
            p.start()
            p.join(30)
            assert p.exitcode in (0, -signal.SIGKILL)

    def measure() -> tuple[int, int, int, int, int]:
        files = [e for e in os.scandir(mp) if e.name != rankdir.cadence.CADENCE_FILE]  # the sidecar's, one
        tmp = len([e for e in files if e.name.endswith(".tmp")])
        dir_bytes = sum(e.stat().st_size for e in files)
        # Every incarnation lands in the same file: the sidecar reads the last one's snapshot.
        body = b""
        # The last incarnation is dead and its file final; a scrape reflects it only after the sampler's
        # next rounds (a round taken while that incarnation had just started shows it with 0 steps: no
        # heartbeat, loss or straggler series yet). Wait for two rounds, then for rank 1's heartbeat.
        time.sleep(0.5)
        for _ in range(200):
            _, body = http_get(ex.url + "/metrics")
            if b'mlops_training_last_step_timestamp_seconds{job="restart",node="n",rank="1"}' in body:
                break
            time.sleep(0.05)
        # A killed incarnation is failed (vanished), a closed one finished: only the first has a
        # failure_info series, whichever of the two the last incarnation was.
        training = [
            ln
            for ln in body.splitlines()
            if ln.startswith(b"mlops_training_") and not ln.startswith(b"mlops_training_rank_failure_info")
        ]
        return len(files) - tmp, tmp, dir_bytes, len(training), sum(len(ln) for ln in training)

    restart(10, 0)
    snaps10, tmp10, bytes10, series10, size10 = measure()
    restart(190, 10)
    snaps200, tmp200, bytes200, series200, size200 = measure()

    assert snaps10 == snaps200 == 4
    # At most one temp file: the last incarnation's, if it was killed mid-write (the next one removes it).
    assert tmp10 <= 1 and tmp200 <= 1
    assert series200 == series10
    assert size200 <= size10 * 1.05 + 200  # counters' digits may change; nothing grows per restart
    one_snapshot = max(e.stat().st_size for e in os.scandir(mp))
    assert bytes200 <= bytes10 + one_snapshot


def test_cached_snapshots_see_rewrites_and_deletes_like_a_fresh_read(tmp_path: Path) -> None:
    """The parse cache never serves a stale snapshot: a rewritten file is parsed again, a dead one goes."""
    now = 1_000_000.0
    ranks = RankDirectory(tmp_path, retention=60)
    rankdir.write(tmp_path, "j", 0, {**_snap("j", 0), "updated": now, "steps": 1})
    rankdir.write(tmp_path, "j", 1, {**_snap("j", 1), "updated": now - 3600, "steps": 9})
    first = sorted(ranks.snapshots(now=now), key=lambda s: s["rank"])
    assert [(s["rank"], s["steps"]) for s in first] == [(0, 1)]
    assert not (tmp_path / rankdir.file_name("j", 1)).exists()  # retention deleted the dead rank's file
    rankdir.write(tmp_path, "j", 0, {**_snap("j", 0), "updated": now + 1, "steps": 2})
    again = ranks.snapshots(now=now + 1)
    assert [s["steps"] for s in again] == [2]
    assert again == RankDirectory(tmp_path, retention=60).snapshots(now=now + 1)


def test_cached_snapshots_reread_a_file_rewritten_within_one_clock_tick(tmp_path: Path) -> None:
    """Two rewrites within one kernel tick share an mtime, and an inode is reused at once: a file read
    while its mtime was that recent is read again, so the second rewrite is never hidden by the first
    (which made the 200-restarts test miss the last incarnation's heartbeat now and then). A file read
    after its mtime settled is served from the cache."""
    ranks = RankDirectory(tmp_path, retention=None)
    path = tmp_path / rankdir.file_name("j", 0)
    now = time.time()
    rankdir.write(tmp_path, "j", 0, {**_snap("j", 0), "updated": now, "steps": 1})
    st = path.stat()
    assert [s["steps"] for s in ranks.snapshots(now=now)] == [1]
    # The same inode, size and mtime, other content: what a reused inode within one tick looks like.
    path.write_bytes(path.read_bytes().replace(b'"steps":1', b'"steps":7'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_size) == (st.st_ino, st.st_size)
    assert [s["steps"] for s in ranks.snapshots(now=now)] == [7]
    old = time.time_ns() - 10 * STAMP_SETTLE_NS
    os.utime(path, ns=(old, old))
    (first,) = ranks.snapshots(now=now)
    (second,) = ranks.snapshots(now=now)
    assert second is first
