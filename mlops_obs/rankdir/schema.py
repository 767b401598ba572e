"""The snapshot a training rank hands to the sidecar: its fields, its version, and the previous version's reader.

A snapshot is one JSON object per (job, rank), replaced as a whole once per flush interval (see
:mod:`mlops_obs.rankdir`). ``v`` is :data:`SCHEMA_VERSION`, bumped on every change of a field's name,
type or meaning. A reader accepts the current version and the one before it, upgraded to the current
shape (:func:`parse`), so a sidecar can be upgraded before or after the ranks it reads; anything
else is not a snapshot it understands and is skipped.

Versions:

* 1: the rank's recent step compute times as a window (``recent_step_seconds``, up to 256 floats).
* 2: their median and count instead (``recent_step_median``, ``recent_steps``): the sidecar needs only
  the median for the straggler score, and parsing and sorting eight windows every second costs a
  fifth of its training collector's round.
"""

from __future__ import annotations

from typing import Any, Required, TypedDict

SCHEMA_VERSION = 2

# Step-duration histogram buckets (seconds): from sub-millisecond CPU toys to minute-long LLM steps.
STEP_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Checkpoint-save buckets (seconds): from an in-memory toy to a multi-terabyte sharded save.
CHECKPOINT_BUCKETS: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Snapshot(TypedDict, total=False):
    """Version 2, as :class:`mlops_obs.instrument.TrainingMonitor` writes it (every key). A reader
    must still expect any key but ``v`` to be missing or of the wrong type: the file is input."""

    v: Required[int]
    job: str
    rank: int
    world_size: int
    node: str
    pid: int
    start_time: float  # Unix time the rank's process started
    updated: float  # Unix time this snapshot was taken
    closed: bool  # the rank closed its monitor: a silent heartbeat is not a stall
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
    recent_step_median: float | None  # their median compute time (None with no recent step)
    goodput_seconds: float
    badput_seconds: dict[str, float]
    checkpoint_buckets: list[int]  # per CHECKPOINT_BUCKETS bucket, the last is +Inf
    checkpoint_seconds_sum: float
    failed_checkpoints: int
    last_checkpoint_time: float
    collectives: int


def median_sorted(xs: list[float]) -> float:
    """The median of a sorted, non-empty list: how a rank's recent step times become one figure, on
    the rank's side and, for a version-1 snapshot, on the sidecar's."""
    n = len(xs)
    mid = n // 2
    return xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2.0


def parse(data: Any) -> Snapshot | None:
    """A decoded JSON document as a current-version snapshot; ``None`` for anything else."""
    if not isinstance(data, dict):
        return None
    v = data.get("v")
    if v == SCHEMA_VERSION:
        return data  # type: ignore[return-value]
    if v == SCHEMA_VERSION - 1:
        return _from_v1(data)
    return None


def _from_v1(data: dict[str, Any]) -> Snapshot:
    """Version 1 upgraded: the window of recent step times becomes its count and median."""
    out = dict(data)
    raw = out.pop("recent_step_seconds", None)
    if isinstance(raw, list):
        try:  # the ring holds floats; map(float) is the C-speed path, the filter only for a hand-edited file
            recent = sorted(map(float, raw))
        except (TypeError, ValueError):
            recent = sorted(float(x) for x in raw if isinstance(x, int | float) and not isinstance(x, bool))
        out["recent_steps"] = len(recent)
        out["recent_step_median"] = median_sorted(recent) if recent else None
    out["v"] = SCHEMA_VERSION
    return out  # type: ignore[return-value]
