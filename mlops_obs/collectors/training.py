"""Training collector: turns the ranks' snapshot files in ``--multiproc-dir`` into metric families.

It also computes what no single rank can: the straggler score, NVIDIA's definition (nvidia-resiliency-ext's
straggler detector) applied across every rank of a job that this sidecar sees: the reference (median
across ranks) of the ranks' median step compute time over their recent window, divided by the rank's
own median. 1 is typical, below 0.75 is flagged. Compute time is the step's wall time less the time
spent waiting in collectives (the DDP comm hook's timing), because in synchronous data parallelism
every rank's step takes as long as the slowest one; only the time outside the wait tells them apart.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, register
from mlops_obs.metrics import FamilyBuilder, sample
from mlops_obs.rankdir import CHECKPOINT_BUCKETS, STEP_BUCKETS, RankDirectory, Snapshot, validate

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

# A rank needs this many recent steps before its score means anything (the first steps include warm-up).
STRAGGLER_MIN_STEPS = 5


def straggler_scores(snaps: Iterable[Snapshot]) -> dict[tuple[str, str], float]:
    """``(job, rank) -> score`` for ranks with enough recent steps, in jobs with at least two such ranks."""
    medians: dict[str, dict[str, float]] = {}
    for s in snaps:
        m = _rank_median(s)
        if m is not None and m > 0:
            medians.setdefault(str(s.get("job", "")), {})[str(s.get("rank", ""))] = m
    out: dict[tuple[str, str], float] = {}
    for job, by_rank in medians.items():
        if len(by_rank) < 2:
            continue
        reference = statistics.median(by_rank.values())
        for rank, m in by_rank.items():
            out[(job, rank)] = reference / m
    return out


def _rank_median(s: Snapshot) -> float | None:
    """The rank's median step compute time over its recent window; ``None`` while it has too few steps."""
    try:
        if int(s["recent_steps"]) < STRAGGLER_MIN_STEPS:
            return None
        return float(s["recent_step_median"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None


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
    "mlops_training_finished": (
        "gauge",
        "1 once the rank closed its monitor (training ended or the process exited), so a silent heartbeat "
        "is not a stall.",
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
    "mlops_training_straggler_score": (
        "gauge",
        "Median step compute time across the job's ranks over this rank's; 1 typical, below 0.75 a straggler.",
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
        self.skips = FamilyBuilder(SNAPSHOT_FAMILIES)

    def sample(self) -> Iterable[Metric]:
        snaps = sorted(self.ranks.snapshots(), key=lambda s: (str(s.get("job")), int(s.get("rank", 0))))
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
    finished = fams.samples("mlops_training_finished")
    goodput = fams.samples("mlops_training_goodput_seconds")
    badput = fams.samples("mlops_training_badput_seconds")
    ckpt_failed = fams.samples("mlops_training_checkpoint_failures")
    ckpt_last = fams.samples("mlops_training_last_checkpoint_timestamp_seconds")
    straggler = fams.samples("mlops_training_straggler_score")
    gauges = [(k, fams.samples(name)) for k, (name, _) in GAUGES.items()]
    scores = straggler_scores(snaps)

    for s in snaps:
        job, rank = str(s.get("job", "")), str(s.get("rank", ""))
        lb = intern({"job": job, "rank": rank, "node": str(s.get("node", ""))})
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
        score = scores.get((job, rank))
        if score is not None:
            straggler.append(sample("mlops_training_straggler_score", lb, score))
        last_step: Any = s.get("last_step_time")
        if last_step:
            heartbeat.append(sample("mlops_training_last_step_timestamp_seconds", lb, float(last_step)))
        started.append(sample("mlops_training_process_start_time_seconds", lb, float(s.get("start_time", 0.0))))
        world.append(sample("mlops_training_world_size", lb, float(s.get("world_size", 1))))
        finished.append(sample("mlops_training_finished", lb, 1.0 if s.get("closed") else 0.0))
        g: Any = s.get("gauges") or {}
        for k, fam in gauges:
            v = g.get(k)
            if v is not None:
                fam.append(sample(GAUGES[k][0], lb, float(v)))
    return fams.metrics()
