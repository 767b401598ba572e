"""Training collector: turns the ranks' snapshot files in ``--multiproc-dir`` into metric families.

It also computes what no single rank can: the straggler score, NVIDIA's definition (nvidia-resiliency-ext's
straggler detector) applied across every rank of a job that this sidecar sees: the reference (median
across ranks) of the ranks' median step compute time over their recent window, divided by the rank's
own median. 1 is typical, below 0.75 is flagged. Compute time is the step's wall time less the time
spent waiting in collectives (the DDP comm hook's timing), because in synchronous data parallelism
every rank's step takes as long as the slowest one; only the time outside the wait tells them apart.
"""

from __future__ import annotations

import functools
import itertools
import statistics
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, register
from mlops_obs.config import Setting, parse_duration, parse_optional_path
from mlops_obs.instrument import snapshot

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

# One cache for the collectors that read the ranks' snapshots (training, process) in the same round.
SCAN_CACHE = snapshot.ScanCache()


def cached_scan(
    directory: str | Path, retention: float | None = None, now: float | None = None
) -> Iterator[dict[str, Any]]:
    """:func:`snapshot.scan` through the shared cache: only changed files are parsed again."""
    return snapshot.scan(directory, retention=retention, now=now, cache=SCAN_CACHE)


# A rank needs this many recent steps before its score means anything (the first steps include warm-up).
STRAGGLER_MIN_STEPS = 5


def straggler_scores(snaps: Iterable[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """``(job, rank) -> score`` for ranks with enough recent steps, in jobs with at least two such ranks."""
    medians: dict[str, dict[str, float]] = {}
    for s in snaps:
        raw = s.get("recent_step_seconds") or []
        try:  # the ring holds floats; map(float) is the C-speed path, the filter only for a hand-edited file
            recent = sorted(map(float, raw))
        except (TypeError, ValueError):
            recent = sorted(float(x) for x in raw if isinstance(x, int | float) and not isinstance(x, bool))
        if len(recent) < STRAGGLER_MIN_STEPS:
            continue
        m = _median_sorted(recent)
        if m > 0:
            medians.setdefault(str(s.get("job", "")), {})[str(s.get("rank", ""))] = m
    out: dict[tuple[str, str], float] = {}
    for job, by_rank in medians.items():
        if len(by_rank) < 2:
            continue
        reference = statistics.median(by_rank.values())
        for rank, m in by_rank.items():
            out[(job, rank)] = reference / m
    return out


def _median_sorted(xs: list[float]) -> float:
    n = len(xs)
    mid = n // 2
    return xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2.0


@functools.cache
def _bucket_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*(repr(float(b)) for b in bounds), "+Inf")


def _histogram(counts: Any, bounds: tuple[float, ...]) -> list[tuple[str, float]] | None:
    if not isinstance(counts, list) or len(counts) != len(bounds) + 1:
        return None
    cum = list(itertools.accumulate(map(int, counts)))
    return list(zip(_bucket_labels(bounds), map(float, cum)))


@register
class TrainingCollector(Collector):
    name = "training"
    help = "Training ranks' step metrics from the shared --multiproc-dir."
    settings = (
        Setting(
            "multiproc-dir",
            parse_optional_path,
            None,
            "Directory the training ranks write their snapshots to (shared with the workload).",
            metavar="DIR",
        ),
        Setting(
            "training.retention",
            parse_duration,
            900.0,
            "Forget (and delete) a rank's snapshot this long after its last update.",
            metavar="DURATION",
        ),
    )

    _last: tuple[list[dict[str, Any]], list[Metric]] | None = None

    def sample(self) -> Iterable[Metric]:
        directory = self.config.get("multiproc-dir")
        snaps = (
            sorted(
                cached_scan(directory, retention=self.config.get("training.retention")),
                key=lambda s: (str(s.get("job")), int(s.get("rank", 0))),
            )
            if directory
            else []
        )
        # No snapshot changed since the last round (ranks flush less often than we sample, or a
        # job is paused): the families would be the same, so they are not built again.
        last = self._last
        if last is not None and len(last[0]) == len(snaps) and all(a is b for a, b in zip(last[0], snaps)):
            return last[1]
        fams = self.families(snaps)
        self._last = (snaps, fams)
        return fams

    @staticmethod
    def families(snaps: list[dict[str, Any]]) -> list[Metric]:
        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=LABELS)

        steps = counter("mlops_training_steps", "Training steps completed.")
        failed = counter("mlops_training_failed_steps", "Steps that raised an exception.")
        samples = counter("mlops_training_samples", "Training samples processed.")
        tokens = counter("mlops_training_tokens", "Training tokens processed.")
        nonfinite = counter("mlops_training_nonfinite_loss", "Steps whose loss was NaN or infinite.")
        phases = CounterMetricFamily(
            "mlops_training_phase_seconds",
            "Seconds spent in each phase of the step.",
            labels=[*LABELS, "phase"],
        )
        hist = HistogramMetricFamily(
            "mlops_training_step_duration_seconds", "Wall time of one training step.", labels=LABELS
        )
        heartbeat = GaugeMetricFamily(
            "mlops_training_last_step_timestamp_seconds", "Unix time the last step finished.", labels=LABELS
        )
        started = GaugeMetricFamily(
            "mlops_training_process_start_time_seconds",
            "Unix time this rank's process started.",
            labels=LABELS,
        )
        world = GaugeMetricFamily("mlops_training_world_size", "Ranks in the job.", labels=LABELS)
        finished = GaugeMetricFamily(
            "mlops_training_finished",
            "1 once the rank closed its monitor (training ended or the process exited), so a silent heartbeat "
            "is not a stall.",
            labels=LABELS,
        )
        goodput = counter("mlops_training_goodput_seconds", "Seconds of productive training (steps, less data wait).")
        badput = CounterMetricFamily(
            "mlops_training_badput_seconds",
            "Seconds that were not productive training, by kind (startup, data_loading, checkpoint_save, ...).",
            labels=[*LABELS, "kind"],
        )
        ckpt = HistogramMetricFamily(
            "mlops_training_checkpoint_duration_seconds", "Wall time of a successful checkpoint save.", labels=LABELS
        )
        ckpt_failed = counter("mlops_training_checkpoint_failures", "Checkpoint saves that raised.")
        ckpt_last = GaugeMetricFamily(
            "mlops_training_last_checkpoint_timestamp_seconds",
            "Unix time the last successful checkpoint save finished.",
            labels=LABELS,
        )
        straggler = GaugeMetricFamily(
            "mlops_training_straggler_score",
            "Median step compute time across the job's ranks over this rank's; 1 typical, below 0.75 a straggler.",
            labels=LABELS,
        )
        scores = straggler_scores(snaps)
        gauges = {k: GaugeMetricFamily(n, d, labels=LABELS) for k, (n, d) in GAUGES.items()}

        for s in snaps:
            lv = [str(s.get("job", "")), str(s.get("rank", "")), str(s.get("node", ""))]
            steps.add_metric(lv, float(s.get("steps", 0)))
            failed.add_metric(lv, float(s.get("failed_steps", 0)))
            samples.add_metric(lv, float(s.get("samples", 0)))
            tokens.add_metric(lv, float(s.get("tokens", 0)))
            nonfinite.add_metric(lv, float(s.get("nonfinite_loss", 0)))
            for phase, secs in sorted((s.get("phase_seconds") or {}).items()):
                phases.add_metric([*lv, str(phase)], float(secs))
            buckets = _histogram(s.get("step_buckets"), snapshot.STEP_BUCKETS)
            if buckets:
                hist.add_metric(lv, buckets, float(s.get("step_seconds_sum", 0.0)))
            goodput.add_metric(lv, float(s.get("goodput_seconds", 0.0)))
            for kind, secs in sorted((s.get("badput_seconds") or {}).items()):
                badput.add_metric([*lv, str(kind)], float(secs))
            # Only ranks that save checkpoints (often rank 0 alone) get checkpoint series.
            buckets = _histogram(s.get("checkpoint_buckets"), snapshot.CHECKPOINT_BUCKETS)
            if buckets and (buckets[-1][1] or s.get("failed_checkpoints")):
                ckpt.add_metric(lv, buckets, float(s.get("checkpoint_seconds_sum", 0.0)))
                ckpt_failed.add_metric(lv, float(s.get("failed_checkpoints", 0)))
            if s.get("last_checkpoint_time"):
                ckpt_last.add_metric(lv, float(s["last_checkpoint_time"]))
            score = scores.get((lv[0], lv[1]))
            if score is not None:
                straggler.add_metric(lv, score)
            if s.get("last_step_time"):
                heartbeat.add_metric(lv, float(s["last_step_time"]))
            started.add_metric(lv, float(s.get("start_time", 0.0)))
            world.add_metric(lv, float(s.get("world_size", 1)))
            finished.add_metric(lv, 1.0 if s.get("closed") else 0.0)
            for k, fam in gauges.items():
                v = (s.get("gauges") or {}).get(k)
                if v is not None:
                    fam.add_metric(lv, float(v))
        return [
            steps,
            failed,
            samples,
            tokens,
            nonfinite,
            phases,
            hist,
            heartbeat,
            started,
            world,
            finished,
            goodput,
            badput,
            ckpt,
            ckpt_failed,
            ckpt_last,
            straggler,
            *gauges.values(),
        ]
