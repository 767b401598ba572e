"""The GPU collector over the fake NVML backend: every field, every fault, as a user scrapes it."""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mlops_obs import rankdir
from mlops_obs.collectors import CollectorUnavailable
from mlops_obs.collectors.fake_nvml import FakeNvml
from mlops_obs.collectors.gpu import FAMILIES, GpuCollector
from mlops_obs.config import ConfigError
from mlops_obs.metrics import render
from tests.conftest import require_binary, wait_for

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# GPU 0's process in FULL: this test process, so a snapshot can claim it (a pid is a rank's only when its
# process started when the snapshot says).
ME = os.getpid()
ME_STARTED = psutil.Process(ME).create_time()

# A node where every field the collector knows is populated (fan, ECC, NVLink errors, throttling,
# remapped rows, GPM, processes, MIG on one GPU, an XID at start-up).
FULL: dict[str, Any] = {
    "devices": [
        {
            "count": 7,
            "fan_speed": 40,
            "ecc": {"volatile": {"corrected": 2, "uncorrected": 0}, "aggregate": {"corrected": 9, "uncorrected": 1}},
            "nvlink_errors": {"replay": 1, "recovery": 0, "crc": 3},
            "throttle": {"power": 0.3, "thermal": 0.05},
            "remapped_rows": {"correctable": 2, "uncorrectable": 1, "pending": True, "failure": False},
            "processes": [{"pid": ME, "used_memory": 4_000_000_000, "sm_util": 73}],
            "xid": [13],
        },
        {
            "fan_speed": 40,
            "not_supported": ["pcie_counters", "throttle_fields"],  # an older driver: the direct getters instead
            "ecc": {"volatile": {"corrected": 0, "uncorrected": 0}},
            "mig": [
                {
                    "profile": "3g.40gb",
                    "gpu_instance": 1,
                    "memory_total": 42_949_672_960,
                    "memory_used": 10_000,
                    "processes": [{"pid": 999_999_002, "used_memory": 10_000}],
                },
                {"profile": "3g.40gb", "gpu_instance": 2, "memory_total": 42_949_672_960},
            ],
        },
    ]
}


def scrape_series(text: str) -> Series:
    out: Series = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def values(series: Series, name: str, **match: str) -> list[float]:
    return [v for (n, lb), v in series.items() if n == name and all((k, m) in lb for k, m in match.items())]


@pytest.fixture
def gpu(tmp_path: Path) -> Iterator[Callable[..., GpuCollector]]:
    made: list[GpuCollector] = []

    def make(scenario: dict[str, Any] | None = None, **cfg: Any) -> GpuCollector:
        config: dict[str, Any] = {
            "gpu.backend": "fake",
            "gpu.fake-scenario": None,
            "gpu.xid-events": True,
            "gpu.counter-interval": 0.0,
            "gpu.profile": "full",  # every series; the default profile's tests ask for it
        }
        if scenario is not None:
            path = tmp_path / f"scenario{len(made)}.yaml"
            path.write_text(yaml.safe_dump(scenario))
            config["gpu.fake-scenario"] = path
        config.update(cfg)
        c = GpuCollector(config)
        made.append(c)
        return c

    yield make
    for c in made:
        lib = c.nvml._lib
        if isinstance(lib, FakeNvml):
            lib.release()
        c.close()


def sample(c: GpuCollector) -> Series:
    return scrape_series(render(c.sample()).decode())


def fake(c: GpuCollector) -> FakeNvml:
    lib = c.nvml.lib
    assert isinstance(lib, FakeNvml)
    return lib


def _rank_on_gpu0(directory: Path) -> Path:
    """A training rank's snapshot naming GPU 0's process of FULL, so the device has an owner."""
    directory.mkdir(exist_ok=True)
    snap = {"v": rankdir.SCHEMA_VERSION, "job": "full", "rank": 0, "pid": ME, "start_time": ME_STARTED,
            "updated": time.time(), "state": "running"}  # fmt: skip
    rankdir.write(directory, "full", 0, snap)  # type: ignore[arg-type]
    return directory


def test_every_field_of_a_full_node_is_reported_in_base_units(gpu: Callable[..., GpuCollector], tmp_path: Path) -> None:
    """Every family in FAMILIES appears for the full scenario, with values converted to base units."""
    c = gpu(FULL, **{"multiproc-dir": _rank_on_gpu0(tmp_path / "mp")})
    c.sample()
    wait_for(lambda: c.xid is not None and bool(c.xid.snapshot()))
    time.sleep(0.05)
    s = sample(c)
    names = {n for n, _ in s}
    missing = [f for f in FAMILIES if f not in names]
    assert missing == []
    g0 = {"gpu": "0"}
    assert values(s, "mlops_gpu_devices") == [8.0]
    assert values(s, "mlops_gpu_utilization_ratio", **g0) == [0.87]
    assert values(s, "mlops_gpu_sm_clock_hertz", **g0) == [1980e6]
    assert values(s, "mlops_gpu_power_usage_watts", **g0) == [612.345]
    assert values(s, "mlops_gpu_power_limit_watts", **g0) == [700.0]
    assert values(s, "mlops_gpu_fan_speed_ratio", **g0) == [0.4]
    assert values(s, "mlops_gpu_memory_temperature_celsius", **g0) == [68.0]
    # PCIe bytes as counters where the driver has them (1.2 GB/s in the scenario), else the sampled rate.
    assert 0 < values(s, "mlops_gpu_pcie_transmit_bytes_total", **g0)[0] <= 1_200_000 * 1024.0 * 60
    assert values(s, "mlops_gpu_pcie_transmit_bytes_per_second", **g0) == []
    assert values(s, "mlops_gpu_pcie_receive_bytes_per_second", gpu="7") == [2_400_000 * 1024.0]
    assert values(s, "mlops_gpu_pcie_receive_bytes_total", gpu="7") == []
    assert values(s, "mlops_gpu_ecc_errors_total", type="uncorrected", scope="aggregate", **g0) == [1.0]
    assert values(s, "mlops_gpu_remapped_rows_total", type="correctable", **g0) == [2.0]
    assert values(s, "mlops_gpu_remap_pending", **g0) == [1.0]
    assert values(s, "mlops_gpu_nvlink_errors_total", link="17", type="crc", **g0) == [3.0]
    assert len(values(s, "mlops_gpu_nvlink_transmit_bytes_total", **g0)) == 18
    assert values(s, "mlops_gpu_xid_errors_total", xid="13", **g0) == [1.0]
    assert values(s, "mlops_gpu_sm_active_ratio", **g0) == [0.715]
    info = [lb for (n, lb) in s if n == "mlops_gpu_info" and ("gpu", "0") in lb]
    assert ("driver_version", "550.54.15") in info[0]
    # The rank owns each GPU its process uses alone: the same attribution as the per-process series.
    owners = sorted((dict(lb)["gpu"], dict(lb)["uuid"], dict(lb)["job"], dict(lb)["rank"])
                    for (n, lb) in s if n == "mlops_gpu_owner_info")  # fmt: skip
    used = sorted((dict(lb)["gpu"], dict(lb)["uuid"], "full", "0") for (n, lb) in s
                  if n == "mlops_gpu_process_memory_used_bytes" and ("job", "full") in lb)  # fmt: skip
    assert owners == used and owners[0][:2] == ("0", dict(info[0])["uuid"]), owners
    # Counters carry _total and only counters do.
    assert all(n.endswith("_total") == (FAMILIES[n][0] == "counter") for n in FAMILIES)


def test_full_node_output_passes_promtool_check_metrics(start_exporter: Callable[..., Any], tmp_path: Path) -> None:
    """promtool check metrics accepts a scrape with every fake-GPU field populated, plus the exporter's own."""
    promtool = require_binary("promtool")
    scenario = tmp_path / "full.yaml"
    scenario.write_text(yaml.safe_dump(FULL))
    ex = start_exporter(
        **{
            "gpu.backend": "fake",
            "gpu.fake-scenario": scenario,
            "collector.gpu": True,
            "gpu.profile": "full",
            "multiproc-dir": _rank_on_gpu0(tmp_path / "mp"),
        }
    )
    wait_for(
        lambda: all(
            f"{n}{{" in _get(ex.url + "/metrics") for n in ("mlops_gpu_xid_errors_total", "mlops_gpu_sm_active_ratio")
        )
    )
    body = _get(ex.url + "/metrics")
    assert 'mlops_scrape_collector_success{collector="gpu"} 1' in body
    for family in FAMILIES:
        assert re.search(rf"^{family}[{{ ]", body, re.MULTILINE), family
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def test_not_supported_fields_have_no_series_never_zero(gpu: Callable[..., GpuCollector]) -> None:
    """A NotSupported value (fan on a passive board, ECC off, no NVLink) yields no series at all."""
    c = gpu(
        {
            "devices": [
                {
                    "fan_speed": None,
                    "ecc": None,
                    "arch": "ampere",
                    "not_supported": ["memory_temperature", "nvlink", "nvmlDeviceGetRemappedRows"],
                }
            ]
        }
    )
    s = sample(c)
    names = {n for n, _ in s}
    for absent in (
        "mlops_gpu_fan_speed_ratio",
        "mlops_gpu_ecc_errors_total",
        "mlops_gpu_memory_temperature_celsius",
        "mlops_gpu_nvlink_transmit_bytes_total",
        "mlops_gpu_nvlink_errors_total",
        "mlops_gpu_remapped_rows_total",
        "mlops_gpu_remap_pending",
        "mlops_gpu_sm_active_ratio",
    ):
        assert absent not in names, absent
    assert values(s, "mlops_gpu_temperature_celsius") == [61.0]
    assert values(s, "mlops_gpu_profiling_supported") == [0.0]


def test_a_not_supported_call_is_not_repeated_every_round(gpu: Callable[..., GpuCollector]) -> None:
    """NotSupported is remembered per call and device (a real H200 spent 1 ms a round on its fan query),
    and asked again after ABSENT_RETRY_SECONDS, so support that appears later is picked up."""
    c = gpu({"devices": [{"fan_speed": None}, {"fan_speed": 40}]})
    for _ in range(5):
        s = sample(c)
    calls = fake(c).calls
    assert calls["nvmlDeviceGetFanSpeed"] == 1 + 5  # gpu 0 once, gpu 1 every round
    assert values(s, "mlops_gpu_fan_speed_ratio", gpu="0") == []
    fake(c).devices[0]["fan_speed"] = 55
    c.nvml._absent = {k: (0.0, args) for k, (_, args) in c.nvml._absent.items()}  # the retry time has come
    s = sample(c)
    assert values(s, "mlops_gpu_fan_speed_ratio", gpu="0") == [0.55]


def test_process_utilization_is_the_mean_of_the_interval_and_read_once_per_interval(
    gpu: Callable[..., GpuCollector],
) -> None:
    """Per-process utilisation averages every NVML sample since the last read, and is read once per
    counter interval (the call cost 4 ms of CPU on a real H200); a pid seen between reads waits."""
    c = gpu({"devices": [{"processes": [{"pid": 4242, "used_memory": 1_000, "sm_util": 73}]}]},
            **{"gpu.counter-interval": 3600.0})  # fmt: skip
    lib = fake(c)
    real = lib.nvmlDeviceGetProcessUtilization

    def two_samples(h: Any, last_seen: int) -> list[Any]:
        first, *_ = real(h, last_seen)
        second = type(first)()
        second.pid, second.timeStamp, second.smUtil = first.pid, first.timeStamp + 1, 13
        return [first, second]

    lib.nvmlDeviceGetProcessUtilization = two_samples  # type: ignore[method-assign]
    s = sample(c)
    assert values(s, "mlops_gpu_process_utilization_ratio", pid="4242") == [pytest.approx(0.43)]
    assert c._devices is not None and c._devices[0].proc_util_ts > 0  # the next read asks for newer samples only
    lib.devices[0]["processes"].append({"pid": 4343, "used_memory": 2_000, "sm_util": 50})
    s = sample(c)  # within the interval: the last read's value, and no series yet for the new pid
    assert values(s, "mlops_gpu_process_utilization_ratio", pid="4242") == [pytest.approx(0.43)]
    assert values(s, "mlops_gpu_process_utilization_ratio", pid="4343") == []
    assert values(s, "mlops_gpu_process_memory_used_bytes", pid="4343") == [2_000.0]
    assert lib.calls["nvmlDeviceGetProcessUtilization"] == 1


def test_lost_gpu_is_reported_and_the_others_still_are(gpu: Callable[..., GpuCollector]) -> None:
    """A GPU that fell off the bus gets mlops_gpu_lost 1 and no other series; the other GPUs are intact."""
    c = gpu({"devices": [{"count": 4}]})
    before = sample(c)
    fake(c).lose(2)
    s = sample(c)
    assert values(s, "mlops_gpu_lost", gpu="2") == [1.0]
    assert values(s, "mlops_gpu_lost", gpu="1") == [0.0]
    assert values(s, "mlops_gpu_utilization_ratio", gpu="2") == []
    assert len(values(s, "mlops_gpu_utilization_ratio")) == 3
    assert len(values(before, "mlops_gpu_utilization_ratio")) == 4
    # Back after a reset: its series return.
    fake(c).devices[2]["lost"] = False
    assert values(sample(c), "mlops_gpu_utilization_ratio", gpu="2") == [0.87]


def test_hanging_nvml_call_is_abandoned_without_delaying_the_scrape(
    start_exporter: Callable[..., Any], tmp_path: Path
) -> None:
    """A hung NVML call: the scrape is still served, gpu success 0, other collectors served, recovery after."""
    ex = start_exporter(
        **{
            "gpu.backend": "fake",
            "collector.gpu": True,
            "collector.training": True,
            "collector.deadline": "0.5s",
            "sampler.interval": "0.1s",
        }
    )
    url = ex.url + "/metrics"
    gpu_collector = next(c for c in ex.collectors if c.name == "gpu")
    wait_for(lambda: 'collector="gpu"} 1' in _get(url))
    fake(gpu_collector).hang(2, "nvmlDeviceGetPowerUsage")

    def gpu_duration() -> float:
        return values(scrape_series(_get(url)), "mlops_scrape_collector_duration_seconds", collector="gpu")[0]

    try:
        wait_for(lambda: gpu_duration() >= 0.5)
        t0 = time.monotonic()
        body = _get(url, timeout=5.0)
        assert time.monotonic() - t0 < 5.0  # generous: the point is that it is served while NVML hangs
        s = scrape_series(body)
        assert values(s, "mlops_scrape_collector_success", collector="gpu") == [0.0]
        assert values(s, "mlops_scrape_collector_success", collector="training") == [1.0]
        assert not any(n.startswith("mlops_gpu_") for n, _ in s)
    finally:
        fake(gpu_collector).release()
    wait_for(lambda: 'collector="gpu"} 1' in _get(url))
    assert 'mlops_gpu_power_usage_watts{gpu="2"' in _get(url)


def test_xid_events_count_per_code(gpu: Callable[..., GpuCollector]) -> None:
    """Each XID event adds one to its own code's counter (not a 'last XID' gauge)."""
    c = gpu({"devices": [{"count": 3}]})
    sample(c)
    assert c.xid is not None
    wait_for(lambda: c.xid is not None and c.xid.registered == {0, 1, 2})
    f = fake(c)
    f.inject_xid(1, 79)
    f.inject_xid(1, 79)
    f.inject_xid(1, 48)
    wait_for(lambda: sum(c.xid.snapshot().values()) == 3 if c.xid else False)
    s = sample(c)
    assert values(s, "mlops_gpu_xid_errors_total", gpu="1", xid="79") == [2.0]
    assert values(s, "mlops_gpu_xid_errors_total", gpu="1", xid="48") == [1.0]
    assert values(s, "mlops_gpu_xid_errors_total", gpu="0") == []


def test_xid_registration_not_supported_skips_only_that_gpu(gpu: Callable[..., GpuCollector]) -> None:
    """A GPU that refuses XID event registration is left out of the event set; the others are watched."""
    c = gpu({"devices": [{}, {"not_supported": ["xid"]}, {}]})
    sample(c)
    wait_for(lambda: c.xid is not None and c.xid.registered == {0, 2})
    fake(c).inject_xid(2, 31)
    wait_for(lambda: c.xid is not None and c.xid.snapshot() == {(2, 31): 1})


def test_ecc_errors_are_counters_by_type_and_scope(gpu: Callable[..., GpuCollector]) -> None:
    """ECC errors appear per type and scope and rise as the device reports more."""
    c = gpu({"devices": [{"ecc": {"volatile": {"corrected": 5, "uncorrected": 0}}}]})
    s = sample(c)
    assert values(s, "mlops_gpu_ecc_errors_total", type="corrected", scope="volatile") == [5.0]
    assert values(s, "mlops_gpu_ecc_errors_total", type="uncorrected", scope="aggregate") == [0.0]
    fake(c).devices[0]["ecc"]["volatile"]["uncorrected"] = 2
    assert values(sample(c), "mlops_gpu_ecc_errors_total", type="uncorrected", scope="volatile") == [2.0]


def test_counters_are_reread_only_every_counter_interval(gpu: Callable[..., GpuCollector]) -> None:
    """Between refreshes counters are reused without NVML calls; gauges are read every round."""
    c = gpu({"devices": [{"count": 2, "ecc": {"volatile": {"corrected": 1}}}]}, **{"gpu.counter-interval": 3600.0})
    first = sample(c)
    f = fake(c)
    ecc_calls, power_calls = f.calls["nvmlDeviceGetTotalEccErrors"], f.calls["nvmlDeviceGetPowerUsage"]
    f.devices[0]["ecc"]["volatile"]["corrected"] = 5
    f.devices[0]["power_mw"] = 100_000
    second = sample(c)
    assert f.calls["nvmlDeviceGetTotalEccErrors"] == ecc_calls
    assert f.calls["nvmlDeviceGetPowerUsage"] == power_calls + 2
    assert values(second, "mlops_gpu_power_usage_watts", gpu="0") == [100.0]
    assert values(second, "mlops_gpu_ecc_errors_total", gpu="0", type="corrected", scope="volatile") == [1.0]
    assert {n for n, _ in second} >= {n for n, _ in first}  # (GPM ratios join from the second round)
    c.counter_interval = 0.0
    third = sample(c)
    assert values(third, "mlops_gpu_ecc_errors_total", gpu="0", type="corrected", scope="volatile") == [5.0]


@pytest.mark.parametrize("driver", ["field values", "older driver"])
def test_throttling_is_seconds_per_reason(gpu: Callable[..., GpuCollector], driver: str) -> None:
    """Violation time becomes a seconds counter per reason that grows only for the active reason, read
    in one field-values call, or one nvmlDeviceGetViolationStatus per reason where the driver lacks the fields."""
    older = driver == "older driver"
    c = gpu({"devices": [{"throttle": {"thermal": 0.5}, "not_supported": ["throttle_fields"] if older else []}]})
    first = sample(c)
    time.sleep(0.2)
    second = sample(c)
    t1 = values(first, "mlops_gpu_throttle_seconds_total", reason="thermal")[0]
    t2 = values(second, "mlops_gpu_throttle_seconds_total", reason="thermal")[0]
    assert t2 > t1
    assert values(second, "mlops_gpu_throttle_seconds_total", reason="power") == [0.0]
    assert fake(c).calls.get("nvmlDeviceGetViolationStatus", 0) == (16 if older else 0)
    reasons = {dict(lb)["reason"] for n, lb in second if n == "mlops_gpu_throttle_seconds_total"}
    assert reasons == {
        "power",
        "thermal",
        "sync_boost",
        "board_limit",
        "low_utilization",
        "reliability",
        "app_clocks",
        "base_clocks",
    }


def test_gpm_ratios_on_hopper_only_from_the_second_round(gpu: Callable[..., GpuCollector]) -> None:
    """GPM ratios need two samples (no sleep inside a round); pre-Hopper GPUs say profiling is unsupported."""
    c = gpu({"devices": [{"arch": "hopper"}, {"arch": "ampere", "name": "NVIDIA A100-SXM4-80GB"}]})
    first = sample(c)
    assert values(first, "mlops_gpu_sm_active_ratio") == []
    second = sample(c)
    assert values(second, "mlops_gpu_tensor_active_ratio", gpu="0") == [0.48]
    assert values(second, "mlops_gpu_tensor_active_ratio", gpu="1") == []
    assert values(second, "mlops_gpu_profiling_supported", gpu="1") == [0.0]
    assert values(second, "mlops_gpu_profiling_supported", gpu="0") == [1.0]


def test_gpm_ratios_are_the_mean_of_a_counter_interval(gpu: Callable[..., GpuCollector]) -> None:
    """After the first one-round window, GPM is sampled once per counter interval (its metrics cost ~1 ms
    of CPU on an H200) and the rounds in between repeat that window's ratios."""
    c = gpu({"devices": [{"arch": "hopper"}]}, **{"gpu.counter-interval": 3600.0})
    sample(c)
    assert values(sample(c), "mlops_gpu_sm_active_ratio") == [0.715]
    fake(c).devices[0]["gpm"] = {**fake(c).devices[0]["gpm"], "sm_active": 10.0}
    for _ in range(3):
        assert values(sample(c), "mlops_gpu_sm_active_ratio") == [0.715]
    assert fake(c).calls["nvmlGpmMetricsGet"] == 1
    assert fake(c).calls["nvmlGpmSampleGet"] == 2
    c.counter_interval = 0.0
    assert values(sample(c), "mlops_gpu_sm_active_ratio") == [0.1]


def test_mig_instances_have_their_own_label_set(gpu: Callable[..., GpuCollector]) -> None:
    """Each MIG instance reports its memory under gpu_instance and mig_profile labels."""
    c = gpu(FULL)
    s = sample(c)
    mig = [
        (dict(lb), v) for (n, lb), v in s.items() if n == "mlops_gpu_memory_total_bytes" and "gpu_instance" in dict(lb)
    ]
    assert sorted(lb["gpu_instance"] for lb, _ in mig) == ["1", "2"]
    assert all(lb["gpu"] == "7" and lb["mig_profile"] == "3g.40gb" for lb, _ in mig)
    assert values(s, "mlops_gpu_process_memory_used_bytes", pid="999999002", gpu_instance="1") == [10_000.0]


def test_no_nvml_reports_unavailable_once(start_exporter: Callable[..., Any]) -> None:
    """Without a driver the real backend is unavailable: gpu success 0, one log line, the rest unaffected."""
    c = GpuCollector({"gpu.backend": "nvml"})
    try:
        c.sample()
    except CollectorUnavailable as e:
        assert "NVML is not available" in str(e)
    else:
        pytest.skip("this machine has a working NVML")
    finally:
        c.close()
    ex = start_exporter(**{"collector.gpu": True, "collector.training": True, "sampler.interval": "0.05s"})
    records: list[tuple[str, dict[str, Any]]] = []

    class Rec:
        def __getattr__(self, level: str) -> Callable[..., None]:
            return lambda msg, **kw: records.append((msg, kw))

    ex.sampler.log = Rec()
    ex.sampler._reported.clear()
    wait_for(lambda: ex.sampler.states["gpu"].rounds >= 1)
    start = ex.sampler.states["gpu"].rounds
    # The sampler runs rounds for scrapes: scrape until five more have run.
    wait_for(lambda: ex.sampler.scrape() and ex.sampler.states["gpu"].rounds >= start + 5)
    gpu_lines = [r for r in records if r[1].get("collector") == "gpu"]
    assert len(gpu_lines) == 1 and gpu_lines[0][0] == "collector unavailable on this machine"
    s = scrape_series(_get(ex.url + "/metrics"))
    assert values(s, "mlops_scrape_collector_success", collector="gpu") == [0.0]
    assert values(s, "mlops_scrape_collector_success", collector="training") == [1.0]


def test_bad_scenario_file_is_a_one_line_config_error(tmp_path: Path) -> None:
    """A scenario that cannot be read or has an unknown field names the setting and the problem."""
    with pytest.raises(ConfigError, match=r"gpu.fake-scenario: cannot read scenario"):
        GpuCollector({"gpu.backend": "fake", "gpu.fake-scenario": tmp_path / "missing.yaml"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices:\n  - {count: 1, fan_sped: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown device field 'fan_sped'"):
        GpuCollector({"gpu.backend": "fake", "gpu.fake-scenario": bad})


def test_exporter_cli_rejects_a_bad_scenario(tmp_path: Path) -> None:
    """``mlops-obs exporter`` exits non-zero with one line naming the setting."""
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("[1, 2\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlops_obs",
            "exporter",
            "--gpu.backend=fake",
            f"--gpu.fake-scenario={bad}",
            "--web.listen-address=127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("mlops-obs exporter: error: gpu.fake-scenario:")


def test_not_supported_memory_keys_real_handles_by_identity() -> None:
    """pynvml's handles are ctypes pointers, which do not hash: the memory keys them by identity, and
    never remembers a call with a list argument (field ids), whose errors are per field."""
    import ctypes

    from mlops_obs.collectors._nvml import _absent_key

    h = ctypes.pointer(ctypes.c_int(0))
    assert _absent_key("nvmlDeviceGetFanSpeed", (h,)) == ("nvmlDeviceGetFanSpeed", id(h))
    assert _absent_key("nvmlDeviceGetClockInfo", (h, 1)) == ("nvmlDeviceGetClockInfo", id(h), 1)
    assert _absent_key("nvmlDeviceGetFieldValues", (h, [82])) is None


def test_not_supported_memory_stays_bounded_when_handles_are_new_each_round() -> None:
    """MIG handles are fetched anew every round: remembering their NotSupported calls must not grow
    without bound, and a remembered handle is kept alive so its id() cannot name another object."""
    import pynvml

    from mlops_obs.collectors import _nvml

    class Lib:
        def nvmlInit(self) -> None:
            pass

        def nvmlDeviceGetFanSpeed(self, h: object) -> int:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    n = _nvml.Nvml(Lib)
    for _ in range(_nvml.ABSENT_MAX + 10):
        assert n.call("nvmlDeviceGetFanSpeed", object()) is None
    assert 0 < len(n._absent) <= _nvml.ABSENT_MAX
    h = object()
    n.call("nvmlDeviceGetFanSpeed", h)
    assert any(args == (h,) for _, args in n._absent.values())


# --- the default profile -----------------------------------------------------------------------------------


def _without(labels: tuple[tuple[str, str], ...], *drop: str) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in labels if k not in drop)


def test_default_profile_sums_nvlink_per_gpu(gpu: Callable[..., GpuCollector], monkeypatch: pytest.MonkeyPatch) -> None:
    """NVLink in the default profile: one transmit, one receive and one error counter a GPU, each the sum
    over its links (and error types) of what the full profile reports per link."""
    from mlops_obs.collectors.fake_nvml import FakeDevice

    monkeypatch.setattr(FakeDevice, "elapsed", lambda self: 100.0)  # both fakes' byte counters alike
    scenario = {"devices": [{"count": 2, "nvlink_errors": {"replay": 2, "recovery": 1, "crc": 3}}]}
    full, default = sample(gpu(scenario)), sample(gpu(scenario, **{"gpu.profile": "default"}))
    for name in ("mlops_gpu_nvlink_errors_total", "mlops_gpu_nvlink_transmit_bytes_total"):
        want: dict[tuple[tuple[str, str], ...], float] = {}
        for (n, lb), v in full.items():
            if n == name:
                key = _without(lb, "link", "type")
                want[key] = want.get(key, 0.0) + v
        got = {lb: v for (n, lb), v in default.items() if n == name}
        assert sorted(got) == sorted(want) and len(got) == 2, name
        for key, v in got.items():
            assert v == want[key], (name, key)
    assert values(default, "mlops_gpu_nvlink_errors_total", gpu="0") == [18 * 6.0]
    assert not any("link" in dict(lb) or "type" in dict(lb) for n, lb in default if "nvlink" in n)


def test_default_profile_nvlink_sums_never_dip(gpu: Callable[..., GpuCollector]) -> None:
    """A per-GPU NVLink sum leaves out a field the device never supports, and is not reported at all in a
    read where a field that answered before is missing (a smaller sum would read as a counter reset)."""
    c = gpu({"devices": [{"nvlink_errors": {"replay": 1, "crc": 2}, "not_supported": ["nvlink_recovery"]}]},
            **{"gpu.profile": "default"})  # fmt: skip
    assert values(sample(c), "mlops_gpu_nvlink_errors_total") == [18 * 3.0]
    fake(c).devices[0]["nvlink_links"] = 17  # one link stops answering
    s = sample(c)
    assert values(s, "mlops_gpu_nvlink_errors_total") == values(s, "mlops_gpu_nvlink_transmit_bytes_total") == []
    fake(c).devices[0]["nvlink_links"] = 18
    assert values(sample(c), "mlops_gpu_nvlink_errors_total") == [18 * 3.0]


def test_default_profile_leaves_out_the_full_only_families_and_their_calls(
    gpu: Callable[..., GpuCollector], tmp_path: Path
) -> None:
    """Families of the full profile only have no series (and their NVML calls are not made); ECC is the
    volatile scope, throttling the reasons the alerts read; every other family is as in full."""
    from mlops_obs.collectors.gpu_device import DEFAULT_THROTTLE_REASONS, FULL_ONLY_FAMILIES

    c = gpu(FULL, **{"gpu.profile": "default", "multiproc-dir": _rank_on_gpu0(tmp_path / "mp")})
    sample(c)
    s = sample(c)
    names = {n for n, _ in s}
    assert not names & FULL_ONLY_FAMILIES
    wait_for(lambda: c.xid is not None and bool(c.xid.snapshot()))
    names |= {n for n, _ in sample(c)}
    assert names == set(FAMILIES) - FULL_ONLY_FAMILIES
    calls = fake(c).calls
    for fn in ("nvmlDeviceGetFanSpeed", "nvmlDeviceGetPerformanceState", "nvmlDeviceGetPersistenceMode",
               "nvmlDeviceGetCurrPcieLinkGeneration"):  # fmt: skip
        assert calls.get(fn, 0) == 0, fn
    assert {dict(lb)["scope"] for n, lb in s if n == "mlops_gpu_ecc_errors_total"} == {"volatile"}
    reasons = {dict(lb)["reason"] for n, lb in s if n == "mlops_gpu_throttle_seconds_total"}
    assert reasons == set(DEFAULT_THROTTLE_REASONS)
    # GPU 7 has a driver without the throttle fields: one nvmlDeviceGetViolationStatus per reason reported.
    before = calls["nvmlDeviceGetViolationStatus"]
    sample(c)
    assert calls["nvmlDeviceGetViolationStatus"] - before == len(DEFAULT_THROTTLE_REASONS)
    assert values(s, "mlops_gpu_throttle_seconds_total", gpu="7", reason="thermal") != []


def test_default_profile_sums_processes_per_gpu_and_owner(gpu: Callable[..., GpuCollector], tmp_path: Path) -> None:
    """Per-process series in the default profile carry no pid: the processes of one owner (a rank and its
    CUDA-using data loader workers; or nobody) on a GPU are one series, memory and utilisation summed."""
    import os

    from mlops_obs.rankdir import RankDirectory

    me = os.getpid()  # a live process the rank directory can name as rank 0's
    mp = tmp_path / "mp"
    mp.mkdir()
    (mp / "j.0.rank.json").write_text(
        f'{{"v": 2, "job": "j", "rank": 0, "world_size": 1, "pid": {me}, "start_time": {ME_STARTED},'
        f' "updated": {time.time()}}}'
    )
    procs = [{"pid": me, "used_memory": 1_000, "sm_util": 50},
             {"pid": 999_999_001, "used_memory": 200, "sm_util": 10},
             {"pid": 999_999_002, "used_memory": 30, "sm_util": 5}]  # fmt: skip
    scenario = {"devices": [{"processes": procs}, {"processes": []}]}
    path = tmp_path / "procs.yaml"
    path.write_text(yaml.safe_dump(scenario))
    c = GpuCollector({"gpu.backend": "fake", "gpu.fake-scenario": path, "gpu.xid-events": False,
                      "gpu.counter-interval": 0.0}, RankDirectory(mp))  # fmt: skip
    try:
        s = sample(c)
    finally:
        c.close()
    mem = {dict(_without(lb, "uuid")).get("rank", "-"): v for (n, lb), v in s.items()
           if n == "mlops_gpu_process_memory_used_bytes"}  # fmt: skip
    assert mem == {"0": 1_000.0, "-": 230.0}
    util = sorted(values(s, "mlops_gpu_process_utilization_ratio", gpu="0"))
    assert util == [pytest.approx(0.15), pytest.approx(0.5)]
    assert not any("pid" in dict(lb) for n, lb in s if n.startswith("mlops_gpu_process_"))
    # The device series name the one rank using it.
    assert values(s, "mlops_gpu_utilization_ratio", gpu="0", job="j", rank="0") == [0.87]
    full = sample(gpu(scenario))
    assert len(values(full, "mlops_gpu_process_memory_used_bytes", gpu="0")) == 3


def test_unknown_profile_is_a_one_line_config_error(tmp_path: Path) -> None:
    import sys

    r = subprocess.run([sys.executable, "-m", "mlops_obs", "exporter", "--gpu.backend=fake", "--gpu.profile=tiny",
                        "--web.listen-address=127.0.0.1:0"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert "gpu.profile" in r.stderr and "default, full" in r.stderr
