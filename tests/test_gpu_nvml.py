"""The NVML wrapper's error policy, against the fake backend that raises the binding's own errors."""

from __future__ import annotations

from typing import Any

import pynvml
import pytest

from mlops_obs.collectors import CollectorUnavailable
from mlops_obs.collectors._nvml import GpuLost, Nvml
from mlops_obs.collectors.fake_nvml import FakeNvml


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda msg, **kw: self.records.append((level, msg, kw))

    def at(self, *levels: str) -> list[tuple[str, str, dict[str, Any]]]:
        return [r for r in self.records if r[0] in levels]


def make(scenario: dict[str, Any] | None = None) -> tuple[Nvml, FakeNvml, Log]:
    fake = FakeNvml(scenario or {"devices": [{"count": 2}]})
    log = Log()
    loads: list[int] = []

    def loader() -> FakeNvml:
        loads.append(1)
        return fake

    nv = Nvml(loader, log)
    assert loads == [] and fake.initialised == 0  # nothing touches the driver until first use
    return nv, fake, log


def test_initialises_lazily_and_once() -> None:
    """The binding is loaded and nvmlInit called on the first call only."""
    nv, fake, _ = make()
    assert nv.call("nvmlDeviceGetCount") == 2
    assert nv.call("nvmlDeviceGetCount") == 2
    assert fake.initialised == 1


def test_handles_are_created_once() -> None:
    """Device handles are looked up once, however many rounds run."""
    nv, fake, _ = make()
    first = nv.handles()
    second = nv.handles()
    assert first is second and len(first) == 2
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == 2


def test_not_supported_is_none_and_only_debug_logged() -> None:
    """NotSupported gives None (so no series), logged once at debug level, never a warning."""
    nv, _, log = make({"devices": [{"fan_speed": None}]})
    h = nv.handles()[0]
    assert nv.call("nvmlDeviceGetFanSpeed", h) is None
    assert nv.call("nvmlDeviceGetFanSpeed", h) is None
    assert len(log.at("debug")) == 1 and log.at("warning", "error") == []


def test_missing_function_is_logged_once() -> None:
    """A function the binding lacks yields None and one warning, however often it is called."""
    nv, _, log = make()
    h = nv.handles()[0]
    for _ in range(3):
        assert nv.call("nvmlDeviceGetC2cModeInfoV", h) is None
    warnings = log.at("warning")
    assert len(warnings) == 1 and warnings[0][2]["function"] == "nvmlDeviceGetC2cModeInfoV"


def test_function_not_found_in_driver_is_logged_once() -> None:
    """A binding function whose symbol the installed driver lacks (FUNCTION_NOT_FOUND) is logged once."""

    class OldDriver(FakeNvml):
        def nvmlDeviceGetRemappedRows(self, h: Any) -> Any:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    fake = OldDriver({"devices": [{}]})
    log = Log()
    nv = Nvml(lambda: fake, log)
    h = nv.handles()[0]
    assert nv.call("nvmlDeviceGetRemappedRows", h) is None
    assert nv.call("nvmlDeviceGetRemappedRows", h) is None
    assert len(log.at("warning")) == 1


def test_lost_gpu_raises_gpu_lost() -> None:
    """GPU_IS_LOST is the one error that surfaces, so the collector can mark that device lost."""
    nv, fake, _ = make()
    h = nv.handles()[1]
    fake.lose(1)
    with pytest.raises(GpuLost):
        nv.call("nvmlDeviceGetPowerUsage", h)
    assert nv.call("nvmlDeviceGetPowerUsage", nv.handles()[0]) == 612_345


def test_not_found_has_its_own_default() -> None:
    """NOT_FOUND (no process samples yet) returns the caller's default, distinct from NotSupported."""
    nv, _, _ = make()
    h = nv.handles()[0]
    assert nv.call("nvmlDeviceGetProcessUtilization", h, 0, not_found=[]) == []


def test_init_failure_is_unavailable_and_not_retried_every_round() -> None:
    """A machine without NVML: CollectorUnavailable with the reason; nvmlInit not retried every round."""
    attempts: list[int] = []

    class NoDriver:
        def nvmlInit(self) -> None:
            attempts.append(1)
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    nv = Nvml(NoDriver)
    for _ in range(3):
        with pytest.raises(CollectorUnavailable, match="NVML is not available: NVML Shared Library Not Found"):
            nv.call("nvmlDeviceGetCount")
    assert attempts == [1]


def test_calls_are_timed_per_function() -> None:
    """With timing on (the real-GPU check turns it on), each call's latency is recorded by function."""
    nv, _, _ = make()
    h = nv.handles()[0]
    nv.call("nvmlDeviceGetTemperature", h, 0)
    assert "nvmlDeviceGetTemperature" not in nv.stats  # off by default: the exporter exports no timings
    nv.keep_samples = True
    h = nv.handles()[0]
    for _ in range(4):
        nv.call("nvmlDeviceGetTemperature", h, 0)
    st = nv.stats["nvmlDeviceGetTemperature"]
    assert st.count == 4 and st.max >= st.total / 4 > 0 and len(st.samples) == 4


def test_field_decoder_reads_what_field_values_reads() -> None:
    """The whole-array decoding (every field answered, one value type) and the per-field one (an error,
    mixed types) give the values ``field_values`` gives, in request order."""
    import pynvml

    from mlops_obs.collectors._nvml_structs import FieldDecoder, field_values

    field_value_list = FieldDecoder().values

    same = (pynvml.c_nvmlFieldValue_t * 4)()
    for i, v in enumerate((0, 7, 2**40 + 3, 12345)):
        same[i].fieldId, same[i].scopeId, same[i].valueType = 138, i, pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
        same[i].value.ullVal = v
    assert field_value_list(same) == [0.0, 7.0, float(2**40 + 3), 12345.0]
    assert field_value_list(same) == [x for _, _, x in field_values(same)]

    mixed = (pynvml.c_nvmlFieldValue_t * 3)()
    mixed[0].valueType, mixed[0].value.uiVal = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, 81
    mixed[1].valueType, mixed[1].nvmlReturn = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, pynvml.NVML_ERROR_NOT_SUPPORTED
    mixed[2].valueType, mixed[2].value.dVal = pynvml.NVML_VALUE_TYPE_DOUBLE, 0.5
    assert field_value_list(mixed) == [81.0, None, 0.5] == [x for _, _, x in field_values(mixed)]

    uints = (pynvml.c_nvmlFieldValue_t * 2)()
    for i in range(2):
        uints[i].valueType, uints[i].value.ullVal = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, (1 << 40) | (i + 5)
    assert field_value_list(uints) == [5.0, 6.0]  # the low four bytes of the union, as uiVal reads them
