"""``TrainingMonitor``: what a training loop calls each step, at about a microsecond a call.

The hot path (``step``, ``phase``, ``record``) only touches plain attributes of this object: it makes
no system call beyond the vDSO clock, takes no lock shared with another process, and allocates no
context-manager objects after warm-up (the ones ``step()`` and ``phase()`` return are reused). A
daemon thread copies the state into a snapshot file every ``flush_interval`` seconds; see
:mod:`mlops_obs.instrument.snapshot` for why that beats prometheus_client's multiprocess mode.

Nothing here may break or slow the training job: a flush that fails (full disk, missing directory)
is counted and retried on the next interval, never raised into the loop.
"""

from __future__ import annotations

import atexit
import bisect
import math
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from mlops_obs.instrument import snapshot

PHASES: tuple[str, ...] = ("data_wait", "forward", "backward", "optimizer", "collective", "other")

_perf = time.perf_counter
_wall = time.time


def _env_int(*names: str, default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)  # type: ignore[arg-type]
            except ValueError:
                pass
    return default


class _Step:
    """Reusable ``with`` target for one step; ``TrainingMonitor.step`` re-arms it."""

    __slots__ = ("_m", "samples", "start", "tokens")

    def __init__(self, m: TrainingMonitor) -> None:
        self._m = m
        self.samples = 0
        self.tokens = 0
        self.start = 0.0

    def __enter__(self) -> _Step:
        self.start = _perf()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        m = self._m
        dur = _perf() - self.start
        if et is not None:
            m.failed_steps += 1
            return
        m.steps += 1
        m.samples += self.samples
        m.tokens += self.tokens
        m.step_seconds_sum += dur
        m.step_buckets[bisect.bisect_left(snapshot.STEP_BUCKETS, dur)] += 1
        r = m._recent
        r[m._recent_i % len(r)] = dur
        m._recent_i += 1
        m.last_step_time = _wall()


class _Phase:
    __slots__ = ("_m", "name", "start")

    def __init__(self, m: TrainingMonitor, name: str) -> None:
        self._m = m
        self.name = name
        self.start = 0.0

    def __enter__(self) -> _Phase:
        self.start = _perf()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        p = self._m.phase_seconds
        p[self.name] = p.get(self.name, 0.0) + (_perf() - self.start)


class _Null:
    """The disabled monitor's context manager: costs one attribute lookup and two no-op calls."""

    __slots__ = ()

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_NULL = _Null()


class TrainingMonitor:
    """Per-rank training metrics handed to the ``mlops-obs exporter`` sidecar through ``directory``.

    ``job``, ``rank``, ``world_size``, ``node`` and ``directory`` default from the environment that
    launchers set (``MLOPS_OBS_JOB``, ``RANK``, ``WORLD_SIZE``, ``MLOPS_OBS_NODE`` or ``NODE_NAME``,
    ``MLOPS_OBS_MULTIPROC_DIR``). Without a directory, or with ``enabled=False`` or
    ``MLOPS_OBS_DISABLED=1``, the monitor is a no-op.
    """

    def __init__(
        self,
        job: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        directory: str | os.PathLike[str] | None = None,
        *,
        node: str | None = None,
        enabled: bool | None = None,
        flush_interval: float = 1.0,
        window: int = 256,
    ) -> None:
        self.job = job or os.environ.get("MLOPS_OBS_JOB") or os.environ.get("TORCHELASTIC_RUN_ID") or "default"
        self.rank = rank if rank is not None else _env_int("RANK", "SLURM_PROCID", default=0)
        self.world_size = world_size if world_size is not None else _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
        self.node = node or os.environ.get("MLOPS_OBS_NODE") or os.environ.get("NODE_NAME") or socket.gethostname()
        d = directory if directory is not None else os.environ.get("MLOPS_OBS_MULTIPROC_DIR")
        self.directory = Path(d) if d else None
        if enabled is None:
            enabled = self.directory is not None and os.environ.get("MLOPS_OBS_DISABLED", "") not in (
                "1",
                "true",
            )
        self.enabled = bool(enabled) and self.directory is not None
        self.flush_interval = flush_interval
        self.pid = os.getpid()
        self.start_time = _wall()

        # Hot-path state: plain numbers, mutated in place.
        self.steps = 0
        self.failed_steps = 0
        self.samples = 0
        self.tokens = 0
        self.step_seconds_sum = 0.0
        self.step_buckets = [0] * (len(snapshot.STEP_BUCKETS) + 1)
        self.phase_seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.gauges: dict[str, float] = {}
        self.nonfinite_loss = 0
        self.last_step_time = 0.0
        self._recent = [0.0] * max(1, window)
        self._recent_i = 0

        self.flush_errors = 0
        self._step_ctx = _Step(self)
        self._phases = {name: _Phase(self, name) for name in PHASES}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        if self.enabled:
            assert self.directory is not None
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError:
                self.flush_errors += 1
            self.flush()
            self._thread = threading.Thread(target=self._run, name="mlops-obs-flush", daemon=True)
            self._thread.start()
            atexit.register(self.close)

    # --- hot path ---------------------------------------------------------------------------------

    def step(self, samples: int = 0, tokens: int = 0) -> _Step | _Null:
        """Time one training step: ``with monitor.step(samples=len(batch)): ...``."""
        if not self.enabled:
            return _NULL
        s = self._step_ctx
        s.samples = samples
        s.tokens = tokens
        return s

    def phase(self, name: str) -> _Phase | _Null:
        """Time a part of the step (``data_wait``, ``forward``, ``backward``, ``optimizer``, ...)."""
        if not self.enabled:
            return _NULL
        p = self._phases.get(name)
        if p is None:
            p = self._phases[name] = _Phase(self, name)
        return p

    def record(self, loss: float | None = None, grad_norm: float | None = None, lr: float | None = None) -> None:
        """Record the step's scalars; a NaN or infinite loss is also counted."""
        if not self.enabled:
            return
        g = self.gauges
        if loss is not None:
            loss = float(loss)
            g["loss"] = loss
            if not math.isfinite(loss):
                self.nonfinite_loss += 1
        if grad_norm is not None:
            g["grad_norm"] = float(grad_norm)
        if lr is not None:
            g["learning_rate"] = float(lr)

    # --- hand-off ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The snapshot written for the sidecar; a copy, safe to serialise off the training thread."""
        n = min(self._recent_i, len(self._recent))
        i = self._recent_i
        recent = [self._recent[(i - n + k) % len(self._recent)] for k in range(n)]
        return {
            "v": snapshot.SCHEMA_VERSION,
            "job": self.job,
            "rank": self.rank,
            "world_size": self.world_size,
            "node": self.node,
            "pid": self.pid,
            "start_time": self.start_time,
            "updated": _wall(),
            "closed": self._closed,
            "steps": self.steps,
            "failed_steps": self.failed_steps,
            "samples": self.samples,
            "tokens": self.tokens,
            "step_seconds_sum": self.step_seconds_sum,
            "step_buckets": list(self.step_buckets),
            "phase_seconds": dict(self.phase_seconds),
            "gauges": dict(self.gauges),
            "nonfinite_loss": self.nonfinite_loss,
            "last_step_time": self.last_step_time,
            "recent_step_seconds": recent,
        }

    def flush(self) -> None:
        if not self.enabled or self.directory is None:
            return
        try:
            snapshot.write(self.directory, self.job, self.rank, self.state())
        except Exception:  # never into the training loop
            self.flush_errors += 1

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            self.flush()

    def close(self) -> None:
        """Write the final snapshot and stop the flush thread (also runs at interpreter exit)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
