"""Progress as the launcher sees it: heartbeats through shared memory, and stall detection over them."""

from __future__ import annotations

import os
import subprocess
import sys

from mlops_obs.workload.progress import FINISH_AHEAD, HEARTBEAT_FD_ENV, STARTUP_SECONDS, Beat, Heartbeats, StallWatch


def test_a_rank_process_writes_its_slots_and_the_launcher_reads_them() -> None:
    hb = Heartbeats(3)
    try:
        code = (
            "import os, time\n"
            "from mlops_obs.workload.progress import Beat\n"
            "b = Beat.from_env(2)\n"
            "b.ready(); b.step(41); time.sleep(0.05); b.step(42)\n"
            "print(os.getpid())\n"
        )
        env = {**os.environ, HEARTBEAT_FD_ENV: str(hb.fd)}
        r = subprocess.run([sys.executable, "-c", code], env=env, pass_fds=(hb.fd,), capture_output=True,
                           text=True, timeout=60, check=True)  # fmt: skip
        assert hb.steps() == [0, 0, 42]
        assert hb.intervals()[:2] == [0.0, 0.0] and 0.05 <= hb.intervals()[2] < 30
        assert hb.ready(2) == int(r.stdout) and hb.ready(0) == 0
    finally:
        hb.close()


def test_a_rank_without_a_launcher_beats_into_nothing() -> None:
    code = "from mlops_obs.workload.progress import Beat\nb = Beat.from_env(0)\nb.ready(); b.step(1); b.unready()\n"
    env = {k: v for k, v in os.environ.items() if k != HEARTBEAT_FD_ENV}
    subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=True)
    env[HEARTBEAT_FD_ENV] = "987"  # not an open descriptor: still nothing, no error
    subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=True)


def feed(w: StallWatch, points: list[tuple[float, list[int], list[float]]]) -> list[tuple[float, object, object]]:
    out = []
    for t, steps, intervals in points:
        stall, ended = w.observe(t, steps, intervals)
        if stall is not None or ended is not None:
            out.append((t, stall, ended))
    return out


def test_threshold_follows_the_jobs_own_cadence() -> None:
    w = StallWatch(floor=1.0, factor=10.0, started=0.0)
    assert w.threshold() == STARTUP_SECONDS  # nothing completed yet: start-up is slow
    # start-up takes 30 s; the launcher first sees 12 steps done at once (a burst of fast steps between
    # two looks), each 0.5 s apart by the ranks' own clocks
    pts = [(30.0, [12, 12], [0.5, 0.5])] + [(30.0 + 0.5 * i, [12 + i, 12 + i], [0.5, 0.5]) for i in range(1, 20)]
    assert feed(w, pts) == []
    assert w.step_time == 0.5
    assert w.threshold() == 5.0
    # then nothing: a stall is reported once, after 5 s, however long it lasts
    last = pts[-1][0]
    got = feed(w, [(last + d / 10, [31, 31], [0.5, 0.5]) for d in range(1, 200)])
    assert len(got) == 1
    t, stall, ended = got[0]
    assert t == last + 5.0 and ended is None
    assert stall.idle == 5.0 and stall.threshold == 5.0 and stall.steps == (31, 31)  # type: ignore[attr-defined]
    # a step ends it, and says how long it lasted
    got = feed(w, [(last + 30.0, [32, 31], [30.0, 0.5])])
    assert got == [(last + 30.0, None, 30.0)]
    assert w.step_time == 0.5  # the stall's long step does not move the median much


def test_before_two_steps_the_threshold_is_start_up() -> None:
    w = StallWatch(floor=1.0, factor=10.0, started=0.0)
    assert feed(w, [(20.0, [1, 1], [0.0, 0.0]), (200.0, [1, 1], [0.0, 0.0])]) == []
    assert feed(w, [(20.0 + STARTUP_SECONDS, [1, 1], [0.0, 0.0])])[0][1] is not None


def test_a_lagging_rank_catching_up_is_progress() -> None:
    w = StallWatch(floor=2.0, factor=1.0, started=0.0)
    feed(w, [(1.0, [1, 0], [0, 0]), (2.0, [2, 1], [1, 0]), (3.0, [3, 2], [1, 1])])
    assert feed(w, [(4.5, [3, 2], [1, 1]), (4.9, [3, 2], [1, 1])]) == []
    assert feed(w, [(6.0, [3, 2], [1, 1])])[0][1] is not None  # 3 s idle > max(2, 1 x 1 s)
    assert feed(w, [(6.5, [3, 2], [1, 1])]) == []  # once
    got = feed(w, [(7.0, [3, 3], [1, 5])])  # the lagging rank completes a step: progress, though no new top
    assert got == [(7.0, None, 4.0)]


def test_floor_zero_turns_stall_detection_off() -> None:
    w = StallWatch(floor=0.0, factor=20.0, started=0.0)
    assert feed(w, [(1.0, [1], [0]), (2.0, [2], [1]), (10_000.0, [2], [1])]) == []


def test_a_finish_is_set_ahead_of_the_furthest_rank_once_and_every_rank_reads_it() -> None:
    hb = Heartbeats(2)
    try:
        beats = [Beat(r, os.dup(hb.fd)) for r in range(2)]
        assert [b.finish() for b in beats] == [0, 0]  # nothing asked: train the --steps asked for
        beats[0].step(40)
        beats[1].step(41)
        assert hb.finish() == 41 + FINISH_AHEAD
        beats[1].step(90)
        assert hb.finish() == 41 + FINISH_AHEAD  # a finish the ranks may have read never moves
        assert [b.finish() for b in beats] == [41 + FINISH_AHEAD] * 2
        assert hb.steps() == [40, 90]  # the ranks' own slots are where they were
    finally:
        hb.close()
