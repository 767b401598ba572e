"""The one definition every alert, recording rule and dashboard panel reads its selectors and thresholds from.

As in node-mixin's ``config.libsonnet``: a panel's threshold line and the alert about the same quantity come
from the same field here, so they cannot disagree. Each field says when to change it. Users override fields
with :func:`dataclasses.replace` (or a YAML file given to ``mlops-obs generate --mixin.config``) and
regenerate.

Every time constant (a window, a ``for:``, a threshold in seconds) is marked :data:`TIME`, so
:func:`scaled` can render the same rules with all of them multiplied by one factor: the end-to-end tests
run the shipped expressions on a compressed clock, and no second copy of the rules can drift from them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TIME = {"time": True}  # field metadata: a time constant, scaled by scaled()


def _t(default: Any) -> Any:
    return field(default=default, metadata=TIME)


@dataclass(frozen=True)
class MixinConfig:
    # --- selectors ---------------------------------------------------------------------------------------
    # The scrape job of the sidecars, as kubernetes-mixin's job selectors: series the sidecar exposes about
    # itself and its host (and `up`) carry the scrape job's `job` label. The shipped compose file, the
    # ServiceMonitor and the PodMonitor all produce job="mlops-obs"; change both together.
    exporter_selector: str = 'job="mlops-obs"'
    # Training series carry the *training job's* `job` label (honor_labels), so select them by something
    # else if several kinds of targets share a Prometheus (e.g. 'cluster="a"'); empty selects all.
    training_selector: str = ""
    # GPU series (a GPU's owning rank is joined from mlops_gpu_owner_info, never read from its own `job`).
    gpu_selector: str = ""
    # The log shipper's own metrics.
    shipper_selector: str = ""
    # Filesystems worth alerting on; pseudo and read-only mounts are excluded by default.
    filesystem_selector: str = 'mountpoint!~"/(run|dev|proc|sys)($|/.*)|/boot.*"'
    # Labels that identify one scraped sidecar (a scrape target). Joins with the sidecar's `_info` series
    # (node name, GPU owner) match on them. Add the label your central store adds per Prometheus (e.g.
    # "cluster") when several clusters feed one store and instances could repeat.
    instance_labels: tuple[str, ...] = ("instance",)

    # Regexes over the `reason` label of mlops_gpu_throttle_seconds_total (NVML violation policies).
    thermal_throttle_reasons: str = "thermal"
    power_throttle_reasons: str = "power|board_limit"

    # --- assumptions about the deployment ------------------------------------------------------------------
    # The scrape and rule evaluation interval the windows below are sized for (every rate window holds at
    # least 4 samples of it). Change it with the windows if you scrape less often.
    scrape_interval_seconds: float = _t(15.0)
    # The sidecar's --training.retention default: a rank's series vanish this long after its last snapshot
    # update, so every training alert must be able to fire well within it (a test checks both).
    training_retention_seconds: float = _t(900.0)

    # --- GPU thresholds ----------------------------------------------------------------------------------
    # XIDs that mean hardware or driver trouble needing a drain or reset (double-bit ECC 48, row remap
    # 63/64, NVLink 74, fell off the bus 79, 92/94/95 ECC/containment). Add codes your fleet treats so.
    xid_critical_codes: tuple[int, ...] = (48, 61, 62, 63, 64, 74, 79, 92, 94, 95)
    # XIDs caused by the application itself (illegal access 13, MMU fault 31, stopped 43, killed 45);
    # they go to the job owner through the training alerts, not to the cluster operators.
    xid_ignored_codes: tuple[int, ...] = (13, 31, 43, 45)
    # How far back a counter increase (XID, ECC, NVLink, PCIe replays) is looked for.
    gpu_error_window: str = _t("10m")
    # How far before gpu_error_window a counter must have existed not to count as born inside it: a
    # counter that appears at 1 (the first XID of a code) is an event `increase()` cannot see.
    counter_birth_lookback: str = _t("1h")
    # How long a GPU's last known owner (job/rank) is kept for its alerts: an XID often kills the process.
    gpu_owner_lookback: str = _t("10m")
    # History over which the number of GPUs a node had is remembered.
    gpu_missing_window: str = _t("6h")
    # PCIe replays in gpu_error_window above which the link is suspect (a few are normal under load).
    pcie_replays_threshold: float = 100.0
    # NVLink errors (all kinds) in gpu_error_window above which a link is suspect.
    nvlink_errors_threshold: float = 10.0
    # Alert when a GPU is this many degrees Celsius or less below its slowdown temperature.
    temperature_margin_celsius: float = 5.0
    # A GPU idle (utilisation below gpu_idle_utilization) yet hotter than this has a cooling problem.
    hot_idle_temperature_celsius: float = 70.0
    # Fraction of a window a GPU may spend throttled (thermal or power) before it is worth a look.
    throttle_ratio: float = 0.1
    # Used/total memory ratio above which a GPU is "near full" (PyTorch's caching allocator keeps a lot).
    gpu_memory_full_ratio: float = 0.97
    # Below this utilisation a GPU counts as idle.
    gpu_idle_utilization: float = 0.05
    # Memory used above which an idle GPU counts as allocated (someone holds it and does nothing).
    gpu_allocated_bytes: float = 1024**3
    # Window over which idleness is averaged.
    gpu_idle_window: str = _t("30m")

    # --- node thresholds ---------------------------------------------------------------------------------
    filesystem_predict_window: str = _t("6h")  # history used to extrapolate a filesystem's fill rate
    filesystem_predict_horizon_seconds: float = _t(24 * 3600.0)  # alert when it will be full within this
    filesystem_filling_avail_ratio: float = 0.25  # only extrapolate once less than this is free
    filesystem_full_avail_ratio: float = 0.05  # free ratio below which a filesystem is "almost full"
    memory_available_ratio: float = 0.05  # available/total memory ratio below which a node is short
    memory_pressure_ratio: float = 0.1  # PSI memory "full": fraction of time all tasks stalled
    io_pressure_ratio: float = 0.3  # PSI io "full" fraction
    cpu_pressure_ratio: float = 0.8  # PSI cpu "some": fraction of time some task waited for a CPU
    cpu_busy_ratio: float = 0.95  # non-idle CPU fraction: saturation of data loaders/tokenizers
    disk_io_busy_ratio: float = 0.9  # fraction of time a disk had I/O in flight
    network_errors_per_second: float = 1.0  # NIC receive/transmit errors per second
    infiniband_errors_threshold: float = 10.0  # InfiniBand port errors (per type) in gpu_error_window
    clock_offset_seconds: float = _t(0.05)  # |offset| that skews cross-node timelines and NCCL timeouts
    node_rate_window: str = _t("5m")  # rate() window for host counters
    # How long a sidecar's node name is remembered after its last scrape (MlopsExporterDown names the node).
    node_info_lookback: str = _t("1h")

    # --- training thresholds -----------------------------------------------------------------------------
    # Stall: a rank that made no step for longer than `stall_step_multiple` times the job's recent median
    # step time, bounded below by the floor (fast toy steps) and above by the ceiling (so it fires well
    # within the retention even for minute-long steps). Phases the job declares as expected pauses
    # (checkpoint, evaluation) suspend it, for at most training_pause_max_seconds.
    training_stall_floor_seconds: float = _t(60.0)
    training_stall_ceiling_seconds: float = _t(300.0)
    stall_step_multiple: float = 10.0
    training_pause_max_seconds: float = _t(1800.0)
    straggler_score: float = 0.75  # relative score (1 = typical rank) below which a rank is a straggler
    step_time_anomaly_factor: float = 2.0  # recent mean step time over the job's own baseline
    throughput_drop_ratio: float = 0.7  # recent samples/s below this fraction of the job's own baseline
    goodput_ratio: float = 0.5  # productive share of the ranks' time below which a job wastes the cluster
    checkpoint_stale_seconds: float = _t(7200.0)  # no checkpoint for this long risks too much lost work
    # How far back a job's last checkpoint (and its first start) is looked for: must exceed the staleness
    # threshold, so a job whose last save is older than this alerts as "never checkpointed in the window".
    checkpoint_lookback_window: str = _t("6h")
    data_wait_ratio: float = 0.3  # share of step time waiting for data: input pipeline bound
    training_rate_window: str = _t("2m")  # recent window: step time, throughput, phase shares, NaN
    # The job's own baseline for step time and throughput, ending where the recent window starts (so a
    # fault does not raise its own baseline); a young job's baseline is whatever history it has.
    training_baseline_window: str = _t("1h")
    goodput_window: str = _t("1h")

    # --- pipeline thresholds -----------------------------------------------------------------------------
    collector_slow_seconds: float = _t(2.0)  # a collector's sampling duration (the scrape is pre-rendered)
    scrape_slow_seconds: float = _t(1.0)  # Prometheus' scrape of the sidecar
    shipper_lag_bytes: float = 64 * 1024**2  # unread log bytes behind the writers
    shipper_stale_seconds: float = _t(600.0)  # no successful delivery for this long while lines are read

    # --- `for:` durations (how long a condition must hold) -----------------------------------------------
    for_critical: str = _t("1m")  # hardware faults that are already certain
    for_short: str = _t("5m")
    for_medium: str = _t("15m")
    for_long: str = _t("30m")
    for_very_long: str = _t("1h")
    # A failed rank or a non-finite loss is certain; one evaluation of waiting lets a peer that failed
    # first show up before the alert names a rank.
    for_training_fault: str = _t("15s")
    for_stall: str = _t("0s")  # the stall condition is itself a duration (no step for the threshold)
    for_straggler: str = _t("2m")
    for_training: str = _t("2m")  # data-bound ranks, step-time anomaly, throughput regression
    # Rule group evaluation interval (None: Prometheus' global evaluation_interval).
    rule_interval: str | None = _t(None)

    # --- links and labels --------------------------------------------------------------------------------
    runbook_url_base: str = "https://github.com/mlops-obs/mlops-obs/blob/main/docs/runbooks.md"
    # OpenSearch Dashboards base URL for "logs of this rank/node" data links on dashboards.
    opensearch_dashboards_url: str = "http://localhost:5601"
    logs_index_pattern: str = "mlops-logs-*"
    dashboard_uid_prefix: str = "mlops-obs"
    dashboard_tags: tuple[str, ...] = ("mlops-obs",)
    # Alertmanager receivers: a webhook URL for each severity (alert-sink by default; page someone for
    # critical by editing this).
    alert_sink_url: str = "http://127.0.0.1:9478/alerts"
    critical_webhook_url: str | None = None
    group_wait: str = _t("30s")
    group_interval: str = _t("5m")
    repeat_interval: str = _t("4h")

    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def runbook_url(self, alertname: str) -> str:
        return f"{self.runbook_url_base}#{alertname.lower()}"

    @property
    def instance(self) -> str:
        """``instance_labels`` as the comma-separated list ``on (...)`` and ``by (...)`` take."""
        return ", ".join(self.instance_labels)


_UNITS = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001))
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")


def seconds(d: str) -> float:
    """A Prometheus duration (``90s``, ``1m30s``, ``750ms``, ``0s``) in seconds."""
    m = _DURATION.match(d)
    if not d or not m:
        raise ValueError(f"not a Prometheus duration: {d!r}")
    return sum(float(g or 0) * unit for g, (_, unit) in zip(m.groups(), _UNITS))


def duration(s: float) -> str:
    """Seconds as the shortest Prometheus duration, to the millisecond (``90`` -> ``1m30s``)."""
    ms = round(s * 1000)
    if ms < 0 or not math.isclose(ms, s * 1000, abs_tol=1e-6 * max(1.0, s * 1000)):
        raise ValueError(f"{s}s is not a whole number of milliseconds")
    if ms == 0:
        return "0s"
    out = []
    for suffix, unit in _UNITS:
        n, ms = divmod(ms, round(unit * 1000))
        if n:
            out.append(f"{n}{suffix}")
    return "".join(out)


def time_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(MixinConfig) if f.metadata.get("time")]


def scaled(cfg: MixinConfig, factor: float) -> MixinConfig:
    """The same definition with every time constant multiplied by ``factor`` (``< 1`` compresses time).

    Expressions and thresholds without a time dimension are untouched, so the scaled rules are the shipped
    rules on a faster clock: at ``factor=1/15`` a 1 s scrape stands for the 15 s one they are sized for.
    """
    if not factor > 0:
        raise ValueError(f"time scale must be positive, got {factor}")
    changes: dict[str, Any] = {}
    for name in time_fields():
        v = getattr(cfg, name)
        if v is None:
            continue
        changes[name] = duration(seconds(v) * factor) if isinstance(v, str) else v * factor
    return dataclasses.replace(cfg, **changes)


def load(path: Path | None) -> MixinConfig:
    """A YAML mapping of field overrides; unknown keys are an error naming the key."""
    if path is None:
        return MixinConfig()
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a mapping of mixin fields")
    names = {f.name for f in dataclasses.fields(MixinConfig)} - {"extra"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path}: unknown mixin field {unknown[0]!r}")
    for k, v in list(data.items()):
        if isinstance(v, list):
            data[k] = tuple(v)
    return dataclasses.replace(MixinConfig(), **data)


def selector(*parts: str) -> str:
    """``{a, b}`` from the non-empty parts (``""`` when none), so selectors compose with metric names."""
    kept = [p for p in parts if p]
    return "{" + ", ".join(kept) + "}" if kept else ""
