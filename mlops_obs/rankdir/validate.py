"""What the sidecar checks in every snapshot before a collector reads it, and why a file is refused.

The rank directory is input from other processes, in the DaemonSet layout from every pod on the
node (``docs/security.md``): one file with a field of the wrong type, a negative or astronomic
counter, fifty thousand phases or a label value of 200 kB must cost only that file, never the
training collector's round or another job's series. :func:`check` runs once per version of a file
(the directory's parse cache), after :func:`~mlops_obs.rankdir.schema.parse` upgraded an older
version, so it checks the current shape only. What it returns is what the collectors may assume:
every field present has its declared type and range (a field may be missing; readers default it).

The rules, per kind of field (:data:`FIELDS` maps every :class:`Snapshot` field to one):

* counters (steps, samples, seconds spent, bucket counts): a number (not a bool), finite, from 0 to
  :data:`MAX_COUNTER` (2^53, beyond which a float64 no longer counts by one). Below 0 is
  ``negative_counter``; non-finite or beyond the bound is ``out_of_range``. Refused, never clamped: a
  clamped counter would be a made-up value, and a counter that later drops back is a reset to
  Prometheus.
* timestamps: finite, from 0 (meaning "never") to :data:`MAX_TIMESTAMP`.
* gauges (loss, learning rate...): any finite number, or ``"nan"``, ``"inf"``, ``"-inf"`` (how the
  SDK writes a non-finite value; a NaN loss is the news, not an error).
* label values (job, node): a string of at most :data:`MAX_LABEL_LENGTH` characters; longer is
  ``label_too_long`` and refuses the file, since cutting an identity could merge two jobs.
* phase and badput maps (seconds by name, a series each): a value that is not a number refuses the
  file; an entry whose value a counter may not have (negative, beyond the bound), whose name is
  longer than :data:`MAX_LABEL_LENGTH`, or past the first :data:`MAX_SERIES_PER_MAP` in name order
  (the same ones every round) is left out and counted as dropped (:data:`DROP_REASONS`), and the rest
  of the file is used. Entries, not the file: each is its own series, and the SDK's phase arithmetic
  (a phase net of the collective time reported inside it) can leave one a little below zero.
* the lifecycle: ``state`` one of the schema's states; ``failure`` (or null) an object whose
  ``reason`` is one of the schema's reasons and whose ``detail`` is a string of at most its
  ``DETAIL_MAX`` characters; ``phase`` (or null) an object with a ``name`` of 1 to
  :data:`MAX_LABEL_LENGTH` characters (the collector keeps the first ``PHASE_NAME_MAX``), an
  ``activity`` of the schema's and a ``since`` timestamp. Anything else refuses the file as
  ``wrong_type`` or ``out_of_range``: these fields become label values and alert reasons.
* identity numbers: ``rank`` from 0, ``world_size`` and ``pid`` from 1, all below 2^31; whole
  numbers only. Whether the process under ``pid`` is the rank's is checked where it is used
  (:func:`mlops_obs.collectors.process.same_process`).

A new snapshot field gets its rule here, in :data:`FIELDS`; ``tests/test_rankdir_validate.py`` fails
while a field of :class:`Snapshot` has none.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from mlops_obs.rankdir.schema import (
    ACTIVITIES,
    CHECKPOINT_BUCKETS,
    DETAIL_MAX,
    FAILURE_REASONS,
    STATES,
    STEP_BUCKETS,
    Snapshot,
)

# Why a file was skipped: the values of mlops_training_snapshot_errors_total's ``reason`` label. A
# fixed set, so the label's cardinality is bounded whatever the files say.
NOT_REGULAR_FILE = "not_regular_file"  # a symbolic link, FIFO, device or directory under a snapshot's name
TOO_LARGE = "too_large"  # over MAX_BYTES
UNREADABLE = "unreadable"  # an I/O or permission error
NOT_JSON = "not_json"
UNKNOWN_VERSION = "unknown_version"  # JSON, but not an object of a schema version this sidecar reads
WRONG_TYPE = "wrong_type"
NEGATIVE_COUNTER = "negative_counter"
OUT_OF_RANGE = "out_of_range"  # not finite, or beyond the field's bound
LABEL_TOO_LONG = "label_too_long"
DUPLICATE_IDENTITY = "duplicate_identity"  # another file claims the same job/rank/node and is newer
TOO_MANY_FILES = "too_many_files"  # beyond the directory's cap on snapshots, and not among the newest
REASONS: tuple[str, ...] = (
    NOT_REGULAR_FILE, TOO_LARGE, UNREADABLE, NOT_JSON, UNKNOWN_VERSION, WRONG_TYPE, NEGATIVE_COUNTER,
    OUT_OF_RANGE, LABEL_TOO_LONG, DUPLICATE_IDENTITY, TOO_MANY_FILES,
)  # fmt: skip

# Why entries of an otherwise good file were left out: mlops_training_snapshot_dropped_series_total's
# ``reason`` label.
TOO_MANY_SERIES = "too_many_series"
DROP_REASONS: tuple[str, ...] = (TOO_MANY_SERIES, LABEL_TOO_LONG, NEGATIVE_COUNTER, OUT_OF_RANGE)

MAX_COUNTER = float(2**53)
MAX_TIMESTAMP = 1e10  # the year 2286
# Kubernetes names are at most 253 characters; a label value longer than this is not a name.
MAX_LABEL_LENGTH = 256
# Phases and badput kinds per file: a model timed per layer has a few dozen; thousands are a bug.
MAX_SERIES_PER_MAP = 128
MAX_RANK = 2**31 - 1
MAX_PID = 2**31 - 1  # pid_t; whether the pid is the rank's is the collectors' question (process.same_process)
GAUGE_STRINGS = frozenset(("nan", "inf", "-inf"))


class Invalid(Exception):
    """A file refused: ``reason`` is one of :data:`REASONS`, ``field`` the field that was wrong."""

    def __init__(self, reason: str, field: str = "") -> None:
        super().__init__(f"{reason}: {field}" if field else reason)
        self.reason = reason
        self.field = field


def _number(v: Any) -> float:
    # bool is an int to Python and a JSON literal of its own: never a number here.
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise Invalid(WRONG_TYPE)
    return float(v) if isinstance(v, float) or abs(v) <= MAX_COUNTER else math.copysign(math.inf, v)


def counter(v: Any) -> Any:
    x = _number(v)
    if x < 0:
        raise Invalid(NEGATIVE_COUNTER)
    if not x <= MAX_COUNTER:  # also NaN
        raise Invalid(OUT_OF_RANGE)
    return v


def timestamp(v: Any) -> Any:
    x = _number(v)
    if not 0 <= x <= MAX_TIMESTAMP:
        raise Invalid(OUT_OF_RANGE)
    return v


def gauge(v: Any) -> Any:
    if isinstance(v, str):
        if v not in GAUGE_STRINGS:
            raise Invalid(WRONG_TYPE)
        return v
    if not math.isfinite(_number(v)):
        raise Invalid(OUT_OF_RANGE)
    return v


def finite(v: Any) -> Any:
    if not math.isfinite(_number(v)):
        raise Invalid(OUT_OF_RANGE)
    return v


def label(v: Any) -> Any:
    if not isinstance(v, str):
        raise Invalid(WRONG_TYPE)
    if len(v) > MAX_LABEL_LENGTH:
        raise Invalid(LABEL_TOO_LONG)
    if not v.isascii():
        try:
            v.encode()
        except UnicodeEncodeError:  # a lone surrogate: only from a dict built in Python, never from JSON
            raise Invalid(WRONG_TYPE) from None
    return v


def whole(lo: int, hi: int) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int):
            raise Invalid(WRONG_TYPE)
        if not lo <= v <= hi:
            raise Invalid(OUT_OF_RANGE)
        return v

    return check


def one_of(values: tuple[str, ...]) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if not isinstance(v, str):
            raise Invalid(WRONG_TYPE)
        if v not in values:
            raise Invalid(OUT_OF_RANGE)
        return v

    return check


def text(limit: int, *, empty: bool = True) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        label(v)
        if len(v) > limit or (not empty and not v):
            raise Invalid(OUT_OF_RANGE)
        return v

    return check


def record(rules: dict[str, Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """An object with exactly these keys, each checked by its rule."""

    def check(v: Any) -> Any:
        if not isinstance(v, dict) or v.keys() != rules.keys():
            raise Invalid(WRONG_TYPE)
        for k, rule in rules.items():
            rule(v[k])
        return v

    return check


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def buckets(bounds: tuple[float, ...]) -> Callable[[Any], Any]:
    """Per-bucket counts, one more than ``bounds`` (the last is +Inf): another length is another schema."""

    n = len(bounds) + 1

    def check(v: Any) -> Any:
        if not isinstance(v, list) or len(v) != n:
            raise Invalid(WRONG_TYPE)
        # What the SDK writes (whole numbers in range) in three C-level passes; anything else rule by rule.
        if not (all(type(x) is int for x in v) and min(v) >= 0 and max(v) <= MAX_COUNTER):
            for x in v:
                counter(x)
        return v

    return check


def gauge_map(v: Any) -> Any:
    if not isinstance(v, dict):
        raise Invalid(WRONG_TYPE)
    for x in v.values():
        gauge(x)
    return v


def seconds_map(v: Any) -> Any:
    """Seconds by name (phases, badput kinds): each name becomes a label value, so :func:`check` caps
    the map rather than refusing it for its size."""
    if not isinstance(v, dict):
        raise Invalid(WRONG_TYPE)
    for k, x in v.items():
        _number(x)
        if not k.isascii():
            label(k[:MAX_LABEL_LENGTH])
    return v


FIELDS: dict[str, Callable[[Any], Any]] = {
    "v": whole(0, MAX_RANK),
    "job": label,
    "rank": whole(0, MAX_RANK),
    "world_size": whole(1, MAX_RANK),
    "node": label,
    "pid": whole(1, MAX_PID),
    "start_time": timestamp,
    "updated": timestamp,
    "pid_ns": optional(whole(0, 2**64 - 1)),
    "boot_id": optional(text(64)),
    "state": one_of(STATES),
    "end_time": optional(timestamp),
    "failure": optional(record({"reason": one_of(FAILURE_REASONS), "detail": text(DETAIL_MAX)})),
    "phase": optional(
        record({"name": text(MAX_LABEL_LENGTH, empty=False), "activity": one_of(ACTIVITIES), "since": timestamp})
    ),
    "steps": counter,
    "failed_steps": counter,
    "samples": counter,
    "tokens": counter,
    "step_seconds_sum": counter,
    "step_buckets": buckets(STEP_BUCKETS),
    "phase_seconds": seconds_map,
    "gauges": gauge_map,
    "nonfinite_loss": counter,
    "last_step_time": timestamp,
    "recent_steps": counter,
    "step_median": optional(finite),
    "step_compute_median": optional(finite),  # wall time less collective waits: a scheduling quirk can make it < 0
    "goodput_seconds": counter,
    "badput_seconds": seconds_map,
    "checkpoint_buckets": buckets(CHECKPOINT_BUCKETS),
    "checkpoint_seconds_sum": counter,
    "failed_checkpoints": counter,
    "last_checkpoint_time": timestamp,
    "collectives": counter,
}
# The maps whose keys become label values: capped per file.
LABELLED_MAPS = tuple(k for k, c in FIELDS.items() if c is seconds_map)


class Checked:
    """The outcome for one file: the snapshot to use (``None`` when refused), why it was refused, and
    what was dropped from it."""

    __slots__ = ("dropped", "reason", "snapshot")

    def __init__(self, snapshot: Snapshot | None, reason: str | None = None, dropped: Counter[str] | None = None):
        self.snapshot = snapshot
        self.reason = reason
        self.dropped = dropped


def check(snap: Snapshot) -> Checked:
    """``snap`` (a parsed, current-version snapshot) checked field by field, its labelled maps capped.

    Returns the same dict when nothing was dropped, else a copy with the capped maps. Never raises.
    """
    data: dict[str, Any] = snap  # type: ignore[assignment]
    for key, rule in FIELDS.items():
        if key in data:
            try:
                rule(data[key])
            except Invalid as e:
                return Checked(None, e.reason)
    dropped: Counter[str] | None = None
    capped: dict[str, Any] | None = None
    for key in LABELLED_MAPS:
        entries = data.get(key)
        if not entries:
            continue
        keep, dropped_here = _cap(entries)
        if dropped_here:
            dropped = (dropped or Counter()) + dropped_here
            capped = capped if capped is not None else dict(data)
            capped[key] = keep
    return Checked(capped if capped is not None else snap, None, dropped)  # type: ignore[arg-type]


def _cap(entries: dict[str, Any]) -> tuple[dict[str, Any], Counter[str]]:
    """The entries a labelled map may export (see the module's rules); what was left out, counted."""
    dropped: Counter[str] = Counter()
    if len(entries) <= MAX_SERIES_PER_MAP and all(
        len(k) <= MAX_LABEL_LENGTH and 0 <= x <= MAX_COUNTER for k, x in entries.items()
    ):
        return entries, dropped
    keep: dict[str, Any] = {}
    for name in sorted(entries):
        try:
            counter(entries[name])
        except Invalid as e:
            dropped[e.reason] += 1
            continue
        if len(name) > MAX_LABEL_LENGTH:
            dropped[LABEL_TOO_LONG] += 1
        elif len(keep) >= MAX_SERIES_PER_MAP:
            dropped[TOO_MANY_SERIES] += 1
        else:
            keep[name] = entries[name]
    return keep, dropped


def identity(snap: Snapshot) -> tuple[str, str, str]:
    """The (job, rank, node) a snapshot's series are labelled with: two files with one identity would
    make duplicate series."""
    return str(snap.get("job", "")), str(snap.get("rank", "")), str(snap.get("node", ""))
