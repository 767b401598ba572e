"""Training collector: turns the ranks' snapshot files in ``--multiproc-dir`` into metric families.

Besides the ranks' own figures it says how each rank's life goes: ``mlops_training_rank_state`` (an
enum, one series per state, as kube-state-metrics does), when and why it ended, and the phase it is in.
A snapshot still saying ``running`` whose process is provably gone is reported ``failed`` with reason
``vanished`` (SIGKILL, the OOM killer: see :mod:`.rank_liveness`), ended at its last write. Scores
across ranks (the straggler score) are recording rules over every sidecar, not computed here: one
sidecar sees only the ranks of its own node or pod.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, register
from mlops_obs.collectors.rank_liveness import Liveness
from mlops_obs.metrics import FamilyBuilder, sample
from mlops_obs.rankdir import (
    ACTIVITIES,
    CHECKPOINT_BUCKETS,
    FAILED,
    FAILURE_REASONS,
    PHASE_NAME_MAX,
    RUNNING,
    STATES,
    STEP_BUCKETS,
    RankDirectory,
    Snapshot,
    failure_detail,
    file_name,
    read,
    validate,
)

LABELS = ["job", "rank", "node"]

GAUGES = {
    "loss": ("mlops_training_loss", "Last training loss recorded."),
    "grad_norm": ("mlops_training_grad_norm", "Last gradient norm recorded."),
    "learning_rate": ("mlops_training_learning_rate", "Last learning rate recorded."),
    "mfu": ("mlops_training_mfu_ratio", "Model FLOPs utilisation over the last flush interval (0-1)."),
    "cuda_memory_allocated": ("mlops_training_cuda_memory_allocated_bytes", "CUDA memory held by tensors."),
    "cuda_memory_reserved": ("mlops_training_cuda_memory_reserved_bytes", "CUDA memory held by the caching allocator."),
    "cuda_memory_peak": ("mlops_training_cuda_memory_peak_bytes", "Peak CUDA memory held by tensors."),
}

# A rank's step medians are published once its recent window holds this many steps (the first steps
# include warm-up, and a median of two means little).
MEDIAN_MIN_STEPS = 5
# A reason that is not one of the schema's (a hand-edited or foreign file) is reported as this.
UNKNOWN_REASON = "unknown"


# The families in their exposition order: name -> (type, help). Counters without their _total suffix.
FAMILIES: dict[str, tuple[str, str]] = {
    "mlops_training_steps": ("counter", "Training steps completed."),
    "mlops_training_failed_steps": ("counter", "Steps that raised an exception."),
    "mlops_training_samples": ("counter", "Training samples processed."),
    "mlops_training_tokens": ("counter", "Training tokens processed."),
    "mlops_training_nonfinite_loss": ("counter", "Steps whose loss was NaN or infinite."),
    "mlops_training_phase_seconds": ("counter", "Seconds spent in each phase of the step."),
    "mlops_training_step_duration_seconds": ("histogram", "Wall time of one training step."),
    "mlops_training_last_step_timestamp_seconds": ("gauge", "Unix time the last step finished."),
    "mlops_training_process_start_time_seconds": ("gauge", "Unix time this rank's process started."),
    "mlops_training_world_size": ("gauge", "Ranks in the job."),
    "mlops_training_rank_state": (
        "gauge",
        "The rank's lifecycle: 1 for its current state (running, finished, failed), 0 for the other two.",
    ),
    "mlops_training_rank_end_timestamp_seconds": (
        "gauge",
        "Unix time the rank finished or failed (a vanished rank: its last snapshot); absent while running.",
    ),
    "mlops_training_rank_failure_info": (
        "gauge",
        "Why the rank failed: reason (exception, signal, exit_code, vanished) and detail (exception type, "
        "signal name, exit status); always 1, present while the rank is failed.",
    ),
    "mlops_training_current_phase_start_timestamp_seconds": (
        "gauge",
        "Unix time the rank entered the phase it is in now; activity: work, collective (waiting for its "
        "peers) or pause (checkpoint, evaluation).",
    ),
    "mlops_training_step_median_seconds": ("gauge", "Median wall time of the rank's recent steps."),
    "mlops_training_step_compute_median_seconds": (
        "gauge",
        "Median compute time (wall time less collective waits) of the rank's recent steps.",
    ),
    "mlops_training_goodput_seconds": ("counter", "Seconds of productive training (steps, less data wait)."),
    "mlops_training_badput_seconds": (
        "counter",
        "Seconds that were not productive training, by kind (startup, data_loading, checkpoint_save, ...).",
    ),
    "mlops_training_checkpoint_duration_seconds": ("histogram", "Wall time of a successful checkpoint save."),
    "mlops_training_checkpoint_failures": ("counter", "Checkpoint saves that raised."),
    "mlops_training_last_checkpoint_timestamp_seconds": (
        "gauge",
        "Unix time the last successful checkpoint save finished.",
    ),
    **{name: ("gauge", doc) for name, doc in GAUGES.values()},
}
_PER_RANK_COUNTERS = (
    "mlops_training_steps",
    "mlops_training_failed_steps",
    "mlops_training_samples",
    "mlops_training_tokens",
    "mlops_training_nonfinite_loss",
)


# What the rank directory refused, whichever collector read the file first (the directory is shared).
SNAPSHOT_FAMILIES: dict[str, tuple[str, str]] = {
    "mlops_training_snapshot_errors": (
        "counter",
        "Snapshot files in --multiproc-dir skipped (not read, or not used), by reason; once per version of a file.",
    ),
    "mlops_training_snapshot_dropped_series": (
        "counter",
        "Phases and badput kinds left out of snapshots that were used: past the per-file cap, or a name too long.",
    ),
}


def snapshot_skips(ranks: RankDirectory, out: FamilyBuilder | None = None) -> list[Metric]:
    """The directory's skip counters, every reason present from the start (so ``increase()`` sees the
    first one)."""
    out = out or FamilyBuilder(SNAPSHOT_FAMILIES)
    fams = out.round(*SNAPSHOT_FAMILIES)
    for key, reasons, counts in (
        ("mlops_training_snapshot_errors", validate.REASONS, ranks.errors),
        ("mlops_training_snapshot_dropped_series", validate.DROP_REASONS, ranks.dropped),
    ):
        for reason in reasons:
            fams.add(key, out.labels.get({"reason": reason}), counts.get(reason, 0))
    return fams.metrics()


def _valid_counts(counts: Any, bounds: tuple[float, ...]) -> bool:
    return isinstance(counts, list) and len(counts) == len(bounds) + 1


@register
class TrainingCollector(Collector):
    name = "training"
    help = "Training ranks' step metrics from the shared --multiproc-dir."

    _last: tuple[list[Snapshot], list[Metric]] | None = None

    def __init__(self, config: Mapping[str, Any], ranks: RankDirectory | None = None) -> None:
        super().__init__(config, ranks)
        self.out = FamilyBuilder(FAMILIES)
        self.liveness = Liveness()
        # id(snapshot) -> (the snapshot, its copy saying it vanished): one copy per snapshot object.
        self._copies: dict[int, tuple[Snapshot, Snapshot]] = {}
        self.skips = FamilyBuilder(SNAPSHOT_FAMILIES)

    def sample(self) -> Iterable[Metric]:
        snaps = sorted(self.judged(self.ranks.snapshots()), key=lambda s: (str(s.get("job")), _rank_key(s)))
        self.ranks.raise_problem()
        # No snapshot changed since the last round (ranks flush less often than we sample, or a
        # job is paused): the families would be the same, so they are not built again.
        last = self._last
        if last is not None and len(last[0]) == len(snaps) and all(a is b for a, b in zip(last[0], snaps)):
            fams = last[1]
        else:
            fams = families(snaps, self.out)
            self._last = (snaps, fams)
        return [*fams, *snapshot_skips(self.ranks, self.skips)]

    def judged(self, snaps: list[Snapshot]) -> list[Snapshot]:
        """The snapshots, a vanished rank's replaced by a copy saying so (the same object each round,
        so an unchanged directory still builds nothing)."""
        root = os.fspath(self.config.get("path.procfs") or "/proc")
        out = []
        for s in snaps:
            if self.liveness.vanished(s, root):
                s = self._vanished(s)
            out.append(s)
        self.liveness.end_round()
        return out

    def close(self) -> None:
        self.liveness.close()

    def _vanished(self, s: Snapshot) -> Snapshot:
        # The rank may have written its final snapshot and exited since the directory was read: read
        # its file again, and believe the file if it no longer says running.
        directory = self.ranks.path
        if directory is not None:
            try:
                fresh = read(os.path.join(directory, file_name(str(s.get("job", "")), int(s.get("rank", 0)))))
            except (TypeError, ValueError):
                fresh = None
            if fresh is not None and (fresh.get("state") != RUNNING or fresh.get("start_time") != s.get("start_time")):
                return fresh
        copies = self._copies
        hit = copies.get(id(s))
        if hit is not None and hit[0] is s:
            return hit[1]
        gone: Snapshot = {**s, "state": FAILED, "end_time": s.get("updated"),  # type: ignore[typeddict-item]
                          "failure": {"reason": "vanished", "detail": ""}}  # fmt: skip
        if len(copies) > 1024:
            copies.clear()
        copies[id(s)] = (s, gone)
        return gone


def _rank_key(s: Snapshot) -> int:
    try:
        return int(s.get("rank", 0))
    except (TypeError, ValueError):
        return 0


def _number(x: Any) -> float | None:
    """A finite number from the file, or ``None`` (missing, a string, a boolean, NaN)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def lifecycle(s: Snapshot) -> tuple[str, float | None, tuple[str, str] | None]:
    """(state, end time, (reason, detail) when failed) of a snapshot, whatever its fields hold: an
    unknown state reads as running, a failed rank without a readable reason as ``unknown``."""
    state = s.get("state")
    if state not in STATES:
        state = RUNNING
    end = _number(s.get("end_time")) if state != RUNNING else None
    failure = None
    if state == FAILED:
        f: Any = s.get("failure")
        reason = f.get("reason") if isinstance(f, dict) else None
        detail = f.get("detail") if isinstance(f, dict) else None
        failure = (reason if reason in FAILURE_REASONS else UNKNOWN_REASON,
                   failure_detail(detail) if isinstance(detail, str) else "")  # fmt: skip
    return str(state), end, failure


def current_phase(s: Snapshot) -> tuple[str, str, float] | None:
    """(phase, activity, since) of a snapshot, or ``None`` when it has none (or not a readable one)."""
    p: Any = s.get("phase")
    if not isinstance(p, dict):
        return None
    name, activity, since = p.get("name"), p.get("activity"), _number(p.get("since"))
    if not isinstance(name, str) or not name or since is None:
        return None
    return name[:PHASE_NAME_MAX], (activity if activity in ACTIVITIES else "work"), since


def families(snaps: list[Snapshot], out: FamilyBuilder | None = None) -> list[Metric]:
    """The families for these snapshots, every family present even when empty.

    ``out`` is the collector's builder (its label sets are interned across rounds); a fresh one
    without it.
    """
    out = out or FamilyBuilder(FAMILIES)
    fams = out.round(*FAMILIES)
    intern = out.labels.get
    with_label = out.labels.with_label
    steps, failed, samples_f, tokens, nonfinite = (fams.samples(n) for n in _PER_RANK_COUNTERS)
    phases = fams.samples("mlops_training_phase_seconds")
    heartbeat = fams.samples("mlops_training_last_step_timestamp_seconds")
    started = fams.samples("mlops_training_process_start_time_seconds")
    world = fams.samples("mlops_training_world_size")
    states = fams.samples("mlops_training_rank_state")
    ended = fams.samples("mlops_training_rank_end_timestamp_seconds")
    failures = fams.samples("mlops_training_rank_failure_info")
    now_in = fams.samples("mlops_training_current_phase_start_timestamp_seconds")
    median = fams.samples("mlops_training_step_median_seconds")
    compute_median = fams.samples("mlops_training_step_compute_median_seconds")
    goodput = fams.samples("mlops_training_goodput_seconds")
    badput = fams.samples("mlops_training_badput_seconds")
    ckpt_failed = fams.samples("mlops_training_checkpoint_failures")
    ckpt_last = fams.samples("mlops_training_last_checkpoint_timestamp_seconds")
    gauges = [(k, fams.samples(name)) for k, (name, _) in GAUGES.items()]

    for s in snaps:
        job, rank = str(s.get("job", "")), str(s.get("rank", ""))
        base = {"job": job, "rank": rank, "node": str(s.get("node", ""))}
        lb = intern(base)
        steps.append(sample("mlops_training_steps_total", lb, float(s.get("steps", 0))))
        failed.append(sample("mlops_training_failed_steps_total", lb, float(s.get("failed_steps", 0))))
        samples_f.append(sample("mlops_training_samples_total", lb, float(s.get("samples", 0))))
        tokens.append(sample("mlops_training_tokens_total", lb, float(s.get("tokens", 0))))
        nonfinite.append(sample("mlops_training_nonfinite_loss_total", lb, float(s.get("nonfinite_loss", 0))))
        for phase, secs in sorted((s.get("phase_seconds") or {}).items()):
            phases.append(sample("mlops_training_phase_seconds_total", with_label(lb, "phase", phase), float(secs)))
        counts: Any = s.get("step_buckets")
        if _valid_counts(counts, STEP_BUCKETS):
            fams.histogram("mlops_training_step_duration_seconds", lb, counts, STEP_BUCKETS,
                           s.get("step_seconds_sum", 0.0))  # fmt: skip
        goodput.append(sample("mlops_training_goodput_seconds_total", lb, float(s.get("goodput_seconds", 0.0))))
        for kind, secs in sorted((s.get("badput_seconds") or {}).items()):
            badput.append(sample("mlops_training_badput_seconds_total", with_label(lb, "kind", kind), float(secs)))
        # Only ranks that save checkpoints (often rank 0 alone) get checkpoint series.
        counts = s.get("checkpoint_buckets")
        saved = sum(map(int, counts)) if _valid_counts(counts, CHECKPOINT_BUCKETS) else None
        if saved is not None and (saved > 0 or s.get("failed_checkpoints")):
            fams.histogram("mlops_training_checkpoint_duration_seconds", lb, counts, CHECKPOINT_BUCKETS,
                           s.get("checkpoint_seconds_sum", 0.0))  # fmt: skip
            ckpt_failed.append(sample("mlops_training_checkpoint_failures_total", lb,
                                      float(s.get("failed_checkpoints", 0))))  # fmt: skip
        last_checkpoint: Any = s.get("last_checkpoint_time")
        if last_checkpoint:
            ckpt_last.append(sample("mlops_training_last_checkpoint_timestamp_seconds", lb, float(last_checkpoint)))
        last_step: Any = s.get("last_step_time")
        if last_step:
            heartbeat.append(sample("mlops_training_last_step_timestamp_seconds", lb, float(last_step)))
        started.append(sample("mlops_training_process_start_time_seconds", lb, float(s.get("start_time", 0.0))))
        world.append(sample("mlops_training_world_size", lb, float(s.get("world_size", 1))))
        state, end, failure = lifecycle(s)
        for st in STATES:
            states.append(sample("mlops_training_rank_state", with_label(lb, "state", st), float(st == state)))
        if end is not None:
            ended.append(sample("mlops_training_rank_end_timestamp_seconds", lb, end))
        if failure is not None:
            failures.append(sample("mlops_training_rank_failure_info",
                                   intern({**base, "reason": failure[0], "detail": failure[1]}), 1.0))  # fmt: skip
        now = current_phase(s)
        if now is not None:
            now_in.append(sample("mlops_training_current_phase_start_timestamp_seconds",
                                 intern({**base, "phase": now[0], "activity": now[1]}), now[2]))  # fmt: skip
        recent: Any = s.get("recent_steps")
        if isinstance(recent, int) and recent >= MEDIAN_MIN_STEPS:
            for key, fam, name in (("step_median", median, "mlops_training_step_median_seconds"),
                                   ("step_compute_median", compute_median,
                                    "mlops_training_step_compute_median_seconds")):  # fmt: skip
                v = _number(s.get(key))
                if v is not None and v >= 0:
                    fam.append(sample(name, lb, v))
        g: Any = s.get("gauges") or {}
        for k, fam in gauges:
            v = g.get(k)
            if v is not None:
                fam.append(sample(GAUGES[k][0], lb, float(v)))
    return fams.metrics()
