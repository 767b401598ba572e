"""``TrainingMonitor``: what a training loop calls each step, at about 1 us for a step with 3 phases.

The hot path (``step``, ``phase``, ``record``) only appends clock readings to lists owned by this
object: it makes no system call beyond the vDSO clock, takes no lock (unless the flush thread has
fallen thousands of steps behind, see ``_SYNC_FOLD_EVENTS``), and allocates no context-manager
objects (the ones ``step()`` and ``phase()`` return are reused). Entering or leaving a step or a
phase appends one clock reading (see :func:`_recorder`).
Everything derived from those readings (step count, histogram bucket, goodput, phase totals net of
collective time, the straggler ring) is folded in by :meth:`TrainingMonitor._fold` (:mod:`.fold`), which the daemon
flush thread runs before it copies the state into a snapshot file (see :mod:`mlops_obs.rankdir` for why
that beats prometheus_client's multiprocess mode). By default the flush thread follows the sidecar's
cadence, published in the same directory (:mod:`mlops_obs.rankdir.cadence`): it flushes just before
the sidecar's round ahead of each scrape, at least every 15 s (the heartbeat the stall alert needs),
so a rank scraped every 15 s flushes every 15 s instead of every second; a fixed ``flush_interval``
overrides it.
Reading a derived attribute (``monitor.steps``, ``phase_seconds``, ...) folds first, so it is always
current; a training thread that outruns a stuck flush thread folds itself every few thousand steps,
so the lists stay bounded.

Nothing here may break or slow the training job: a flush that fails (full disk, missing directory)
is counted and retried on the next interval, never raised into the loop.

Besides its figures, a snapshot says where the rank is (the phase it is in and since when: what tells a
hung rank from its peers waiting for it in a collective) and how it ended: ``finished`` on
``close()``, ``failed`` with the reason when the process ends by an exception, a signal or a non-zero
exit status (the hooks are in :mod:`.lifecycle`), or by ``close(error=exc)`` for an error the job
handles itself.
"""

from __future__ import annotations

import bisect
import itertools
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from mlops_obs import rankdir
from mlops_obs.config import node_name
from mlops_obs.instrument import lifecycle
from mlops_obs.instrument.fold import StepTotals, fold_phase, fold_steps
from mlops_obs.rankdir import FAILED, FINISHED, RUNNING

PHASES: tuple[str, ...] = ("data_wait", "forward", "backward", "optimizer", "collective", "other")
# Time that is not productive training, after ml-goodput-measurement's taxonomy.
BADPUT_KINDS: tuple[str, ...] = (
    "startup", "data_loading", "checkpoint_save", "checkpoint_restore", "evaluation", "recovery", "failed_step",
    "other",
)  # fmt: skip

# Phases that are expected pauses: while a rank is in one, its peers waiting for it are not stalled.
PAUSE_PHASES: tuple[str, ...] = ("checkpoint", "checkpoint_restore", "evaluation")
# A monitor's final snapshot waits at most this long for a flush in progress (a hung sampler).
FINAL_WRITE_WAIT_SECONDS = 1.0
# The flush interval with no sidecar cadence to follow (none published, or the sidecar not scraped).
DEFAULT_FLUSH_INTERVAL = rankdir.cadence.MAX_FLUSH_INTERVAL

T = TypeVar("T")

# The gauges ``record(loss=, grad_norm=, lr=)`` sets, in its arguments' order.
RECORDED_GAUGES: tuple[str, ...] = ("loss", "grad_norm", "learning_rate")

_perf = time.perf_counter
_wall = time.time

# The training thread folds (all queues, not only the steps') itself once this many step readings
# are waiting, about 2,000 steps: in a real job that only happens when the flush thread has fallen
# behind (a hung disk write, a starved thread), and it keeps memory bounded whatever the flush thread
# does. ``add_collective``, ``add_data_wait`` and ``timed`` check their own queues the same way. The
# one queue nothing checks is a phase's, timed with no step around it: the phase exit stays a bare
# append (a length test would cost a tenth of the saving), so such readings wait for the flush thread.
_SYNC_FOLD_EVENTS = 4096


def _env_int(*names: str, default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)  # type: ignore[arg-type]
            except ValueError:
                pass
    return default


def _recorder(out: Callable[[float], object]) -> Callable[[], None]:
    """A context manager's ``__enter__`` (as a ``staticmethod``, so ``with`` binds no method) that
    appends ``perf_counter()`` to ``out``; ``with monitor.phase(...) as x`` binds ``None``.

    A Python closure rather than a C-level callable (``map(out, iter(perf_counter, None)).__next__``
    runs no Python frame): in a hot loop the C one is ~0.01 us faster per block, but at the step
    rates training runs at (a few a second, every step with cold caches) its rarely used C paths
    (the method-wrapper, the iterator's sentinel comparison) cost more than the interpreter's own
    loop, ~5 us a block on the reference VM (``bench_instrument.py --part rank``).
    """

    def __enter__() -> None:
        out(_perf())

    return __enter__


class _StepBase:
    """Base of each monitor's step context manager (a class of its own, made by ``_make_step``)."""

    __slots__ = ()

    def __enter__(self) -> object:  # replaced by a recorder in each monitor's class
        raise NotImplementedError

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        raise NotImplementedError


class _PhaseBase:
    """One phase's reusable ``with`` target; each phase is an instance of a class of its own, whose
    ``__enter__`` (:func:`_recorder`) and ``__exit__`` append to this phase's ``events``.

    ``events`` holds entry readings (positive) and exit readings (negated), so the fold pairs them
    without relying on their count (a stray exit or re-entry cannot shift every later pair). ``total``
    takes the time reported without a ``with`` (``add_collective``, ``add_data_wait``, ``timed``);
    ``folded`` the folded ``with`` time, net of collective time reported inside it. ``open_start`` and
    ``open_coll`` carry an interval still open at the last fold.
    """

    __slots__ = ("events", "folded", "name", "open_coll", "open_start", "total")

    events: list[float]
    folded: float
    name: str
    open_coll: float
    open_start: float | None
    total: float

    def __enter__(self) -> object:  # replaced by a recorder in each phase's class
        raise NotImplementedError

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        raise NotImplementedError


def _make_phase(name: str) -> _PhaseBase:
    events: list[float] = []
    append = events.append

    def __exit__(et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        append(-_perf())

    cls = type(f"_Phase_{name}", (_PhaseBase,), {"__slots__": (), "__enter__": staticmethod(_recorder(append)),
                                                  "__exit__": staticmethod(__exit__)})  # fmt: skip
    p: _PhaseBase = cls()
    p.events = events
    p.name = name
    p.total = p.folded = p.open_coll = 0.0
    p.open_start = None
    return p


class _Timed:
    """``checkpoint()`` and ``badput(kind)``: rare, so a fresh object per use is fine. While open it is
    the rank's current phase (``checkpoint`` for a checkpoint save, the kind otherwise)."""

    __slots__ = ("_m", "kind", "phase", "start")

    def __init__(self, m: TrainingMonitor, kind: str) -> None:
        self._m = m
        self.kind = kind
        self.phase = "checkpoint" if kind == "checkpoint_save" else kind
        self.start = 0.0

    def __enter__(self) -> _Timed:
        self.start = _perf()
        self._m._open_timed.append(self)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        m = self._m
        dur = _perf() - self.start
        try:
            m._open_timed.remove(self)
        except ValueError:
            pass
        b = m.badput_seconds
        b[self.kind] = b.get(self.kind, 0.0) + dur
        if self.kind == "checkpoint_save":
            if et is None:
                m.checkpoint_buckets[bisect.bisect_left(rankdir.CHECKPOINT_BUCKETS, dur)] += 1
                m.checkpoint_seconds_sum += dur
                m.last_checkpoint_time = _wall()
            else:
                m.failed_checkpoints += 1


class _PhaseTable(dict[str, _PhaseBase]):
    """Phase name -> reusable phase; a new name gets its phase on first use."""

    def __init__(self) -> None:
        super().__init__((name, _make_phase(name)) for name in PHASES)

    def __missing__(self, name: str) -> _PhaseBase:
        p = self[name] = _make_phase(str(name))
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

    ``flush_interval``: seconds between snapshots; ``None`` (the default) follows the sidecar's
    published cadence, flushing just before its rounds (at least every 15 s, and every 15 s with no
    sidecar cadence to follow), so the flush costs what the scrape interval asks for.

    ``pause_phases`` adds phase names (of ``phase()`` or ``badput()``) that are expected pauses besides
    :data:`PAUSE_PHASES`: while a rank is in one, the stall alerts do not count its peers' wait.
    The rank ends ``finished`` on ``close()`` (or leaving ``with``) and ``failed`` when the process
    ends by an exception, a signal or a non-zero exit status; ``close(error=exc)`` says the job
    stopped on an error it handled itself.
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
        flush_interval: float | None = None,
        window: int = 256,
        flops_per_sample: float | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        pause_phases: Iterable[str] = (),
    ) -> None:
        self.job = job or os.environ.get("MLOPS_OBS_JOB") or os.environ.get("TORCHELASTIC_RUN_ID") or "default"
        self.rank = rank if rank is not None else _env_int("RANK", "SLURM_PROCID", default=0)
        self.world_size = world_size if world_size is not None else _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
        self.node = node or node_name()
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
        self.pid_ns, self.boot_id = _pid_identity()
        self.pause_phases = frozenset((*PAUSE_PHASES, *pause_phases))
        self.flops_per_sample = flops_per_sample
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops

        # Hot-path state. Derived figures (``steps``, ``samples``, ``step_buckets``, ...) are properties
        # over these ``_`` fields that fold the queued readings first; the rest are plain numbers.
        self._totals = StepTotals(window)
        self.collective_seconds = 0.0
        self.collectives = 0
        self.badput_seconds: dict[str, float] = {}
        self.checkpoint_buckets = [0] * (len(rankdir.CHECKPOINT_BUCKETS) + 1)
        self.checkpoint_seconds_sum = 0.0
        self.failed_checkpoints = 0
        self.last_checkpoint_time = 0.0
        self._gauges: dict[str, float] = {}
        # ``record``'s scalars (``RECORDED_GAUGES``, None until recorded): list items are cheaper to
        # store than dict entries; ``gauges`` merges them in when read.
        self._recorded: list[float | None] = [None] * len(RECORDED_GAUGES)
        self.nonfinite_loss = 0
        # Queues the hot path appends to and ``_fold`` empties: step entry readings and negated exit
        # readings (``(end,)`` for a step that raised); (time, seconds) reports of collective and
        # data-wait time, timed so that the fold can tell which step or phase they fell in.
        self._step_events: list[Any] = []
        self._coll_events: list[tuple[float, float]] = []
        self._dw_events: list[tuple[float, float]] = []
        self._fold_lock = threading.Lock()
        # Step entries are perf_counter readings; the first one becomes wall time with this offset.
        self._wall_minus_perf = _wall() - _perf()

        self.flush_errors = 0
        self.sampler_errors = 0
        self._warned_kinds: set[str] = set()
        self._samplers: list[Callable[[TrainingMonitor], None]] = []
        self._mfu_mark: tuple[float, int, int] | None = None
        self._phases = _PhaseTable()
        self._data_wait = self._phases["data_wait"]
        self._collective = self._phases["collective"]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        # The lifecycle (see .lifecycle), and what the current phase is read from besides the phases'
        # own readings: checkpoint()/badput() blocks open now, and the launch time of the last bucket's
        # collective of a step still in flight (the comm hook's), that is the rank waiting for its peers.
        self._state = RUNNING
        self._end_time: float | None = None
        self._failure: rankdir.Failure | None = None
        self._open_timed: list[_Timed] = []
        self._waiting: dict[int, float] = {}
        self._wait_tokens = itertools.count()
        self._created_perf = _perf()
        # Held while a snapshot is built and written, so a final snapshot is never overtaken by an
        # older one; reentrant for a signal handler that runs inside a flush of the same thread.
        self._write_lock = threading.RLock()
        self._end_lock = threading.RLock()
        # The hot-path calls are closures bound on the instance, chosen once here: no ``enabled`` test,
        # no method binding and no ``self.`` lookups per call (the class methods below document them).
        if self.enabled:
            self.step, self._step_totals = _make_step(self)  # type: ignore[method-assign]
            # ``monitor.phase(name)`` becomes a C-level dict lookup: the phase objects are reused.
            self.phase = self._phases.__getitem__  # type: ignore[method-assign,assignment]
            self.record = _make_record(self)  # type: ignore[method-assign]
        else:
            self.step = _null_step  # type: ignore[method-assign,assignment]
            self._step_totals = _no_totals
            self.phase = _null_phase  # type: ignore[method-assign,assignment]
            self.record = _null_record  # type: ignore[method-assign]
        if self.enabled:
            assert self.directory is not None
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                rankdir.remove_leftovers(self.directory, self.job, self.rank)
            except OSError:
                self.flush_errors += 1
            self.flush()
            self._thread = threading.Thread(target=self._run, name="mlops-obs-flush", daemon=True)
            self._thread.start()
            lifecycle.HOOKS.register(self)

    # --- hot path (each instance binds its own closures over these; see __init__) -----------------

    def step(self, samples: int = 0, tokens: int = 0) -> _StepBase | _Null:
        """Time one training step: ``with monitor.step(samples=len(batch)): ...``.

        A step that raises counts as a failed step (its time is ``failed_step`` badput)."""
        return self.step(samples, tokens)  # the instance's own closure (``_make_step``)

    def phase(self, name: str) -> _PhaseBase | _Null:
        """Time a part of the step (``data_wait``, ``forward``, ``backward``, ``optimizer``, ...)."""
        return self.phase(name)  # the instance's own phase table lookup

    def record(self, loss: float | None = None, grad_norm: float | None = None, lr: float | None = None) -> None:
        """Record the step's scalars; a NaN or infinite loss is also counted."""
        return self.record(loss, grad_norm, lr)  # the instance's own closure (``_make_record``)

    def add_collective(self, seconds: float) -> None:
        """Time a collective took, from launch to completion (called by the DDP comm hook).

        It counts as the ``collective`` phase and is taken out of whichever phase was open (usually
        ``backward``), and out of the step's compute time that the straggler score compares, because
        waiting for a slow peer is not this rank's own slowness. The report is queued with its time,
        for the fold to find the phase and step it fell in.
        """
        q = self._coll_events
        q.append((_perf(), seconds))
        self.collective_seconds += seconds
        self.collectives += 1
        self._collective.total += seconds
        if len(q) > _SYNC_FOLD_EVENTS:  # no steps to fold it and the flush thread behind: fold here
            self._fold_safely()

    def add_data_wait(self, seconds: float) -> None:
        """Time spent waiting for the next batch (the DataLoader wrapper reports it)."""
        q = self._dw_events
        q.append((_perf(), seconds))
        self._data_wait.total += seconds
        if len(q) > _SYNC_FOLD_EVENTS:
            self._fold_safely()

    def _wait_begin(self) -> int:
        """The rank started waiting for its peers (the last gradient bucket's collective was launched:
        nothing of its own is left in the step's backward); returns the token for :meth:`_wait_end`.
        Called from DDP's comm hook; dict updates are atomic, so no lock is needed."""
        token = next(self._wait_tokens)
        self._waiting[token] = _perf()
        return token

    def _wait_end(self, token: int) -> None:
        self._waiting.pop(token, None)

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
        q = self._dw_events
        report = q.append
        while True:
            t0 = _perf()
            try:
                item = next(it)
            except StopIteration:
                t1 = _perf()
                report((t1, t1 - t0))
                p.total += t1 - t0
                return
            t1 = _perf()
            report((t1, t1 - t0))
            p.total += t1 - t0
            if len(q) > _SYNC_FOLD_EVENTS:
                self._fold_safely()
            yield item

    def add_sampler(self, fn: Callable[[TrainingMonitor], None]) -> None:
        """Run ``fn(monitor)`` on the flush thread before each snapshot (CUDA memory, custom gauges).

        A sampler that raises is counted in ``sampler_errors`` and skipped for that flush.
        """
        self._samplers.append(fn)

    # --- hand-off ---------------------------------------------------------------------------------

    @property
    def gauges(self) -> dict[str, float]:
        """The rank's gauges: the last ``record``ed loss, grad norm and learning rate, ``mfu``, and
        whatever samplers set (they write into this dict). The recorded scalars are merged in here,
        so reading it is always current."""
        g = self._gauges
        for name, v in zip(RECORDED_GAUGES, self._recorded):
            if v is not None:
                g[name] = v
        return g

    @property
    def steps(self) -> int:
        """Successful steps so far."""
        self._fold_safely()
        return self._totals.steps

    @property
    def failed_steps(self) -> int:
        """Steps that raised."""
        self._fold_safely()
        return self._totals.failed_steps

    @property
    def failed_step_seconds(self) -> float:
        """Seconds spent in steps that raised."""
        self._fold_safely()
        return self._totals.failed_step_seconds

    @property
    def samples(self) -> int:
        """Samples of the successful steps."""
        return self._step_totals()[0]

    @property
    def tokens(self) -> int:
        """Tokens of the successful steps."""
        return self._step_totals()[1]

    @property
    def step_seconds_sum(self) -> float:
        """Seconds spent in successful steps."""
        self._fold_safely()
        return self._totals.step_seconds_sum

    @property
    def goodput_seconds(self) -> float:
        """Seconds of successful steps, less the data wait inside them."""
        self._fold_safely()
        return self._totals.goodput_seconds

    @property
    def last_step_perf(self) -> float:
        """``perf_counter()`` at the end of the last successful step (0 before)."""
        self._fold_safely()
        return self._totals.last_step_perf

    @property
    def step_buckets(self) -> list[int]:
        """Successful steps per ``rankdir.STEP_BUCKETS`` bucket (non-cumulative; the last is +Inf)."""
        self._fold_safely()
        return self._totals.buckets

    @property
    def first_step_time(self) -> float:
        """Unix time the first step started (0 before)."""
        self._fold_safely()
        first = self._totals.first_step_perf
        return first + self._wall_minus_perf if first else 0.0

    @property
    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase so far (a copy)."""
        self._fold_safely()
        return {name: p.folded + p.total for name, p in list(self._phases.items())}

    @property
    def last_step_time(self) -> float:
        """Unix time the last step finished (0 before the first), from the step's monotonic end."""
        last = self.last_step_perf
        if not last:
            return 0.0
        return _wall() - (_perf() - last)

    def state(self, fold_wait: float = -1) -> rankdir.Snapshot:
        """The snapshot written for the sidecar; a copy, safe to serialise off the training thread.

        ``fold_wait``: at most this many seconds to wait for a fold in progress elsewhere (a final
        snapshot taken from a signal handler must not wait on the thread it interrupted); -1 waits."""
        self._fold_safely(fold_wait)
        t = self._totals
        samples, tokens = self._step_totals()
        recent = sorted(t.recent)
        recent_wall = sorted(t.recent_wall)
        badput = dict(self.badput_seconds)
        badput["data_loading"] = badput.get("data_loading", 0.0) + self._data_wait.folded + self._data_wait.total
        if t.failed_step_seconds:
            badput["failed_step"] = badput.get("failed_step", 0.0) + t.failed_step_seconds
        first = self.first_step_time
        if first:
            badput["startup"] = badput.get("startup", 0.0) + max(0.0, first - self.start_time)
        return {
            "v": rankdir.SCHEMA_VERSION,
            "job": self.job,
            "rank": self.rank,
            "world_size": self.world_size,
            "node": self.node,
            "pid": self.pid,
            "pid_ns": self.pid_ns,
            "boot_id": self.boot_id,
            "start_time": self.start_time,
            "updated": _wall(),
            "state": self._state,
            "end_time": self._end_time,
            "failure": dict(self._failure) if self._failure is not None else None,  # type: ignore[typeddict-item]
            "phase": self.current_phase(),
            "steps": t.steps,
            "failed_steps": t.failed_steps,
            "samples": samples,
            "tokens": tokens,
            "step_seconds_sum": t.step_seconds_sum,
            "step_buckets": list(t.buckets),
            "phase_seconds": self.phase_seconds,
            # JSON has no NaN: a non-finite gauge (the loss that went NaN) travels as "nan"/"inf".
            "gauges": {k: (v if v - v == 0.0 else str(v)) for k, v in list(self.gauges.items())},
            "nonfinite_loss": self.nonfinite_loss,
            "last_step_time": self.last_step_time,
            # Medians of the recent steps, not the rings: the stall threshold multiplies the wall
            # time's, the straggler score compares the compute time's, and the sidecar reads every
            # rank's snapshot every round.
            "recent_steps": len(recent),
            "step_median": rankdir.median_sorted(recent_wall) if recent_wall else None,
            "step_compute_median": rankdir.median_sorted(recent) if recent else None,
            "goodput_seconds": t.goodput_seconds,
            "badput_seconds": badput,
            "checkpoint_buckets": list(self.checkpoint_buckets),
            "checkpoint_seconds_sum": self.checkpoint_seconds_sum,
            "failed_checkpoints": self.failed_checkpoints,
            "last_checkpoint_time": self.last_checkpoint_time,
            "collectives": self.collectives,
        }

    def current_phase(self) -> rankdir.Phase:
        """Where the rank is now and since when: waiting for its peers in a collective, else the
        innermost open phase, ``checkpoint()`` or ``badput()`` block, or step, else ``between_steps``.

        Read from the hot path's latest readings (a list's last item is read atomically), so it is
        current without a fold and costs the training thread nothing."""
        now_p, now_w = _perf(), _wall()
        waiting = list(self._waiting.values())
        name: str | None = None
        start = 0.0
        if waiting:
            name, start = "collective", min(waiting)
        else:
            for p in list(self._phases.values()):
                tail = p.events[-1:]
                opened = (tail[0] if tail[0] > 0.0 else None) if tail else p.open_start
                if opened is not None and opened > start:
                    name, start = p.name, opened
            for timed in list(self._open_timed):
                if timed.start > start:
                    name, start = timed.phase, timed.start
            tail = self._step_events[-1:]
            last_end = self._totals.last_step_perf or self._created_perf
            in_step: float | None = self._totals.open_step[0] if self._totals.open_step is not None else None
            if tail:
                x = tail[0]
                if isinstance(x, tuple):  # a failed step's end
                    in_step, last_end = None, x[0]
                elif x > 0.0:
                    in_step = x
                else:
                    in_step, last_end = None, -x
            if in_step is not None and in_step > start:
                name, start = "step", in_step
            if name is None:
                name, start = "between_steps", last_end
        name = name[: rankdir.PHASE_NAME_MAX]
        if name == "collective":
            activity = "collective"
        elif name in self.pause_phases:
            activity = "pause"
        else:
            activity = "work"
        return {"name": name, "activity": activity, "since": now_w - (now_p - start)}

    @property
    def lifecycle_state(self) -> str:
        """``running``, ``finished`` or ``failed``."""
        return self._state

    @property
    def failure(self) -> rankdir.Failure | None:
        """Why the rank failed (``reason``, ``detail``), once it has."""
        return self._failure

    # --- folding the hot path's readings (flush thread, or whoever reads a derived figure) ----------

    def _fold(self, wait: float = -1) -> None:
        """Turn the readings queued by the hot path into the step, phase and goodput figures.

        Runs under a lock, so the flush thread and a training thread that folds itself (see
        ``_SYNC_FOLD_EVENTS``) never both take the same readings: each reading leaves its queue with
        the fold that counts it, so no step is lost or counted twice. The cut is every queue's length,
        read in one C call (no bytecode runs in between, so no other thread can append meanwhile): a
        step's exit is then never taken without the phase exits and the collective or data-wait
        reports that came before it. The hot path only appends, so taking those prefixes afterwards
        is safe. The arithmetic is :mod:`mlops_obs.instrument.fold`'s.
        """
        if not self._fold_lock.acquire(timeout=wait):
            return
        try:
            phases = list(self._phases.values())
            queues = [self._step_events, self._coll_events, self._dw_events, *(p.events for p in phases)]
            lengths = list(map(len, queues))
            taken = []
            for q, n in zip(queues, lengths):
                taken.append(q[:n])
                del q[:n]
            steps, coll, marks = taken[0], taken[1], taken[2]
            for p, items in zip(phases, taken[3:]):
                if items or p.open_start is not None:
                    fold_phase(p, items, coll, marks if p is self._data_wait else None)
            if steps or self._totals.open_step is not None:
                fold_steps(self._totals, steps, coll, marks)
        finally:
            self._fold_lock.release()

    def _fold_safely(self, wait: float = -1) -> None:
        """``_fold`` for the training thread (a derived figure read, or the flush thread behind): like
        a flush, it must never raise into the loop, so a failure is counted in ``flush_errors``."""
        try:
            self._fold(wait)
        except Exception:
            self.flush_errors += 1

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
        self._gauges["mfu"] = flops / ((now - mark[0]) * self.peak_flops)

    def flush(self) -> None:
        if not self.enabled or self.directory is None or os.getpid() != self.pid:
            return  # (a forked child, a DataLoader worker, is not this rank and writes nothing)
        try:
            with self._write_lock:
                self._fold()  # first, so that samplers and MFU see this interval's steps
                self._sample()
                rankdir.write(self.directory, self.job, self.rank, self.state())
        except Exception:  # never into the training loop
            self.flush_errors += 1

    def _write_final(self) -> None:
        """The snapshot that says how the rank ended, written now: no samplers (a CUDA call from a
        signal handler could hang), and no unbounded wait for the flush thread or a fold in progress."""
        if not self.enabled or self.directory is None or os.getpid() != self.pid:
            return
        held = self._write_lock.acquire(timeout=FINAL_WRITE_WAIT_SECONDS)
        try:
            rankdir.write(self.directory, self.job, self.rank, self.state(FINAL_WRITE_WAIT_SECONDS))
        except Exception:
            self.flush_errors += 1
        finally:
            if held:
                self._write_lock.release()

    def _end(self, state: str, reason: str = "", detail: str = "") -> None:
        """The rank ended (``finished``, or ``failed`` with why): recorded and written at once. A
        failure overrides an earlier finish (a crash after ``close()``), never the other way round,
        and the first failure is the one kept."""
        # Held until the snapshot is written: a second thread ending the rank (a signal seen by the
        # watcher and by the main thread's handler) returns only once the first one's write is done,
        # so neither terminates the process with the final snapshot half written.
        held = self._end_lock.acquire(timeout=2 * FINAL_WRITE_WAIT_SECONDS)
        try:
            if state == FAILED:
                if self._state == FAILED:
                    return
                self._failure = {"reason": reason, "detail": rankdir.failure_detail(detail)}
            elif self._state != RUNNING:
                return
            self._state = state
            self._end_time = _wall()
            self._write_final()
        finally:
            if held:
                self._end_lock.release()

    def _flush_wait(self) -> float:
        """Seconds until the next flush: the fixed interval, or just before the sidecar's next round."""
        if self.flush_interval is not None:
            return self.flush_interval
        now = _wall()
        try:
            c = rankdir.cadence.read(self.directory, now) if self.directory is not None else None
        except Exception:  # never into the flush thread: a fallback interval instead
            c = None
        return rankdir.cadence.next_flush(c, now, DEFAULT_FLUSH_INTERVAL)

    def _run(self) -> None:
        while not self._stop.wait(self._flush_wait()):
            self.flush()

    def close(self, error: BaseException | None = None) -> None:
        """Write the final snapshot and stop the flush thread (also runs at interpreter exit).

        The rank is then ``finished``, or ``failed`` when ``error`` is given (the job stopped on an
        error it handled: ``close(error=exc)``) or a signal stopped it. Closing again does nothing but
        record a failure the first close did not know of."""
        failure = lifecycle.HOOKS.failure_of(error)
        if failure is not None:
            self._end(FAILED, *failure)
        if self._closed:
            return
        self._closed = True
        with self._end_lock:
            if self._state == RUNNING:
                self._state = FINISHED
                self._end_time = _wall()
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close(error=ev)


def _pid_identity() -> tuple[int | None, str | None]:
    """The pid namespace (its inode) this process's pid is numbered in, and the kernel's boot id: with
    them the sidecar knows whether it can see this pid, and only then takes its absence for a death."""
    try:
        ns: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = None
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot: str | None = f.read(64).strip() or None
    except (OSError, ValueError):
        boot = None
    return ns, boot


def _process_start_time() -> float:
    """When this process started (what ``process_start_time_seconds`` means), for the startup badput."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:
        return _wall()


def _make_step(m: TrainingMonitor) -> tuple[Callable[..., _StepBase], Callable[[], tuple[int, int]]]:
    """``monitor.step`` of an enabled monitor, and a function that reads its sample and token totals.

    ``step`` stores its arguments in closure cells and returns the monitor's one step context
    manager, whose entry queues a clock reading (:func:`_recorder`) and whose exit queues the
    negated end reading (``(end,)`` for a step that raised) and adds the samples and tokens up in
    closure cells. ``__exit__`` is a ``staticmethod`` closure, so ``with`` binds no method per step.
    The rest (count, histogram, goodput, compute time) is :meth:`TrainingMonitor._fold`'s work. The
    totals are read without a fold, so a snapshot taken while a step exits may count its samples one
    step before its duration (never twice, never lost).
    """
    events = m._step_events
    append = events.append
    fold = m._fold_safely
    cur_samples = cur_tokens = 0
    samples_total = tokens_total = 0

    def __exit__(et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        nonlocal samples_total, tokens_total
        if et is None:
            append(-_perf())
            samples_total += cur_samples
            tokens_total += cur_tokens
        else:
            append((_perf(),))
        if len(events) > _SYNC_FOLD_EVENTS:  # the flush thread is behind: fold here, memory stays bounded
            fold()

    cls = type("_Step", (_StepBase,), {"__slots__": (), "__enter__": staticmethod(_recorder(append)),
                                        "__exit__": staticmethod(__exit__)})  # fmt: skip
    ctx: _StepBase = cls()

    def step(samples: int = 0, tokens: int = 0) -> _StepBase:
        nonlocal cur_samples, cur_tokens
        cur_samples = samples
        cur_tokens = tokens
        return ctx

    def totals() -> tuple[int, int]:
        return samples_total, tokens_total

    return step, totals


def _make_record(m: TrainingMonitor) -> Callable[..., None]:
    """``monitor.record`` of an enabled monitor; ``float()`` only for what is not a float already
    (a tensor, a NumPy scalar). The values go into the items of a list that is a closure cell
    (``RECORDED_GAUGES``' order; ``monitor.gauges`` merges them in), a third cheaper than dict entries."""
    r = m._recorded

    def record(loss: Any = None, grad_norm: Any = None, lr: Any = None) -> None:
        if loss is not None:
            if loss.__class__ is not float:
                loss = float(loss)
            r[0] = loss
            if loss - loss:  # NaN or +-inf (both give NaN, which is true), without a function call
                m.nonfinite_loss += 1
        if grad_norm is not None:
            r[1] = grad_norm if grad_norm.__class__ is float else float(grad_norm)
        if lr is not None:
            r[2] = lr if lr.__class__ is float else float(lr)

    return record


def _null_step(samples: int = 0, tokens: int = 0) -> _Null:
    return _NULL


def _null_phase(name: str) -> _Null:
    return _NULL


def _null_record(loss: Any = None, grad_norm: Any = None, lr: Any = None) -> None:
    return None


def _no_totals() -> tuple[int, int]:
    return 0, 0
