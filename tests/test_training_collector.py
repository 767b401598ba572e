"""The training collector: snapshot files -> mlops_training_* families, the cross-rank straggler
score, and a hand-off directory that stays flat however often a rank restarts."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlops_obs import rankdir
from mlops_obs.children import http_get
from mlops_obs.collectors import training
from mlops_obs.collectors.training import STRAGGLER_MIN_STEPS, straggler_scores
from mlops_obs.instrument import TrainingMonitor
from mlops_obs.metrics import render
from mlops_obs.rankdir import RankDirectory
from mlops_obs.rankdir.directory import STAMP_SETTLE_NS


def _snap(job: str, rank: int, recent: list[Any], **extra: Any) -> rankdir.Snapshot:
    """A version-1 snapshot (the window of recent step times), as the reader hands it on."""
    v1 = {"v": 1, "job": job, "rank": rank, "node": "n", "recent_step_seconds": recent, "updated": 0.0, **extra}
    snap = rankdir.parse(v1)
    assert snap is not None and "recent_step_seconds" not in snap
    return snap


def test_straggler_score_is_reference_median_over_rank_median() -> None:
    """NVIDIA's definition: median across ranks of per-rank medians, divided by the rank's median."""
    snaps = [_snap("a", r, [0.1] * 10) for r in range(3)] + [_snap("a", 3, [0.4] * 9 + [0.01])]
    scores = straggler_scores(snaps)
    assert scores[("a", "0")] == pytest.approx(1.0)
    assert scores[("a", "3")] == pytest.approx(0.25)


def test_straggler_score_needs_enough_steps_and_two_ranks_per_job() -> None:
    snaps = [
        _snap("a", 0, [0.1] * STRAGGLER_MIN_STEPS),
        _snap("a", 1, [0.1] * (STRAGGLER_MIN_STEPS - 1)),  # warming up: no score
        _snap("b", 0, [0.3] * 20),  # alone in its job: nothing to compare with
        _snap("c", 0, [0.1] * 20),
        _snap("c", 1, [0.2] * 20),
        _snap("c", 2, ["junk", None]),  # never crashes on a bad file
    ]
    assert straggler_scores(snaps) == {("c", "0"): pytest.approx(1.5), ("c", "1"): pytest.approx(0.75)}


def test_straggler_score_from_the_median_ranks_write_matches_the_window_of_version_1(tmp_path: Path) -> None:
    """Ranks write their window's median and size (schema version 2); a version-1 snapshot carries the
    window. Both give the same scores, side by side in one job; a bad median is skipped, not fatal."""
    monitors = []
    for rank, step in enumerate((0.1, 0.1, 0.4)):
        m = TrainingMonitor("j", rank, 3, tmp_path, flush_interval=60)
        m._totals.recent.extend([step] * (STRAGGLER_MIN_STEPS + 2))  # the window steps of that length would leave
        monitors.append(m)
    new = [m.state() for m in monitors]
    assert all("recent_step_seconds" not in s for s in new) and new[2]["recent_step_median"] == pytest.approx(0.4)
    old = _snap("j", 3, [0.1] * 10)
    scores = straggler_scores([*new, old])
    assert scores == {("j", "0"): pytest.approx(1.0), ("j", "1"): pytest.approx(1.0), ("j", "2"): pytest.approx(0.25),
                      ("j", "3"): pytest.approx(1.0)}  # fmt: skip
    warming = {**new[0], "rank": 4, "recent_steps": STRAGGLER_MIN_STEPS - 1}
    bad = {**new[0], "rank": 5, "recent_step_median": "junk"}
    assert set(straggler_scores([*new, warming, bad])) == {("j", "0"), ("j", "1"), ("j", "2")}
    for m in monitors:
        m.close()


def test_families_from_real_monitor_snapshots_pass_the_exposition_parser(tmp_path: Path) -> None:
    for rank in range(2):
        m = TrainingMonitor("j", rank, 2, tmp_path, node="n", flush_interval=60)
        for _ in range(STRAGGLER_MIN_STEPS):
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
                 "mlops_training_straggler_score", "mlops_training_tokens"):  # fmt: skip
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
    for _ in range(rnd.randint(STRAGGLER_MIN_STEPS, 20)):
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
        files = list(os.scandir(mp))
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
        training = [ln for ln in body.splitlines() if ln.startswith(b"mlops_training_")]
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
    rankdir.write(tmp_path, "j", 0, {**_snap("j", 0, [0.1]), "updated": now, "steps": 1})
    rankdir.write(tmp_path, "j", 1, {**_snap("j", 1, [0.1]), "updated": now - 3600, "steps": 9})
    first = sorted(ranks.snapshots(now=now), key=lambda s: s["rank"])
    assert [(s["rank"], s["steps"]) for s in first] == [(0, 1)]
    assert not (tmp_path / rankdir.file_name("j", 1)).exists()  # retention deleted the dead rank's file
    rankdir.write(tmp_path, "j", 0, {**_snap("j", 0, [0.1]), "updated": now + 1, "steps": 2})
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
    rankdir.write(tmp_path, "j", 0, {**_snap("j", 0, [0.1]), "updated": now, "steps": 1})
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
