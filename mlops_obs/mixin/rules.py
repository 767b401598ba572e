"""Alerting and recording rules, each alert with the unit-test cases that prove it fires and stays quiet.

Every expression reads :class:`~mlops_obs.mixin.config.MixinConfig`, so the production rules, the e2e
test profile and the dashboards' threshold lines are one definition. Each alert carries a firing case and
a quiet case; :func:`rule_tests` turns them into Prometheus 2.42 ``promtool test rules`` input, so an alert
cannot be added without both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from mlops_obs.config import parse_duration
from mlops_obs.mixin.config import MixinConfig, selector

Labels = dict[str, str]
UNCORRECTED, VOLATILE, IDLE = 'type="uncorrected"', 'scope="volatile"', 'mode="idle"'


@dataclass(frozen=True)
class Case:
    """Input series (``'metric{labels}' -> 'values'``), an evaluation time, and the alerts expected then."""

    series: dict[str, str]
    at: str
    alerts: tuple[Labels, ...] = ()


@dataclass(frozen=True)
class Alert:
    name: str
    group: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    fires: Case
    quiet: Case
    extra_labels: Labels = field(default_factory=dict)
    # Further cases where the alert must stay quiet (a known false positive it guards against).
    also_quiet: tuple[Case, ...] = ()

    def rule(self, cfg: MixinConfig) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity, **self.extra_labels},
            "annotations": self.annotations(cfg),
        }

    def annotations(self, cfg: MixinConfig) -> dict[str, str]:
        return {"summary": self.summary, "description": self.description, "runbook_url": cfg.runbook_url(self.name)}


@dataclass(frozen=True)
class Recording:
    record: str
    expr: str


def _labels(d: Labels) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in d.items()) + "}"


def _equalities(sel: str) -> Labels:
    """The ``k="v"`` matchers of a selector: test series must carry them to be selected at all."""
    return dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', re.sub(r'\w+\s*(!=|=~|!~)\s*"[^"]*"', "", sel)))


def _num(x: float) -> str:
    """Thresholds as people write them (``0.05``, ``600``, ``64Mi``) in descriptions."""
    if x >= 1024**2 and x == int(x) and int(x) % 1024**2 == 0:
        n = int(x) // 1024**2
        return f"{n // 1024}Gi" if n % 1024 == 0 else f"{n}Mi"
    return f"{x:g}"


def _minutes(seconds: float) -> int:
    return math.ceil(seconds / 60.0)


def _pct(x: float) -> str:
    return f"{x * 100:g}%"


def recording_rules(cfg: MixinConfig) -> list[Recording]:
    t = cfg.training_selector
    rw, bw, gw = cfg.training_rate_window, cfg.training_baseline_window, cfg.goodput_window
    step = "mlops_training_step_duration_seconds"
    out = []
    for w, suffix in ((rw, "mean_recent"), (bw, "mean_baseline")):
        out.append(
            Recording(
                f"job_rank:{step}:{suffix}",
                f"rate({step}_sum{selector(t)}[{w}]) / rate({step}_count{selector(t)}[{w}])",
            )
        )
    out += [
        Recording(
            "job:mlops_training_samples:rate_recent",
            f"sum by (job) (rate(mlops_training_samples_total{selector(t)}[{rw}]))",
        ),
        Recording(
            "job_rank:mlops_training_phase_seconds:ratio_rate_recent",
            f"rate(mlops_training_phase_seconds_total{selector(t)}[{rw}]) / ignoring (phase) group_left () "
            f"sum without (phase) (rate(mlops_training_phase_seconds_total{selector(t)}[{rw}]))",
        ),
        Recording(
            "job:mlops_training_goodput:ratio_rate",
            f"sum by (job) (rate(mlops_training_goodput_seconds_total{selector(t)}[{gw}])) / "
            f"(sum by (job) (rate(mlops_training_goodput_seconds_total{selector(t)}[{gw}])) + "
            f"sum by (job) (rate(mlops_training_badput_seconds_total{selector(t)}[{gw}])))",
        ),
    ]
    return out


def alerts(cfg: MixinConfig) -> list[Alert]:
    return [*gpu_alerts(cfg), *node_alerts(cfg), *training_alerts(cfg), *pipeline_alerts(cfg)]


# --- GPU ------------------------------------------------------------------------------------------------


def gpu_alerts(c: MixinConfig) -> list[Alert]:
    n = c.node_label
    s = c.gpu_selector
    g: Labels = {**_equalities(s), n: "n1:9477", "gpu": "0", "uuid": "GPU-0", "model": "H100"}
    gl = _labels(g)
    on = f"on ({n}, gpu)"
    where = f"GPU {{{{ $labels.gpu }}}} on {{{{ $labels.{n} }}}}"
    w = c.gpu_error_window
    crit = "|".join(str(x) for x in c.xid_critical_codes)
    not_other = "|".join(str(x) for x in (*c.xid_critical_codes, *c.xid_ignored_codes))

    def xid(matcher: str) -> str:
        m = f"mlops_gpu_xid_errors_total{selector(s, matcher)}"
        # increase() misses a counter born at 1 (the first XID of a code); the `unless offset` arm catches it.
        return f"increase({m}[{w}]) > 0 or ({m} > 0 unless {m} offset {w})"

    def xid_labels(code: str) -> Labels:
        return {**g, "xid": code}

    xid_case = "0x5 1x30"

    def throttle(name: str, reasons: str, what: str) -> Alert:
        reason = f'reason=~"{reasons}"'
        m = f"mlops_gpu_throttle_seconds_total{selector(s, reason)}"
        return Alert(
            name,
            "gpu",
            f"sum without (reason) (rate({m}[{c.node_rate_window}])) > {c.throttle_ratio}",
            c.for_medium,
            "warning",
            f"{where} is {what} throttled",
            f"{where} spent more than {_pct(c.throttle_ratio)} of the time throttled for {what} reasons; "
            "steps on it (and on every rank waiting for it) slow down.",
            Case({f'mlops_gpu_throttle_seconds_total{_labels({**g, "reason": reasons.split("|")[0]})}': "0+30x40"},
                 "30m", (g,)),
            Case({f'mlops_gpu_throttle_seconds_total{_labels({**g, "reason": reasons.split("|")[0]})}': "0+1x40"},
                 "30m"),
        )  # fmt: skip

    temp, slow = f"mlops_gpu_temperature_celsius{selector(s)}", f"mlops_gpu_slowdown_temperature_celsius{selector(s)}"
    used, total = f"mlops_gpu_memory_used_bytes{selector(s)}", f"mlops_gpu_memory_total_bytes{selector(s)}"
    util = f"mlops_gpu_utilization_ratio{selector(s)}"
    idle = f"avg_over_time({util}[{c.gpu_idle_window}]) < {c.gpu_idle_utilization}"
    return [
        Alert(
            "GpuXidCritical",
            "gpu",
            xid(f'xid=~"{crit}"'),
            c.for_critical,
            "critical",
            f"{where} reported XID {{{{ $labels.xid }}}}",
            f"XID {{{{ $labels.xid }}}} means a hardware or driver fault on {where}: drain the node and follow "
            "the runbook for that code (reset, reboot or RMA).",
            Case({f"mlops_gpu_xid_errors_total{_labels(xid_labels('79'))}": xid_case}, "8m", (xid_labels("79"),)),
            Case({f"mlops_gpu_xid_errors_total{_labels(xid_labels('13'))}": xid_case}, "8m"),
        ),
        Alert(
            "GpuXidError",
            "gpu",
            xid(f'xid!~"{not_other}"'),
            c.for_critical,
            "warning",
            f"{where} reported XID {{{{ $labels.xid }}}}",
            f"XID {{{{ $labels.xid }}}} on {where} is neither an application error nor a known hardware fault; "
            "check dmesg on the node and the XID catalogue.",
            Case({f"mlops_gpu_xid_errors_total{_labels(xid_labels('109'))}": xid_case}, "8m", (xid_labels("109"),)),
            Case({f"mlops_gpu_xid_errors_total{_labels(xid_labels('13'))}": xid_case}, "8m"),
        ),
        Alert(
            "GpuEccUncorrectedErrors",
            "gpu",
            f"increase(mlops_gpu_ecc_errors_total{selector(s, UNCORRECTED, VOLATILE)}[{w}]) > 0",
            c.for_critical,
            "critical",
            f"{where} had uncorrectable ECC errors",
            f"Uncorrectable memory errors on {where} corrupt or kill the job using it; drain the node and reset "
            "the GPU (row remapping happens on reset).",
            Case(
                {f"mlops_gpu_ecc_errors_total{_labels({**g, 'type': 'uncorrected', 'scope': 'volatile'})}": "0x5 2x30"},
                "8m",
                ({**g, "type": "uncorrected", "scope": "volatile"},),
            ),
            Case(
                {f"mlops_gpu_ecc_errors_total{_labels({**g, 'type': 'corrected', 'scope': 'volatile'})}": "0x5 2x30"},
                "8m",
            ),
        ),
        Alert(
            "GpuRowRemapFailure",
            "gpu",
            f"mlops_gpu_remap_failure{selector(s)} == 1",
            c.for_critical,
            "critical",
            f"{where} failed to remap a memory row",
            f"{where} has run out of spare rows or failed a remap: it cannot be trusted and needs an RMA.",
            Case({f"mlops_gpu_remap_failure{gl}": "0x3 1x20"}, "10m", (g,)),
            Case({f"mlops_gpu_remap_failure{gl}": "0x20"}, "10m"),
        ),
        Alert(
            "GpuRowRemapPending",
            "gpu",
            f"mlops_gpu_remap_pending{selector(s)} == 1",
            c.for_medium,
            "warning",
            f"{where} has a row remap pending",
            f"{where} remapped a memory row that takes effect only after a GPU reset; schedule one when the "
            "node is drained.",
            Case({f"mlops_gpu_remap_pending{gl}": "0x3 1x30"}, "25m", (g,)),
            Case({f"mlops_gpu_remap_pending{gl}": "0x3 1x5 0x25"}, "25m"),
        ),
        Alert(
            "GpuFellOffBus",
            "gpu",
            f"mlops_gpu_lost{selector(s)} == 1",
            c.for_critical,
            "critical",
            f"{where} fell off the bus",
            f"{where} no longer answers NVML (XID 79 class): every job on it is stuck; drain and reboot the node.",
            Case({f"mlops_gpu_lost{gl}": "0x3 1x20"}, "10m", (g,)),
            Case({f"mlops_gpu_lost{gl}": "0x20"}, "10m"),
        ),
        Alert(
            "GpuMissing",
            "gpu",
            f"mlops_gpu_devices{selector(s)} < max_over_time(mlops_gpu_devices{selector(s)}[6h])",
            c.for_short,
            "critical",
            f"{{{{ $labels.{n} }}}} sees fewer GPUs than it did",
            f"{{{{ $labels.{n} }}}} sees fewer GPUs than it did in the last 6h: a GPU was lost or hidden from "
            "the driver.",
            Case({f"mlops_gpu_devices{_labels({n: 'n1:9477'})}": "8x10 7x20"}, "20m", ({n: "n1:9477"},)),
            Case({f"mlops_gpu_devices{_labels({n: 'n1:9477'})}": "8x30"}, "20m"),
        ),
        Alert(
            "GpuPcieLinkDegraded",
            "gpu",
            f"mlops_gpu_pcie_link_width{selector(s)} < {on} group_left () mlops_gpu_pcie_link_width_max{selector(s)}",
            c.for_medium,
            "warning",
            f"{where} runs its PCIe link below full width",
            f"{where} trained its PCIe link narrower than it supports (bad riser, seating or retimer); host "
            "transfers and GPUDirect traffic slow down.",
            Case(
                {f"mlops_gpu_pcie_link_width{gl}": "8x40", f"mlops_gpu_pcie_link_width_max{gl}": "16x40"}, "30m", (g,)
            ),
            Case({f"mlops_gpu_pcie_link_width{gl}": "16x40", f"mlops_gpu_pcie_link_width_max{gl}": "16x40"}, "30m"),
        ),
        Alert(
            "GpuPcieReplays",
            "gpu",
            f"increase(mlops_gpu_pcie_replays_total{selector(s)}[{w}]) > {c.pcie_replays_threshold:g}",
            c.for_short,
            "warning",
            f"{where} is replaying PCIe packets",
            f"More than {_num(c.pcie_replays_threshold)} PCIe replays in {w} on {where}: the link is marginal.",
            Case({f"mlops_gpu_pcie_replays_total{gl}": "0+50x40"}, "30m", (g,)),
            Case({f"mlops_gpu_pcie_replays_total{gl}": "0+5x40"}, "30m"),
        ),
        Alert(
            "GpuNvlinkErrors",
            "gpu",
            f"sum without (type) (increase(mlops_gpu_nvlink_errors_total{selector(s)}[{w}])) "
            f"> {c.nvlink_errors_threshold:g}",
            c.for_short,
            "warning",
            f"NVLink {{{{ $labels.link }}}} of {where} has errors",
            f"More than {_num(c.nvlink_errors_threshold)} NVLink errors in {w} on link {{{{ $labels.link }}}} of "
            f"{where}; collectives over it retry or fail.",
            Case(
                {f"mlops_gpu_nvlink_errors_total{_labels({**g, 'link': '0', 'type': 'crc_flit'})}": "0+5x40"},
                "30m",
                ({**g, "link": "0"},),
            ),
            Case({f"mlops_gpu_nvlink_errors_total{_labels({**g, 'link': '0', 'type': 'crc_flit'})}": "0x40"}, "30m"),
        ),
        Alert(
            "GpuTemperatureNearSlowdown",
            "gpu",
            f"{temp} > {on} group_left () ({slow} - {c.temperature_margin_celsius:g})",
            c.for_short,
            "warning",
            f"{where} is close to its slowdown temperature",
            f"{where} is within {c.temperature_margin_celsius:g}°C of the temperature where it slows its clocks; "
            "check airflow and fans.",
            Case(
                {f"mlops_gpu_temperature_celsius{gl}": "85x20", f"mlops_gpu_slowdown_temperature_celsius{gl}": "87x20"},
                "15m",
                (g,),
            ),
            Case(
                {f"mlops_gpu_temperature_celsius{gl}": "70x20", f"mlops_gpu_slowdown_temperature_celsius{gl}": "87x20"},
                "15m",
            ),
        ),
        throttle("GpuThermalThrottling", c.thermal_throttle_reasons, "thermal"),
        throttle("GpuPowerThrottling", c.power_throttle_reasons, "power"),
        Alert(
            "GpuMemoryNearFull",
            "gpu",
            f"{used} / {on} group_left () {total} > {c.gpu_memory_full_ratio:g}",
            c.for_medium,
            "warning",
            f"{where} memory is nearly full",
            f"More than {_pct(c.gpu_memory_full_ratio)} of {where}'s memory is in use; the next allocation "
            "spike will OOM.",
            Case(
                {f"mlops_gpu_memory_used_bytes{gl}": "79e9x30", f"mlops_gpu_memory_total_bytes{gl}": "80e9x30"},
                "25m",
                (g,),
            ),
            Case(
                {f"mlops_gpu_memory_used_bytes{gl}": "40e9x30", f"mlops_gpu_memory_total_bytes{gl}": "80e9x30"}, "25m"
            ),
        ),
        Alert(
            "GpuAllocatedButIdle",
            "gpu",
            f"{idle} and {on} {used} > {c.gpu_allocated_bytes:g}",
            c.for_long,
            "warning",
            f"{where} is allocated but idle",
            f"{where} holds more than {_num(c.gpu_allocated_bytes)}B of memory but averaged under "
            f"{_pct(c.gpu_idle_utilization)} utilisation over {c.gpu_idle_window}: a hung or forgotten job.",
            Case(
                {f"mlops_gpu_utilization_ratio{gl}": "0x90", f"mlops_gpu_memory_used_bytes{gl}": "2e9x90"}, "75m", (g,)
            ),
            Case({f"mlops_gpu_utilization_ratio{gl}": "0.5x90", f"mlops_gpu_memory_used_bytes{gl}": "2e9x90"}, "75m"),
        ),
        Alert(
            "GpuHotWhileIdle",
            "gpu",
            f"{temp} > {c.hot_idle_temperature_celsius:g} and {on} {idle}",
            c.for_medium,
            "warning",
            f"{where} is hot while idle",
            f"{where} is above {c.hot_idle_temperature_celsius:g}°C with almost no work: its cooling is failing.",
            Case(
                {f"mlops_gpu_temperature_celsius{gl}": "80x60", f"mlops_gpu_utilization_ratio{gl}": "0x60"}, "50m", (g,)
            ),
            Case({f"mlops_gpu_temperature_celsius{gl}": "50x60", f"mlops_gpu_utilization_ratio{gl}": "0x60"}, "50m"),
        ),
    ]


# --- node -----------------------------------------------------------------------------------------------


def node_alerts(c: MixinConfig) -> list[Alert]:
    n = c.node_label
    e = c.exporter_selector
    h: Labels = {**_equalities(e), n: "n1:9477"}
    hl = _labels(h)
    on = f"{{{{ $labels.{n} }}}}"
    rw = c.node_rate_window
    fs_sel = selector(e, c.filesystem_selector)
    fs: Labels = {**h, "path": "/data", "mountpoint": "/data"}
    fsl = _labels(fs)
    ratio = f"mlops_node_filesystem_avail_bytes{fs_sel} / mlops_node_filesystem_size_bytes{fs_sel}"
    dev: Labels = {**h, "device": "eth0"}

    def rate_alert(name: str, metric: str, threshold: float, for_: str, what: str, desc: str,
                   lab: Labels, fire: str, quiet: str, at: str = "30m") -> Alert:  # fmt: skip
        return Alert(
            name, "node", f"rate({metric}{selector(e)}[{rw}]) > {threshold:g}", for_, "warning",
            what, desc,
            Case({f"{metric}{_labels(lab)}": fire}, at, (lab,)),
            Case({f"{metric}{_labels(lab)}": quiet}, at),
        )  # fmt: skip

    return [
        Alert(
            "NodeFilesystemFillingUp", "node",
            f"({ratio} < {c.filesystem_filling_avail_ratio:g}) and "
            f"predict_linear(mlops_node_filesystem_avail_bytes{fs_sel}[{c.filesystem_predict_window}], "
            f"{c.filesystem_predict_horizon_seconds}) < 0",
            c.for_very_long, "warning",
            f"Filesystem {{{{ $labels.mountpoint }}}} on {on} will be full soon",
            f"At the rate of the last {c.filesystem_predict_window}, {{{{ $labels.mountpoint }}}} on {on} fills "
            f"up within {c.filesystem_predict_horizon_seconds // 3600}h; checkpoints and logs will fail.",
            Case({f"mlops_node_filesystem_avail_bytes{fsl}": "140-0.5x80",
                  f"mlops_node_filesystem_size_bytes{fsl}": "1000x80"}, "70m", (fs,)),
            Case({f"mlops_node_filesystem_avail_bytes{fsl}": "200x80",
                  f"mlops_node_filesystem_size_bytes{fsl}": "1000x80"}, "70m"),
        ),
        Alert(
            "NodeFilesystemAlmostFull", "node", f"{ratio} < {c.filesystem_full_avail_ratio:g}",
            c.for_long, "critical",
            f"Filesystem {{{{ $labels.mountpoint }}}} on {on} is almost full",
            f"Less than {_pct(c.filesystem_full_avail_ratio)} of {{{{ $labels.mountpoint }}}} on {on} is free.",
            Case({f"mlops_node_filesystem_avail_bytes{fsl}": "30x60",
                  f"mlops_node_filesystem_size_bytes{fsl}": "1000x60"}, "45m", (fs,)),
            Case({f"mlops_node_filesystem_avail_bytes{fsl}": "100x60",
                  f"mlops_node_filesystem_size_bytes{fsl}": "1000x60"}, "45m"),
        ),
        Alert(
            "NodeMemoryLow", "node",
            f"mlops_node_memory_available_bytes{selector(e)} / mlops_node_memory_total_bytes{selector(e)} "
            f"< {c.memory_available_ratio:g}",
            c.for_medium, "warning",
            f"{on} is running out of memory",
            f"Less than {_pct(c.memory_available_ratio)} of {on}'s memory is available; data loader workers or "
            "the job will be OOM-killed.",
            Case({f"mlops_node_memory_available_bytes{hl}": "1e9x30",
                  f"mlops_node_memory_total_bytes{hl}": "64e9x30"}, "25m", (h,)),
            Case({f"mlops_node_memory_available_bytes{hl}": "32e9x30",
                  f"mlops_node_memory_total_bytes{hl}": "64e9x30"}, "25m"),
        ),
        rate_alert("NodeMemoryPressure", "mlops_node_pressure_memory_stalled_seconds_total", c.memory_pressure_ratio,
                   c.for_medium, f"{on} is stalling on memory",
                   f"All tasks on {on} were stalled on memory more than {_pct(c.memory_pressure_ratio)} of the "
                   "time (PSI): it is thrashing.", h, "0+12x40", "0+1x40"),
        rate_alert("NodeIoPressure", "mlops_node_pressure_io_stalled_seconds_total", c.io_pressure_ratio,
                   c.for_medium, f"{on} is stalling on I/O",
                   f"All tasks on {on} were stalled on I/O more than {_pct(c.io_pressure_ratio)} of the time "
                   "(PSI): data loading and checkpoints are slow.", h, "0+30x40", "0+1x40"),
        rate_alert("NodeCpuPressure", "mlops_node_pressure_cpu_waiting_seconds_total", c.cpu_pressure_ratio,
                   c.for_medium, f"{on} has tasks waiting for CPU",
                   f"Some task on {on} waited for a CPU more than {_pct(c.cpu_pressure_ratio)} of the time (PSI): "
                   "too many data loader workers or a noisy neighbour.", h, "0+55x40", "0+10x40"),
        Alert(
            "NodeCpuSaturated", "node",
            f"1 - sum without (mode) (rate(mlops_node_cpu_seconds_total{selector(e, IDLE)}[{rw}])) "
            f"/ mlops_node_cpus{selector(e)} > {c.cpu_busy_ratio:g}",
            c.for_long, "warning",
            f"{on} CPUs are saturated",
            f"{on}'s CPUs are more than {_pct(c.cpu_busy_ratio)} busy: input pipelines starve the GPUs.",
            Case({f'mlops_node_cpu_seconds_total{_labels({**h, "mode": "idle"})}': "0+1x60",
                  f"mlops_node_cpus{hl}": "4x60"}, "45m", (h,)),
            Case({f'mlops_node_cpu_seconds_total{_labels({**h, "mode": "idle"})}': "0+180x60",
                  f"mlops_node_cpus{hl}": "4x60"}, "45m"),
        ),
        rate_alert("NodeDiskIoSaturated", "mlops_node_disk_io_time_seconds_total", c.disk_io_busy_ratio,
                   c.for_long, f"Disk {{{{ $labels.device }}}} on {on} is saturated",
                   f"Disk {{{{ $labels.device }}}} on {on} had I/O in flight more than "
                   f"{_pct(c.disk_io_busy_ratio)} of the time.",
                   {**h, "device": "nvme0n1"}, "0+57x60", "0+6x60", "45m"),
        Alert(
            "NodeNetworkErrors", "node",
            f"rate(mlops_node_network_receive_errors_total{selector(e)}[{rw}]) > {c.network_errors_per_second:g} "
            f"or rate(mlops_node_network_transmit_errors_total{selector(e)}[{rw}]) > "
            f"{c.network_errors_per_second:g}",
            c.for_medium, "warning",
            f"{{{{ $labels.device }}}} on {on} has network errors",
            f"More than {c.network_errors_per_second:g} errors/s on {{{{ $labels.device }}}} of {on}: check the "
            "cable, transceiver and switch port.",
            Case({f"mlops_node_network_receive_errors_total{_labels(dev)}": "0+120x40",
                  f"mlops_node_network_transmit_errors_total{_labels(dev)}": "0x40"}, "30m", (dev,)),
            Case({f"mlops_node_network_receive_errors_total{_labels(dev)}": "0+1x40",
                  f"mlops_node_network_transmit_errors_total{_labels(dev)}": "0x40"}, "30m"),
        ),
        Alert(
            "NodeInfinibandErrors", "node",
            f"increase(mlops_node_infiniband_port_errors_total{selector(e)}[{c.gpu_error_window}]) > "
            f"{c.infiniband_errors_threshold:g}",
            c.for_short, "warning",
            f"InfiniBand {{{{ $labels.device }}}} port {{{{ $labels.port }}}} on {on} has errors",
            f"More than {c.infiniband_errors_threshold:g} {{{{ $labels.type }}}} errors in "
            f"{c.gpu_error_window} on InfiniBand {{{{ $labels.device }}}} port {{{{ $labels.port }}}} of {on}; "
            "NCCL traffic over it retries or times out.",
            Case({f'mlops_node_infiniband_port_errors_total{_labels({**h, "device": "mlx5_0", "port": "1", "type": "symbol"})}': "0+5x40"},  # noqa: E501
                 "30m", ({**h, "device": "mlx5_0", "port": "1", "type": "symbol"},)),
            Case({f'mlops_node_infiniband_port_errors_total{_labels({**h, "device": "mlx5_0", "port": "1", "type": "symbol"})}': "0x40"},  # noqa: E501
                 "30m"),
        ),
        Alert(
            "NodeClockSkew", "node", f"abs(mlops_node_timex_offset_seconds{selector(e)}) > {c.clock_offset_seconds:g}",
            c.for_medium, "warning",
            f"{on}'s clock is off",
            f"{on}'s clock is more than {c.clock_offset_seconds:g}s off: cross-node timelines and log replay "
            "misorder events.",
            Case({f"mlops_node_timex_offset_seconds{hl}": "0.2x30"}, "25m", (h,)),
            Case({f"mlops_node_timex_offset_seconds{hl}": "0.001x30"}, "25m"),
        ),
        Alert(
            "NodeClockNotSynchronising", "node", f"mlops_node_timex_sync_status{selector(e)} == 0",
            c.for_medium, "warning",
            f"{on}'s clock is not synchronising",
            f"The kernel reports {on}'s clock unsynchronised: check chrony/ntpd.",
            Case({f"mlops_node_timex_sync_status{hl}": "0x30"}, "25m", (h,)),
            Case({f"mlops_node_timex_sync_status{hl}": "1x30"}, "25m"),
        ),
    ]  # fmt: skip


# --- training -------------------------------------------------------------------------------------------


def training_alerts(c: MixinConfig) -> list[Alert]:
    n = c.node_label
    t = c.training_selector
    tr: Labels = {**_equalities(t), "job": "train-a", "rank": "1", "node": "n1", n: "n1:9477"}
    tl = _labels(tr)
    job_only = {**_equalities(t), "job": "train-a"}
    who = "Rank {{ $labels.rank }} of job {{ $labels.job }}"
    step = "mlops_training_step_duration_seconds"
    samples = "job:mlops_training_samples:rate_recent"
    # Evaluation times (minutes) derived from the thresholds, so overridden thresholds keep their tests valid:
    # heartbeat stops at 10m; it must be older than the threshold for the whole `for:` duration, plus slack.
    stall_at = 10 + _minutes(c.training_stall_seconds) + _minutes(parse_duration(c.for_stall)) + 3
    ckpt_at = _minutes(c.checkpoint_stale_seconds) + _minutes(parse_duration(c.for_medium)) + 3
    return [
        Alert(
            "TrainingStalled",
            "training",
            # A rank that closed its monitor (training finished) keeps its last heartbeat until the sidecar's
            # retention forgets it: that silence is not a stall.
            f"(time() - mlops_training_last_step_timestamp_seconds{selector(t)} > {c.training_stall_seconds:g})"
            f" unless on (job, rank) (mlops_training_finished{selector(t)} == 1)",
            c.for_stall,
            "critical",
            f"{who} has stopped making progress",
            f"{who} has not finished a step for more than {c.training_stall_seconds:g}s: a hung collective, "
            "a dead peer or a stuck data loader. Check its logs around the last step.",
            Case(
                {
                    f"mlops_training_last_step_timestamp_seconds{tl}": f"0+60x10 600x{stall_at + 5}",
                    f"mlops_training_finished{tl}": f"0x{stall_at + 15}",
                },
                f"{stall_at}m",
                (tr,),
            ),
            Case({f"mlops_training_last_step_timestamp_seconds{tl}": f"0+60x{stall_at + 5}"}, f"{stall_at}m"),
            also_quiet=(
                Case(
                    {
                        f"mlops_training_last_step_timestamp_seconds{tl}": f"0+60x10 600x{stall_at + 5}",
                        f"mlops_training_finished{tl}": f"0x10 1x{stall_at + 5}",
                    },
                    f"{stall_at}m",
                ),
            ),
        ),
        Alert(
            "TrainingStraggler",
            "training",
            f"mlops_training_straggler_score{selector(t)} < {c.straggler_score:g}",
            c.for_straggler,
            "warning",
            f"{who} is a straggler",
            f"{who} is slower than the job's typical rank (score below {c.straggler_score:g}); every rank waits "
            "for it at each collective. Check its GPU's throttling and its node.",
            Case({f"mlops_training_straggler_score{tl}": "0.5x30"}, "25m", (tr,)),
            Case({f"mlops_training_straggler_score{tl}": "0.95x30"}, "25m"),
        ),
        Alert(
            "TrainingStepTimeAnomaly",
            "training",
            f"job_rank:{step}:mean_recent > {c.step_time_anomaly_factor:g} * job_rank:{step}:mean_baseline",
            c.for_medium,
            "warning",
            f"{who} steps are much slower than usual",
            f"{who}'s mean step time over {c.training_rate_window} is more than {c.step_time_anomaly_factor:g}x "
            f"its {c.training_baseline_window} mean.",
            Case({f"{step}_count{tl}": "0+60x200", f"{step}_sum{tl}": "0+6x120 720+60x80"}, "140m", (tr,)),
            Case({f"{step}_count{tl}": "0+60x200", f"{step}_sum{tl}": "0+6x200"}, "140m"),
        ),
        Alert(
            "TrainingThroughputRegression",
            "training",
            f"{samples} < {c.throughput_drop_ratio:g} * avg_over_time({samples}[{c.training_baseline_window}]) "
            f"and {samples} > 0",
            c.for_medium,
            "warning",
            "Job {{ $labels.job }} throughput dropped",
            f"Job {{{{ $labels.job }}}} processes fewer than {_pct(c.throughput_drop_ratio)} of the samples/s it "
            f"averaged over {c.training_baseline_window}.",
            Case({f"mlops_training_samples_total{tl}": "0+6000x120 720000+2000x60"}, "140m", (job_only,)),
            Case({f"mlops_training_samples_total{tl}": "0+6000x180"}, "140m"),
        ),
        Alert(
            "TrainingLowGoodput",
            "training",
            f"job:mlops_training_goodput:ratio_rate < {c.goodput_ratio:g}",
            c.for_long,
            "warning",
            "Job {{ $labels.job }} wastes most of its time",
            f"Less than {_pct(c.goodput_ratio)} of job {{{{ $labels.job }}}}'s wall time over {c.goodput_window} "
            "was productive steps; see mlops_training_badput_seconds_total by kind.",
            Case(
                {
                    f"mlops_training_goodput_seconds_total{tl}": "0+20x120",
                    f"mlops_training_badput_seconds_total{_labels({**tr, 'kind': 'data_wait'})}": "0+40x120",
                },
                "100m",
                (job_only,),
            ),
            Case(
                {
                    f"mlops_training_goodput_seconds_total{tl}": "0+55x120",
                    f"mlops_training_badput_seconds_total{_labels({**tr, 'kind': 'data_wait'})}": "0+5x120",
                },
                "100m",
            ),
        ),
        Alert(
            "TrainingNonFiniteLoss",
            "training",
            f"increase(mlops_training_nonfinite_loss_total{selector(t)}[{c.training_rate_window}]) > 0",
            c.for_critical,
            "warning",
            f"{who} produced NaN or infinite losses",
            f"{who} recorded non-finite losses: the run is diverging (learning rate, bad batch, overflow).",
            Case({f"mlops_training_nonfinite_loss_total{tl}": "0x5 3x30"}, "8m", (tr,)),
            Case({f"mlops_training_nonfinite_loss_total{tl}": "0x30"}, "8m"),
        ),
        Alert(
            "TrainingCheckpointStale",
            "training",
            f"time() - mlops_training_last_checkpoint_timestamp_seconds{selector(t)} > {c.checkpoint_stale_seconds:g}",
            c.for_medium,
            "warning",
            f"{who} has not checkpointed recently",
            f"{who}'s last checkpoint is more than {c.checkpoint_stale_seconds:g}s old: a failure now loses "
            "that much work.",
            Case({f"mlops_training_last_checkpoint_timestamp_seconds{tl}": f"0x{ckpt_at + 2}"}, f"{ckpt_at}m", (tr,)),
            Case({f"mlops_training_last_checkpoint_timestamp_seconds{tl}": f"0+60x{ckpt_at + 2}"}, f"{ckpt_at}m"),
        ),
        Alert(
            "TrainingDataLoaderBound",
            "training",
            f'job_rank:mlops_training_phase_seconds:ratio_rate_recent{{phase="data_wait"}} > {c.data_wait_ratio:g}',
            c.for_medium,
            "warning",
            f"{who} waits on its input pipeline",
            f"{who} spends more than {_pct(c.data_wait_ratio)} of its step time waiting for data: add loader "
            "workers, prefetch, or faster storage.",
            Case(
                {
                    f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'data_wait'})}": "0+24x40",
                    f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'forward'})}": "0+12x40",
                    f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'backward'})}": "0+24x40",
                },
                "30m",
                ({**tr, "phase": "data_wait"},),
            ),
            Case(
                {
                    f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'data_wait'})}": "0+3x40",
                    f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'forward'})}": "0+12x40",
                    f"mlops_training_phase_seconds_total{_labels({**tr, 'phase': 'backward'})}": "0+24x40",
                },
                "30m",
            ),
        ),
    ]


# --- the pipeline itself --------------------------------------------------------------------------------


def pipeline_alerts(c: MixinConfig) -> list[Alert]:
    n = c.node_label
    e, sh = c.exporter_selector, c.shipper_selector
    h: Labels = {**_equalities(e), n: "n1:9477"}
    col: Labels = {**h, "collector": "host"}
    sp: Labels = {**_equalities(sh), n: "n1:9477"}
    spf: Labels = {**sp, "file": "/logs/train-a-rank0.jsonl"}
    on = f"{{{{ $labels.{n} }}}}"
    return [
        Alert(
            "MlopsExporterDown",
            "pipeline",
            f"up{selector(e)} == 0",
            c.for_short,
            "critical",
            f"The mlops-obs sidecar on {on} is down",
            f"Prometheus cannot scrape the sidecar on {on}: GPU, host and training metrics from that node are "
            "missing and its other alerts cannot fire.",
            Case({f"up{_labels(h)}": "0x20"}, "15m", (h,)),
            Case({f"up{_labels(h)}": "1x20"}, "15m"),
        ),
        Alert(
            "MlopsCollectorFailing",
            "pipeline",
            f"mlops_scrape_collector_success{selector(e)} == 0",
            c.for_medium,
            "warning",
            f"Collector {{{{ $labels.collector }}}} on {on} is failing",
            f"The {{{{ $labels.collector }}}} collector on {on} has failed (or been abandoned) for a while; its "
            "series are missing. The sidecar's log says why.",
            Case({f"mlops_scrape_collector_success{_labels(col)}": "0x30"}, "25m", (col,)),
            Case({f"mlops_scrape_collector_success{_labels(col)}": "1x30"}, "25m"),
        ),
        Alert(
            "MlopsCollectorSlow",
            "pipeline",
            f"mlops_scrape_collector_duration_seconds{selector(e)} > {c.collector_slow_seconds:g}",
            c.for_medium,
            "warning",
            f"Collector {{{{ $labels.collector }}}} on {on} is slow",
            f"The {{{{ $labels.collector }}}} collector on {on} takes more than {c.collector_slow_seconds:g}s "
            "per sample (a hanging NVML call or a huge /proc); its data goes stale.",
            Case({f"mlops_scrape_collector_duration_seconds{_labels(col)}": "3x30"}, "25m", (col,)),
            Case({f"mlops_scrape_collector_duration_seconds{_labels(col)}": "0.01x30"}, "25m"),
        ),
        Alert(
            "MlopsScrapeSlow",
            "pipeline",
            f"scrape_duration_seconds{selector(e)} > {c.scrape_slow_seconds:g}",
            c.for_medium,
            "warning",
            f"Scraping the sidecar on {on} is slow",
            f"Prometheus needs more than {c.scrape_slow_seconds:g}s to scrape the sidecar on {on}: too many "
            "series or an overloaded node.",
            Case({f"scrape_duration_seconds{_labels(h)}": "2x30"}, "25m", (h,)),
            Case({f"scrape_duration_seconds{_labels(h)}": "0.05x30"}, "25m"),
        ),
        Alert(
            "MlopsShipperBehind",
            "pipeline",
            f"mlops_shipper_lag_bytes{selector(sh)} > {c.shipper_lag_bytes:g}",
            c.for_medium,
            "warning",
            f"The log shipper on {on} is behind",
            f"More than {_num(c.shipper_lag_bytes)}B of {{{{ $labels.file }}}} on {on} are not shipped yet: the "
            "store is slow or rejecting.",
            Case({f"mlops_shipper_lag_bytes{_labels(spf)}": "1e9x30"}, "25m", (spf,)),
            Case({f"mlops_shipper_lag_bytes{_labels(spf)}": "1e3x30"}, "25m"),
        ),
        Alert(
            "MlopsShipperNotShipping",
            "pipeline",
            f"time() - mlops_shipper_last_success_timestamp_seconds{selector(sh)} > {c.shipper_stale_seconds:g} "
            f"and on ({n}) sum by ({n}) (rate(mlops_shipper_lines_read_total{selector(sh)}[{c.node_rate_window}])) "
            "> 0",
            c.for_short,
            "critical",
            f"The log shipper on {on} delivers nothing",
            f"The shipper on {on} reads lines but has not delivered any for more than {c.shipper_stale_seconds:g}s.",
            Case(
                {
                    f"mlops_shipper_last_success_timestamp_seconds{_labels(sp)}": "0x40",
                    f"mlops_shipper_lines_read_total{_labels(sp)}": "0+100x40",
                },
                "30m",
                (sp,),
            ),
            Case(
                {
                    f"mlops_shipper_last_success_timestamp_seconds{_labels(sp)}": "0+60x40",
                    f"mlops_shipper_lines_read_total{_labels(sp)}": "0+100x40",
                },
                "30m",
            ),
        ),
        Alert(
            "MlopsShipperDeadLetters",
            "pipeline",
            f"increase(mlops_shipper_dead_letters_total{selector(sh)}[{c.gpu_error_window}]) > 0",
            c.for_critical,
            "warning",
            f"The log shipper on {on} dead-lettered events",
            f"The store rejected events from {on} for good; they are in the dead-letter file, not in the store.",
            Case({f"mlops_shipper_dead_letters_total{_labels(sp)}": "0x5 4x30"}, "8m", (sp,)),
            Case({f"mlops_shipper_dead_letters_total{_labels(sp)}": "0x30"}, "8m"),
        ),
    ]


# --- files ----------------------------------------------------------------------------------------------

GROUP_TITLES = {"gpu": "mlops-obs.gpu", "node": "mlops-obs.node", "training": "mlops-obs.training",
                "pipeline": "mlops-obs.pipeline"}  # fmt: skip


def alert_groups(cfg: MixinConfig) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for a in alerts(cfg):
        groups.setdefault(a.group, []).append(a.rule(cfg))
    out = []
    for key, rules in groups.items():
        g: dict[str, Any] = {"name": GROUP_TITLES[key], "rules": rules}
        if cfg.rule_interval:
            g["interval"] = cfg.rule_interval
        out.append(g)
    return {"groups": out}


def recording_groups(cfg: MixinConfig) -> dict[str, Any]:
    g: dict[str, Any] = {
        "name": "mlops-obs.training.rules",
        "rules": [{"record": r.record, "expr": r.expr} for r in recording_rules(cfg)],
    }
    if cfg.rule_interval:
        g["interval"] = cfg.rule_interval
    return {"groups": [g]}


_TEMPLATE = re.compile(r"\{\{\s*\$labels\.(\w+)\s*\}\}")


def render_annotation(text: str, labels: Labels) -> str:
    """Expand ``{{ $labels.x }}`` as Prometheus does; a label the alert lacks is a bug in the rule's text."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in labels:
            raise KeyError(f"annotation uses $labels.{m.group(1)}, which the alert does not carry: {text!r}")
        return labels[m.group(1)]

    return _TEMPLATE.sub(sub, text)


def rule_tests(cfg: MixinConfig, rule_files: list[str]) -> dict[str, Any]:
    """promtool test input: for every alert one group where it fires and one where it must stay quiet."""
    tests: list[dict[str, Any]] = []
    for a in alerts(cfg):
        if "$value" in a.summary + a.description:
            raise ValueError(f"{a.name}: annotations with $value cannot be unit-tested exactly; use thresholds")
        for case, firing in ((a.fires, True), (a.quiet, False), *((q, False) for q in a.also_quiet)):
            if firing and not case.alerts:
                raise ValueError(f"{a.name}: the firing case expects no alert")
            exp = []
            for lab in case.alerts if firing else ():
                full = {**lab, "severity": a.severity, **a.extra_labels}
                ann = {k: render_annotation(v, full) for k, v in a.annotations(cfg).items()}
                exp.append({"exp_labels": full, "exp_annotations": ann})
            tests.append(
                {
                    "interval": "1m",
                    "input_series": [{"series": k, "values": v} for k, v in case.series.items()],
                    "alert_rule_test": [{"eval_time": case.at, "alertname": a.name, "exp_alerts": exp}],
                }
            )
    return {"rule_files": rule_files, "evaluation_interval": "1m", "tests": tests}
