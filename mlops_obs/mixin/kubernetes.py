"""Kubernetes forms of the same output: a ``PrometheusRule`` (prometheus-operator) whose ``spec.groups``
has the rule-file shape, and a ConfigMap of dashboards labelled for Grafana's dashboard sidecar.

``release`` is set because kube-prometheus-stack's default rule selector ignores objects without it.
"""

from __future__ import annotations

from typing import Any

NAMESPACE = "monitoring"
RELEASE = "kube-prometheus-stack"


def prometheus_rule(groups: list[dict[str, Any]], name: str = "mlops-obs") -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": "mlops-obs", "release": RELEASE},
        },
        "spec": {"groups": groups},
    }


def dashboards_configmaps(dashboards: dict[str, str], prefix: str = "mlops-obs-dashboard") -> list[dict[str, Any]]:
    """One ConfigMap per dashboard (``file name -> JSON text``), labelled ``grafana_dashboard: "1"`` (the
    sidecar's default). One each, as kube-prometheus does, because ``kubectl apply`` keeps a copy in an
    annotation limited to 256 KiB, which all dashboards together would exceed."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": f"{prefix}-{name.removesuffix('.json')}",
                "namespace": NAMESPACE,
                "labels": {"app.kubernetes.io/name": "mlops-obs", "grafana_dashboard": "1"},
                "annotations": {"grafana_folder": "mlops-obs"},
            },
            "data": {name: text},
        }
        for name, text in sorted(dashboards.items())
    ]
