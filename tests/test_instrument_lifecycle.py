"""How a rank ends, as its snapshot says: real processes that finish, raise, exit non-zero, are
signalled (with the job's own handler, without one, while blocked outside Python) or fork workers.

Each case runs a small training script in a fresh interpreter and reads the final snapshot; the
process's own behaviour (exit status, traceback, the job's handler) must be what it would have been
without the monitor.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mlops_obs import rankdir
from mlops_obs.instrument import TrainingMonitor
from mlops_obs.instrument.lifecycle import HOOKS, exception_detail, exit_status

PRELUDE = """
import os, signal, sys, time, threading
from mlops_obs.instrument import TrainingMonitor
d = sys.argv[1]
"""
MONITOR = """
m = TrainingMonitor("j", 0, 1, d, node="n", flush_interval=60)
with m.step(samples=1):
    pass
"""
READY = "print('ready', flush=True)\n"

CASES: dict[str, tuple[str, int, tuple[str, ...]]] = {
    # name: (script after the prelude, exit status, expected end: state[, reason, detail])
    "returns": (MONITOR, 0, ("finished",)),
    "raises": (MONITOR + "raise RuntimeError('boom')\n", 1, ("failed", "exception", "RuntimeError")),
    "raises_a_class_of_a_module": (
        MONITOR + "import json\nraise json.JSONDecodeError('x', 'y', 0)\n",
        1,
        ("failed", "exception", "json.decoder.JSONDecodeError"),
    ),
    "exits_3": (MONITOR + "sys.exit(3)\n", 3, ("failed", "exit_code", "3")),
    "exits_with_a_message": (MONITOR + "sys.exit('bad config')\n", 1, ("failed", "exit_code", "1")),
    "exits_0": (MONITOR + "sys.exit(0)\n", 0, ("finished",)),
    "closes_with_the_error_it_handled": (
        MONITOR + "try:\n    raise FloatingPointError('nan')\nexcept FloatingPointError as e:\n    m.close(error=e)\n",
        0,
        ("failed", "exception", "FloatingPointError"),
    ),
    "raises_inside_with": (
        "try:\n    with TrainingMonitor('j', 0, 1, d, node='n', flush_interval=60) as m:\n"
        "        raise KeyError('k')\nexcept KeyError:\n    pass\n",
        0,
        ("failed", "exception", "KeyError"),
    ),
    "raises_after_close": (MONITOR + "m.close()\nraise OSError('disk')\n", 1, ("failed", "exception", "OSError")),
    "sigterm_without_a_handler": (MONITOR + READY + "time.sleep(600)\n", -15, ("failed", "signal", "SIGTERM")),
    # The main thread stuck outside Python (a collective in C++): emulated by blocking the signal in it,
    # so the kernel delivers it to another thread and the main thread never runs a Python handler.
    "sigterm_while_the_main_thread_is_blocked": (
        MONITOR + "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n" + READY + "time.sleep(600)\n",
        -15,
        ("failed", "signal", "SIGTERM"),
    ),
    "sigterm_with_the_jobs_own_handler": (
        "stop = threading.Event()\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('job handler', flush=True), stop.set()))\n"
        + MONITOR
        + READY
        + "stop.wait(600)\nm.close()\nsys.exit(0)\n",
        0,
        ("failed", "signal", "SIGTERM"),
    ),
    "sigint": (MONITOR + READY + "time.sleep(600)\n", -2, ("failed", "signal", "SIGINT")),
}
SIGNAL_OF = {"sigterm_without_a_handler": signal.SIGTERM, "sigterm_while_the_main_thread_is_blocked": signal.SIGTERM,
             "sigterm_with_the_jobs_own_handler": signal.SIGTERM, "sigint": signal.SIGINT}  # fmt: skip


def _run(tmp_path: Path, script: str, send: signal.Signals | None = None) -> tuple[int, str, str, float]:
    """Run ``script``; with ``send``, signal it once it says ready. Returns (status, stdout, stderr,
    seconds from the signal to the exit)."""
    p = subprocess.Popen([sys.executable, "-c", PRELUDE + script, str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    took = 0.0
    if send is not None:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        p.send_signal(send)
        p.wait(timeout=120)
        took = time.monotonic() - t0
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err, took


def _end(tmp_path: Path) -> tuple[Any, ...]:
    s = rankdir.read(tmp_path / rankdir.file_name("j", 0))
    assert s is not None
    if s["state"] == "running":
        return ("running",)
    assert isinstance(s["end_time"], float) and s["start_time"] <= s["end_time"] <= time.time()
    f = s["failure"]
    assert (f is None) == (s["state"] != "failed"), s
    return (s["state"],) if f is None else (s["state"], f["reason"], f["detail"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_final_snapshot_says_how_the_process_ended(tmp_path: Path, case: str) -> None:
    script, status, end = CASES[case]
    code, out, err, took = _run(tmp_path, script, SIGNAL_OF.get(case))
    assert code == status, err
    assert _end(tmp_path) == end
    if end[1:2] == ("exception",) and code == 1:
        assert "Traceback" in err  # the job's own excepthook still printed it
    if case == "sigterm_with_the_jobs_own_handler":
        assert "job handler" in out
    if case == "sigterm_while_the_main_thread_is_blocked":
        assert took < 60  # not the 600 s the main thread would have slept


def test_an_ignored_sighup_stays_ignored(tmp_path: Path) -> None:
    """A job started with SIGHUP ignored (nohup) keeps ignoring it; SIGTERM still ends it, failed."""
    script = "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n" + MONITOR + READY + "time.sleep(600)\n"
    p = subprocess.Popen([sys.executable, "-c", PRELUDE + script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=1.0)
        assert _end(tmp_path) == ("running",)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == -signal.SIGTERM
        assert _end(tmp_path) == ("failed", "signal", "SIGTERM")
    finally:
        p.kill()
        p.wait()


def test_a_forked_worker_is_not_the_rank(tmp_path: Path) -> None:
    """A DataLoader-style worker forked from the rank: SIGTERM kills the worker (by its default action)
    without touching the rank or its snapshot, and a worker that exits normally writes nothing."""
    script = MONITOR + (
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(600)\n"
        "    os._exit(0)\n"
        "os.kill(pid, signal.SIGTERM)\n"
        "_, st = os.waitpid(pid, 0)\n"
        "print('worker', os.WTERMSIG(st) if os.WIFSIGNALED(st) else -1, flush=True)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.exit(5)\n"  # atexit runs in this child: it must not write the rank's snapshot
        "os.waitpid(pid, 0)\n"
        "m.flush()\n"
        "s = m.state()\n"
        "print('state', s['state'], flush=True)\n"
    )
    code, out, err, _ = _run(tmp_path, script)
    assert code == 0, err
    assert f"worker {int(signal.SIGTERM)}" in out and "state running" in out
    assert _end(tmp_path) == ("finished",)


def test_exception_details_and_exit_statuses() -> None:
    class Local(Exception):
        pass

    assert exception_detail(RuntimeError()) == "RuntimeError"
    # A label value: only [A-Za-z0-9_.:-], so "<locals>" loses its brackets.
    assert exception_detail(Local) == f"{__name__}.test_exception_details_and_exit_statuses._locals_.Local"
    assert [exit_status(c) for c in (None, 0, 3, 256 + 4, True, "msg")] == [0, 0, 3, 4, 1, 1]


def test_close_with_an_error_and_a_second_failure(tmp_path: Path) -> None:
    """In-process: the first failure is kept; a finish never overrides a failure; a disabled monitor
    records nothing and writes nothing."""
    m = TrainingMonitor("j", 0, 1, tmp_path, node="n", flush_interval=60)
    assert m.lifecycle_state == "running" and m.failure is None
    m.close(error=MemoryError())
    m.close(error=ValueError())
    m._end("finished")
    assert (m.lifecycle_state, m.failure) == ("failed", {"reason": "exception", "detail": "MemoryError"})
    assert _end(tmp_path) == ("failed", "exception", "MemoryError")
    off = TrainingMonitor("j", 1, 1, None, flush_interval=60)
    off.close(error=ValueError())
    assert not (tmp_path / rankdir.file_name("j", 1)).exists()
    assert HOOKS.pending_signal is None  # nothing here signalled this (the test) process
