"""TrainingMonitor: what a loop records is what lands in the snapshot the sidecar reads."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import pytest

from mlops_obs import rankdir
from mlops_obs.instrument import BADPUT_KINDS, TrainingMonitor


def _read(d: Path, job: str = "j", rank: int = 0) -> dict[str, object]:
    data = rankdir.read(d / rankdir.file_name(job, rank))
    assert data is not None
    return data


def test_step_phases_record_and_goodput(tmp_path: Path) -> None:
    """Steps, samples, tokens, phases, scalars and goodput (step time less in-step data wait) add up."""
    m = TrainingMonitor("j", 0, 2, tmp_path, node="n1", flush_interval=60)
    for _ in range(3):
        with m.step(samples=8, tokens=80):
            with m.phase("data_wait"):
                time.sleep(0.002)
            with m.phase("forward"):
                time.sleep(0.001)
            m.record(loss=1.5, grad_norm=0.5, lr=0.1)
    m.close()
    s = _read(tmp_path)
    assert (s["steps"], s["samples"], s["tokens"], s["failed_steps"]) == (3, 24, 240, 0)
    assert (s["node"], s["world_size"], s["state"], s["failure"]) == ("n1", 2, "finished", None)
    assert s["end_time"] is not None and s["start_time"] <= s["end_time"] <= time.time()  # type: ignore[operator]
    phases = s["phase_seconds"]
    assert isinstance(phases, dict) and phases["data_wait"] >= 0.006 and phases["forward"] >= 0.003
    assert s["gauges"] == {"loss": 1.5, "grad_norm": 0.5, "learning_rate": 0.1}
    good, total = float(s["goodput_seconds"]), float(s["step_seconds_sum"])  # type: ignore[arg-type]
    assert good == pytest.approx(total - phases["data_wait"], abs=1e-6)
    assert sum(s["step_buckets"]) == 3  # type: ignore[arg-type]
    badput = s["badput_seconds"]
    assert isinstance(badput, dict) and badput["data_loading"] == pytest.approx(phases["data_wait"])
    assert badput["startup"] > 0  # process start -> first step


def test_recorded_scalars_and_sampler_gauges_share_one_dict(tmp_path: Path) -> None:
    """``record``'s scalars (kept apart, for speed) and what samplers write meet in ``monitor.gauges``
    and the snapshot; a later ``record`` wins, a scalar never recorded is absent, and a tensor-like
    value is stored as a float."""

    class Scalar:
        def __float__(self) -> float:
            return 2.0

    m = TrainingMonitor("j", 0, 1, tmp_path, flush_interval=60)
    m.add_sampler(lambda mon: mon.gauges.__setitem__("cuda_memory_allocated", 7.0))
    m.record(loss=1.0)
    assert m.gauges == {"loss": 1.0}
    m.flush()
    assert _read(tmp_path)["gauges"] == {"loss": 1.0, "cuda_memory_allocated": 7.0}
    m.record(loss=Scalar(), lr=0.5)
    assert m.gauges["loss"] == 2.0 and type(m.gauges["loss"]) is float and "grad_norm" not in m.gauges
    m.close()
    assert _read(tmp_path)["gauges"] == {"loss": 2.0, "learning_rate": 0.5, "cuda_memory_allocated": 7.0}


def test_failed_step_nonfinite_loss_and_nan_gauge(tmp_path: Path) -> None:
    """A step that raises is a failed step (its time is badput); a NaN loss is counted and exported as NaN."""
    m = TrainingMonitor("j", 0, 1, tmp_path, flush_interval=60)
    with pytest.raises(ZeroDivisionError), m.step(samples=4):
        m.record(loss=float("nan"))
        _ = 1 / 0
    m.record(loss=float("inf"))
    m.close()
    s = _read(tmp_path)
    assert (s["steps"], s["failed_steps"], s["nonfinite_loss"], s["samples"]) == (0, 1, 2, 0)
    assert "failed_step" in s["badput_seconds"]  # type: ignore[operator]
    assert float(s["gauges"]["loss"]) == math.inf  # type: ignore[index]


def test_checkpoint_and_badput(tmp_path: Path) -> None:
    """Successful saves fill the histogram and the timestamp; a failed save only counts; kinds are bounded."""
    m = TrainingMonitor("j", 0, 1, tmp_path, flush_interval=60)
    with m.checkpoint():
        time.sleep(0.01)
    before = m.last_checkpoint_time
    with pytest.raises(OSError), m.checkpoint():
        raise OSError("disk full")
    assert m.last_checkpoint_time == before > 0
    with m.badput("evaluation"):
        time.sleep(0.005)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with m.badput("coffee"):
            pass
        with m.badput("coffee"):
            pass
    assert len(w) == 1 and "coffee" in str(w[0].message)
    m.close()
    s = _read(tmp_path)
    assert sum(s["checkpoint_buckets"]) == 1 and s["failed_checkpoints"] == 1  # type: ignore[arg-type]
    kinds = s["badput_seconds"]
    assert isinstance(kinds, dict)
    assert set(kinds) <= set(BADPUT_KINDS)
    assert kinds["checkpoint_save"] >= 0.01 and kinds["evaluation"] >= 0.005 and "other" in kinds


def test_collective_time_is_not_counted_twice(tmp_path: Path) -> None:
    """Collective time reported inside backward moves from backward to collective and out of compute time."""
    m = TrainingMonitor("j", 0, 2, tmp_path, flush_interval=60)
    with m.step():
        t0 = time.perf_counter()
        with m.phase("backward"):
            time.sleep(0.02)
            m.add_collective(0.015)  # what the comm hook reports while backward waits
        elapsed = time.perf_counter() - t0  # brackets the phase: at least 0.02 s, more on a busy machine
    m.close()
    s = _read(tmp_path)
    p = s["phase_seconds"]
    assert isinstance(p, dict)
    assert p["collective"] == pytest.approx(0.015)
    # The phase's own time less the collective, measured against the clock around it (a sleep of 0.02 s
    # lasts longer under load, so no fixed upper bound holds).
    assert 0.02 - 0.015 <= p["backward"] <= elapsed - 0.015
    assert s["recent_steps"] == 1
    assert s["step_compute_median"] == pytest.approx(float(s["step_seconds_sum"]) - 0.015, abs=1e-9)  # type: ignore[arg-type]
    assert s["step_median"] == pytest.approx(float(s["step_seconds_sum"]), abs=1e-9)  # type: ignore[arg-type]


def test_timed_iterator_counts_data_wait(tmp_path: Path) -> None:
    m = TrainingMonitor("j", 0, 1, tmp_path, flush_interval=60)

    def slow() -> object:
        for i in range(3):
            time.sleep(0.004)
            yield i

    assert list(m.timed(slow())) == [0, 1, 2]
    assert m.phase_seconds["data_wait"] >= 0.012
    m.close()


def test_mfu_and_samplers_run_on_flush(tmp_path: Path) -> None:
    """MFU = FLOPs done over wall time x peak, from the flush thread; a failing sampler is counted, not raised."""
    m = TrainingMonitor("j", 0, 1, tmp_path, flush_interval=60, flops_per_sample=1e6, peak_flops=1e11)
    calls: list[int] = []
    m.add_sampler(lambda mon: calls.append(mon.steps))
    m.add_sampler(lambda mon: 1 / 0)  # type: ignore[func-returns-value]
    before_first = time.perf_counter()
    m.flush()  # first mark, taken inside the flush (before its write)
    after_first = time.perf_counter()
    for _ in range(10):
        with m.step(samples=100):
            time.sleep(0.001)
    before_second = time.perf_counter()
    m.flush()
    after_second = time.perf_counter()
    mfu = m.gauges["mfu"]
    # 1e9 FLOPs on a 1e11 FLOP/s device over the time between the two marks, which lies between the
    # gap separating the flushes and the span covering both: exact bounds, however long a flush's
    # write was descheduled on a busy machine (a margin around the steps' time alone was not).
    assert 1e9 / ((after_second - before_first) * 1e11) <= mfu <= 1e9 / ((before_second - after_first) * 1e11)
    assert 0 < mfu < 1
    assert calls == [0, 10] and m.sampler_errors == 2 and m.flush_errors == 0
    m.close()


def test_disabled_monitor_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No directory, enabled=False or MLOPS_OBS_DISABLED: nothing recorded, no thread, no file."""
    monkeypatch.delenv("MLOPS_OBS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv("MLOPS_OBS_DISABLED", "1")
    for m in (TrainingMonitor("j", 0, 1), TrainingMonitor("j", 0, 1, tmp_path, enabled=False),
              TrainingMonitor("j", 0, 1, tmp_path)):  # fmt: skip
        assert not m.enabled and m._thread is None
        with m.step(samples=1), m.phase("forward"):
            m.record(loss=float("nan"))
        with m.checkpoint(), m.badput("evaluation"):
            pass
        assert list(m.timed([1, 2])) == [1, 2]
        m.close()
        assert (m.steps, m.nonfinite_loss, m.gauges) == (0, 0, {})
    assert os.listdir(tmp_path) == []


def test_defaults_from_launcher_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MLOPS_OBS_JOB", "llm")
    monkeypatch.setenv("MLOPS_OBS_NODE", "gpu-7")
    monkeypatch.setenv("MLOPS_OBS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.delenv("MLOPS_OBS_DISABLED", raising=False)
    m = TrainingMonitor()
    m.close()
    s = _read(tmp_path, "llm", 3)
    assert (s["rank"], s["world_size"], s["node"], s["job"]) == (3, 8, "gpu-7", "llm")


def test_unwritable_directory_never_raises_into_the_loop(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    m = TrainingMonitor("j", 0, 1, blocker / "sub", flush_interval=60)
    with m.step(samples=1):
        pass
    m.close()
    assert m.steps == 1 and m.flush_errors >= 2


def _scripted_run(m: TrainingMonitor, now: list[float], fold: bool) -> None:
    """Steps, phases, collectives, data wait and a failed step on a fake clock, folding after every
    action when ``fold`` (so every interval is cut open by a fold at least once)."""

    def tick(dt: float) -> None:
        now[0] += dt
        if fold:
            m._fold()

    for i in range(6):
        try:
            with m.step(samples=4, tokens=40):
                tick(0.5)
                with m.phase("data_wait"):
                    tick(0.25)
                tick(0.125)
                with m.phase("forward"):
                    tick(1.0)
                with m.phase("backward"):
                    tick(0.5)
                    m.add_collective(0.25)  # reported inside backward: moves to "collective"
                    tick(0.5)
                m.add_data_wait(0.0625)
                tick(0.0625)
                if i == 4:
                    raise KeyError("boom")
        except KeyError:
            pass
        tick(2.0)  # between steps: not in any step
        m.add_data_wait(0.5)
    # A step still open at the end: not counted yet, and its phase only up to its exit.
    m.step(samples=100).__enter__()
    with m.phase("forward"):
        tick(3.0)


@pytest.mark.parametrize("fold", [False, True])
def test_folded_figures_are_exact_wherever_the_folds_fall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fold: bool
) -> None:
    """The hot path only queues clock readings; the fold must give the same figures as per-step
    bookkeeping would, whether it runs once or cuts every step and phase open."""
    from mlops_obs.instrument import monitor as mod

    now = [1000.0]
    monkeypatch.setattr(mod, "_perf", lambda: now[0])
    m = TrainingMonitor("j", 0, 1, tmp_path, flush_interval=3600, window=4)
    _scripted_run(m, now, fold)
    step = 0.5 + 0.25 + 0.125 + 1.0 + 1.0 + 0.0625  # 2.9375 s, of which 0.25 collective, 0.3125 data wait
    assert (m.steps, m.failed_steps, m.samples, m.tokens) == (5, 1, 20, 200)
    assert m.step_seconds_sum == pytest.approx(5 * step)
    assert m.failed_step_seconds == pytest.approx(step)
    assert m.goodput_seconds == pytest.approx(5 * (step - 0.25 - 0.0625))
    assert sum(m.step_buckets) == 5 and m.step_buckets[rankdir.STEP_BUCKETS.index(5.0)] == 5
    phases = m.phase_seconds
    assert phases["forward"] == pytest.approx(6 * 1.0 + 3.0)
    assert phases["backward"] == pytest.approx(6 * (1.0 - 0.25))
    assert phases["collective"] == pytest.approx(6 * 0.25)
    assert phases["data_wait"] == pytest.approx(6 * (0.25 + 0.0625 + 0.5))
    s = m.state()
    assert (s["recent_steps"], s["step_compute_median"], s["step_median"]) == (4, pytest.approx(step - 0.25),
                                                                            pytest.approx(step))  # fmt: skip
    assert s["last_step_time"] > 0 and m.first_step_time > 0
    m._stop.set()


def test_concurrent_folds_lose_and_double_count_nothing(tmp_path: Path) -> None:
    """The flush thread (every millisecond), a reader thread and a collective-reporting thread all
    run while the training thread steps: every step, sample and bucket is counted exactly once."""
    import threading

    m = TrainingMonitor("j", 0, 1, tmp_path, flush_interval=0.001, window=8)
    stop = threading.Event()
    reads: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            reads.append(m.state()["steps"])

    def reporter() -> None:
        while not stop.is_set():
            m.add_collective(1e-6)
            time.sleep(0)

    threads = [threading.Thread(target=reader), threading.Thread(target=reporter)]
    for t in threads:
        t.start()
    n = 20_000
    try:
        for i in range(n):
            with m.step(samples=2, tokens=3):
                with m.phase("forward"):
                    pass
                if i % 1000 == 999:
                    time.sleep(0.001)  # let the other threads in mid-step
                with m.phase("backward"):
                    pass
    finally:
        stop.set()
        for t in threads:
            t.join()
    m.close()
    s = _read(tmp_path)
    assert (s["steps"], s["samples"], s["tokens"], s["failed_steps"]) == (n, 2 * n, 3 * n, 0)
    assert sum(s["step_buckets"]) == n  # type: ignore[arg-type]
    assert reads == sorted(reads) and len(reads) > 1  # monotonic: no fold ever undid another
    assert s["recent_steps"] == 8
    assert float(s["goodput_seconds"]) == pytest.approx(float(s["step_seconds_sum"]))  # type: ignore[arg-type]
    assert not m._step_events and all(not p.events for p in m._phases.values())


def test_training_thread_folds_itself_when_the_flush_thread_is_behind(tmp_path: Path) -> None:
    """With no flush for an hour, the queued readings stay bounded: the step exit folds them."""
    from mlops_obs.instrument import monitor as mod

    m = TrainingMonitor("j", 0, 1, tmp_path, flush_interval=3600)
    longest = 0
    n = 3 * mod._SYNC_FOLD_EVENTS
    for _ in range(n):
        with m.step(samples=1), m.phase("forward"):
            pass
        longest = max(longest, len(m._step_events), len(m._phases["forward"].events))
    assert longest <= mod._SYNC_FOLD_EVENTS + 1
    assert (m.steps, m.samples, sum(m.step_buckets)) == (n, n, n)
    m.close()
