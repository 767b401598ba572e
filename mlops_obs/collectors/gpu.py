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
  and per-process series carry pid, job, rank, container, pod and namespace (see ``gpu_process``).
* GPM profiling ratios exist only on Hopper and newer; ``mlops_gpu_profiling_supported`` says so
  explicitly elsewhere, instead of the ratios silently missing.
* NVLink throughput and error counters come from one ``nvmlDeviceGetFieldValues`` call per device,
  not one call per link and counter.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from mlops_obs.collectors import Collector, CollectorUnavailable, register
from mlops_obs.collectors._nvml import GpuLost, Nvml
from mlops_obs.collectors.gpu_process import Attributor
from mlops_obs.config import (
    ConfigError,
    Setting,
    choice_parser,
    int_parser,
    parse_bool,
    parse_duration,
    parse_optional_path,
)
from mlops_obs.exporter.exposition import Labels, family
from mlops_obs.exporter.exposition import labels as label_set

# NVML constants used here (nvml.h), so the module imports without pynvml's shared library.
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
EVENT_XID = 0x0000000000000008
GPM_METRICS_GET_VERSION = 1
GPM = {2: "mlops_gpu_sm_active_ratio", 5: "mlops_gpu_tensor_active_ratio", 10: "mlops_gpu_dram_active_ratio",
       1: "mlops_gpu_graphics_engine_active_ratio"}  # fmt: skip

_GPM_IDS = tuple(GPM)

# Perf policy id -> reason label (nvmlPerfPolicyType_t).
THROTTLE_REASONS = {0: "power", 1: "thermal", 2: "sync_boost", 3: "board_limit", 4: "low_utilization",
                    5: "reliability", 10: "app_clocks", 11: "base_clocks"}  # fmt: skip
# The same violation-time counters (ns) as field ids NVML_FI_DEV_PERF_POLICY_*, in THROTTLE_REASONS order:
# one nvmlDeviceGetFieldValues call read all eight for 0.9-1.0 ms of CPU on an H200, against 6.0-6.3 ms
# for eight nvmlDeviceGetViolationStatus calls (docs/nvml-calls-h200-*.md).
FI_THROTTLE = dict(zip(range(74, 82), THROTTLE_REASONS.values()))

# Every family: name -> (type, help). Counters are named with their _total sample name.
FAMILIES: dict[str, tuple[str, str]] = {
    "mlops_gpu_info": ("gauge", "GPU identity and driver version; always 1."),
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
    "mlops_gpu_nvlink_transmit_bytes_total": ("counter", "NVLink data bytes transmitted, per link."),
    "mlops_gpu_nvlink_receive_bytes_total": ("counter", "NVLink data bytes received, per link."),
    "mlops_gpu_nvlink_errors_total": ("counter", "NVLink data-link errors, per link and type."),
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
    "mlops_gpu_process_memory_used_bytes": ("gauge", "Device memory used by a process."),
    "mlops_gpu_process_utilization_ratio": (
        "gauge",
        "Fraction of time a process's kernels ran (SM), averaged over NVML's samples of the last counter interval.",
    ),
}


_new_tuple = tuple.__new__


# name -> (family name, help, type): the arguments of each family's ``Metric``.
_FAMILY_ARGS = {name: (name[:-6] if typ == "counter" else name, doc, typ) for name, (typ, doc) in FAMILIES.items()}


class _Out:
    """Samples for one round, per family, in first-use order: an unsupported field yields no family at all.

    Plain lists until :meth:`metrics`: ~1,100 samples a round, so each ``add`` does as little as it can.
    """

    __slots__ = ("lists",)

    def __init__(self) -> None:
        self.lists: dict[str, list[Any]] = {}

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        if type(labels) is not Labels:
            labels = label_set(labels)  # interned: the renderer reads its text instead of sorting and escaping
        lst = self.lists.get(name)
        if lst is None:
            lst = self.lists[name] = []
        # tuple.__new__ skips the namedtuple's Python-level __new__: ~1100 samples a round add up.
        lst.append(_new_tuple(Sample, (name, labels, float(value), None, None, None)))

    def extend(self, name: str, samples: list[Any]) -> None:
        lst = self.lists.get(name)
        if lst is None:
            self.lists[name] = samples.copy()  # a copy: the caller's list is reused next round
        else:
            lst.extend(samples)

    def metrics(self) -> list[Metric]:
        args = _FAMILY_ARGS
        return [family(*args[name], lst) for name, lst in self.lists.items()]


@dataclass
class _Mig:
    handle: Any
    labels: dict[str, str]


@dataclass
class _Device:
    index: int
    handle: Any
    lost_labels: Labels = field(init=False)  # {gpu}: what mlops_gpu_lost carries
    labels: Labels = field(default_factory=lambda: label_set({}))
    info: dict[str, str] = field(default_factory=dict)
    ready: bool = False
    static: dict[str, float] = field(default_factory=dict)
    field_ids: list[Any] = field(default_factory=list)
    gpm: list[Any] | None = None  # two GPM samples, alternating; None where unsupported
    gpm_primed: bool = False
    gpm_request: Any = None  # the nvmlGpmMetricsGet_t request, reused round after round
    gpm_reader: tuple[struct.Struct, int, int] | None = None  # how to read its results (see _gpm_reader)
    mig_enabled: bool = False
    proc_util_ts: int = 0
    proc_util: dict[int, float] | None = None  # pid -> SM utilisation at the last read; None: not read yet
    proc_util_at: float = float("-inf")
    pcie_counters: bool = False  # the driver has NVML_FI_DEV_PCIE_COUNT_{TX,RX}_BYTES
    throttle_fields: bool = False  # the driver has the NVML_FI_DEV_PERF_POLICY_* fields
    gpm_at: float = float("-inf")  # when the last GPM sample was taken
    gpm_last: list[tuple[str, float]] = field(default_factory=list)  # the last window's ratios
    link_labels_key: tuple[str | None, str | None] | None = None
    link_labels: dict[tuple[int, int], Labels] = field(default_factory=dict)
    slow: list[tuple[str, list[Any]]] | None = None  # the counters' last samples, per family
    rare: dict[str, Any] = field(default_factory=dict)  # settings-like gauges, read with the counters
    rare_at: float = float("-inf")
    slow_at: float = 0.0
    slow_key: tuple[str | None, str | None] | None = None
    info_labels: Labels = field(default_factory=lambda: label_set({}))
    owner_labels: tuple[tuple[str, str], Labels] | None = None  # the owning rank and the device's labels with it
    proc_labels: dict[int, tuple[dict[str, str], Labels]] = field(default_factory=dict)  # pid -> (attribution, labels)

    def __post_init__(self) -> None:
        self.lost_labels = label_set({"gpu": str(self.index)})


def _address(h: Any) -> int:
    """A stable key for a device handle: a ctypes pointer's address, or the fake's object id."""
    if isinstance(h, ctypes._Pointer):
        return ctypes.cast(h, ctypes.c_void_p).value or 0
    return id(h)


# nvmlFieldValue_t: fieldId u32, scopeId u32, timestamp i64, latencyUsec i64, valueType u32, nvmlReturn u32,
# value (8-byte union). Decoded with struct from the array's buffer: pynvml's structures run Python
# hooks on every attribute access, which made reading ~90 NVLink fields a device the collector's top cost.
_FIELD_VALUE = struct.Struct("<IIqqII8s")
_VALUE_FORMATS = tuple(struct.Struct(f) for f in ("<d", "<I", "<Q", "<Q", "<q", "<i", "<H"))


def _field_values(arr: Any) -> list[tuple[int, int, float | None]]:
    """(field id, scope id, value or ``None`` where NVML returned an error) for an nvmlFieldValue_t array."""
    out: list[tuple[int, int, float | None]] = []
    try:
        raw = memoryview(arr).cast("B")
    except TypeError:
        raw = None
    if raw is not None and len(raw) == _FIELD_VALUE.size * len(arr):
        for fid, scope, _ts, _lat, vtype, ret, value in _FIELD_VALUE.iter_unpack(raw):
            if ret != 0:
                out.append((fid, scope, None))
            else:
                fmt = _VALUE_FORMATS[vtype] if vtype < len(_VALUE_FORMATS) else _VALUE_FORMATS[3]
                out.append((fid, scope, float(fmt.unpack_from(value)[0])))
        return out
    for v in arr:  # not a ctypes buffer (a hand-made stand-in): attribute by attribute
        if int(v.nvmlReturn) != 0:
            out.append((int(v.fieldId), int(v.scopeId), None))
            continue
        names = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
        t = int(v.valueType)
        out.append((int(v.fieldId), int(v.scopeId), float(getattr(v.value, names[t] if t < len(names) else "ullVal"))))
    return out


def _gpm_reader(mg: Any, count: int) -> tuple[struct.Struct, int, int]:
    """How to read the (nvmlReturn, value) of the first ``count`` metrics of an nvmlGpmMetricsGet_t
    from its memory in one copy: pynvml's structures run a Python hook on every attribute read.
    Returns (layout of one metric, offset of the metrics array, bytes to copy); built once per request."""
    metric = type(mg.metrics)._type_
    ret_off, val_off, size = metric.nvmlReturn.offset, metric.value.offset, ctypes.sizeof(metric)
    layout = _GPM_LAYOUTS.get((ret_off, val_off, size))
    if layout is None:
        layout = _GPM_LAYOUTS[(ret_off, val_off, size)] = struct.Struct(
            f"<{ret_off}xI{val_off - ret_off - 4}xd{size - val_off - 8}x"
        )
    return layout, type(mg).metrics.offset, size * count


def _gpm_results(mg: Any, reader: tuple[struct.Struct, int, int]) -> list[tuple[int, float]]:
    """(nvmlReturn, value) of the metrics ``reader`` (from :func:`_gpm_reader`) describes."""
    layout, offset, length = reader
    return list(layout.iter_unpack(ctypes.string_at(ctypes.addressof(mg) + offset, length)))


_GPM_LAYOUTS: dict[tuple[int, int, int], struct.Struct] = {}


class XidWatcher:
    """Counts XID events per (device, XID) from NVML's event set, on its own daemon thread.

    A counter per code (not the last code) so ``increase(mlops_gpu_xid_errors_total[5m]) > 0`` fires
    once per new error. Counts start when this exporter starts, like any process-local counter.
    """

    def __init__(self, nvml: Nvml, devices: list[_Device], log: Any) -> None:
        self.nvml = nvml
        self.log = log
        self.by_handle = {_address(d.handle): d.index for d in devices if d.handle is not None}
        self.counts: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(devices,), name="gpu-xid-events", daemon=True)
        self.registered: set[int] = set()

    def start(self) -> XidWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict[tuple[int, int], int]:
        with self._lock:
            return dict(self.counts)

    def _run(self, devices: list[_Device]) -> None:
        nvml = self.nvml
        try:
            es = nvml.call("nvmlEventSetCreate")
            if es is None:
                return
            for d in devices:
                try:
                    if d.handle is not None and nvml.try_call("nvmlDeviceRegisterEvents", d.handle, EVENT_XID, es)[0]:
                        self.registered.add(d.index)
                except GpuLost:
                    continue
        except Exception as e:  # a lib that cannot even create an event set: no XID counting
            self.log.warning("gpu XID event thread not started", error=str(e))
            return
        if not self.registered:
            return
        wait = nvml.lib.nvmlEventSetWait
        while not self._stop.is_set():
            try:
                data = wait(es, 500)
            except Exception as e:
                code = getattr(e, "value", None)
                if code == 10:  # NVML_ERROR_TIMEOUT: no event in this window
                    continue
                if self._stop.wait(1.0):
                    break
                continue
            if int(data.eventType) & EVENT_XID == 0:
                continue
            index = self.by_handle.get(_address(data.device))
            if index is None:
                continue
            key = (index, int(data.eventData))
            with self._lock:
                self.counts[key] = self.counts.get(key, 0) + 1
            self.log.warning("gpu XID error", gpu=index, xid=key[1])
        try:
            nvml.lib.nvmlEventSetFree(es)
        except Exception:
            pass


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
        Setting("gpu.nvlink", parse_bool, True, "Report per-link NVLink throughput and error counters.",
                kind="bool"),
    )  # fmt: skip

    def __init__(self, config: Mapping[str, Any], log: Any = None) -> None:
        super().__init__(config)
        if log is None:
            from mlops_obs.logs import get_logger

            log = get_logger(component="gpu")
        self.log = log
        self.nvml = Nvml(_loader(config), log)
        directory = config.get("multiproc-dir")
        self.attributor = Attributor(Path(directory) if directory else None, config.get("training.retention", 900.0))
        self.processes = bool(config.get("gpu.processes", True))
        self.process_limit = int(config.get("gpu.process-limit", 32))
        self.nvlink = bool(config.get("gpu.nvlink", True))
        self.xid_enabled = bool(config.get("gpu.xid-events", True))
        self.counter_interval = float(config.get("gpu.counter-interval", 15.0))
        self.node = os.environ.get("NODE_NAME") or None
        self._devices: list[_Device] | None = None
        self._driver: str | None = None
        self.xid: XidWatcher | None = None
        self._limited_logged = False

    # --- setup ------------------------------------------------------------------------------------

    def _devices_once(self) -> list[_Device]:
        if self._devices is None:
            handles = self.nvml.handles()
            self._driver = self.nvml.text("nvmlSystemGetDriverVersion") or ""
            self._devices = [_Device(i, h) for i, h in enumerate(handles)]
            if self.xid_enabled:
                self.xid = XidWatcher(self.nvml, self._devices, self.log).start()
        return self._devices

    def _prepare(self, d: _Device) -> None:
        """Read what does not change while the driver is loaded, once per device."""
        n = self.nvml
        if d.handle is None:
            d.handle = n.call("nvmlDeviceGetHandleByIndex", d.index)
            if d.handle is None:
                raise GpuLost("nvmlDeviceGetHandleByIndex")
        h = d.handle
        uuid = n.text("nvmlDeviceGetUUID", h) or ""
        model = n.text("nvmlDeviceGetName", h) or ""
        d.labels = label_set({"gpu": str(d.index), "uuid": uuid, "model": model})
        d.link_labels_key = None
        d.owner_labels = None
        d.proc_labels = {}
        pci = n.call("nvmlDeviceGetPciInfo", h)
        d.info = {"driver_version": self._driver or ""}
        if pci is not None:
            bus = pci.busId
            d.info["pci_bus_id"] = bus.decode() if isinstance(bus, bytes) else str(bus)
        if self.node:
            d.info["node"] = self.node
        d.info_labels = label_set({**d.labels, **d.info})
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
        d.static = st
        links = 0
        if self.nvlink:
            fv = n.call("nvmlDeviceGetFieldValues", h, [FI_NVLINK_LINK_COUNT])
            if fv is not None:
                links = int(_field_values(fv)[0][2] or 0)
        # PCIe traffic as byte counters, read with the other counters: nvmlDeviceGetPcieThroughput (the
        # fallback for older drivers) blocks 20 ms per direction, 42 ms a round per GPU on an H200.
        fv = n.call("nvmlDeviceGetFieldValues", h, [FI_PCIE_TX_BYTES, FI_PCIE_RX_BYTES])
        d.pcie_counters = fv is not None and all(x is not None for _, _, x in _field_values(fv))
        fv = n.call("nvmlDeviceGetFieldValues", h, list(FI_THROTTLE))
        d.throttle_fields = fv is not None and all(x is not None for _, _, x in _field_values(fv))
        ids: list[Any] = [FI_PCIE_TX_BYTES, FI_PCIE_RX_BYTES] if d.pcie_counters else []
        if d.throttle_fields:
            ids += list(FI_THROTTLE)
        for link in range(links):
            ids += [(FI_NVLINK_DATA_TX, link), (FI_NVLINK_DATA_RX, link)]
            ids += [(fid, link) for fid in FI_NVLINK_ERRORS]
        d.field_ids = ids
        arch = n.call("nvmlDeviceGetArchitecture", h)
        d.gpm = None
        d.gpm_request = None
        d.gpm_reader = None
        d.gpm_primed = False
        d.gpm_at = float("-inf")
        d.gpm_last = []
        if arch is not None and int(arch) >= ARCH_HOPPER and int(arch) != 0xFFFFFFFF:
            support = n.call("nvmlGpmQueryDeviceSupport", h)
            if support is not None and int(support.isSupportedDevice):
                s1, s2 = n.call("nvmlGpmSampleAlloc"), n.call("nvmlGpmSampleAlloc")
                if s1 is not None and s2 is not None:
                    d.gpm = [s1, s2]
        mode = n.call("nvmlDeviceGetMigMode", h)
        d.mig_enabled = bool(mode is not None and int(mode[0]) == 1)
        d.ready = True

    # --- sampling ----------------------------------------------------------------------------------

    def sample(self) -> Iterable[Metric]:
        devices = self._devices_once()
        out = _Out()
        out.add("mlops_gpu_devices", {}, len(devices))
        live_pids: set[int] = set()
        xids = self.xid.snapshot() if self.xid is not None else {}
        for d in devices:
            try:
                if not d.ready:
                    self._prepare(d)
                self._sample_device(d, out, live_pids)
            except GpuLost:
                d.ready = False  # re-read identity after a reset brings it back
                d.slow = None
                d.rare_at = float("-inf")
                out.add("mlops_gpu_lost", d.lost_labels, 1)
                continue
            out.add("mlops_gpu_lost", d.lost_labels, 0)
        for (index, xid), count in sorted(xids.items()):
            dev = devices[index]
            if dev.labels:
                out.add("mlops_gpu_xid_errors_total", {**dev.labels, "xid": str(xid)}, count)
        self.attributor.end_round(live_pids)
        return out.metrics()

    def _processes(self, d: _Device, out: _Out, live: set[int]) -> tuple[str, str] | None:
        """Per-process series; returns the (job, rank) that owns the device, if exactly one does."""
        n = self.nvml
        procs = n.call("nvmlDeviceGetComputeRunningProcesses", d.handle)
        if procs is None:
            return None
        if procs and time.monotonic() - d.proc_util_at >= self.counter_interval:
            d.proc_util_at = time.monotonic()
            d.proc_util = self._process_utilization(d, procs)
        util = d.proc_util
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
        cache = d.proc_labels
        seen: dict[int, tuple[dict[str, str], Labels]] = {}
        lists = out.lists
        for p in procs:
            pid = int(p.pid)
            live.add(pid)
            attr = attribute(pid)
            # The attributor hands back the same dict while nothing about the pid changed, so the
            # label set built from it last round is still right.
            hit = cache.get(pid)
            if hit is None or hit[0] is not attr:
                hit = (attr, label_set({"gpu": d.labels["gpu"], "uuid": d.labels["uuid"], "pid": str(pid), **attr}))
            seen[pid] = hit
            labels = hit[1]
            if "job" in attr and "rank" in attr:
                owners.add((str(attr["job"]), str(attr["rank"])))
            used = p.usedGpuMemory
            if used is not None:
                lst = lists.get("mlops_gpu_process_memory_used_bytes")
                if lst is None:
                    lst = lists["mlops_gpu_process_memory_used_bytes"] = []
                lst.append(_new_tuple(Sample, ("mlops_gpu_process_memory_used_bytes", labels, float(used), None,
                                               None, None)))  # fmt: skip
            if util is not None and pid in util:  # a pid that appeared since the last read waits for the next
                lst = lists.get("mlops_gpu_process_utilization_ratio")
                if lst is None:
                    lst = lists["mlops_gpu_process_utilization_ratio"] = []
                lst.append(_new_tuple(Sample, ("mlops_gpu_process_utilization_ratio", labels,
                                               util[pid], None, None, None)))  # fmt: skip
        d.proc_labels = seen  # only the pids listed this round stay cached
        return owners.pop() if len(owners) == 1 else None

    def _process_utilization(self, d: _Device, procs: list[Any]) -> dict[int, float] | None:
        """Mean SM utilisation per listed pid over NVML's samples since the last read; ``None`` where
        the driver has no per-process utilisation.

        Read every ``gpu.counter-interval``, not every round: on a real H200 this call cost 1.4-4 ms of
        CPU, more than all the device's other per-round calls together, and its samples cover the whole
        interval.
        """
        samples = self.nvml.call("nvmlDeviceGetProcessUtilization", d.handle, d.proc_util_ts, not_found=[])
        if samples is None:
            return None
        sums: dict[int, list[float]] = {}
        for s in samples:
            ts = int(s.timeStamp)
            if ts > d.proc_util_ts:
                d.proc_util_ts = ts
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

    def _rare(self, d: _Device, refresh: bool, fn: str) -> Any:
        """A gauge that only an administrator or a link retrain changes (power limit, PCIe link
        generation and width): read with the counters, every ``gpu.counter-interval``, and reused in
        between, in its usual place among the series. Three NVML calls fewer per device a round."""
        if refresh:
            d.rare[fn] = self.nvml.call(fn, d.handle)
        return d.rare.get(fn)

    def _sample_device(self, d: _Device, out: _Out, live: set[int]) -> None:
        n, h = self.nvml, d.handle
        call = n.call
        now = time.monotonic()
        rare = now - d.rare_at >= self.counter_interval
        if rare:
            d.rare_at = now
        owner = self._processes(d, out, live) if self.processes else None
        if owner is None:
            lb = d.labels
        elif d.owner_labels is not None and d.owner_labels[0] == owner:
            lb = d.owner_labels[1]
        else:
            lb = label_set({**d.labels, "job": owner[0], "rank": owner[1]})
            d.owner_labels = (owner, lb)
        lists = out.lists
        get = lists.get
        new = _new_tuple

        # Every series below shares the device's label set: appended straight to the family's list
        # (what _Out.add does, without its per-call label check), ~40 times a device a round.
        def put(name: str, value: float) -> None:
            lst = get(name)
            if lst is None:
                lst = lists[name] = []
            lst.append(new(Sample, (name, lb, float(value), None, None, None)))

        out.add("mlops_gpu_info", d.info_labels, 1)
        put("mlops_gpu_profiling_supported", int(d.gpm is not None))

        u = call("nvmlDeviceGetUtilizationRates", h)
        if u is not None:
            put("mlops_gpu_utilization_ratio", u.gpu / 100.0)
            put("mlops_gpu_memory_copy_utilization_ratio", u.memory / 100.0)
        m = call("nvmlDeviceGetMemoryInfo", h, NVML_MEMORY_V2)
        if m is not None:
            put("mlops_gpu_memory_used_bytes", m.used)
            put("mlops_gpu_memory_free_bytes", m.free)
            put("mlops_gpu_memory_reserved_bytes", m.reserved)
            put("mlops_gpu_memory_total_bytes", m.total)
        else:
            m1 = call("nvmlDeviceGetMemoryInfo", h)
            if m1 is not None:
                put("mlops_gpu_memory_used_bytes", m1.used)
                put("mlops_gpu_memory_free_bytes", m1.free)
                put("mlops_gpu_memory_total_bytes", m1.total)
        v = call("nvmlDeviceGetClockInfo", h, CLOCK_SM)
        if v is not None:
            put("mlops_gpu_sm_clock_hertz", v * 1e6)
        v = call("nvmlDeviceGetClockInfo", h, CLOCK_MEM)
        if v is not None:
            put("mlops_gpu_memory_clock_hertz", v * 1e6)
        v = call("nvmlDeviceGetTemperature", h, TEMPERATURE_GPU)
        if v is not None:
            put("mlops_gpu_temperature_celsius", v)

        fvs = call("nvmlDeviceGetFieldValues", h, [FI_MEMORY_TEMP])
        if fvs is not None:
            x = _field_values(fvs)[0][2]
            if x is not None:
                put("mlops_gpu_memory_temperature_celsius", x)
        st = d.static
        if "slowdown" in st:
            put("mlops_gpu_slowdown_temperature_celsius", st["slowdown"])
        if "shutdown" in st:
            put("mlops_gpu_shutdown_temperature_celsius", st["shutdown"])

        v = call("nvmlDeviceGetPowerUsage", h)
        if v is not None:
            put("mlops_gpu_power_usage_watts", v / 1000.0)
        v = self._rare(d, rare, "nvmlDeviceGetEnforcedPowerLimit")
        if v is not None:
            put("mlops_gpu_power_limit_watts", v / 1000.0)
        v = call("nvmlDeviceGetPerformanceState", h)
        if v is not None and int(v) != PSTATE_UNKNOWN:
            put("mlops_gpu_pstate", v)
        v = call("nvmlDeviceGetFanSpeed", h)
        if v is not None:
            put("mlops_gpu_fan_speed_ratio", v / 100.0)

        v = self._rare(d, rare, "nvmlDeviceGetCurrPcieLinkGeneration")
        if v is not None:
            put("mlops_gpu_pcie_link_generation", v)
        if "gen_max" in st:
            put("mlops_gpu_pcie_link_generation_max", st["gen_max"])
        v = self._rare(d, rare, "nvmlDeviceGetCurrPcieLinkWidth")
        if v is not None:
            put("mlops_gpu_pcie_link_width", v)
        if "width_max" in st:
            put("mlops_gpu_pcie_link_width_max", st["width_max"])
        if not d.pcie_counters:
            v = call("nvmlDeviceGetPcieThroughput", h, PCIE_TX)
            if v is not None:
                put("mlops_gpu_pcie_transmit_bytes_per_second", v * 1024.0)
            v = call("nvmlDeviceGetPcieThroughput", h, PCIE_RX)
            if v is not None:
                put("mlops_gpu_pcie_receive_bytes_per_second", v * 1024.0)
        self._counters(d, out, lb, owner or (None, None))
        if d.gpm is not None:
            self._gpm(d, out, lb)
        if d.mig_enabled:
            self._mig(d, out, live)

    def _counters(self, d: _Device, out: _Out, lb: dict[str, str], key: tuple[str | None, str | None]) -> None:
        """Counters and slow-moving health state, re-read every ``gpu.counter-interval``.

        A counter loses no information when read less often (``rate()`` over the same window gives the
        same answer), only freshness, and these are most of a device's NVML calls and series (90
        NVLink series on an H100). Between refreshes the last round's samples are reused as they are.
        """
        now = time.monotonic()
        if d.slow is not None and d.slow_key == key and now - d.slow_at < self.counter_interval:
            for name, samples in d.slow:
                out.extend(name, samples)
            return
        n, h = self.nvml, d.handle
        so = _Out()
        v = n.call("nvmlDeviceGetTotalEnergyConsumption", h)
        if v is not None:
            so.add("mlops_gpu_energy_joules_total", lb, v / 1000.0)
        v = n.call("nvmlDeviceGetPcieReplayCounter", h)
        if v is not None:
            so.add("mlops_gpu_pcie_replays_total", lb, v)

        for etype, ename in ((MEMORY_ERROR_CORRECTED, "corrected"), (MEMORY_ERROR_UNCORRECTED, "uncorrected")):
            for scope, sname in ((VOLATILE_ECC, "volatile"), (AGGREGATE_ECC, "aggregate")):
                v = n.call("nvmlDeviceGetTotalEccErrors", h, etype, scope)
                if v is not None:
                    so.add("mlops_gpu_ecc_errors_total", {**lb, "type": ename, "scope": sname}, v)
        rows = n.call("nvmlDeviceGetRemappedRows", h)
        if rows is not None:
            corr, unc, pending, failure = rows
            so.add("mlops_gpu_remapped_rows_total", {**lb, "type": "correctable"}, corr)
            so.add("mlops_gpu_remapped_rows_total", {**lb, "type": "uncorrectable"}, unc)
            so.add("mlops_gpu_remap_pending", lb, int(bool(pending)))
            so.add("mlops_gpu_remap_failure", lb, int(bool(failure)))
        if not d.throttle_fields:  # an older driver: one call per reason
            for policy, reason in THROTTLE_REASONS.items():
                t = n.call("nvmlDeviceGetViolationStatus", h, policy)
                if t is not None:
                    so.add("mlops_gpu_throttle_seconds_total", {**lb, "reason": reason}, t.violationTime / 1e9)
        v = n.call("nvmlDeviceGetPersistenceMode", h)
        if v is not None:
            so.add("mlops_gpu_persistence_mode", lb, int(v == 1))
        fvs = n.call("nvmlDeviceGetFieldValues", h, d.field_ids) if d.field_ids else None
        if fvs is not None:
            # Per-link label sets are built once per owner, not ~90 fresh dicts a device a round.
            if d.link_labels_key != key:
                d.link_labels_key, d.link_labels = key, {}
            ll = d.link_labels
            for fid, scope, x in _field_values(fvs):
                if x is None:
                    continue
                if fid == FI_PCIE_TX_BYTES:
                    so.add("mlops_gpu_pcie_transmit_bytes_total", lb, x)
                    continue
                if fid == FI_PCIE_RX_BYTES:
                    so.add("mlops_gpu_pcie_receive_bytes_total", lb, x)
                    continue
                if fid in FI_THROTTLE:
                    so.add("mlops_gpu_throttle_seconds_total", {**lb, "reason": FI_THROTTLE[fid]}, x / 1e9)
                    continue
                labels = ll.get((fid, scope))
                if labels is None:
                    extra = {"type": FI_NVLINK_ERRORS[fid]} if fid in FI_NVLINK_ERRORS else {}
                    labels = ll[(fid, scope)] = label_set({**lb, "link": str(scope), **extra})
                if fid == FI_NVLINK_DATA_TX:
                    so.add("mlops_gpu_nvlink_transmit_bytes_total", labels, x * 1024)
                elif fid == FI_NVLINK_DATA_RX:
                    so.add("mlops_gpu_nvlink_receive_bytes_total", labels, x * 1024)
                elif fid in FI_NVLINK_ERRORS:
                    so.add("mlops_gpu_nvlink_errors_total", labels, x)
        d.slow = list(so.lists.items())
        d.slow_at, d.slow_key = now, key
        for name, samples in d.slow:
            out.extend(name, samples)

    def _gpm(self, d: _Device, out: _Out, lb: dict[str, str]) -> None:
        """Ratios between two GPM samples ``gpu.counter-interval`` apart: no sleep, the interval is the
        window, so each ratio is that interval's mean. Not every round: on an H200 computing the four
        metrics cost 1.1-1.5 ms of CPU (one of them alone 2 us), a sample 50 us. The first window is
        one round long, so the ratios appear at the second round."""
        now = time.monotonic()
        if d.gpm_primed and now - d.gpm_at < self.counter_interval:
            for name, value in d.gpm_last:
                out.add(name, lb, value)
            return
        n = self.nvml
        assert d.gpm is not None
        prev, cur = d.gpm
        if n.call("nvmlGpmSampleGet", d.handle, cur) is None:
            d.gpm_primed = False
            d.gpm_last = []
            return
        d.gpm = [cur, prev]
        if not d.gpm_primed:
            d.gpm_primed = True  # the next round computes the first (one-round) window
            return
        d.gpm_at = now
        ids = _GPM_IDS
        mg = d.gpm_request
        if mg is None:
            # The request (a ~10 KB structure with room for every GPM metric) is built once per
            # device: NVML only reads its inputs and overwrites each metric's result on every call.
            mg = n.lib.c_nvmlGpmMetricsGet_t()
            mg.version = GPM_METRICS_GET_VERSION
            mg.numMetrics = len(ids)
            for i, mid in enumerate(ids):
                mg.metrics[i].metricId = mid
            d.gpm_request = mg
            d.gpm_reader = _gpm_reader(mg, len(ids))
        # Through the fields' descriptors: pynvml's __setattr__ hook only re-encodes str values.
        cls = type(mg)
        cls.sample1.__set__(mg, prev)
        cls.sample2.__set__(mg, cur)
        if n.call("nvmlGpmMetricsGet", mg) is None:
            d.gpm_last = []
            return
        assert d.gpm_reader is not None
        d.gpm_last = [
            (GPM[mid], max(0.0, min(1.0, value / 100.0)))
            for mid, (ret, value) in zip(ids, _gpm_results(mg, d.gpm_reader))
            if ret == 0
        ]
        for name, value in d.gpm_last:
            out.add(name, lb, value)

    def _mig(self, d: _Device, out: _Out, live: set[int]) -> None:
        """MIG instances as their own label set (gpu_instance, mig_profile) under the parent GPU's labels."""
        n = self.nvml
        count = n.call("nvmlDeviceGetMaxMigDeviceCount", d.handle) or 0
        for i in range(int(count)):
            mh = n.call("nvmlDeviceGetMigDeviceHandleByIndex", d.handle, i)
            if mh is None:
                continue
            gi = n.call("nvmlDeviceGetGpuInstanceId", mh)
            name = n.text("nvmlDeviceGetName", mh) or ""
            profile = name.rsplit(" ", 1)[-1] if " MIG " in name else name
            lb = {**d.labels, "gpu_instance": str(gi if gi is not None else i), "mig_profile": profile}
            m = n.call("nvmlDeviceGetMemoryInfo", mh)
            if m is not None:
                out.add("mlops_gpu_memory_used_bytes", lb, m.used)
                out.add("mlops_gpu_memory_free_bytes", lb, m.free)
                out.add("mlops_gpu_memory_total_bytes", lb, m.total)
            if self.processes:
                procs = n.call("nvmlDeviceGetComputeRunningProcesses", mh) or []
                for p in procs[: self.process_limit or None]:
                    pid = int(p.pid)
                    live.add(pid)
                    if p.usedGpuMemory is not None:
                        labels = {"gpu": d.labels["gpu"], "uuid": d.labels["uuid"], "pid": str(pid),
                                  "gpu_instance": lb["gpu_instance"], **self.attributor.labels(pid)}  # fmt: skip
                        out.add("mlops_gpu_process_memory_used_bytes", labels, p.usedGpuMemory)

    def close(self) -> None:
        if self.xid is not None:
            self.xid.stop()
        self.nvml.shutdown()


__all__ = ["FAMILIES", "CollectorUnavailable", "GpuCollector", "XidWatcher"]
