"""scripts/gpu_check.py without a GPU: it refuses clearly, and its checks judge real exporter output."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

from mlops_obs import rankdir
from mlops_obs.collectors.fake_nvml import FakeNvml
from mlops_obs.collectors.gpu import GpuCollector
from mlops_obs.metrics import render

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


gc = _load()


def test_without_a_gpu_it_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """On a machine without NVML the check stops at once, naming what is missing."""
    try:
        gc.preflight()
    except gc.NoGpu:
        pass
    else:
        pytest.skip("this machine has a GPU; run the check itself")
    assert gc.main(["--budget", "60"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: cannot run here: ")


def test_budget_is_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    """A budget over the 5-minute limit is refused before anything starts."""
    assert gc.main(["--budget", "900"]) == 2
    assert "--budget" in capsys.readouterr().err


def _run(tmp_path: Path, mutate: Any = None) -> list[Any]:
    """Scrapes of a fake 2-GPU node: idle, then a training phase with our rank on GPU 0 and 1."""
    mp = tmp_path / "mp"
    mp.mkdir()
    pid = os.getpid()
    now = time.time()
    for rank in (0, 1):
        rankdir.write(
            mp,
            gc.JOB,
            rank,
            {
                "v": rankdir.SCHEMA_VERSION,
                "job": gc.JOB,
                "rank": rank,
                "pid": pid if rank == 0 else 999_999_999,
                "updated": now,
                "start_time": psutil.Process(pid).create_time(),  # this process: its pid is verified
            },
        )
    c = GpuCollector({"gpu.backend": "fake", "multiproc-dir": mp, "gpu.xid-events": False, "gpu.profile": "full"})
    scrapes = []
    try:
        c.sample()
        f = c.nvml.lib
        assert isinstance(f, FakeNvml)
        f.devices = f.devices[:2]
        c._devices = c._devices[:2] if c._devices else None
        for d in f.devices:
            d["utilization"], d["memory_used"], d["power_mw"] = 0, 500_000_000, 70_000
        for _ in range(2):
            text = render(c.sample()).decode() + 'mlops_scrape_collector_success{collector="gpu"} 1\n'
            scrapes.append(gc.Scrape(time.time(), "idle", gc.parse_scrape(text), 0.001))
        for i, d in enumerate(f.devices):
            d["utilization"], d["memory_used"], d["power_mw"] = 93, 30_000_000_000, 650_000
            d["processes"] = [{"pid": pid, "used_memory": 29_000_000_000, "sm_util": 90}] if i == 0 else []
        if mutate is not None:
            mutate(f)
        for _ in range(3):
            text = render(c.sample()).decode() + 'mlops_scrape_collector_success{collector="gpu"} 1\n'
            scrapes.append(gc.Scrape(time.time(), "training", gc.parse_scrape(text), 0.001))
    finally:
        c.close()
    return scrapes


def test_a_healthy_run_passes_every_check(tmp_path: Path) -> None:
    """Utilisation, memory, power, temperature, clocks, energy and attribution all pass on a sane run."""
    checks = gc.evaluate(_run(tmp_path))
    assert [c.name for c in checks if not c.ok] == []
    assert len(checks) == 8
    assert any("ranks seen on GPUs: 0" in c.detail for c in checks)


@pytest.mark.parametrize(
    ("failing", "mutate"),
    [
        ("utilisation above 0 while training", lambda f: f.devices[1].__setitem__("utilization", 0)),
        ("memory used rises during training", lambda f: f.devices[0].__setitem__("memory_used", 1000)),
        ("power within its enforced limit", lambda f: f.devices[0].__setitem__("power_mw", 900_000)),
        ("temperature sane", lambda f: f.devices[1].__setitem__("temperature", 95)),
        ("SM clock above 0 while training", lambda f: f.devices[0].__setitem__("sm_clock_mhz", 0)),
        ("training processes attributed to the job", lambda f: f.devices[0].__setitem__("processes", [])),
    ],
)
def test_each_check_catches_its_fault(tmp_path: Path, failing: str, mutate: Any) -> None:
    """Each insane value fails exactly its own check."""
    checks = gc.evaluate(_run(tmp_path, mutate))
    assert [c.name for c in checks if not c.ok] == [failing]


def test_missing_phases_fail_instead_of_passing_vacuously() -> None:
    """No training scrapes is a failure, not an empty pass."""
    checks = gc.evaluate([gc.Scrape(0.0, "idle", {}, 0.0)])
    assert len(checks) == 1 and not checks[0].ok


def test_latency_table_and_report(tmp_path: Path) -> None:
    """NVML call timings become a per-function table, slowest first, in the Markdown report."""
    c = GpuCollector({"gpu.backend": "fake", "gpu.xid-events": False})
    c.nvml.keep_samples = True
    try:
        for _ in range(3):
            c.sample()
    finally:
        c.close()
    lat = gc.latencies(c.nvml.stats)
    assert {x.function for x in lat} >= {"nvmlDeviceGetPowerUsage", "nvmlDeviceGetFieldValues"}
    assert all(x.p50_us <= x.p99_us <= x.max_us for x in lat)
    assert [x.p50_us for x in lat] == sorted((x.p50_us for x in lat), reverse=True)
    report = gc.Report({"GPU": "8 x test"}, gc.evaluate(_run(tmp_path)), lat, round_ms=[1.0, 2.0], scrape_ms=[0.5])
    text = gc.render_report(report)
    assert "Result: **PASS**" in text and "| nvmlDeviceGetPowerUsage |" in text and "- GPU: 8 x test" in text
