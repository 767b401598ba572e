"""The exporter's whole /metrics output passes ``promtool check metrics`` (Prometheus' own linter)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mlops_obs.instrument import TrainingMonitor
from tests.conftest import require_binary

FIX = Path(__file__).parent / "fixtures"
WAIT = 30.0


def scrape_when_ready(ex: Any) -> str:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if ex.sampler.ready and all(s.rounds > 0 for s in ex.sampler.states.values()):
            break
        time.sleep(0.05)
    with urllib.request.urlopen(ex.url + "/metrics", timeout=WAIT) as r:
        return str(r.read().decode())


def promtool_check(text: str) -> None:
    promtool = require_binary("promtool")
    r = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    problems = (r.stdout + r.stderr).decode().strip()
    assert r.returncode == 0 and not problems, problems


def successes(text: str) -> dict[str, float]:
    return {
        s.labels["collector"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "mlops_scrape_collector_success"
    }


def test_host_training_and_process_output_passes_promtool(start_exporter: Callable[..., Any], tmp_path: Path) -> None:
    """Every host family (PSI, InfiniBand, per-CPU) plus a real rank's training and process series."""
    mp = tmp_path / "multiproc"
    mp.mkdir()
    with TrainingMonitor(job="lint", rank=0, world_size=1, directory=mp, flush_interval=0.05) as mon:
        for _ in range(3):
            with mon.step(samples=8, tokens=1024), mon.phase("forward"):
                pass
            mon.record(loss=1.25, grad_norm=0.5, lr=1e-3)
        mon.flush()
        ex = start_exporter(
            **{
                "collector.gpu": False,
                "path.procfs": FIX / "proc" / "gpu-node",
                "path.sysfs": FIX / "sys" / "ib-node",
                "host.per-cpu": True,
                "host.filesystem-paths": [str(tmp_path)],
                "multiproc-dir": mp,
            }
        )
        text = scrape_when_ready(ex)
    promtool_check(text)
    ok = successes(text)
    assert (ok["host"], ok["training"], ok["process"]) == (1, 1, 1)
    for name in ("mlops_node_pressure_io_stalled_seconds_total", "mlops_node_infiniband_port_errors_total",
                 "mlops_node_cpu_core_seconds_total", "mlops_training_steps_total", "mlops_exporter_cpu_seconds_total",
                 "mlops_exporter_resident_memory_bytes", "mlops_exporter_build_info"):  # fmt: skip
        assert f"\n{name}" in text, name


def test_fake_gpu_node_output_passes_promtool(start_exporter: Callable[..., Any]) -> None:
    """The full exporter on this machine's /proc with the fake 8-GPU backend lints clean."""
    ex = start_exporter(**{"collector.gpu": True, "gpu.backend": "fake", "host.filesystem-paths": ["/"]})
    text = scrape_when_ready(ex)
    promtool_check(text)
    assert successes(text)["gpu"] == 1
    assert "\nmlops_gpu_utilization_ratio{" in text
