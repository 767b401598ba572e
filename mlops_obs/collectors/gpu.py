"""GPU collector through NVML: dcgm-exporter's default set plus the health fields it leaves out.

Every NVML call goes through :class:`mlops_obs.collectors._nvml.Nvml`, so a field a device does not
support has no series (never a misleading 0) and a GPU that fell off the bus turns into
``mlops_gpu_lost{gpu} 1`` while the other devices are still reported. The collector runs on the
background sampler, so slow NVML calls (PCIe throughput blocks ~20 ms on real hardware) never reach a
scrape; a hung call is abandoned by the sampler's deadline.

Design choices that differ from dcgm-exporter, and why:

* XIDs are a counter per XID code fed by an NVML event thread, not a gauge of the *last* XID (on
  which public ``increase()`` rules misfire).
* Clock-event (throttle) reasons are seconds counters per reason (NVML's violation time per policy),
  so ``rate()`` gives the fraction of time each reason held the clocks down.
* GPU series carry the ``job`` and ``rank`` of the single instrumented rank running on the device,
  and per-process series carry pid, job, rank, container, pod and namespace (see ``gpu_process``);
  ``mlops_gpu_owner_info{gpu, uuid, job, rank}`` says the same owner on its own series, which the
  alert rules join (a GPU fault then carries its job, and mutes that job's symptoms).
* GPM profiling ratios exist only on Hopper and newer; ``mlops_gpu_profiling_supported`` says so
  explicitly elsewhere, instead of the ratios silently missing.
* NVLink throughput and error counters come from one ``nvmlDeviceGetFieldValues`` call per device,
  not one call per link and counter.

What the collector keeps per device between rounds (identity, timed caches, GPM state) is in
:mod:`.gpu_device`; the XID event thread in :mod:`.gpu_xid`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, CollectorUnavailable, register
from mlops_obs.collectors._nvml import GpuLost, Nvml
from mlops_obs.collectors._nvml_structs import FieldDecoder, field_values
from mlops_obs.collectors.gpu_device import (
    CLOCK_MEM,
    CLOCK_SM,
    FI_MEMORY_TEMP,
    FI_NVLINK_ERRORS,
    MEMORY_ERROR_CORRECTED,
    MEMORY_ERROR_UNCORRECTED,
    NVML_MEMORY_V2,
    PCIE_RX,
    PCIE_TX,
    PSTATE_UNKNOWN,
    TEMPERATURE_GPU,
    Device,
    Identity,
    Owner,
    Profile,
    profile,
)
from mlops_obs.collectors.gpu_process import Attributor
from mlops_obs.collectors.gpu_xid import XidWatcher
from mlops_obs.config import (
    ConfigError,
    Setting,
    choice_parser,
    int_parser,
    node_name,
    parse_bool,
    parse_duration,
    parse_optional_path,
)
from mlops_obs.metrics import Families, FamilyBuilder, Labels
from mlops_obs.rankdir import RankDirectory

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

# Every family: name -> (type, help). Counters are named with their _total sample name.
FAMILIES: dict[str, tuple[str, str]] = {
    "mlops_gpu_info": ("gauge", "GPU identity and driver version; always 1."),
    "mlops_gpu_owner_info": (
        "gauge",
        "The instrumented training rank (job, rank) using this GPU, when exactly one does; always 1.",
    ),
    "mlops_gpu_devices": ("gauge", "GPUs visible to NVML."),
    "mlops_gpu_lost": ("gauge", "1 when NVML reports the GPU fell off the bus (NVML_ERROR_GPU_IS_LOST)."),
    "mlops_gpu_profiling_supported": ("gauge", "1 where GPM profiling ratios are available (Hopper and newer)."),
    "mlops_gpu_utilization_ratio": ("gauge", "Fraction of the last sample period a kernel was running."),
    "mlops_gpu_memory_copy_utilization_ratio": ("gauge", "Fraction of the sample period memory was read or written."),
    "mlops_gpu_memory_used_bytes": ("gauge", "Device memory allocated by processes."),
    "mlops_gpu_memory_free_bytes": ("gauge", "Device memory free."),
    "mlops_gpu_memory_reserved_bytes": ("gauge", "Device memory reserved by the driver and firmware."),
    "mlops_gpu_memory_total_bytes": ("gauge", "Device memory installed."),
    "mlops_gpu_sm_clock_hertz": ("gauge", "Current SM clock."),
    "mlops_gpu_memory_clock_hertz": ("gauge", "Current memory clock."),
    "mlops_gpu_temperature_celsius": ("gauge", "GPU die temperature."),
    "mlops_gpu_memory_temperature_celsius": ("gauge", "HBM memory temperature."),
    "mlops_gpu_slowdown_temperature_celsius": ("gauge", "Temperature at which the GPU starts to slow down."),
    "mlops_gpu_shutdown_temperature_celsius": ("gauge", "Temperature at which the GPU shuts down."),
    "mlops_gpu_power_usage_watts": ("gauge", "Power draw of the board."),
    "mlops_gpu_power_limit_watts": ("gauge", "Enforced power limit."),
    "mlops_gpu_energy_joules_total": ("counter", "Energy consumed since the driver was loaded."),
    "mlops_gpu_pstate": ("gauge", "Performance state (0 fastest, 15 slowest)."),
    "mlops_gpu_fan_speed_ratio": ("gauge", "Intended fan speed as a fraction of its maximum."),
    "mlops_gpu_pcie_link_generation": ("gauge", "Current PCIe link generation."),
    "mlops_gpu_pcie_link_generation_max": ("gauge", "Maximum PCIe link generation of the GPU and system."),
    "mlops_gpu_pcie_link_width": ("gauge", "Current PCIe link width (lanes)."),
    "mlops_gpu_pcie_link_width_max": ("gauge", "Maximum PCIe link width (lanes)."),
    "mlops_gpu_pcie_transmit_bytes_total": ("counter", "PCIe bytes transmitted (NVML field counter)."),
    "mlops_gpu_pcie_receive_bytes_total": ("counter", "PCIe bytes received (NVML field counter)."),
    "mlops_gpu_pcie_transmit_bytes_per_second": (
        "gauge",
        "PCIe transmit throughput over NVML's 20 ms window (only from drivers without the PCIe byte counters).",
    ),
    "mlops_gpu_pcie_receive_bytes_per_second": (
        "gauge",
        "PCIe receive throughput over NVML's 20 ms window (only from drivers without the PCIe byte counters).",
    ),
    "mlops_gpu_pcie_replays_total": ("counter", "PCIe replays (link-level retransmissions)."),
    "mlops_gpu_nvlink_transmit_bytes_total": (
        "counter",
        "NVLink data bytes transmitted (per GPU; per link with --gpu.profile=full).",
    ),
    "mlops_gpu_nvlink_receive_bytes_total": (
        "counter",
        "NVLink data bytes received (per GPU; per link with --gpu.profile=full).",
    ),
    "mlops_gpu_nvlink_errors_total": (
        "counter",
        "NVLink data-link errors of every type (per GPU; per link and type with --gpu.profile=full).",
    ),
    "mlops_gpu_ecc_errors_total": ("counter", "Memory ECC errors by type and scope (volatile: since driver load)."),
    "mlops_gpu_remapped_rows_total": ("counter", "Memory rows remapped, by the error that caused it."),
    "mlops_gpu_remap_pending": ("gauge", "1 when a row remap waits for a GPU reset."),
    "mlops_gpu_remap_failure": ("gauge", "1 when a row remap failed (the GPU needs service)."),
    "mlops_gpu_throttle_seconds_total": ("counter", "Seconds the clocks were held down, per reason."),
    "mlops_gpu_xid_errors_total": ("counter", "XID errors seen by this exporter's NVML event thread, per XID."),
    "mlops_gpu_sm_active_ratio": ("gauge", "Fraction of SMs busy (GPM, Hopper and newer; counter-interval mean)."),
    "mlops_gpu_tensor_active_ratio": ("gauge", "Fraction of time tensor cores were busy (GPM; counter-interval mean)."),
    "mlops_gpu_dram_active_ratio": ("gauge", "Fraction of peak DRAM bandwidth used (GPM; counter-interval mean)."),
    "mlops_gpu_graphics_engine_active_ratio": (
        "gauge",
        "Fraction of time the graphics/compute engine was busy (GPM; counter-interval mean).",
    ),
    "mlops_gpu_persistence_mode": ("gauge", "1 when persistence mode is on."),
    "mlops_gpu_process_memory_used_bytes": (
        "gauge",
        "Device memory used by processes (per GPU and owner; per pid with --gpu.profile=full).",
    ),
    "mlops_gpu_process_utilization_ratio": (
        "gauge",
        "Fraction of time processes' kernels ran (SM), averaged over NVML's samples of the last counter "
        "interval (per GPU and owner, summed; per pid with --gpu.profile=full).",
    ),
}


PROFILES = ("default", "full")


def _loader(config: Mapping[str, Any]) -> Any:
    if config.get("gpu.backend", "nvml") == "fake":
        from mlops_obs.collectors.fake_nvml import FakeNvml, ScenarioError, load_scenario

        try:
            scenario = load_scenario(config.get("gpu.fake-scenario"))
            fake = FakeNvml(scenario)
        except ScenarioError as e:
            raise ConfigError("gpu.fake-scenario", str(e)) from None
        except (TypeError, ValueError) as e:
            raise ConfigError("gpu.fake-scenario", f"bad value in scenario: {e}") from None
        return lambda: fake

    def load_real() -> Any:
        import pynvml

        return pynvml

    return load_real


@register
class GpuCollector(Collector):
    name = "gpu"
    help = "NVIDIA GPU health, utilisation and per-process memory through NVML."
    settings = (
        Setting("gpu.backend", choice_parser("nvml", "fake"), "nvml",
                "nvml: the real driver through nvidia-ml-py; fake: a simulated node for tests and demos.",
                choices=("nvml", "fake")),
        Setting("gpu.fake-scenario", parse_optional_path, None,
                "YAML/JSON scenario the fake backend plays (default: 8 healthy H100s).", metavar="FILE"),
        Setting("gpu.processes", parse_bool, True, "Report per-process GPU memory and utilisation.", kind="bool"),
        Setting("gpu.process-limit", int_parser(0, 10_000), 32,
                "At most this many processes per GPU get series (the largest by memory).", metavar="N"),
        Setting("gpu.xid-events", parse_bool, True, "Count XID errors from an NVML event thread.", kind="bool"),
        Setting("gpu.counter-interval", parse_duration, 15.0,
                "Re-read counters, slow health state and the windowed ratios (ECC, NVLink, PCIe bytes, "
                "throttle time, energy, power limit, PCIe link, per-process and GPM utilisation) this "
                "often; 0: every round.", metavar="DURATION"),
        Setting("gpu.nvlink", parse_bool, True,
                "Report NVLink throughput and error counters (per GPU; per link with --gpu.profile=full).",
                kind="bool"),
        Setting("gpu.profile", choice_parser(*PROFILES), "default",
                "Which series: default: what the alerts, dashboards and rank attribution read (NVLink per GPU, "
                "processes per GPU and owner; ~37 series a GPU); full: every field, NVLink per link and type, "
                "processes per pid (~140 series an H100).", choices=PROFILES),
    )  # fmt: skip

    def __init__(
        self,
        config: Mapping[str, Any],
        ranks: RankDirectory | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        super().__init__(config, ranks)
        if log is None:
            from mlops_obs.logs import get_logger

            log = get_logger(component="gpu")
        self.log: FilteringBoundLogger = log
        self.nvml = Nvml(_loader(config), log)
        self.out = FamilyBuilder(FAMILIES)
        self.attributor = Attributor(self.ranks)
        self.field_decoder = FieldDecoder()
        self.processes = bool(config.get("gpu.processes", True))
        self.process_limit = int(config.get("gpu.process-limit", 32))
        self.nvlink = bool(config.get("gpu.nvlink", True))
        self.profile: Profile = profile(str(config.get("gpu.profile", "default")), frozenset(FAMILIES))
        self.families = self.profile.families
        self.xid_enabled = bool(config.get("gpu.xid-events", True))
        self.counter_interval = float(config.get("gpu.counter-interval", 15.0))
        self.node = node_name()
        self._devices: list[Device] | None = None
        self._driver: str | None = None
        self.xid: XidWatcher | None = None
        self._limited_logged = False

    def _devices_once(self) -> list[Device]:
        if self._devices is None:
            handles = self.nvml.handles()
            self._driver = self.nvml.text("nvmlSystemGetDriverVersion") or ""
            labels = self.out.labels
            self._devices = [Device(i, h, labels.get({"gpu": str(i)})) for i, h in enumerate(handles)]
            if self.xid_enabled:
                self.xid = XidWatcher(self.nvml, [(d.index, d.handle) for d in self._devices], self.log).start()
        return self._devices

    # --- sampling ----------------------------------------------------------------------------------

    def sample(self) -> Iterable[Metric]:
        devices = self._devices_once()
        out = self.out.round()
        labels = self.out.labels
        out.add("mlops_gpu_devices", labels.get({}), len(devices))
        live_pids: set[int] = set()
        xids = self.xid.snapshot() if self.xid is not None else {}
        for d in devices:
            try:
                ident = d.ident
                if ident is None:
                    ident = d.prepare(self.nvml, labels, self._driver or "", self.node, self.nvlink, self.profile)
                self._sample_device(d, ident, out, live_pids)
            except GpuLost:
                d.lost()
                out.add("mlops_gpu_lost", d.lost_labels, 1)
                continue
            out.add("mlops_gpu_lost", d.lost_labels, 0)
        for (index, xid), count in sorted(xids.items()):
            dev = devices[index]
            if dev.labels:
                out.add("mlops_gpu_xid_errors_total", labels.get({**dev.labels, "xid": str(xid)}), count)
        self.attributor.end_round(live_pids)
        return out.metrics()

    def _processes(self, d: Device, out: Families, live: set[int]) -> tuple[str, str] | None:
        """Per-process series (per pid, or summed per owner); returns the (job, rank) that owns the device,
        if exactly one does."""
        procs = self.nvml.call("nvmlDeviceGetComputeRunningProcesses", d.handle)
        if procs is None:
            return None
        if procs and d.proc_util.due(time.monotonic(), self.counter_interval):
            d.proc_util.at = time.monotonic()
            d.proc_util.value = d.process_utilization(self.nvml, procs)
        util = d.proc_util.value
        if len(procs) > 1:
            procs = sorted(procs, key=lambda p: -(p.usedGpuMemory or 0))
        if self.process_limit and len(procs) > self.process_limit:
            if not self._limited_logged:
                self._limited_logged = True
                self.log.warning("more GPU processes than gpu.process-limit; the smallest get no series",
                                 gpu=d.index, processes=len(procs), limit=self.process_limit)  # fmt: skip
            procs = procs[: self.process_limit]
        owners: set[tuple[str, str]] = set()
        attribute = self.attributor.labels
        intern = self.out.labels.get
        per_pid = self.profile.process_per_pid
        cache = d.proc_labels
        seen: dict[int, tuple[dict[str, str], Labels]] = {}
        # label set -> [memory, processes with one, utilisation, processes with one]: one entry a pid (full
        # profile), or one per owner with the pids' values summed (default: a rank's data loader workers
        # that open a CUDA context, or a restarted rank, add no series).
        sums: dict[Labels, list[float]] = {}
        for p in procs:
            pid = int(p.pid)
            live.add(pid)
            attr = attribute(pid)
            # The attributor hands back the same dict while nothing about the pid changed, so the
            # label set built from it last round is still right.
            hit = cache.get(pid)
            if hit is None or hit[0] is not attr:
                base = {"gpu": d.labels["gpu"], "uuid": d.labels["uuid"]}
                if per_pid:
                    base["pid"] = str(pid)
                hit = (attr, intern({**base, **attr}))
            seen[pid] = hit
            if "job" in attr and "rank" in attr:
                owners.add((str(attr["job"]), str(attr["rank"])))
            acc = sums.get(hit[1])
            if acc is None:
                acc = sums[hit[1]] = [0, 0, 0.0, 0]  # memory, processes with memory, utilisation, with one
            used = p.usedGpuMemory
            if used is not None:
                acc[0] += used
                acc[1] += 1
            if util is not None and pid in util:  # a pid that appeared since the last read waits for the next
                acc[2] += util[pid]
                acc[3] += 1
        d.proc_labels = seen  # only the pids listed this round stay cached
        add = out.add
        for labels, (mem, with_mem, ratio, with_util) in sums.items():
            if with_mem:
                add("mlops_gpu_process_memory_used_bytes", labels, mem)
            if with_util:
                add("mlops_gpu_process_utilization_ratio", labels, ratio)
        return owners.pop() if len(owners) == 1 else None

    def _sample_device(self, d: Device, ident: Identity, out: Families, live: set[int]) -> None:
        n, h = self.nvml, d.handle
        call = n.call
        now = time.monotonic()
        # Gauges only an administrator or a link retrain changes (power limit, PCIe link generation
        # and width) are read with the counters, every gpu.counter-interval, and reused in between, in
        # their usual place among the series: three NVML calls fewer per device a round.
        rare = d.rare.due(now, self.counter_interval)
        if rare:
            d.rare.at = now
        rare_values = d.rare.value

        def rarely(fn: str) -> Any:
            if rare:
                rare_values[fn] = call(fn, h)
            return rare_values.get(fn)

        owner = self._processes(d, out, live) if self.processes else None
        if owner is None:
            lb = d.labels
        elif d.owner_labels is not None and d.owner_labels[0] == owner:
            lb = d.owner_labels[1]
        else:
            lb = self.out.labels.get({**d.labels, "job": owner[0], "rank": owner[1]})
            d.owner_labels = (owner, lb)
        # Every series below shares the device's label set, ~40 of them a device a round.
        add = out.add
        fams = self.families

        add("mlops_gpu_info", ident.info_labels, 1)
        if owner is not None:
            add("mlops_gpu_owner_info", self.out.labels.get({"gpu": d.labels["gpu"], "uuid": d.labels["uuid"],
                                                            "job": owner[0], "rank": owner[1]}), 1)  # fmt: skip
        add("mlops_gpu_profiling_supported", lb, int(ident.gpm is not None))

        u = call("nvmlDeviceGetUtilizationRates", h)
        if u is not None:
            add("mlops_gpu_utilization_ratio", lb, u.gpu / 100.0)
            add("mlops_gpu_memory_copy_utilization_ratio", lb, u.memory / 100.0)
        m = call("nvmlDeviceGetMemoryInfo", h, NVML_MEMORY_V2)
        if m is not None:
            add("mlops_gpu_memory_used_bytes", lb, m.used)
            if "mlops_gpu_memory_free_bytes" in fams:
                add("mlops_gpu_memory_free_bytes", lb, m.free)
                add("mlops_gpu_memory_reserved_bytes", lb, m.reserved)
            add("mlops_gpu_memory_total_bytes", lb, m.total)
        else:
            m1 = call("nvmlDeviceGetMemoryInfo", h)
            if m1 is not None:
                add("mlops_gpu_memory_used_bytes", lb, m1.used)
                if "mlops_gpu_memory_free_bytes" in fams:
                    add("mlops_gpu_memory_free_bytes", lb, m1.free)
                add("mlops_gpu_memory_total_bytes", lb, m1.total)
        v = call("nvmlDeviceGetClockInfo", h, CLOCK_SM)
        if v is not None:
            add("mlops_gpu_sm_clock_hertz", lb, v * 1e6)
        v = call("nvmlDeviceGetClockInfo", h, CLOCK_MEM)
        if v is not None:
            add("mlops_gpu_memory_clock_hertz", lb, v * 1e6)
        v = call("nvmlDeviceGetTemperature", h, TEMPERATURE_GPU)
        if v is not None:
            add("mlops_gpu_temperature_celsius", lb, v)

        fvs = call("nvmlDeviceGetFieldValues", h, [FI_MEMORY_TEMP])
        if fvs is not None:
            x = field_values(fvs)[0][2]
            if x is not None:
                add("mlops_gpu_memory_temperature_celsius", lb, x)
        st = ident.static
        if "slowdown" in st:
            add("mlops_gpu_slowdown_temperature_celsius", lb, st["slowdown"])
        if "shutdown" in st and "mlops_gpu_shutdown_temperature_celsius" in fams:
            add("mlops_gpu_shutdown_temperature_celsius", lb, st["shutdown"])

        v = call("nvmlDeviceGetPowerUsage", h)
        if v is not None:
            add("mlops_gpu_power_usage_watts", lb, v / 1000.0)
        v = rarely("nvmlDeviceGetEnforcedPowerLimit")
        if v is not None:
            add("mlops_gpu_power_limit_watts", lb, v / 1000.0)
        if "mlops_gpu_pstate" in fams:
            v = call("nvmlDeviceGetPerformanceState", h)
            if v is not None and int(v) != PSTATE_UNKNOWN:
                add("mlops_gpu_pstate", lb, v)
        if "mlops_gpu_fan_speed_ratio" in fams:
            v = call("nvmlDeviceGetFanSpeed", h)
            if v is not None:
                add("mlops_gpu_fan_speed_ratio", lb, v / 100.0)

        if "mlops_gpu_pcie_link_generation" in fams:
            v = rarely("nvmlDeviceGetCurrPcieLinkGeneration")
            if v is not None:
                add("mlops_gpu_pcie_link_generation", lb, v)
            if "gen_max" in st:
                add("mlops_gpu_pcie_link_generation_max", lb, st["gen_max"])
        v = rarely("nvmlDeviceGetCurrPcieLinkWidth")
        if v is not None:
            add("mlops_gpu_pcie_link_width", lb, v)
        if "width_max" in st:
            add("mlops_gpu_pcie_link_width_max", lb, st["width_max"])
        if not ident.pcie_counters:
            v = call("nvmlDeviceGetPcieThroughput", h, PCIE_TX)
            if v is not None:
                add("mlops_gpu_pcie_transmit_bytes_per_second", lb, v * 1024.0)
            v = call("nvmlDeviceGetPcieThroughput", h, PCIE_RX)
            if v is not None:
                add("mlops_gpu_pcie_receive_bytes_per_second", lb, v * 1024.0)
        self._counters(d, ident, out, lb, owner or (None, None))
        if ident.gpm is not None:
            for name, value in ident.gpm.read(n, h, time.monotonic(), self.counter_interval):
                if name in fams:
                    add(name, lb, value)
        if ident.mig_enabled:
            self._mig(d, out, live)

    def _counters(self, d: Device, ident: Identity, out: Families, lb: Labels, key: Owner) -> None:
        """Counters and slow-moving health state, re-read every ``gpu.counter-interval``.

        A counter loses no information when read less often (``rate()`` over the same window gives the
        same answer), only freshness, and these are most of a device's NVML calls and series (90
        NVLink series on an H100). Between refreshes the last refresh's samples are reused as they are.
        """
        now = time.monotonic()
        if not d.counters.due(now, self.counter_interval, key):
            for name, samples in d.counters.value:
                out.extend(name, samples)
            return
        n, h = self.nvml, d.handle
        intern = self.out.labels.get
        so = self.out.round()
        add = so.add
        v = n.call("nvmlDeviceGetTotalEnergyConsumption", h)
        if v is not None:
            add("mlops_gpu_energy_joules_total", lb, v / 1000.0)
        v = n.call("nvmlDeviceGetPcieReplayCounter", h)
        if v is not None:
            add("mlops_gpu_pcie_replays_total", lb, v)

        prof = self.profile
        for etype, ename in ((MEMORY_ERROR_CORRECTED, "corrected"), (MEMORY_ERROR_UNCORRECTED, "uncorrected")):
            for scope, sname in prof.ecc_scopes:
                v = n.call("nvmlDeviceGetTotalEccErrors", h, etype, scope)
                if v is not None:
                    add("mlops_gpu_ecc_errors_total", intern({**lb, "type": ename, "scope": sname}), v)
        rows = n.call("nvmlDeviceGetRemappedRows", h)
        if rows is not None:
            corr, unc, pending, failure = rows
            add("mlops_gpu_remapped_rows_total", intern({**lb, "type": "correctable"}), corr)
            add("mlops_gpu_remapped_rows_total", intern({**lb, "type": "uncorrectable"}), unc)
            add("mlops_gpu_remap_pending", lb, int(bool(pending)))
            add("mlops_gpu_remap_failure", lb, int(bool(failure)))
        if not ident.throttle_fields:  # an older driver: one call per reason
            for policy, reason in prof.throttle_policies().items():
                t = n.call("nvmlDeviceGetViolationStatus", h, policy)
                if t is not None:
                    add("mlops_gpu_throttle_seconds_total", intern({**lb, "reason": reason}), t.violationTime / 1e9)
        if "mlops_gpu_persistence_mode" in self.families:
            v = n.call("nvmlDeviceGetPersistenceMode", h)
            if v is not None:
                add("mlops_gpu_persistence_mode", lb, int(v == 1))
        fvs = n.call("nvmlDeviceGetFieldValues", h, ident.field_ids) if ident.field_ids else None
        if fvs is not None:
            values = self.field_decoder.values(fvs)
            lay = ident.fields
            for i, name, cause in lay.scalars:
                x = values[i]
                if x is not None:
                    if cause is None:
                        add(name, lb, x)
                    else:
                        add(name, intern({**lb, "reason": cause}), x / 1e9)
            if prof.nvlink_per_link:
                # Per-link label sets are built once per owner, not ~90 fresh dicts a device a round.
                if d.link_labels is None or d.link_labels[0] != key:
                    d.link_labels = (key, {})
                ll = d.link_labels[1]
                for i, name, fid, scope, scale in lay.nvlink:
                    x = values[i]
                    if x is None:
                        continue
                    labels = ll.get((fid, scope))
                    if labels is None:
                        extra = {"type": FI_NVLINK_ERRORS[fid]} if fid in FI_NVLINK_ERRORS else {}
                        labels = ll[(fid, scope)] = intern({**lb, "link": str(scope), **extra})
                    add(name, labels, x if scale is None else x * scale)
            elif lay.nvlink:
                # Per GPU (default profile): each family's sum over the links (and error types) that have
                # answered, or no sample when one that answered before is missing from this read: a partial
                # sum would look like a counter reset. A field the device never supports is simply not summed.
                answered = lay.nvlink_keys
                if None in values:
                    answered = frozenset((fid, scope) for i, _, fid, scope, _ in lay.nvlink if values[i] is not None)
                if answered >= d.nvlink_answered:
                    d.nvlink_answered = answered
                    for name, positions, scale in lay.sums:
                        xs: list[float] = [x for i in positions if (x := values[i]) is not None]
                        if xs:
                            add(name, lb, sum(xs if scale is None else [x * scale for x in xs]))
        for name, samples in d.counters.set(list(so.items()), now, key):
            out.extend(name, samples)

    def _mig(self, d: Device, out: Families, live: set[int]) -> None:
        """MIG instances as their own label set (gpu_instance, mig_profile) under the parent GPU's labels."""
        n = self.nvml
        intern = self.out.labels.get
        count = n.call("nvmlDeviceGetMaxMigDeviceCount", d.handle) or 0
        for i in range(int(count)):
            mh = n.call("nvmlDeviceGetMigDeviceHandleByIndex", d.handle, i)
            if mh is None:
                continue
            gi = n.call("nvmlDeviceGetGpuInstanceId", mh)
            name = n.text("nvmlDeviceGetName", mh) or ""
            profile = name.rsplit(" ", 1)[-1] if " MIG " in name else name
            lb = intern({**d.labels, "gpu_instance": str(gi if gi is not None else i), "mig_profile": profile})
            m = n.call("nvmlDeviceGetMemoryInfo", mh)
            if m is not None:
                out.add("mlops_gpu_memory_used_bytes", lb, m.used)
                if "mlops_gpu_memory_free_bytes" in self.families:
                    out.add("mlops_gpu_memory_free_bytes", lb, m.free)
                out.add("mlops_gpu_memory_total_bytes", lb, m.total)
            if self.processes:
                procs = n.call("nvmlDeviceGetComputeRunningProcesses", mh) or []
                used: dict[Labels, int] = {}
                for p in procs[: self.process_limit or None]:
                    pid = int(p.pid)
                    live.add(pid)
                    if p.usedGpuMemory is not None:
                        base = {"gpu": d.labels["gpu"], "uuid": d.labels["uuid"], "gpu_instance": lb["gpu_instance"]}
                        if self.profile.process_per_pid:
                            base["pid"] = str(pid)
                        labels = intern({**base, **self.attributor.labels(pid)})
                        used[labels] = used.get(labels, 0) + p.usedGpuMemory
                for labels, value in used.items():
                    out.add("mlops_gpu_process_memory_used_bytes", labels, value)

    def close(self) -> None:
        if self.xid is not None:
            self.xid.stop()
        self.attributor.close()
        self.nvml.shutdown()


__all__ = ["FAMILIES", "CollectorUnavailable", "GpuCollector", "XidWatcher"]
