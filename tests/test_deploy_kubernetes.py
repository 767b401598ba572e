"""Kubernetes manifests: core kinds validate against the API schemas; monitors keep our conventions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HAND_WRITTEN = ["exporter-daemonset.yaml", "training-pod-sidecar.yaml"]


def _docs(name: str) -> list[dict[str, object]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes" / name).read_text()) if d]


CORE = sorted(p.name for p in (ROOT / "deploy/kubernetes").glob("*.yaml") if p.name != "prometheus-rule.yaml")


@pytest.mark.parametrize("name", CORE)
def test_core_kinds_validate_against_kubernetes_schemas(name: str, tmp_path: Path) -> None:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    if not tool.exists():
        pytest.skip("kubernetes-validate not installed (pip install -e '.[dev]')")
    core = [d for d in _docs(name) if not str(d["apiVersion"]).startswith("monitoring.coreos.com")]
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(core))
    r = subprocess.run([str(tool), "--strict", "-k", "1.30.0", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_monitors_keep_the_training_job_label_and_the_release_label(name: str) -> None:
    monitors = [d for d in _docs(name) if d["kind"] in ("ServiceMonitor", "PodMonitor")]
    assert monitors
    for m in monitors:
        assert m["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # type: ignore[index]
        spec = m["spec"]
        endpoints = spec.get("endpoints") or spec.get("podMetricsEndpoints")  # type: ignore[attr-defined]
        assert all(e["honorLabels"] is True and e["port"] == "metrics" for e in endpoints)


def test_exporter_never_requests_a_gpu() -> None:
    ds = next(d for d in _docs("exporter-daemonset.yaml") if d["kind"] == "DaemonSet")
    for c in ds["spec"]["template"]["spec"]["containers"]:  # type: ignore[index]
        assert "nvidia.com/gpu" not in str(c.get("resources", {}))


def test_prometheus_rule_spec_is_a_valid_rule_file(tmp_path: Path) -> None:
    """No CRD schema is packaged here, but a PrometheusRule's spec has the rule-file shape: promtool checks it."""
    from tests.conftest import require_binary

    promtool = require_binary("promtool")
    (rule,) = _docs("prometheus-rule.yaml")
    assert rule["kind"] == "PrometheusRule"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
