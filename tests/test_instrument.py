"""TrainingMonitor: what a loop records is what lands in the snapshot the sidecar reads."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import pytest

from mlops_obs.instrument import BADPUT_KINDS, TrainingMonitor, snapshot


def _read(d: Path, job: str = "j", rank: int = 0) -> dict[str, object]:
    data = snapshot.read(d / snapshot.file_name(job, rank))
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
    assert (s["node"], s["world_size"], s["closed"]) == ("n1", 2, True)
    phases = s["phase_seconds"]
    assert isinstance(phases, dict) and phases["data_wait"] >= 0.006 and phases["forward"] >= 0.003
    assert s["gauges"] == {"loss": 1.5, "grad_norm": 0.5, "learning_rate": 0.1}
    good, total = float(s["goodput_seconds"]), float(s["step_seconds_sum"])  # type: ignore[arg-type]
    assert good == pytest.approx(total - phases["data_wait"], abs=1e-6)
    assert sum(s["step_buckets"]) == 3  # type: ignore[arg-type]
    badput = s["badput_seconds"]
    assert isinstance(badput, dict) and badput["data_loading"] == pytest.approx(phases["data_wait"])
    assert badput["startup"] > 0  # process start -> first step


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
    with m.step(), m.phase("backward"):
        time.sleep(0.02)
        m.add_collective(0.015)  # what the comm hook reports while backward waits
    m.close()
    s = _read(tmp_path)
    p = s["phase_seconds"]
    assert isinstance(p, dict)
    assert p["collective"] == pytest.approx(0.015)
    assert 0.004 < p["backward"] < 0.02
    (compute,) = s["recent_step_seconds"]  # type: ignore[misc]
    assert compute == pytest.approx(float(s["step_seconds_sum"]) - 0.015, abs=1e-9)  # type: ignore[arg-type]


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
    m.flush()  # first mark
    t0 = time.perf_counter()
    for _ in range(10):
        with m.step(samples=100):
            time.sleep(0.001)
    m.flush()
    elapsed = time.perf_counter() - t0
    mfu = m.gauges["mfu"]
    # 1e9 FLOPs in about `elapsed` seconds (the flush marks bracket it) on a 1e11 FLOP/s device.
    expected = 1e9 / (elapsed * 1e11)
    assert 0 < mfu < 1 and 0.5 * expected < mfu < 1.5 * expected
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
