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
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from mlops_obs.instrument import snapshot

PHASES: tuple[str, ...] = ("data_wait", "forward", "backward", "optimizer", "collective", "other")
# Time that is not productive training, after ml-goodput-measurement's taxonomy.
BADPUT_KINDS: tuple[str, ...] = (
    "startup", "data_loading", "checkpoint_save", "checkpoint_restore", "evaluation", "recovery", "failed_step",
    "other",
)  # fmt: skip

T = TypeVar("T")

_perf = time.perf_counter
_wall = time.time
_bisect = bisect.bisect_left
_STEP_BUCKETS = snapshot.STEP_BUCKETS


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
    """Reusable ``with`` target for one step; ``TrainingMonitor.step`` re-arms it.

    On entry it notes the running totals of collective and data-wait time, so that on exit the step
    can be split into time spent waiting (for other ranks, for data) and the rest, without any
    per-step allocation.
    """

    __slots__ = ("_m", "c0", "dw0", "samples", "start", "tokens")

    def __init__(self, m: TrainingMonitor) -> None:
        self._m = m
        self.samples = 0
        self.tokens = 0
        self.start = 0.0
        self.c0 = 0.0
        self.dw0 = 0.0

    def __enter__(self) -> _Step:
        m = self._m
        if not m.first_step_time:
            m.first_step_time = _wall()
        self.c0 = m.collective_seconds
        self.dw0 = m._data_wait.total
        self.start = _perf()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        m = self._m
        end = _perf()
        dur = end - self.start
        if et is not None:
            m.failed_steps += 1
            m.failed_step_seconds += dur
            return
        m.steps += 1
        m.samples += self.samples
        m.tokens += self.tokens
        m.step_seconds_sum += dur
        m.goodput_seconds += dur - (m._data_wait.total - self.dw0)
        m.step_buckets[_bisect(_STEP_BUCKETS, dur)] += 1
        i = m._recent_i
        m._recent[i % m._window] = dur - (m.collective_seconds - self.c0)
        m._recent_i = i + 1
        m.last_step_perf = end  # turned into wall time off the hot path, saving a clock read


class _Phase:
    """Reusable ``with`` target for one phase, holding the phase's running total itself (cheaper than a
    dict update); collective time reported inside it is not counted twice."""

    __slots__ = ("_m", "c0", "name", "start", "total")

    def __init__(self, m: TrainingMonitor, name: str) -> None:
        self._m = m
        self.name = name
        self.start = 0.0
        self.c0 = 0.0
        self.total = 0.0

    def __enter__(self) -> _Phase:
        self.c0 = self._m.collective_seconds
        self.start = _perf()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.total += _perf() - self.start - (self._m.collective_seconds - self.c0)


class _Timed:
    """``checkpoint()`` and ``badput(kind)``: rare, so a fresh object per use is fine."""

    __slots__ = ("_m", "kind", "start")

    def __init__(self, m: TrainingMonitor, kind: str) -> None:
        self._m = m
        self.kind = kind
        self.start = 0.0

    def __enter__(self) -> _Timed:
        self.start = _perf()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        m = self._m
        dur = _perf() - self.start
        b = m.badput_seconds
        b[self.kind] = b.get(self.kind, 0.0) + dur
        if self.kind == "checkpoint_save":
            if et is None:
                m.checkpoint_buckets[bisect.bisect_left(snapshot.CHECKPOINT_BUCKETS, dur)] += 1
                m.checkpoint_seconds_sum += dur
                m.last_checkpoint_time = _wall()
            else:
                m.failed_checkpoints += 1


class _PhaseTable(dict[str, "_Phase"]):
    """Phase name -> reusable :class:`_Phase`; a new name gets its phase on first use."""

    def __init__(self, m: TrainingMonitor) -> None:
        super().__init__((name, _Phase(m, name)) for name in PHASES)
        self._m = m

    def __missing__(self, name: str) -> _Phase:
        p = self[name] = _Phase(self._m, str(name))
        return p


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
    ``MLOPS_OBS_DISABLED=1``, the monitor is a no-op: every call returns at once and nothing is written.

    ``flops_per_sample`` (or ``flops_per_token``) and ``peak_flops`` (one device's peak FLOP/s; known
    GPUs are detected by :mod:`mlops_obs.instrument.torch`) give model FLOPs utilisation, computed by
    the flush thread over each flush interval of wall time, so stalls and data waits lower it as they
    should.
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
        flops_per_sample: float | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> None:
        self.job = job or os.environ.get("MLOPS_OBS_JOB") or os.environ.get("TORCHELASTIC_RUN_ID") or "default"
        self.rank = rank if rank is not None else _env_int("RANK", "SLURM_PROCID", default=0)
        self.world_size = world_size if world_size is not None else _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
        self.node = node or os.environ.get("MLOPS_OBS_NODE") or os.environ.get("NODE_NAME") or socket.gethostname()
        d = directory if directory is not None else os.environ.get("MLOPS_OBS_MULTIPROC_DIR")
        self.directory = Path(d) if d else None
        if enabled is None:
            enabled = self.directory is not None and os.environ.get("MLOPS_OBS_DISABLED", "").lower() not in (
                "1",
                "true",
                "yes",
            )
        self.enabled = bool(enabled) and self.directory is not None
        self.flush_interval = flush_interval
        self.pid = os.getpid()
        self.start_time = _process_start_time()
        self.flops_per_sample = flops_per_sample
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops

        # Hot-path state: plain numbers, mutated in place.
        self.steps = 0
        self.failed_steps = 0
        self.failed_step_seconds = 0.0
        self.samples = 0
        self.tokens = 0
        self.step_seconds_sum = 0.0
        self.goodput_seconds = 0.0
        self.collective_seconds = 0.0
        self.collectives = 0
        self.first_step_time = 0.0
        self.step_buckets = [0] * (len(snapshot.STEP_BUCKETS) + 1)
        self.badput_seconds: dict[str, float] = {}
        self.checkpoint_buckets = [0] * (len(snapshot.CHECKPOINT_BUCKETS) + 1)
        self.checkpoint_seconds_sum = 0.0
        self.failed_checkpoints = 0
        self.last_checkpoint_time = 0.0
        self.gauges: dict[str, float] = {}
        self.nonfinite_loss = 0
        self.last_step_perf = 0.0
        self._window = max(1, window)
        self._recent = [0.0] * self._window
        self._recent_i = 0

        self.flush_errors = 0
        self.sampler_errors = 0
        self._warned_kinds: set[str] = set()
        self._samplers: list[Callable[[TrainingMonitor], None]] = []
        self._mfu_mark: tuple[float, int, int] | None = None
        self._step_ctx = _Step(self)
        self._phases = _PhaseTable(self)
        self._data_wait = self._phases["data_wait"]
        self._collective = self._phases["collective"]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        if self.enabled:
            assert self.directory is not None
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                snapshot.remove_leftovers(self.directory, self.job, self.rank)
            except OSError:
                self.flush_errors += 1
            self.flush()
            self._thread = threading.Thread(target=self._run, name="mlops-obs-flush", daemon=True)
            self._thread.start()
            atexit.register(self.close)
            # ``monitor.phase(name)`` becomes a C-level dict lookup: the phase objects are reused, and
            # a Python-level method call would be a fifth of the whole step's cost.
            self.phase = self._phases.__getitem__  # type: ignore[method-assign,assignment]

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
            if loss - loss != 0.0:  # NaN or +-inf, without a function call
                self.nonfinite_loss += 1
        if grad_norm is not None:
            g["grad_norm"] = float(grad_norm)
        if lr is not None:
            g["learning_rate"] = float(lr)

    def add_collective(self, seconds: float) -> None:
        """Time a collective took, from launch to completion (called by the DDP comm hook).

        It counts as the ``collective`` phase and is taken out of whichever phase was open (usually
        ``backward``), and out of the step's compute time that the straggler score compares, because
        waiting for a slow peer is not this rank's own slowness.
        """
        self.collective_seconds += seconds
        self.collectives += 1
        self._collective.total += seconds

    def add_data_wait(self, seconds: float) -> None:
        """Time spent waiting for the next batch (the DataLoader wrapper reports it)."""
        self._data_wait.total += seconds

    # --- rare events ------------------------------------------------------------------------------

    def checkpoint(self) -> _Timed | _Null:
        """Time a checkpoint save: ``with monitor.checkpoint(): torch.save(...)``.

        A save that raises counts as a failed checkpoint and does not move the last-checkpoint time.
        """
        if not self.enabled:
            return _NULL
        return _Timed(self, "checkpoint_save")

    def badput(self, kind: str) -> _Timed | _Null:
        """Time that is not training: ``with monitor.badput("evaluation"): ...``.

        ``kind`` is one of :data:`BADPUT_KINDS`; an unknown kind is counted as ``other`` (with one
        warning) rather than raised, because a metrics typo must not stop a training job.
        """
        if not self.enabled:
            return _NULL
        if kind not in BADPUT_KINDS:
            if kind not in self._warned_kinds:
                self._warned_kinds.add(kind)
                warnings.warn(
                    f"mlops_obs: unknown badput kind {kind!r}, counted as 'other' (one of {', '.join(BADPUT_KINDS)})",
                    stacklevel=2,
                )
            kind = "other"
        return _Timed(self, kind)

    def timed(self, iterable: Iterable[T]) -> Iterator[T]:
        """Iterate ``iterable`` timing each ``next()`` as data wait: ``for batch in monitor.timed(loader)``."""
        if not self.enabled:
            yield from iterable
            return
        it = iter(iterable)
        p = self._data_wait
        while True:
            t0 = _perf()
            try:
                item = next(it)
            except StopIteration:
                p.total += _perf() - t0
                return
            p.total += _perf() - t0
            yield item

    def add_sampler(self, fn: Callable[[TrainingMonitor], None]) -> None:
        """Run ``fn(monitor)`` on the flush thread before each snapshot (CUDA memory, custom gauges).

        A sampler that raises is counted in ``sampler_errors`` and skipped for that flush.
        """
        self._samplers.append(fn)

    # --- hand-off ---------------------------------------------------------------------------------

    @property
    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase so far (a copy)."""
        return {name: p.total for name, p in list(self._phases.items())}

    @property
    def last_step_time(self) -> float:
        """Unix time the last step finished (0 before the first), from the step's monotonic end."""
        if not self.last_step_perf:
            return 0.0
        return _wall() - (_perf() - self.last_step_perf)

    def state(self) -> dict[str, Any]:
        """The snapshot written for the sidecar; a copy, safe to serialise off the training thread."""
        n = min(self._recent_i, len(self._recent))
        i = self._recent_i
        recent = [self._recent[(i - n + k) % len(self._recent)] for k in range(n)]
        badput = dict(self.badput_seconds)
        badput["data_loading"] = badput.get("data_loading", 0.0) + self._data_wait.total
        if self.failed_step_seconds:
            badput["failed_step"] = badput.get("failed_step", 0.0) + self.failed_step_seconds
        if self.first_step_time:
            badput["startup"] = badput.get("startup", 0.0) + max(0.0, self.first_step_time - self.start_time)
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
            "phase_seconds": self.phase_seconds,
            # JSON has no NaN: a non-finite gauge (the loss that went NaN) travels as "nan"/"inf".
            "gauges": {k: (v if v - v == 0.0 else str(v)) for k, v in list(self.gauges.items())},
            "nonfinite_loss": self.nonfinite_loss,
            "last_step_time": self.last_step_time,
            "recent_step_seconds": recent,
            "goodput_seconds": self.goodput_seconds,
            "badput_seconds": badput,
            "checkpoint_buckets": list(self.checkpoint_buckets),
            "checkpoint_seconds_sum": self.checkpoint_seconds_sum,
            "failed_checkpoints": self.failed_checkpoints,
            "last_checkpoint_time": self.last_checkpoint_time,
            "collectives": self.collectives,
        }

    def _sample(self) -> None:
        for fn in list(self._samplers):
            try:
                fn(self)
            except Exception:
                self.sampler_errors += 1
        self._update_mfu()

    def _update_mfu(self) -> None:
        """MFU over the wall time since the previous flush: achieved FLOP/s over the device's peak."""
        if not self.peak_flops or not (self.flops_per_sample or self.flops_per_token):
            return
        now = _perf()
        mark = self._mfu_mark
        self._mfu_mark = (now, self.samples, self.tokens)
        if mark is None or now - mark[0] <= 0:
            return
        flops = (self.samples - mark[1]) * (self.flops_per_sample or 0.0) + (self.tokens - mark[2]) * (
            self.flops_per_token or 0.0
        )
        self.gauges["mfu"] = flops / ((now - mark[0]) * self.peak_flops)

    def flush(self) -> None:
        if not self.enabled or self.directory is None:
            return
        try:
            self._sample()
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
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _process_start_time() -> float:
    """When this process started (what ``process_start_time_seconds`` means), for the startup badput."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:
        return _wall()
