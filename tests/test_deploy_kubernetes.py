"""Kubernetes manifests, validated offline: core kinds against the Kubernetes API schemas
(kubernetes-validate), the Prometheus Operator's kinds against its CRDs' OpenAPI schemas (vendored in
tests/fixtures/prometheus-operator), unknown fields rejected as the API server's strict validation does."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "tests/fixtures/prometheus-operator"
HAND_WRITTEN = ["exporter-daemonset.yaml", "training-pod-sidecar.yaml"]
MANIFESTS = sorted(p.name for p in (ROOT / "deploy/kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.30.0"
# metadata rules of the API server (RFC 1123 names; qualified label keys; label values).
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")  # fmt: skip
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes" / name).read_text()) if d]


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected: every object that lists its properties and neither
    preserves unknown fields nor declares additionalProperties gets ``additionalProperties: false``.
    Regex flags are moved where Python's ``re`` accepts them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if isinstance(out.get("pattern"), str) and "(?i)" in out["pattern"]:
        # RE2 (the API server's) takes an inline flag anywhere; Python only at the start, where it means the same.
        out["pattern"] = "(?i)" + out["pattern"].replace("(?i)", "")
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
        out["additionalProperties"] = False
    return out


@cache
def _validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    out = {}
    for path in sorted(CRDS.glob("*.json")):
        doc = json.loads(path.read_text())
        schema = _strict(doc["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        out[(doc["apiVersion"], doc["kind"])] = jsonschema.Draft7Validator(schema)
    assert len(out) == 3, f"expected the ServiceMonitor, PodMonitor and PrometheusRule schemas in {CRDS}"
    return out


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Why ``obj`` (a monitoring.coreos.com object) would be refused; empty when it would be accepted."""
    validator = _validators().get((str(obj.get("apiVersion")), str(obj.get("kind"))))
    if validator is None:
        return [f"no vendored schema for {obj.get('apiVersion')} {obj.get('kind')}"]
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]
    meta = obj.get("metadata") or {}
    for key in ("name", "namespace"):
        if not _NAME.match(str(meta.get(key, ""))) or len(str(meta.get(key, ""))) > 253:
            errors.append(f"metadata.{key}: {meta.get(key)!r} is not a valid name")
    for k, v in (meta.get("labels") or {}).items():
        if not _LABEL_KEY.match(str(k)) or not isinstance(v, str) or not _LABEL_VALUE.match(v):
            errors.append(f"metadata.labels: {k}={v!r} is not a valid label")
    return errors


def _tool() -> Path:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    assert tool.exists(), "kubernetes-validate is missing: `pip install -e '.[dev]'` (scripts/setup.sh does)"
    return tool


@pytest.mark.parametrize("name", MANIFESTS)
def test_core_kinds_validate_against_kubernetes_schemas(name: str, tmp_path: Path) -> None:
    core = [d for d in _docs(name) if not str(d["apiVersion"]).startswith("monitoring.coreos.com")]
    if not core:
        return
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(core))
    r = subprocess.run([str(_tool()), "--strict", "-k", KUBERNETES_VERSION, str(path)], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", MANIFESTS)
def test_operator_kinds_validate_against_the_crd_schemas(name: str) -> None:
    """Every ServiceMonitor, PodMonitor and PrometheusRule is accepted by the Operator's CRD schema."""
    for obj in _docs(name):
        if str(obj["apiVersion"]).startswith("monitoring.coreos.com"):
            assert crd_errors(obj) == [], (name, obj["kind"])


def test_every_manifest_kind_is_validated() -> None:
    """No object escapes both validators: kubernetes-validate knows the core kinds, the CRDs the rest."""
    kinds = {(d["apiVersion"], d["kind"]) for name in MANIFESTS for d in _docs(name)}
    operator = {k for k in kinds if k[0].startswith("monitoring.coreos.com")}
    assert operator <= set(_validators()), operator - set(_validators())
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= {k for _, k in operator}


def test_the_crd_validation_refuses_what_the_api_server_refuses() -> None:
    """A misspelt field, a wrong type, a bad enum value and a bad label are each an error naming the path."""
    (sm,) = [d for d in _docs("exporter-daemonset.yaml") if d["kind"] == "ServiceMonitor"]
    typo = copy.deepcopy(sm)
    typo["spec"]["endpoints"][0]["honorLabel"] = True
    wrong_type = copy.deepcopy(sm)
    wrong_type["spec"]["jobLabel"] = 5
    bad_enum = copy.deepcopy(sm)
    bad_enum["spec"]["endpoints"][0]["scheme"] = "gopher"
    bad_label = copy.deepcopy(sm)
    bad_label["metadata"]["labels"]["release"] = "kube prometheus"
    assert any("endpoints.0" in e and "honorLabel" in e for e in crd_errors(typo))
    assert any(e.startswith("spec.jobLabel") for e in crd_errors(wrong_type))
    assert any("endpoints.0.scheme" in e for e in crd_errors(bad_enum))
    assert any("metadata.labels" in e for e in crd_errors(bad_label))
    (rule,) = _docs("prometheus-rule.yaml")
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    assert any("spec.groups.0.rules.0.for" in e for e in crd_errors(broken))


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_monitors_keep_the_training_job_label_and_the_release_label(name: str) -> None:
    monitors = [d for d in _docs(name) if d["kind"] in ("ServiceMonitor", "PodMonitor")]
    assert monitors
    for m in monitors:
        assert m["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        spec = m["spec"]
        endpoints = spec.get("endpoints") or spec.get("podMetricsEndpoints")
        assert all(e["honorLabels"] is True and e["port"] == "metrics" for e in endpoints)


def test_exporter_never_requests_a_gpu() -> None:
    ds = next(d for d in _docs("exporter-daemonset.yaml") if d["kind"] == "DaemonSet")
    for c in ds["spec"]["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in str(c.get("resources", {}))


def test_prometheus_rule_spec_is_a_valid_rule_file(tmp_path: Path) -> None:
    """A PrometheusRule's spec has the rule-file shape: promtool checks the expressions the CRD cannot."""
    from tests.conftest import require_binary

    promtool = require_binary("promtool")
    (rule,) = _docs("prometheus-rule.yaml")
    assert rule["kind"] == "PrometheusRule"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
