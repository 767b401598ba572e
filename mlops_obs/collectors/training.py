"""Training collector: turns the ranks' snapshot files in ``--multiproc-dir`` into metric families."""

from __future__ import annotations

from collections.abc import Iterable
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
}


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

    def sample(self) -> Iterable[Metric]:
        directory = self.config.get("multiproc-dir")
        snaps = (
            sorted(
                snapshot.scan(directory, retention=self.config.get("training.retention")),
                key=lambda s: (str(s.get("job")), int(s.get("rank", 0))),
            )
            if directory
            else []
        )
        return self.families(snaps)

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
            counts = s.get("step_buckets") or []
            if len(counts) == len(snapshot.STEP_BUCKETS) + 1:
                cum, buckets = 0, []
                for bound, c in zip((*snapshot.STEP_BUCKETS, float("inf")), counts):
                    cum += int(c)
                    buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(cum)))
                hist.add_metric(lv, buckets, float(s.get("step_seconds_sum", 0.0)))
            if s.get("last_step_time"):
                heartbeat.add_metric(lv, float(s["last_step_time"]))
            started.add_metric(lv, float(s.get("start_time", 0.0)))
            world.add_metric(lv, float(s.get("world_size", 1)))
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
            *gauges.values(),
        ]
