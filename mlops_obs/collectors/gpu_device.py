"""One GPU as the collector keeps it between rounds: its identity, read once, and its timed caches.

What does not change while the driver is loaded (names, limits, which optional fields the driver
has) is read once per device by :meth:`Device.prepare`, again after the device was lost and came
back. What changes slowly is re-read every ``gpu.counter-interval`` through a :class:`Timed` each:
counters, settings-like gauges, per-process utilisation, GPM ratios.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.samples import Sample

from mlops_obs.collectors._nvml import GpuLost, Nvml
from mlops_obs.collectors._nvml_structs import GpmResults, field_values
from mlops_obs.collectors.timed import Timed
from mlops_obs.metrics import NO_LABELS, Labels, LabelSets

# NVML constants used here (nvml.h), so the collector imports without pynvml's shared library.
CLOCK_SM, CLOCK_MEM = 1, 2
TEMPERATURE_GPU = 0
THRESHOLD_SHUTDOWN, THRESHOLD_SLOWDOWN = 0, 1
PCIE_TX, PCIE_RX = 0, 1
MEMORY_ERROR_CORRECTED, MEMORY_ERROR_UNCORRECTED = 0, 1
VOLATILE_ECC, AGGREGATE_ECC = 0, 1
PSTATE_UNKNOWN = 32
FI_MEMORY_TEMP = 82
FI_NVLINK_LINK_COUNT = 91
FI_NVLINK_DATA_TX, FI_NVLINK_DATA_RX = 138, 139
FI_NVLINK_ERRORS = {161: "replay", 162: "recovery", 163: "crc"}
FI_PCIE_TX_BYTES, FI_PCIE_RX_BYTES = 197, 198  # NVML_FI_DEV_PCIE_COUNT_{TX,RX}_BYTES
NVML_MEMORY_V2 = 0x02000028
ARCH_HOPPER = 9
ARCH_UNKNOWN = 0xFFFFFFFF
GPM_METRICS_GET_VERSION = 1
GPM = {2: "mlops_gpu_sm_active_ratio", 5: "mlops_gpu_tensor_active_ratio", 10: "mlops_gpu_dram_active_ratio",
       1: "mlops_gpu_graphics_engine_active_ratio"}  # fmt: skip
GPM_IDS = tuple(GPM)

# Perf policy id -> reason label (nvmlPerfPolicyType_t).
THROTTLE_REASONS = {0: "power", 1: "thermal", 2: "sync_boost", 3: "board_limit", 4: "low_utilization",
                    5: "reliability", 10: "app_clocks", 11: "base_clocks"}  # fmt: skip
# The same violation-time counters (ns) as field ids NVML_FI_DEV_PERF_POLICY_*, in THROTTLE_REASONS order:
# one nvmlDeviceGetFieldValues call read all eight for 0.9-1.0 ms of CPU on an H200, against 6.0-6.3 ms
# for eight nvmlDeviceGetViolationStatus calls (docs/nvml-calls-h200-*.md).
FI_THROTTLE = dict(zip(range(74, 82), THROTTLE_REASONS.values()))

Owner = tuple[str | None, str | None]  # the (job, rank) that owns a device, or (None, None)


@dataclass(frozen=True)
class Profile:
    """Which series the collector reports (``--gpu.profile``), as dcgm-exporter's counter sets.

    ``full`` is every field NVML has, NVLink per link and error type, processes per pid. ``default`` is
    what the alerts, the dashboards and the GPU-to-rank attribution read (replay and rca), plus
    dcgm-exporter's default counters: about a third of a node's series (``docs/gpu.md`` says what each
    leaves out and why). Every query of the mixin gives the same answer on either.
    """

    name: str
    families: frozenset[str]  # the families reported at all
    nvlink_per_link: bool  # per link and error type; else one series per GPU, links (and types) summed
    process_per_pid: bool  # per pid; else per GPU and owner (job, rank, container, pod), pids summed
    ecc_scopes: tuple[tuple[int, str], ...]  # (NVML counter type, scope label)
    throttle_reasons: tuple[str, ...]  # the reason labels of mlops_gpu_throttle_seconds_total

    def throttle_policies(self) -> dict[int, str]:
        """Perf policy id -> reason, for this profile's reasons."""
        return {p: r for p, r in THROTTLE_REASONS.items() if r in self.throttle_reasons}

    def throttle_fields(self) -> dict[int, str]:
        """NVML_FI_DEV_PERF_POLICY_* field id -> reason, for this profile's reasons."""
        return {f: r for f, r in FI_THROTTLE.items() if r in self.throttle_reasons}


# Families only the full profile reports: configuration read once (shutdown threshold, maximum PCIe link
# generation, persistence mode), values no alert, panel or detector reads and dcgm-exporter's default set
# leaves out too (free and reserved memory: used and total tell how full a GPU is; P-state, fan, current
# PCIe generation: it drops at idle by design), and the GPM graphics-engine ratio (the SM and tensor
# ratios say more, and utilisation_ratio covers "is a kernel running").
FULL_ONLY_FAMILIES = frozenset({
    "mlops_gpu_memory_free_bytes", "mlops_gpu_memory_reserved_bytes", "mlops_gpu_shutdown_temperature_celsius",
    "mlops_gpu_pstate", "mlops_gpu_fan_speed_ratio", "mlops_gpu_pcie_link_generation",
    "mlops_gpu_pcie_link_generation_max", "mlops_gpu_persistence_mode", "mlops_gpu_graphics_engine_active_ratio",
})  # fmt: skip
ECC_SCOPES = ((VOLATILE_ECC, "volatile"), (AGGREGATE_ECC, "aggregate"))
# The reasons the mixin's throttle classes read (thermal; power and board limit): the others are either
# clocks lowered on purpose (low_utilization: idle; sync_boost: matched to a slower peer) or derived
# totals of the rest (app_clocks, base_clocks), and reliability is rare enough to look at with `full`.
DEFAULT_THROTTLE_REASONS = ("power", "thermal", "board_limit")


def profile(name: str, families: frozenset[str]) -> Profile:
    """The profile called ``name`` over the collector's ``families``."""
    if name == "full":
        return Profile("full", families, True, True, ECC_SCOPES, tuple(THROTTLE_REASONS.values()))
    if name == "default":
        return Profile("default", families - FULL_ONLY_FAMILIES, False, False, ECC_SCOPES[:1], DEFAULT_THROTTLE_REASONS)
    raise ValueError(f"unknown GPU profile {name!r}")


class Gpm:
    """A device's GPM profiling ratios: the means between two samples one counter interval apart.

    No sleep: the interval is the window. Not every round: on an H200 computing the four metrics cost
    1.1-1.5 ms of CPU, a sample 50 us. The first window is one round long, so the ratios appear at
    the second round.
    """

    __slots__ = ("primed", "ratios", "request", "results", "samples")

    def __init__(self, samples: list[Any]) -> None:
        self.samples = samples  # two nvmlGpmSample_t, alternating
        self.primed = False  # a first sample was taken: the next read can compute a window
        self.request: Any = None  # the nvmlGpmMetricsGet_t, built once and reused
        self.results: GpmResults | None = None
        self.ratios: Timed[list[tuple[str, float]]] = Timed([])

    def read(self, nvml: Nvml, handle: Any, now: float, interval: float) -> list[tuple[str, float]]:
        """(family, ratio) pairs of the current window; the last window's between refreshes."""
        if self.primed and not self.ratios.due(now, interval):
            return self.ratios.value
        prev, cur = self.samples
        if nvml.call("nvmlGpmSampleGet", handle, cur) is None:
            self.primed = False
            self.ratios.value = []
            return []
        self.samples = [cur, prev]
        if not self.primed:
            self.primed = True  # the next round computes the first (one-round) window
            return []
        self.ratios.at = now
        ids = GPM_IDS
        mg = self.request
        if mg is None:
            # The request (a ~10 KB structure with room for every GPM metric) is built once per
            # device: NVML only reads its inputs and overwrites each metric's result on every call.
            mg = nvml.lib.c_nvmlGpmMetricsGet_t()
            mg.version = GPM_METRICS_GET_VERSION
            mg.numMetrics = len(ids)
            for i, mid in enumerate(ids):
                mg.metrics[i].metricId = mid
            self.request = mg
            self.results = GpmResults(mg, len(ids))
        # Through the fields' descriptors: pynvml's __setattr__ hook only re-encodes str values.
        cls = type(mg)
        cls.sample1.__set__(mg, prev)
        cls.sample2.__set__(mg, cur)
        if nvml.call("nvmlGpmMetricsGet", mg) is None:
            self.ratios.value = []
            return []
        assert self.results is not None
        self.ratios.value = [
            (GPM[mid], max(0.0, min(1.0, value / 100.0)))
            for mid, (ret, value) in zip(ids, self.results.read(mg))
            if ret == 0
        ]
        return self.ratios.value


NVLINK_TX, NVLINK_RX = "mlops_gpu_nvlink_transmit_bytes_total", "mlops_gpu_nvlink_receive_bytes_total"
NVLINK_ERRORS = "mlops_gpu_nvlink_errors_total"


@dataclass(frozen=True)
class FieldLayout:
    """Where each counter sits in a device's one ``nvmlDeviceGetFieldValues`` request, worked out once
    per device (:meth:`Device.prepare`) so that a refresh walks positions, not field ids.

    ``scalars``: (position, family, throttle reason or ``None``) of the PCIe byte counters and the
    throttle times, in request order. ``nvlink``: (position, family, field id, link, scale) in request
    order. ``sums``: per NVLink family, in order of first appearance, the positions summed for the
    per-GPU series (default profile) and the scale applied to each value before summing.
    """

    scalars: tuple[tuple[int, str, str | None], ...]
    nvlink: tuple[tuple[int, str, int, int, float | None], ...]
    sums: tuple[tuple[str, tuple[int, ...], float | None], ...]
    nvlink_keys: frozenset[tuple[int, int]]

    @classmethod
    def of(cls, ids: list[Any]) -> FieldLayout:
        scalars: list[tuple[int, str, str | None]] = []
        nvlink: list[tuple[int, str, int, int, float | None]] = []
        sums: dict[str, tuple[list[int], float | None]] = {}
        for i, item in enumerate(ids):
            fid, scope = item if isinstance(item, tuple) else (item, 0)
            if fid == FI_PCIE_TX_BYTES:
                scalars.append((i, "mlops_gpu_pcie_transmit_bytes_total", None))
            elif fid == FI_PCIE_RX_BYTES:
                scalars.append((i, "mlops_gpu_pcie_receive_bytes_total", None))
            elif fid in FI_THROTTLE:
                scalars.append((i, "mlops_gpu_throttle_seconds_total", FI_THROTTLE[fid]))
            else:
                name, scale = {FI_NVLINK_DATA_TX: (NVLINK_TX, 1024.0), FI_NVLINK_DATA_RX: (NVLINK_RX, 1024.0)}.get(
                    fid, (NVLINK_ERRORS, None)
                )
                nvlink.append((i, name, fid, scope, scale))
                sums.setdefault(name, ([], scale))[0].append(i)
        return cls(
            tuple(scalars),
            tuple(nvlink),
            tuple((name, tuple(idx), scale) for name, (idx, scale) in sums.items()),
            frozenset((fid, scope) for _, _, fid, scope, _ in nvlink),
        )


@dataclass
class Identity:
    """What :meth:`Device.prepare` reads once per device."""

    info_labels: Labels  # the device's labels plus driver version, PCI bus id, node: mlops_gpu_info's
    static: dict[str, float]  # limits that never change: max PCIe link, temperature thresholds
    field_ids: list[Any]  # the counters read with one nvmlDeviceGetFieldValues call a refresh
    fields: FieldLayout  # where each of them sits in the answer
    pcie_counters: bool  # the driver has NVML_FI_DEV_PCIE_COUNT_{TX,RX}_BYTES
    throttle_fields: bool  # the driver has the NVML_FI_DEV_PERF_POLICY_* fields
    mig_enabled: bool
    gpm: Gpm | None  # None where GPM is not supported


@dataclass
class Device:
    index: int
    handle: Any
    lost_labels: Labels  # {gpu}: what mlops_gpu_lost carries
    labels: Labels = NO_LABELS  # gpu, uuid, model: kept while the device is lost (its XID series keep them)
    ident: Identity | None = None  # None until read, and again once the device was lost
    # Label sets derived from ``labels``, kept while what they derive from stays the same.
    owner_labels: tuple[tuple[str, str], Labels] | None = None  # the owning rank, and labels with it
    link_labels: tuple[Owner, dict[tuple[int, int], Labels]] | None = None  # per (field, link), per owner
    proc_labels: dict[int, tuple[dict[str, str], Labels]] = field(default_factory=dict)  # pid -> (attribution, set)
    # The NVLink (field, link) pairs the per-GPU sums added up at their last read (default profile).
    nvlink_answered: AbstractSet[tuple[int, int]] = field(default_factory=frozenset)
    # Re-read every gpu.counter-interval.
    counters: Timed[list[tuple[str, list[Sample]]]] = field(default_factory=lambda: Timed([]))  # per family
    rare: Timed[dict[str, Any]] = field(default_factory=lambda: Timed({}))  # settings-like gauges, by function
    proc_util: Timed[dict[int, float] | None] = field(default_factory=lambda: Timed(None))  # pid -> SM ratio
    proc_util_ts: int = 0  # NVML's timestamp of the newest utilisation sample read

    def lost(self) -> None:
        """The device fell off the bus: read its identity and every cache afresh when it is back."""
        self.ident = None
        self.counters.expire()
        self.rare.expire()

    def prepare(
        self, nvml: Nvml, labels: LabelSets, driver: str, node: str | None, nvlink: bool, prof: Profile
    ) -> Identity:
        """Read what does not change while the driver is loaded (and the field ids ``prof`` reports)."""
        n = nvml
        if self.handle is None:
            self.handle = n.call("nvmlDeviceGetHandleByIndex", self.index)
            if self.handle is None:
                raise GpuLost("nvmlDeviceGetHandleByIndex")
        h = self.handle
        uuid = n.text("nvmlDeviceGetUUID", h) or ""
        model = n.text("nvmlDeviceGetName", h) or ""
        self.labels = labels.get({"gpu": str(self.index), "uuid": uuid, "model": model})
        self.link_labels = None
        self.owner_labels = None
        self.nvlink_answered = frozenset()
        self.proc_labels = {}
        pci = n.call("nvmlDeviceGetPciInfo", h)
        info = {"driver_version": driver}
        if pci is not None:
            bus = pci.busId
            info["pci_bus_id"] = bus.decode() if isinstance(bus, bytes) else str(bus)
        if node:
            info["node"] = node
        info_labels = labels.get({**self.labels, **info})
        st: dict[str, float] = {}
        for key, fn, args in (
            ("gen_max", "nvmlDeviceGetMaxPcieLinkGeneration", ()),
            ("width_max", "nvmlDeviceGetMaxPcieLinkWidth", ()),
            ("slowdown", "nvmlDeviceGetTemperatureThreshold", (THRESHOLD_SLOWDOWN,)),
            ("shutdown", "nvmlDeviceGetTemperatureThreshold", (THRESHOLD_SHUTDOWN,)),
        ):
            v = n.call(fn, h, *args)
            if v is not None:
                st[key] = float(v)
        links = 0
        if nvlink:
            fv = n.call("nvmlDeviceGetFieldValues", h, [FI_NVLINK_LINK_COUNT])
            if fv is not None:
                links = int(field_values(fv)[0][2] or 0)
        # PCIe traffic as byte counters, read with the other counters: nvmlDeviceGetPcieThroughput (the
        # fallback for older drivers) blocks 20 ms per direction, 42 ms a round per GPU on an H200.
        fv = n.call("nvmlDeviceGetFieldValues", h, [FI_PCIE_TX_BYTES, FI_PCIE_RX_BYTES])
        pcie_counters = fv is not None and all(x is not None for _, _, x in field_values(fv))
        fv = n.call("nvmlDeviceGetFieldValues", h, list(FI_THROTTLE))
        throttle_fields = fv is not None and all(x is not None for _, _, x in field_values(fv))
        ids: list[Any] = [FI_PCIE_TX_BYTES, FI_PCIE_RX_BYTES] if pcie_counters else []
        if throttle_fields:
            ids += list(prof.throttle_fields())
        for link in range(links):
            ids += [(FI_NVLINK_DATA_TX, link), (FI_NVLINK_DATA_RX, link)]
            ids += [(fid, link) for fid in FI_NVLINK_ERRORS]
        arch = n.call("nvmlDeviceGetArchitecture", h)
        gpm = None
        if arch is not None and int(arch) >= ARCH_HOPPER and int(arch) != ARCH_UNKNOWN:
            support = n.call("nvmlGpmQueryDeviceSupport", h)
            if support is not None and int(support.isSupportedDevice):
                s1, s2 = n.call("nvmlGpmSampleAlloc"), n.call("nvmlGpmSampleAlloc")
                if s1 is not None and s2 is not None:
                    gpm = Gpm([s1, s2])
        mode = n.call("nvmlDeviceGetMigMode", h)
        mig = bool(mode is not None and int(mode[0]) == 1)
        self.ident = Identity(info_labels, st, ids, FieldLayout.of(ids), pcie_counters, throttle_fields, mig, gpm)
        return self.ident

    def process_utilization(self, nvml: Nvml, procs: list[Any]) -> dict[int, float] | None:
        """Mean SM utilisation per listed pid over NVML's samples since the last read; ``None`` where
        the driver has no per-process utilisation.

        Read every ``gpu.counter-interval``, not every round: on a real H200 this call cost 1.4-4 ms of
        CPU, more than all the device's other per-round calls together, and its samples cover the whole
        interval.
        """
        samples = nvml.call("nvmlDeviceGetProcessUtilization", self.handle, self.proc_util_ts, not_found=[])
        if samples is None:
            return None
        sums: dict[int, list[float]] = {}
        for s in samples:
            ts = int(s.timeStamp)
            if ts > self.proc_util_ts:
                self.proc_util_ts = ts
            acc = sums.get(int(s.pid))
            if acc is None:
                sums[int(s.pid)] = [int(s.smUtil), 1]
            else:
                acc[0] += int(s.smUtil)
                acc[1] += 1
        # A listed process with no utilisation sample in the window ran no kernel: 0 is true.
        out = {int(p.pid): 0.0 for p in procs}
        for pid, (total, count) in sums.items():
            out[pid] = total / count / 100.0
        return out
