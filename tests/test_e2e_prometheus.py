"""The whole path: DDP workload -> snapshot dir -> exporter -> a real Prometheus -> its HTTP API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlops_obs.children.prometheus import PrometheusProcess
from tests.conftest import require_binary

STEPS = 50


@pytest.fixture(scope="module")
def workload_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("e2e")
    logs, mp = root / "logs", root / "mp"
    r = subprocess.run(
        [sys.executable, "-m", "mlops_obs", "workload", "--world-size=2", f"--steps={STEPS}",
         f"--log-dir={logs}", f"--multiproc-dir={mp}", "--job=e2e", "--log-every=5"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return {"root": root, "logs": logs, "mp": mp}


def test_workload_leaves_json_logs_from_both_ranks(workload_run: dict[str, Path]) -> None:
    import orjson

    for rank in (0, 1):
        lines = (workload_run["logs"] / f"e2e-rank{rank}.jsonl").read_bytes().splitlines()
        events = [orjson.loads(x) for x in lines]
        assert events, f"rank {rank} logged nothing"
        assert all(e["job"] == "e2e" and e["rank"] == rank and e["node"] for e in events)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        steps = [e["step"] for e in events if e["event"] == "step"]
        assert steps[0] == 0 and steps[-1] == STEPS - 1
        assert events[-1]["event"] == "training finished"


def test_prometheus_scrapes_per_rank_steps_and_host_metrics(
    workload_run: dict[str, Path], start_exporter: Any, tmp_path: Path
) -> None:
    require_binary("prometheus")
    ex = start_exporter(**{"multiproc-dir": workload_run["mp"]})
    target = ex.url.split("//", 1)[1]
    with PrometheusProcess(tmp_path / "prom", [target], job_name="mlops-sidecar") as prom:
        steps = prom.wait_for("mlops_training_steps_total", lambda r: len(r) == 2, timeout=30)
        by_rank = {r["metric"]["rank"]: r for r in steps}
        assert set(by_rank) == {"0", "1"}
        for r in by_rank.values():
            assert r["metric"]["job"] == "e2e"  # the training job's label survives (honor_labels)
            assert r["metric"]["node"]
            assert float(r["value"][1]) == STEPS
        samples = prom.query('mlops_training_samples_total{job="e2e"}')
        assert sorted(float(r["value"][1]) for r in samples) == [STEPS * 64.0] * 2
        hist = prom.query('mlops_training_step_duration_seconds_count{job="e2e"}')
        assert sorted(float(r["value"][1]) for r in hist) == [float(STEPS)] * 2

        cpu = prom.wait_for('mlops_node_cpu_seconds_total{mode="user"}', timeout=15)
        assert cpu[0]["metric"]["job"] == "mlops-sidecar"  # host series take the scrape job's label
        mem = prom.query("mlops_node_memory_total_bytes")
        assert float(mem[0]["value"][1]) > 0
        ok = prom.query('mlops_scrape_collector_success{collector=~"host|training"}')
        assert sorted(r["metric"]["collector"] for r in ok if r["value"][1] == "1") == ["host", "training"]
        up = prom.query("up")
        assert [float(u["value"][1]) for u in up] == [1.0]
