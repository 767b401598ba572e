"""The fleet benchmark and its simulator, at a size that runs in seconds."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import fleet_sim  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def templates() -> dict[str, object]:
    return fleet_sim.render_templates(ranks=2, gap=1.0)


def test_simulated_nodes_differ_in_identity_and_keep_counters_monotonic(templates: dict[str, object]) -> None:
    nodes = fleet_sim.build_fleet(templates, 12)
    kinds = {n.spec.kind for n in nodes}
    assert kinds == {"training", "idle"} or kinds == {"training"}
    busy = [n for n in nodes if n.spec.job is not None]
    a, b = busy[0], busy[-1]
    now = time.time()
    body_a, body_b = a.body(now).decode(), b.body(now).decode()
    uuid = 'uuid="GPU-00000000-'
    assert uuid in body_a and body_a.count(uuid) == body_b.count(uuid)
    assert set(_labels(body_a, "uuid")).isdisjoint(_labels(body_b, "uuid"))  # every GPU is its own
    assert f'node="gpu-node-{a.spec.index:04d}"' in body_a
    assert set(_labels(body_a, "rank")) == {str(a.spec.first_rank + r) for r in range(2)}
    assert f'job="{a.spec.job}"' in body_a and fleet_sim.TEMPLATE_JOB not in body_a
    later = _values(a.body(now + 30).decode())
    first = _values(body_a)
    assert first.keys() == later.keys()
    kinds_of = _types(body_a)
    moved = 0
    for key, v in first.items():
        if kinds_of.get(key.split("{")[0].removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")) in (
            "counter",
            "histogram",
        ):
            assert later[key] >= v, key
            moved += later[key] > v
        if "timestamp" in key:
            assert later[key] == pytest.approx(v + 30, abs=1e-3), key  # a heartbeat keeps its age
    assert moved > 50  # training, GPU energy, host CPU... advance
    ws = [v for k, v in first.items() if k.startswith("mlops_training_world_size")]
    assert ws and set(ws) == {float(a.spec.world_size)}


def test_simulator_serves_every_node_on_its_own_port(templates: dict[str, object], tmp_path: Path) -> None:
    import subprocess
    import urllib.request

    tmpl = tmp_path / "t.json"
    tmpl.write_text(json.dumps(templates))
    ready = tmp_path / "ports.json"
    sim = subprocess.Popen(
        [sys.executable, fleet_sim.__file__, "serve", "--templates", str(tmpl), "--nodes", "3", "--ready", str(ready)]
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert sim.poll() is None and time.monotonic() < deadline, "simulator did not start"
            time.sleep(0.05)
        meta = json.loads(ready.read_text())
        assert len(meta) == 3
        bodies = []
        for m in meta:
            with urllib.request.urlopen(f"http://127.0.0.1:{m['port']}/metrics", timeout=10) as r:
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                bodies.append(r.read().decode())
        assert len(set(bodies)) == 3
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{meta[0]['port']}/other", timeout=10)
        assert e.value.code == 404
    finally:
        sim.terminate()
        sim.wait(timeout=30)


def test_quick_benchmark_measures_a_real_prometheus(tmp_path: Path) -> None:
    require_binary("prometheus")
    import bench_fleet

    out = tmp_path / "fleet.json"
    assert bench_fleet.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    r1, r2 = data["results"]
    assert (r1["nodes"], r2["nodes"]) == (1, 2)
    assert r2["head_series"] > 1.8 * r1["head_series"] > 1000
    assert r2["samples_per_s"] > 0 and r2["rss"] > 0 and r2["cpu_cores"] >= 0
    assert set(r2["rule_groups_s"]) >= {"mlops-obs.gpu", "mlops-obs.node", "mlops-obs.training"}
    from mlops_obs.mixin import config, dashboards

    panels = sum(
        len(p.queries)
        for d in dashboards.dashboards(config.MixinConfig()).values()
        for row in d.rows
        for p in row.panels
    )
    assert len(r2["queries"]) == panels
    assert [q for q in r2["queries"] if q["error"]] == []
    assert all(q["instant_p95_s"] > 0 and q["range_p95_s"] > 0 for q in r2["queries"])
    assert data["extrapolation"]["series_per_node"] > 500


def _labels(body: str, name: str) -> list[str]:
    import re

    return re.findall(rf'[{{,]{name}="([^"]*)"', body)


def _values(body: str) -> dict[str, float]:
    return {k: float(v) for k, _, v in (ln.rpartition(" ") for ln in body.splitlines() if ln and ln[0] != "#")}


def _types(body: str) -> dict[str, str]:
    return {p[2]: p[3] for p in (ln.split(" ") for ln in body.splitlines() if ln.startswith("# TYPE "))}
