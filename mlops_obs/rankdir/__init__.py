"""The hand-off between training ranks and the sidecar: one small JSON snapshot file per (job, rank).

Why snapshots and not prometheus_client's multiprocess mode: multiprocess mode writes an mmap'd file
per process and metric kind, takes a lock per update (0.96 us per ``inc`` here against 0.32 us), and
the library never removes a dead process's files, so restarting ranks make scrapes grow to seconds
(client_python#204, #367). Here a rank keeps plain Python numbers in memory and a background thread
writes the whole state once per flush interval (:func:`write`); the sidecar reads the directory
through one :class:`RankDirectory` and deletes files that stopped being updated for longer than its
retention.

Counters restart from zero when a rank restarts, exactly like a restarted process's own ``/metrics``;
Prometheus' ``rate()`` and ``increase()`` handle the reset. ``pid`` and ``start_time`` say which
incarnation wrote the file.

* :mod:`.schema`: the snapshot's fields (:class:`Snapshot`), :data:`SCHEMA_VERSION`, and the reader of
  the previous version;
* :mod:`.validate`: what the sidecar checks in every snapshot (types, ranges, caps) and the bounded
  reasons a file is skipped for;
* :mod:`.files`: file names, the rank's atomic write, the sidecar's guarded read;
* :mod:`.directory`: :class:`RankDirectory` (listing, parse cache, stale deletion, one file per
  job/rank/node);
* :mod:`.cadence`: the other direction, the sidecar's scrape cadence that the ranks' flushes follow.

This package imports neither the SDK (``instrument``) nor the collectors: both stand on it.
"""

from mlops_obs.rankdir import cadence, validate
from mlops_obs.rankdir.directory import DEFAULT_RETENTION, RankDirectory, Unlistable
from mlops_obs.rankdir.files import MAX_BYTES, SUFFIX, file_name, read, remove_leftovers, write
from mlops_obs.rankdir.schema import (
    ACTIVITIES,
    CHECKPOINT_BUCKETS,
    FAILED,
    FAILURE_REASONS,
    FINISHED,
    PHASE_NAME_MAX,
    RUNNING,
    SCHEMA_VERSION,
    STATES,
    STEP_BUCKETS,
    Failure,
    Phase,
    Snapshot,
    failure_detail,
    median_sorted,
    parse,
)

__all__ = [
    "ACTIVITIES",
    "CHECKPOINT_BUCKETS",
    "DEFAULT_RETENTION",
    "FAILED",
    "FAILURE_REASONS",
    "FINISHED",
    "MAX_BYTES",
    "PHASE_NAME_MAX",
    "RUNNING",
    "SCHEMA_VERSION",
    "STATES",
    "STEP_BUCKETS",
    "SUFFIX",
    "Failure",
    "Phase",
    "RankDirectory",
    "Snapshot",
    "Unlistable",
    "cadence",
    "failure_detail",
    "file_name",
    "median_sorted",
    "parse",
    "read",
    "remove_leftovers",
    "validate",
    "write",
]
