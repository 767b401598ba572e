"""The one definition every alert, recording rule and dashboard panel reads its selectors and thresholds from.

As in node-mixin's ``config.libsonnet``: a panel's threshold line and the alert about the same quantity come
from the same field here, so they cannot disagree. Each field says when to change it. Users override fields
with :func:`dataclasses.replace` (or a YAML file given to ``mlops-obs generate --mixin.config``) and
regenerate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class MixinConfig:
    # --- selectors ---------------------------------------------------------------------------------------
    # Series the sidecar exposes about itself and its host carry the scrape job's label (they have no
    # training job). Change it to match your scrape config / ServiceMonitor job name.
    exporter_selector: str = 'job="mlops-obs"'
    # Training series carry the *training job's* `job` label (honor_labels), so select them by something
    # else if several kinds of targets share a Prometheus (e.g. 'cluster="a"'); empty selects all.
    training_selector: str = ""
    # GPU series (their `job`, where present, is the owning rank's training job).
    gpu_selector: str = ""
    # The log shipper's own metrics.
    shipper_selector: str = ""
    # Filesystems worth alerting on; pseudo and read-only mounts are excluded by default.
    filesystem_selector: str = 'mountpoint!~"/(run|dev|proc|sys)($|/.*)|/boot.*"'
    # The label naming a node on every series (the scrape target's `instance` unless you relabel to `node`).
    node_label: str = "instance"

    # Regexes over the `reason` label of mlops_gpu_throttle_seconds_total (NVML violation policies).
    thermal_throttle_reasons: str = "thermal"
    power_throttle_reasons: str = "power|board_limit"

    # --- GPU thresholds ----------------------------------------------------------------------------------
    # XIDs that mean hardware or driver trouble needing a drain or reset (double-bit ECC 48, row remap
    # 63/64, NVLink 74, fell off the bus 79, 92/94/95 ECC/containment). Add codes your fleet treats so.
    xid_critical_codes: tuple[int, ...] = (48, 61, 62, 63, 64, 74, 79, 92, 94, 95)
    # XIDs caused by the application itself (illegal access 13, MMU fault 31, stopped 43, killed 45);
    # they go to the job owner through the training alerts, not to the cluster operators.
    xid_ignored_codes: tuple[int, ...] = (13, 31, 43, 45)
    # How far back a counter increase (XID, ECC, NVLink, PCIe replays) is looked for.
    gpu_error_window: str = "10m"
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
    gpu_idle_window: str = "30m"

    # --- node thresholds ---------------------------------------------------------------------------------
    filesystem_predict_window: str = "6h"  # history used to extrapolate a filesystem's fill rate
    filesystem_predict_horizon_seconds: int = 24 * 3600  # alert when it will be full within this
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
    clock_offset_seconds: float = 0.05  # |offset| that skews cross-node timelines and NCCL timeouts
    node_rate_window: str = "5m"  # rate() window for host counters

    # --- training thresholds -----------------------------------------------------------------------------
    # A rank whose last step finished longer ago than this is stalled (longest normal step, checkpoint or
    # evaluation pause included).
    training_stall_seconds: float = 600.0
    straggler_score: float = 0.75  # relative score (1 = typical rank) below which a rank is a straggler
    step_time_anomaly_factor: float = 2.0  # recent mean step time over the baseline's
    throughput_drop_ratio: float = 0.7  # recent samples/s below this fraction of the baseline
    goodput_ratio: float = 0.5  # productive share of wall time below which a job wastes the cluster
    checkpoint_stale_seconds: float = 7200.0  # no checkpoint for this long risks too much lost work
    data_wait_ratio: float = 0.3  # share of step time waiting for data: input pipeline bound
    training_rate_window: str = "5m"  # recent window for step time and throughput
    training_baseline_window: str = "1h"  # baseline window for step time and throughput
    goodput_window: str = "1h"

    # --- pipeline thresholds -----------------------------------------------------------------------------
    collector_slow_seconds: float = 2.0  # a collector's sampling duration (the scrape itself is pre-rendered)
    scrape_slow_seconds: float = 1.0  # Prometheus' scrape of the sidecar
    shipper_lag_bytes: float = 64 * 1024**2  # unread log bytes behind the writers
    shipper_stale_seconds: float = 600.0  # no successful delivery for this long while lines are read

    # --- `for:` durations (how long a condition must hold); the e2e test profile shortens them -----------
    for_critical: str = "1m"  # hardware faults that are already certain
    for_short: str = "5m"
    for_medium: str = "15m"
    for_long: str = "30m"
    for_very_long: str = "1h"
    for_stall: str = "5m"
    for_straggler: str = "10m"
    # Rule group evaluation interval (None: Prometheus' global evaluation_interval).
    rule_interval: str | None = None

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
    group_wait: str = "30s"
    group_interval: str = "5m"
    repeat_interval: str = "4h"

    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def runbook_url(self, alertname: str) -> str:
        return f"{self.runbook_url_base}#{alertname.lower()}"


def e2e_profile(base: MixinConfig | None = None, **overrides: Any) -> MixinConfig:
    """Short windows and ``for:`` durations, so the end-to-end test sees real rules fire in seconds.

    Only durations change: the expressions are the same code path as production's.
    """
    short: dict[str, Any] = dict(
        for_critical="2s",
        for_short="2s",
        for_medium="2s",
        for_long="2s",
        for_very_long="2s",
        for_stall="2s",
        for_straggler="2s",
        training_stall_seconds=4.0,
        training_rate_window="10s",
        training_baseline_window="1m",
        node_rate_window="10s",
        gpu_error_window="30s",
        goodput_window="1m",
        rule_interval="1s",
        group_wait="1s",
        group_interval="1s",
        repeat_interval="1m",
    )
    short.update(overrides)
    return dataclasses.replace(base or MixinConfig(), **short)


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
