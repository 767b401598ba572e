"""A fake ``pynvml``: plays GPU states and faults for tests, benchmarks and demos without a GPU.

Why a fake and not mocks: the collector's error policy (no series for NotSupported, ``mlops_gpu_lost``
for a GPU off the bus, abandonment of a hung call) is only worth testing against something that
behaves like the binding, raising the binding's own ``NVMLError`` subclasses and returning its own
ctypes structures. So this object exposes the same function names and signatures as ``pynvml``,
borrows its constants, exceptions and structures, and keeps device state in plain attributes that a
test, a scenario file or a benchmark sets.

Select it with ``--gpu.backend=fake`` and optionally ``--gpu.fake-scenario=FILE`` (YAML or JSON)::

    driver_version: "550.54.15"
    devices:
      - count: 8                      # this entry, repeated
        name: NVIDIA H100 80GB HBM3
        arch: hopper                  # hopper and newer have GPM profiling ratios
        utilization: 87               # percent, as NVML reports it
        fan_speed: null               # null or listed in not_supported: NVML_ERROR_NOT_SUPPORTED
        not_supported: [nvmlDeviceGetFanSpeed, memory_temperature, pcie_counters]   # nvlink_crc (one
                                      # error type's field), pcie_counters,
                                      # throttle_fields: an older driver without those field ids
        ecc: {volatile: {corrected: 3, uncorrected: 0}}
        nvlink_errors: {crc: 1}       # per link; nvlink_errors_per_second: {crc: 0.5} makes them grow
        pcie_replays_per_second: 5    # a marginal PCIe link
        throttle: {power: 0.25}       # fraction of wall time each reason holds clocks down
        xid: [79]                     # XID events delivered once the event thread listens
        processes: [{pid: 4242, used_memory: 1073741824, sm_util: 80}]
        mig: [{profile: 1g.10gb, gpu_instance: 1, memory_total: 10737418240}]
        lost: false                   # true: every call on it raises NVML_ERROR_GPU_IS_LOST
        hang: [nvmlDeviceGetPowerUsage]   # these calls block until release() (or "all")

Counters (energy, throttle time, NVLink and PCIe bytes, and errors given a rate) advance with wall time, as a
real GPU's would.
"""

from __future__ import annotations

import copy
import ctypes
import queue
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml

# Defaults for one device: an H100 SXM under training load. Every field the collector reads is here.
DEFAULT_DEVICE: dict[str, Any] = {
    "name": "NVIDIA H100 80GB HBM3",
    "arch": "hopper",
    "memory_total": 85_520_809_984,
    "memory_used": 61_203_283_968,
    "memory_reserved": 567_279_616,
    "utilization": 87,
    "memory_utilization": 41,
    "sm_clock_mhz": 1980,
    "memory_clock_mhz": 2619,
    "temperature": 61,
    "memory_temperature": 68,
    "slowdown_temperature": 90,
    "shutdown_temperature": 92,
    "power_mw": 612_345,
    "power_limit_mw": 700_000,
    "pstate": 0,
    "fan_speed": 35,
    "pcie_gen": 5,
    "pcie_gen_max": 5,
    "pcie_width": 16,
    "pcie_width_max": 16,
    "pcie_tx_kbps": 1_200_000,
    "pcie_rx_kbps": 2_400_000,
    "pcie_replays": 0,
    "pcie_replays_per_second": 0.0,
    "nvlink_links": 18,
    "nvlink_tx_kib_per_s": 20_000_000,
    "nvlink_rx_kib_per_s": 20_000_000,
    "nvlink_errors": {},  # {"replay": n, "recovery": n, "crc": n}, per link
    "nvlink_errors_per_second": {},  # the same keys: errors a second added per link
    "ecc": {},  # {"volatile": {"corrected": n, "uncorrected": n}, "aggregate": {...}}
    "remapped_rows": {"correctable": 0, "uncorrectable": 0, "pending": False, "failure": False},
    "throttle": {},  # reason -> fraction of wall time
    "persistence_mode": 1,
    "gpm": {"sm_active": 71.5, "tensor_active": 48.0, "dram_active": 39.0, "graphics_engine_active": 93.0},
    "processes": [],
    "mig": [],
    "xid": [],
    "not_supported": [],
    "lost": False,
    "hang": [],
    "pci_bus_id": None,
}

ARCHES = {"kepler": 2, "maxwell": 3, "pascal": 4, "volta": 5, "turing": 6, "ampere": 7, "ada": 8, "hopper": 9,
          "blackwell": 10}  # fmt: skip

THROTTLE_POLICIES = {
    "power": pynvml.NVML_PERF_POLICY_POWER,
    "thermal": pynvml.NVML_PERF_POLICY_THERMAL,
    "sync_boost": pynvml.NVML_PERF_POLICY_SYNC_BOOST,
    "board_limit": pynvml.NVML_PERF_POLICY_BOARD_LIMIT,
    "low_utilization": pynvml.NVML_PERF_POLICY_LOW_UTILIZATION,
    "reliability": pynvml.NVML_PERF_POLICY_RELIABILITY,
    "app_clocks": pynvml.NVML_PERF_POLICY_TOTAL_APP_CLOCKS,
    "base_clocks": pynvml.NVML_PERF_POLICY_TOTAL_BASE_CLOCKS,
}
_POLICY_NAMES = {v: k for k, v in THROTTLE_POLICIES.items()}

GPM_METRICS = {
    pynvml.NVML_GPM_METRIC_SM_UTIL: "sm_active",
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: "tensor_active",
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: "dram_active",
    pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: "graphics_engine_active",
}

_NVLINK_FIELDS = {
    pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY: "replay",
    pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY: "recovery",
    pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_CRC: "crc",
}


# NVML_FI_DEV_PERF_POLICY_* field id -> throttle reason (the fields carry nvmlDeviceGetViolationStatus's time).
_THROTTLE_FIELDS = {
    pynvml.NVML_FI_DEV_PERF_POLICY_POWER: "power",
    pynvml.NVML_FI_DEV_PERF_POLICY_THERMAL: "thermal",
    pynvml.NVML_FI_DEV_PERF_POLICY_SYNC_BOOST: "sync_boost",
    pynvml.NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT: "board_limit",
    pynvml.NVML_FI_DEV_PERF_POLICY_LOW_UTILIZATION: "low_utilization",
    pynvml.NVML_FI_DEV_PERF_POLICY_RELIABILITY: "reliability",
    pynvml.NVML_FI_DEV_PERF_POLICY_TOTAL_APP_CLOCKS: "app_clocks",
    pynvml.NVML_FI_DEV_PERF_POLICY_TOTAL_BASE_CLOCKS: "base_clocks",
}

# The byte layout of nvmlFieldValue_t (see gpu._FIELD_VALUE).
_FIELD_VALUE = struct.Struct("<IIqqII8s")


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


class ScenarioError(ValueError):
    """A scenario file that cannot be played; ``str()`` names the file and what was wrong."""


def load_scenario(path: str | Path | None) -> dict[str, Any]:
    """Read a scenario file (YAML or JSON); ``None`` gives the built-in 8-GPU H100 node."""
    if path is None:
        return {"devices": [{"count": 8}]}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ScenarioError(f"cannot read scenario {str(path)!r}: {e.strerror or e}") from None
    except yaml.YAMLError:
        raise ScenarioError(f"scenario {str(path)!r} is not valid YAML or JSON") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("devices"), list):
        raise ScenarioError(f"scenario {str(path)!r} must be a mapping with a 'devices' list")
    return dict(data)


@dataclass(eq=False)  # a handle compares and hashes by identity, as NVML's pointers do
class FakeDevice:
    index: int
    spec: dict[str, Any]
    uuid: str
    created: float = field(default_factory=time.monotonic)
    hang_release: threading.Event = field(default_factory=threading.Event)

    def __getitem__(self, key: str) -> Any:
        return self.spec[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.spec[key] = value

    def elapsed(self) -> float:
        return time.monotonic() - self.created


@dataclass(eq=False)
class FakeMig:
    parent: FakeDevice
    spec: dict[str, Any]
    uuid: str


class _GpmSample:
    """What the fake remembers about one ``nvmlGpmSample_t``: which device and when it was taken."""

    def __init__(self) -> None:
        self.device: FakeDevice | None = None
        self.taken = 0.0


class _EventSet:
    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[FakeDevice, int]] = queue.Queue()
        self.devices: list[FakeDevice] = []


class FakeNvml:
    """``pynvml``-compatible functions over scenario state; attributes not defined here come from pynvml."""

    def __init__(self, scenario: Mapping[str, Any] | None = None, call_latency: float = 0.0) -> None:
        scenario = scenario if scenario is not None else load_scenario(None)
        self.driver_version = str(scenario.get("driver_version", "550.54.15"))
        self.cuda_driver_version = int(scenario.get("cuda_driver_version", 12040))
        self.call_latency = float(scenario.get("call_latency", call_latency))
        self.devices: list[FakeDevice] = []
        self.initialised = 0
        self.calls: dict[str, int] = {}
        self._event_sets: list[_EventSet] = []
        self._gpm_samples: dict[int, tuple[Any, _GpmSample]] = {}
        for entry in scenario.get("devices") or []:
            if not isinstance(entry, Mapping):
                raise ScenarioError("each entry under 'devices' must be a mapping")
            unknown = set(entry) - set(DEFAULT_DEVICE) - {"count"}
            if unknown:
                raise ScenarioError(f"unknown device field {sorted(unknown)[0]!r} in scenario")
            for _ in range(int(entry.get("count", 1))):
                spec = copy.deepcopy(DEFAULT_DEVICE)
                spec.update(copy.deepcopy({k: v for k, v in entry.items() if k != "count"}))
                i = len(self.devices)
                self.devices.append(FakeDevice(i, spec, f"GPU-{i:08x}-fake-4e0b-9c1d-{i:012x}"))
        self.migs: dict[int, list[FakeMig]] = {}
        for d in self.devices:
            self.migs[d.index] = [
                FakeMig(d, {"memory_total": 10_737_418_240, "memory_used": 0, "gpu_instance": j + 1,
                            "compute_instance": 0, "profile": "1g.10gb", "processes": [], **m},
                        f"MIG-{d.index:04x}{j:04x}-fake-{j:012x}")
                for j, m in enumerate(d.spec["mig"])
            ]  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        # Constants, structures and exception classes are the real binding's.
        if name.startswith("nvml") and name[4:5].isupper():
            raise AttributeError(name)  # a function the fake does not implement: "missing function"
        return getattr(pynvml, name)

    # --- test controls ------------------------------------------------------------------------------

    def lose(self, index: int) -> None:
        self.devices[index]["lost"] = True

    def hang(self, index: int, function: str = "all") -> None:
        self.devices[index].hang_release.clear()
        self.devices[index]["hang"] = [function]

    def release(self) -> None:
        for d in self.devices:
            d["hang"] = []
            d.hang_release.set()

    def inject_xid(self, index: int, xid: int) -> None:
        d = self.devices[index]
        for es in self._event_sets:
            if d in es.devices:
                es.queue.put((d, int(xid)))

    # --- plumbing -----------------------------------------------------------------------------------

    def _dev(self, handle: Any, fn: str, what: str | None = None) -> FakeDevice:
        self.calls[fn] = self.calls.get(fn, 0) + 1
        if not self.initialised:
            raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
        d = handle.parent if isinstance(handle, FakeMig) else handle
        if not isinstance(d, FakeDevice):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if self.call_latency:
            time.sleep(self.call_latency)
        hang = d["hang"]
        if hang and ("all" in hang or fn in hang):
            d.hang_release.wait()
        if d["lost"]:
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        ns = d["not_supported"]
        if fn in ns or (what is not None and what in ns):
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return d

    def _value(self, handle: Any, fn: str, key: str) -> Any:
        d = self._dev(handle, fn, key)
        v = d[key]
        if v is None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return v

    # --- system -------------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        if not self.initialised:
            raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        if not self.initialised:
            raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        if not 0 <= index < len(self.devices):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._dev(self.devices[index], "nvmlDeviceGetHandleByIndex")

    # --- identity -----------------------------------------------------------------------------------

    def nvmlDeviceGetName(self, h: Any) -> str:
        d = self._dev(h, "nvmlDeviceGetName")
        if isinstance(h, FakeMig):
            return f"{d['name']} MIG {h.spec['profile']}"
        return str(d["name"])

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        d = self._dev(h, "nvmlDeviceGetUUID")
        return h.uuid if isinstance(h, FakeMig) else d.uuid

    def nvmlDeviceGetPciInfo(self, h: Any) -> Any:
        d = self._dev(h, "nvmlDeviceGetPciInfo")
        info = pynvml.nvmlPciInfo_t()
        bus = d["pci_bus_id"] or f"00000000:{0x18 + 0x10 * d.index:02X}:00.0"
        info.busId = bus.encode()
        info.busIdLegacy = bus[4:].encode()
        return info

    def nvmlDeviceGetArchitecture(self, h: Any) -> int:
        d = self._dev(h, "nvmlDeviceGetArchitecture")
        return ARCHES.get(str(d["arch"]), 0xFFFFFFFF)

    def nvmlDeviceGetPersistenceMode(self, h: Any) -> int:
        return int(self._value(h, "nvmlDeviceGetPersistenceMode", "persistence_mode"))

    # --- utilisation, memory, clocks ------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, h: Any) -> Any:
        d = self._dev(h, "nvmlDeviceGetUtilizationRates", "utilization")
        if isinstance(h, FakeMig):
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        u = pynvml.c_nvmlUtilization_t()
        u.gpu, u.memory = int(d["utilization"]), int(d["memory_utilization"])
        return u

    def nvmlDeviceGetMemoryInfo(self, h: Any, version: Any = None) -> Any:
        d = self._dev(h, "nvmlDeviceGetMemoryInfo")
        spec = h.spec if isinstance(h, FakeMig) else d.spec
        total, used = int(spec["memory_total"]), int(spec["memory_used"])
        reserved = int(spec.get("memory_reserved", 0))
        if version:
            m = pynvml.c_nvmlMemory_v2_t()
            m.version, m.total, m.reserved, m.used = version, total, reserved, used
            m.free = total - used - reserved
            return m
        m1 = pynvml.c_nvmlMemory_t()
        m1.total, m1.used, m1.free = total, used + reserved, total - used - reserved
        return m1

    def nvmlDeviceGetClockInfo(self, h: Any, clock: int) -> int:
        key = "sm_clock_mhz" if clock == pynvml.NVML_CLOCK_SM else "memory_clock_mhz"
        return int(self._value(h, "nvmlDeviceGetClockInfo", key))

    def nvmlDeviceGetPerformanceState(self, h: Any) -> int:
        return int(self._value(h, "nvmlDeviceGetPerformanceState", "pstate"))

    def nvmlDeviceGetFanSpeed(self, h: Any) -> int:
        return int(self._value(h, "nvmlDeviceGetFanSpeed", "fan_speed"))

    # --- thermal and power ----------------------------------------------------------------------------

    def nvmlDeviceGetTemperature(self, h: Any, sensor: int) -> int:
        return int(self._value(h, "nvmlDeviceGetTemperature", "temperature"))

    def nvmlDeviceGetTemperatureThreshold(self, h: Any, threshold: int) -> int:
        key = {
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: "slowdown_temperature",
            pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: "shutdown_temperature",
        }.get(threshold)
        if key is None:
            self._dev(h, "nvmlDeviceGetTemperatureThreshold")
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(self._value(h, "nvmlDeviceGetTemperatureThreshold", key))

    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:
        return int(self._value(h, "nvmlDeviceGetPowerUsage", "power_mw"))

    def nvmlDeviceGetEnforcedPowerLimit(self, h: Any) -> int:
        return int(self._value(h, "nvmlDeviceGetEnforcedPowerLimit", "power_limit_mw"))

    def nvmlDeviceGetTotalEnergyConsumption(self, h: Any) -> int:
        d = self._dev(h, "nvmlDeviceGetTotalEnergyConsumption", "energy")
        # mJ since the driver loaded: a steady draw at the current power since this fake started.
        return int(1_000_000_000 + float(d["power_mw"]) * d.elapsed())

    # --- PCIe and NVLink ------------------------------------------------------------------------------

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: Any) -> int:
        return int(self._value(h, "nvmlDeviceGetCurrPcieLinkGeneration", "pcie_gen"))

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: Any) -> int:
        return int(self._value(h, "nvmlDeviceGetMaxPcieLinkGeneration", "pcie_gen_max"))

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: Any) -> int:
        return int(self._value(h, "nvmlDeviceGetCurrPcieLinkWidth", "pcie_width"))

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: Any) -> int:
        return int(self._value(h, "nvmlDeviceGetMaxPcieLinkWidth", "pcie_width_max"))

    def nvmlDeviceGetPcieThroughput(self, h: Any, counter: int) -> int:
        key = "pcie_tx_kbps" if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else "pcie_rx_kbps"
        return int(self._value(h, "nvmlDeviceGetPcieThroughput", key))

    def nvmlDeviceGetPcieReplayCounter(self, h: Any) -> int:
        base = int(self._value(h, "nvmlDeviceGetPcieReplayCounter", "pcie_replays"))
        d = h.parent if isinstance(h, FakeMig) else h
        return base + int(float(d["pcie_replays_per_second"] or 0.0) * d.elapsed())

    def nvmlDeviceGetFieldValues(self, h: Any, field_ids: list[Any]) -> Any:
        d = self._dev(h, "nvmlDeviceGetFieldValues")
        links = int(d["nvlink_links"] or 0)
        ns = d["not_supported"]
        no_nvlink = "nvlink" in ns or not links
        now_us = int(time.time() * 1e6)
        elapsed = d.elapsed()
        errors = d["nvlink_errors"] or {}
        error_rates = d["nvlink_errors_per_second"] or {}
        ok, unsupported = pynvml.NVML_SUCCESS, pynvml.NVML_ERROR_NOT_SUPPORTED
        ull, uint = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
        tx_id, rx_id = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX
        pcie_tx_id, pcie_rx_id = pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES
        mem_temp = d["memory_temperature"]
        # Packed straight into the structure's bytes, as the driver fills them: pynvml's structures
        # are slow to write attribute by attribute.
        buf = bytearray(_FIELD_VALUE.size * len(field_ids))
        for i, fid in enumerate(field_ids):
            fid, scope = fid if isinstance(fid, tuple) else (fid, 0)
            ret, vtype, value = ok, ull, 0
            if fid == pynvml.NVML_FI_DEV_MEMORY_TEMP:
                if mem_temp is None or "memory_temperature" in ns:
                    ret = unsupported
                else:
                    vtype, value = uint, int(mem_temp)
            elif fid == pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT:
                if no_nvlink:
                    ret = unsupported
                else:
                    vtype, value = uint, links
            elif fid in (tx_id, rx_id):
                if no_nvlink or scope >= links:
                    ret = unsupported
                else:
                    rate = d["nvlink_tx_kib_per_s" if fid == tx_id else "nvlink_rx_kib_per_s"]
                    value = int(float(rate) * elapsed)
            elif fid in (pcie_tx_id, pcie_rx_id):
                # The driver's byte counters, at the scenario's throughput since the device appeared.
                if "pcie_counters" in ns:
                    ret = unsupported
                else:
                    rate = d["pcie_tx_kbps" if fid == pcie_tx_id else "pcie_rx_kbps"]
                    value = int(float(rate) * 1024 * elapsed)
            elif fid in _THROTTLE_FIELDS:
                # Violation time per perf policy, as nvmlDeviceGetViolationStatus gives it.
                if "throttle" in ns or "throttle_fields" in ns:
                    ret = unsupported
                else:
                    frac = float((d["throttle"] or {}).get(_THROTTLE_FIELDS[fid], 0.0))
                    value = int(frac * elapsed * 1e9)
            elif fid in _NVLINK_FIELDS:
                kind = _NVLINK_FIELDS[fid]
                if no_nvlink or scope >= links or f"nvlink_{kind}" in ns:
                    ret = unsupported
                else:
                    value = int(errors.get(kind, 0)) + int(float(error_rates.get(kind, 0.0)) * elapsed)
            else:
                ret = unsupported
            packed = value.to_bytes(8, "little") if vtype == ull else value.to_bytes(4, "little") + bytes(4)
            _FIELD_VALUE.pack_into(buf, i * _FIELD_VALUE.size, fid, scope, now_us, 0, vtype, ret, packed)
        return (pynvml.c_nvmlFieldValue_t * len(field_ids)).from_buffer_copy(buf)

    # --- health ---------------------------------------------------------------------------------------

    def nvmlDeviceGetTotalEccErrors(self, h: Any, error_type: int, counter_type: int) -> int:
        d = self._dev(h, "nvmlDeviceGetTotalEccErrors", "ecc")
        ecc = d["ecc"]
        if ecc is None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        scope = "volatile" if counter_type == pynvml.NVML_VOLATILE_ECC else "aggregate"
        kind = "corrected" if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else "uncorrected"
        return int((ecc.get(scope) or {}).get(kind, 0))

    def nvmlDeviceGetRemappedRows(self, h: Any) -> tuple[int, int, int, int]:
        r = self._value(h, "nvmlDeviceGetRemappedRows", "remapped_rows")
        return (int(r.get("correctable", 0)), int(r.get("uncorrectable", 0)), int(bool(r.get("pending"))),
                int(bool(r.get("failure"))))  # fmt: skip

    def nvmlDeviceGetViolationStatus(self, h: Any, policy: int) -> Any:
        d = self._dev(h, "nvmlDeviceGetViolationStatus", "throttle")
        t = pynvml.c_nvmlViolationTime_t()
        t.referenceTime = int(time.time() * 1e6)
        frac = float((d["throttle"] or {}).get(_POLICY_NAMES.get(policy, ""), 0.0))
        t.violationTime = int(frac * d.elapsed() * 1e9)
        return t

    # --- GPM (Hopper and newer) -------------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, h: Any) -> Any:
        d = self._dev(h, "nvmlGpmQueryDeviceSupport", "gpm")
        s = pynvml.c_nvmlGpmSupport_t()
        s.version = pynvml.NVML_GPM_SUPPORT_VERSION
        s.isSupportedDevice = int(ARCHES.get(str(d["arch"]), 0) >= ARCHES["hopper"] and bool(d["gpm"]))
        return s

    # Samples are real ``nvmlGpmSample_t`` pointers (so they fit ``c_nvmlGpmMetricsGet_t``), keyed by address.

    def nvmlGpmSampleAlloc(self) -> Any:
        buf = ctypes.create_string_buffer(8)
        ptr = ctypes.cast(buf, pynvml.c_nvmlGpmSample_t)
        self._gpm_samples[ctypes.addressof(buf)] = (buf, _GpmSample())
        return ptr

    def _gpm_sample(self, ptr: Any) -> _GpmSample | None:
        entry = self._gpm_samples.get(ctypes.cast(ptr, ctypes.c_void_p).value or 0)
        return entry[1] if entry else None

    def nvmlGpmSampleFree(self, ptr: Any) -> None:
        self._gpm_samples.pop(ctypes.cast(ptr, ctypes.c_void_p).value or 0, None)

    def nvmlGpmSampleGet(self, h: Any, ptr: Any) -> Any:
        d = self._dev(h, "nvmlGpmSampleGet", "gpm")
        sample = self._gpm_sample(ptr)
        if sample is None:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if ARCHES.get(str(d["arch"]), 0) < ARCHES["hopper"]:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        sample.device, sample.taken = d, time.monotonic()
        return ptr

    def nvmlGpmMetricsGet(self, mg: Any) -> Any:
        self.calls["nvmlGpmMetricsGet"] = self.calls.get("nvmlGpmMetricsGet", 0) + 1
        s1, s2 = self._gpm_sample(mg.sample1), self._gpm_sample(mg.sample2)
        if s1 is None or s2 is None or s1.device is None or s2.device is not s1.device:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        d = s1.device
        for i in range(mg.numMetrics):
            m = mg.metrics[i]
            name = GPM_METRICS.get(m.metricId)
            if name is None or name not in (d["gpm"] or {}):
                m.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
            else:
                m.nvmlReturn = pynvml.NVML_SUCCESS
                m.value = float(d["gpm"][name])
        return mg

    # --- MIG --------------------------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, h: Any) -> list[int]:
        d = self._dev(h, "nvmlDeviceGetMigMode", "mig")
        if ARCHES.get(str(d["arch"]), 0) < ARCHES["ampere"]:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        on = int(bool(self.migs[d.index]))
        return [on, on]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: Any) -> int:
        self._dev(h, "nvmlDeviceGetMaxMigDeviceCount", "mig")
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: Any, index: int) -> FakeMig:
        d = self._dev(h, "nvmlDeviceGetMigDeviceHandleByIndex", "mig")
        migs = self.migs[d.index]
        if index >= len(migs):
            raise _err(pynvml.NVML_ERROR_NOT_FOUND)
        return migs[index]

    def nvmlDeviceGetGpuInstanceId(self, h: Any) -> int:
        self._dev(h, "nvmlDeviceGetGpuInstanceId")
        if not isinstance(h, FakeMig):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(h.spec["gpu_instance"])

    def nvmlDeviceGetComputeInstanceId(self, h: Any) -> int:
        self._dev(h, "nvmlDeviceGetComputeInstanceId")
        if not isinstance(h, FakeMig):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(h.spec["compute_instance"])

    # --- processes ----------------------------------------------------------------------------------------

    def nvmlDeviceGetComputeRunningProcesses(self, h: Any) -> list[Any]:
        d = self._dev(h, "nvmlDeviceGetComputeRunningProcesses", "processes")
        procs = h.spec["processes"] if isinstance(h, FakeMig) else d["processes"]
        out = []
        for p in procs or []:
            info = pynvml.nvmlFriendlyObject(
                {"pid": int(p["pid"]), "usedGpuMemory": p.get("used_memory"), "gpuInstanceId": 0xFFFFFFFF,
                 "computeInstanceId": 0xFFFFFFFF}
            )  # fmt: skip
            out.append(info)
        return out

    def nvmlDeviceGetProcessUtilization(self, h: Any, last_seen: int) -> list[Any]:
        d = self._dev(h, "nvmlDeviceGetProcessUtilization", "process_utilization")
        now = int(time.time() * 1e6)
        out = []
        for p in d["processes"] or []:
            if p.get("sm_util") is None:
                continue
            s = pynvml.c_nvmlProcessUtilizationSample_t()
            s.pid, s.timeStamp = int(p["pid"]), now
            s.smUtil, s.memUtil = int(p["sm_util"]), int(p.get("mem_util", 0))
            out.append(s)
        if not out:
            raise _err(pynvml.NVML_ERROR_NOT_FOUND)
        return out

    # --- events (XID) -------------------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> _EventSet:
        es = _EventSet()
        self._event_sets.append(es)
        return es

    def nvmlDeviceRegisterEvents(self, h: Any, event_types: int, es: _EventSet) -> None:
        d = self._dev(h, "nvmlDeviceRegisterEvents", "xid")
        es.devices.append(d)
        for xid in d["xid"] or []:
            es.queue.put((d, int(xid)))

    def nvmlEventSetWait(self, es: _EventSet, timeout_ms: int) -> Any:
        try:
            d, xid = es.queue.get(timeout=timeout_ms / 1000.0)
        except queue.Empty:
            raise _err(pynvml.NVML_ERROR_TIMEOUT) from None
        if d["lost"]:
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        # The real binding returns c_nvmlEventData_t whose device is a handle; the fake's handle is d.
        return _EventData(d, pynvml.nvmlEventTypeXidCriticalError, xid)

    def nvmlEventSetFree(self, es: _EventSet) -> None:
        if es in self._event_sets:
            self._event_sets.remove(es)


@dataclass
class _EventData:
    device: FakeDevice
    eventType: int  # pynvml's field names
    eventData: int
