"""The snapshot a training rank hands to the sidecar: its fields, its version, and the previous version's reader.

A snapshot is one JSON object per (job, rank), replaced as a whole once per flush interval (see
:mod:`mlops_obs.rankdir`). ``v`` is :data:`SCHEMA_VERSION`, bumped on every change of a field's name,
type or meaning. A reader accepts the current version and the one before it, upgraded to the current
shape (:func:`parse`), so a sidecar can be upgraded before or after the ranks it reads; anything
else is not a snapshot it understands and is skipped.

Versions:

* 2: the recent steps' median compute time and count (``recent_step_median``, ``recent_steps``), and
  ``closed`` once the monitor closed, whether the rank finished or crashed.
* 3: the rank's lifecycle instead of ``closed`` (``state``: running, finished or failed; ``end_time``;
  ``failure``: why it failed), the phase it is in and since when (``phase``), the median wall time of
  its recent steps beside their median compute time (``step_median``, ``step_compute_median``), and
  which pid namespace and boot its ``pid`` belongs to (``pid_ns``, ``boot_id``), so the sidecar can tell
  a rank that vanished (SIGKILL, the OOM killer) from one it cannot see. A version-2 snapshot reads as
  running or (``closed``) finished, with no phase, no wall-time median, and never as vanished.
"""

from __future__ import annotations

import re
from typing import Any, Required, TypedDict

SCHEMA_VERSION = 3

# A rank's lifecycle (``state``) and why a failed one failed (``failure["reason"]``).
RUNNING, FINISHED, FAILED = "running", "finished", "failed"
STATES: tuple[str, ...] = (RUNNING, FINISHED, FAILED)
FAILURE_REASONS: tuple[str, ...] = ("exception", "signal", "exit_code", "vanished")
# What a rank does in its current phase (``phase["activity"]``): its own work, waiting for its peers in
# a collective, or an expected pause the job declared (checkpoint, evaluation).
ACTIVITIES: tuple[str, ...] = ("work", "collective", "pause")
DETAIL_MAX = 128
_DETAIL_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")
# Phase names are the job's own strings: bounded so a hostile or buggy one cannot make a huge label.
PHASE_NAME_MAX = 64

# Step-duration histogram buckets (seconds): from sub-millisecond CPU toys to minute-long LLM steps.
STEP_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Checkpoint-save buckets (seconds): from an in-memory toy to a multi-terabyte sharded save.
CHECKPOINT_BUCKETS: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Failure(TypedDict):
    reason: str  # one of FAILURE_REASONS
    detail: str  # the exception type's qualified name, the signal's name, the exit status; "" if none


class Phase(TypedDict):
    name: str  # the innermost open phase, "collective", "checkpoint", a badput kind, "step", "between_steps"
    activity: str  # one of ACTIVITIES
    since: float  # Unix time the rank entered it


class Snapshot(TypedDict, total=False):
    """Version 3, as :class:`mlops_obs.instrument.TrainingMonitor` writes it (every key). A reader
    must still expect any key but ``v`` to be missing or of the wrong type: the file is input."""

    v: Required[int]
    job: str
    rank: int
    world_size: int
    node: str
    pid: int
    pid_ns: int | None  # inode of the pid namespace ``pid`` is numbered in (None: unknown)
    boot_id: str | None  # the kernel's boot id: the machine (and boot) the pid is on (None: unknown)
    start_time: float  # Unix time the rank's process started
    updated: float  # Unix time this snapshot was taken
    state: str  # one of STATES
    end_time: float | None  # Unix time the rank finished or failed (None while running)
    failure: Failure | None  # set exactly when state is "failed"
    phase: Phase | None  # where the rank is now (None before the monitor knows)
    steps: int
    failed_steps: int
    samples: int
    tokens: int
    step_seconds_sum: float
    step_buckets: list[int]  # per STEP_BUCKETS bucket, not cumulative; the last is +Inf
    phase_seconds: dict[str, float]
    gauges: dict[str, float | str]  # a non-finite value as "nan", "inf" or "-inf" (JSON has no NaN)
    nonfinite_loss: int
    last_step_time: float
    recent_steps: int  # steps in the recent window
    step_median: float | None  # their median wall time (None with no recent step)
    step_compute_median: float | None  # their median compute time: wall time less collective waits
    goodput_seconds: float
    badput_seconds: dict[str, float]
    checkpoint_buckets: list[int]  # per CHECKPOINT_BUCKETS bucket, the last is +Inf
    checkpoint_seconds_sum: float
    failed_checkpoints: int
    last_checkpoint_time: float
    collectives: int


def median_sorted(xs: list[float]) -> float:
    """The median of a sorted, non-empty list: how a rank's recent step times become one figure."""
    n = len(xs)
    mid = n // 2
    return xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2.0


def failure_detail(text: object) -> str:
    """``text`` as a ``failure["detail"]``: at most :data:`DETAIL_MAX` characters of
    ``[A-Za-z0-9_.:-]``, others replaced by ``_`` (it becomes a label value; the log has the rest)."""
    return _DETAIL_UNSAFE.sub("_", str(text)[:DETAIL_MAX])


def parse(data: Any) -> Snapshot | None:
    """A decoded JSON document as a current-version snapshot; ``None`` for anything else."""
    if not isinstance(data, dict):
        return None
    v = data.get("v")
    if v == SCHEMA_VERSION:
        return data  # type: ignore[return-value]
    if v == SCHEMA_VERSION - 1:
        return _from_v2(data)
    return None


def _from_v2(data: dict[str, Any]) -> Snapshot:
    """Version 2 upgraded: ``closed`` becomes finished (version 2 could not tell a crash from a finish),
    the compute-time median keeps its meaning under its new name, and nothing says which pid namespace
    the pid is in, so such a rank is never taken for vanished."""
    out = dict(data)
    closed = out.pop("closed", False) is True
    out["state"] = FINISHED if closed else RUNNING
    out["end_time"] = out.get("updated") if closed else None
    out["failure"] = None
    out["phase"] = None
    out["step_compute_median"] = out.pop("recent_step_median", None)
    out["step_median"] = None
    out["v"] = SCHEMA_VERSION
    return out  # type: ignore[return-value]
