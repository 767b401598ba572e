"""``mlops-obs demo`` finishes by itself, prints a summary, and leaves nothing running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from mlops_obs.children import find_binary


def test_demo_runs_to_completion_and_cleans_up(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    workdir = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "mlops_obs", "demo", "--steps=60", f"--workdir={workdir}"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "exporter:   http://127.0.0.1:" in out
    assert f"logs:       {workdir / 'logs'}" in out
    assert "workload finished with exit code 0" in out
    assert "rank 0: 60 steps" in out and "rank 1: 60 steps" in out
    if find_binary("prometheus"):
        assert "summary (queried from Prometheus):" in out
        assert "mlops_training_steps_total{job='demo', rank='0'} = 60" in out
    assert sorted(p.name for p in (workdir / "logs").glob("*.jsonl")) == [
        "demo-launcher.jsonl",
        "demo-rank0.jsonl",
        "demo-rank1.jsonl",
    ]
    leftovers = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if str(workdir) in cmd:
            leftovers.append(cmd)
    assert leftovers == []


def test_demo_rejects_bad_steps() -> None:
    r = subprocess.run([sys.executable, "-m", "mlops_obs", "demo", "--steps=abc"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "mlops-obs demo: error: steps: expected an integer, got 'abc' (from --steps)"
