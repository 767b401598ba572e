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
from collections.abc import Iterable, Iterator
from itertools import accumulate
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from mlops_obs.collectors import Collector, register
from mlops_obs.config import Setting, parse_duration, parse_optional_path
from mlops_obs.exporter.exposition import Labels, family, labels
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


def _rank_median(s: dict[str, Any]) -> float | None:
    """The rank's median step compute time over its recent window; ``None`` while it has too few steps.

    Ranks write the median itself (``recent_step_median`` over ``recent_steps``); snapshots of older
    SDK versions carry the window (``recent_step_seconds``), and get the same answer from it.
    """
    median, count = s.get("recent_step_median"), s.get("recent_steps")
    if median is not None or count is not None:
        try:
            return float(median) if int(count) >= STRAGGLER_MIN_STEPS else None  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
    raw = s.get("recent_step_seconds") or []
    try:  # the ring holds floats; map(float) is the C-speed path, the filter only for a hand-edited file
        recent = sorted(map(float, raw))
    except (TypeError, ValueError):
        recent = sorted(float(x) for x in raw if isinstance(x, int | float) and not isinstance(x, bool))
    return snapshot.median_sorted(recent) if len(recent) >= STRAGGLER_MIN_STEPS else None


_new_sample = tuple.__new__  # skips Sample's Python-level __new__ (a namedtuple)

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

# (rank's label set, bucket bounds) -> the label sets of its buckets: the same every round.
_bucket_sets: dict[tuple[Labels, tuple[float, ...]], tuple[Labels, ...]] = {}
# (rank's label set, extra label, its value) -> the label set with it (phase, kind): the same every round.
_extra_sets: dict[tuple[Labels, str, str], Labels] = {}
# (job, rank, node) -> the rank's label set.
_rank_sets: dict[tuple[str, str, str], Labels] = {}


def _with(lb: Labels, key: str, value: Any) -> Labels:
    """``labels({**lb, key: str(value)})``, looked up by (set, key, value) instead of built and interned."""
    v = value if type(value) is str else str(value)
    got = _extra_sets.get((lb, key, v))
    if got is None:
        if len(_extra_sets) >= 10_000:
            _extra_sets.clear()
        got = _extra_sets[(lb, key, v)] = labels({**lb, key: v})
    return got


def _valid_counts(counts: Any, bounds: tuple[float, ...]) -> bool:
    return isinstance(counts, list) and len(counts) == len(bounds) + 1


def _histogram(out: list[Any], name: str, lb: Labels, counts: Any, bounds: tuple[float, ...], total: Any) -> None:
    """Buckets, count and sum in prometheus_client's order; nothing for a malformed bucket list."""
    if not _valid_counts(counts, bounds):
        return
    sets = _bucket_sets.get((lb, bounds))
    if sets is None:
        if len(_bucket_sets) >= 10_000:
            _bucket_sets.clear()
        les = (*(repr(float(b)) for b in bounds), "+Inf")
        sets = _bucket_sets[(lb, bounds)] = tuple(labels({**lb, "le": le}) for le in les)
    bucket = name + "_bucket"
    new = _new_sample
    # Cumulative counts as float sums in bucket order (the same additions a running total makes).
    cums = list(accumulate(map(int, counts), initial=0.0))
    out.extend([new(Sample, (bucket, ls, cum, None, None, None)) for ls, cum in zip(sets, cums[1:])])
    out.append(new(Sample, (name + "_count", lb, cums[-1], None, None, None)))
    out.append(_new_sample(Sample, (name + "_sum", lb, float(total), None, None, None)))


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
        """The families for these snapshots, every family present even when empty.

        Built straight into prometheus_client's ``Metric``/``Sample`` types with interned label sets
        (see :class:`mlops_obs.exporter.exposition.Labels`): ``add_metric`` zips a fresh label dict
        and builds a namedtuple through Python code per sample, which for 8 ranks was most of this
        collector's round.
        """
        fams = {name: family(name, doc, typ, []) for name, (typ, doc) in FAMILIES.items()}
        steps, failed, samples_f, tokens, nonfinite = (fams[n].samples for n in _PER_RANK_COUNTERS)
        phases = fams["mlops_training_phase_seconds"].samples
        hist = fams["mlops_training_step_duration_seconds"].samples
        heartbeat = fams["mlops_training_last_step_timestamp_seconds"].samples
        started = fams["mlops_training_process_start_time_seconds"].samples
        world = fams["mlops_training_world_size"].samples
        finished = fams["mlops_training_finished"].samples
        goodput = fams["mlops_training_goodput_seconds"].samples
        badput = fams["mlops_training_badput_seconds"].samples
        ckpt = fams["mlops_training_checkpoint_duration_seconds"].samples
        ckpt_failed = fams["mlops_training_checkpoint_failures"].samples
        ckpt_last = fams["mlops_training_last_checkpoint_timestamp_seconds"].samples
        straggler = fams["mlops_training_straggler_score"].samples
        gauges = [(k, fams[name].samples) for k, (name, _) in GAUGES.items()]
        scores = straggler_scores(snaps)
        new = _new_sample

        for s in snaps:
            get = s.get
            job, rank = str(get("job", "")), str(get("rank", ""))
            key = (job, rank, str(get("node", "")))
            known = _rank_sets.get(key)
            if known is None:
                if len(_rank_sets) >= 10_000:
                    _rank_sets.clear()
                known = _rank_sets[key] = labels({"job": key[0], "rank": key[1], "node": key[2]})
            lb = known
            steps.append(new(Sample, ("mlops_training_steps_total", lb, float(get("steps", 0)), None, None, None)))
            failed.append(new(Sample, ("mlops_training_failed_steps_total", lb, float(get("failed_steps", 0)),
                                       None, None, None)))  # fmt: skip
            samples_f.append(new(Sample, ("mlops_training_samples_total", lb, float(get("samples", 0)), None, None,
                                          None)))  # fmt: skip
            tokens.append(new(Sample, ("mlops_training_tokens_total", lb, float(get("tokens", 0)), None, None, None)))
            nonfinite.append(new(Sample, ("mlops_training_nonfinite_loss_total", lb, float(get("nonfinite_loss", 0)),
                                          None, None, None)))  # fmt: skip
            for phase, secs in sorted((get("phase_seconds") or {}).items()):
                phases.append(new(Sample, ("mlops_training_phase_seconds_total", _with(lb, "phase", phase),
                                           float(secs), None, None, None)))  # fmt: skip
            _histogram(hist, "mlops_training_step_duration_seconds", lb, get("step_buckets"), snapshot.STEP_BUCKETS,
                       get("step_seconds_sum", 0.0))  # fmt: skip
            goodput.append(new(Sample, ("mlops_training_goodput_seconds_total", lb, float(get("goodput_seconds", 0.0)),
                                        None, None, None)))  # fmt: skip
            for kind, secs in sorted((get("badput_seconds") or {}).items()):
                badput.append(new(Sample, ("mlops_training_badput_seconds_total", _with(lb, "kind", kind),
                                           float(secs), None, None, None)))  # fmt: skip
            # Only ranks that save checkpoints (often rank 0 alone) get checkpoint series.
            counts: Any = get("checkpoint_buckets")
            saved = sum(map(int, counts)) if _valid_counts(counts, snapshot.CHECKPOINT_BUCKETS) else None
            if saved is not None and (saved > 0 or get("failed_checkpoints")):
                _histogram(ckpt, "mlops_training_checkpoint_duration_seconds", lb, counts, snapshot.CHECKPOINT_BUCKETS,
                           get("checkpoint_seconds_sum", 0.0))  # fmt: skip
                ckpt_failed.append(new(Sample, ("mlops_training_checkpoint_failures_total", lb,
                                                float(get("failed_checkpoints", 0)), None, None, None)))  # fmt: skip
            if get("last_checkpoint_time"):
                ckpt_last.append(new(Sample, ("mlops_training_last_checkpoint_timestamp_seconds", lb,
                                              float(s["last_checkpoint_time"]), None, None, None)))  # fmt: skip
            score = scores.get((job, rank))
            if score is not None:
                straggler.append(new(Sample, ("mlops_training_straggler_score", lb, score, None, None, None)))
            if get("last_step_time"):
                heartbeat.append(new(Sample, ("mlops_training_last_step_timestamp_seconds", lb,
                                              float(s["last_step_time"]), None, None, None)))  # fmt: skip
            started.append(new(Sample, ("mlops_training_process_start_time_seconds", lb,
                                        float(get("start_time", 0.0)), None, None, None)))  # fmt: skip
            world.append(new(Sample, ("mlops_training_world_size", lb, float(get("world_size", 1)), None, None, None)))
            finished.append(new(Sample, ("mlops_training_finished", lb, 1.0 if get("closed") else 0.0, None, None,
                                         None)))  # fmt: skip
            g = get("gauges") or {}
            for k, fam in gauges:
                v = g.get(k)
                if v is not None:
                    fam.append(new(Sample, (GAUGES[k][0], lb, float(v), None, None, None)))
        return list(fams.values())
