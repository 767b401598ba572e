"""The shipped deployments produce series the mixin's selectors match, checked with a real Prometheus
scraping a real exporter (fake GPUs, a real TrainingMonitor's snapshot):

* the compose stack: ``deploy/compose/prometheus.yml``'s scrape job as it is, its target pointed here;
* Kubernetes: the ServiceMonitor and the PodMonitor of ``deploy/kubernetes/``, through the scrape config
  the Prometheus Operator generates from them (the relabelling of prometheus-operator
  ``pkg/prometheus/promcfg.go``, v0.93: job from the Service name or ``<namespace>/<PodMonitor name>``,
  ``jobLabel``, then the endpoint's own relabelings), fed the discovery labels Kubernetes would give
  the objects in the manifests. Prometheus itself applies the relabelling.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlops_obs.children import find_binary
from mlops_obs.children.prometheus import PrometheusProcess
from mlops_obs.mixin import config as mixin_config
from mlops_obs.mixin import rules
from mlops_obs.mixin.generate import RECORDING_FILE, render_files

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy/kubernetes"
CFG = mixin_config.MixinConfig()
TRAINING_JOB = "selectors-job"

pytestmark = pytest.mark.timeout(180)


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _user_relabelings(endpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """A monitor endpoint's ``relabelings`` in Prometheus' own form (the Operator's generateRelabelConfig)."""
    keys = {"sourceLabels": "source_labels", "separator": "separator", "targetLabel": "target_label",
            "regex": "regex", "modulus": "modulus", "replacement": "replacement", "action": "action"}  # fmt: skip
    out = []
    for r in endpoint.get("relabelings") or []:
        unknown = set(r) - set(keys)
        assert not unknown, f"relabeling fields this emulation does not know: {unknown}"
        out.append({keys[k]: (v.lower() if k == "action" else v) for k, v in r.items()})
    return out


def _keep_selected(prefix: str, match_labels: dict[str, str]) -> list[dict[str, Any]]:
    return [{"action": "keep", "regex": f"({v});true",
             "source_labels": [f"{prefix}_label_{_sanitize(k)}", f"{prefix}_labelpresent_{_sanitize(k)}"]}
            for k, v in sorted(match_labels.items())]  # fmt: skip


def _labels_meta(prefix: str, labels: dict[str, str]) -> dict[str, str]:
    meta = {f"{prefix}_label_{_sanitize(k)}": str(v) for k, v in labels.items()}
    meta.update({f"{prefix}_labelpresent_{_sanitize(k)}": "true" for k in labels})
    return meta


def _pod_meta(namespace: str, pod: str, labels: dict[str, str], container: str, port: str) -> dict[str, str]:
    return {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_container_name": container,
        "__meta_kubernetes_pod_container_port_name": port,
        "__meta_kubernetes_pod_node_name": "gpu-node-1",
        **_labels_meta("__meta_kubernetes_pod", labels),
    }


def _container_with_port(pod_spec: dict[str, Any], port: str) -> str:
    for c in [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]:
        if any(p.get("name") == port for p in c.get("ports", [])):
            return str(c["name"])
    raise AssertionError(f"no container declares port {port!r}")


def _scrape_job(
    kind: str,
    monitor: dict[str, Any],
    ep: dict[str, Any],
    prefix: str,
    target_labels: str,
    default_job: dict[str, Any],
    relabel: list[dict[str, Any]],
    meta: dict[str, str],
    address: str,
) -> dict[str, Any]:
    """The part of a monitor's scrape job both kinds share: target labels copied from the Service's or the
    pod's labels, the default job and ``jobLabel``'s override, the endpoint label, the user's relabelings."""
    spec = monitor["spec"]
    for lab in spec.get(target_labels, []):
        relabel.append({"source_labels": [f"{prefix}_label_{_sanitize(lab)}"], "target_label": _sanitize(lab),
                        "regex": "(.+)", "replacement": "${1}"})  # fmt: skip
    relabel.append(default_job)
    if spec.get("jobLabel"):
        relabel.append({"source_labels": [f"{prefix}_label_{_sanitize(spec['jobLabel'])}"], "target_label": "job",
                        "regex": "(.+)", "replacement": "${1}"})  # fmt: skip
    relabel.append({"target_label": "endpoint", "replacement": ep["port"]})
    relabel += _user_relabelings(ep)
    return {
        "job_name": f"{kind}/{monitor['metadata']['namespace']}/{monitor['metadata']['name']}/0",
        "honor_labels": bool(ep.get("honorLabels", False)),
        "static_configs": [{"targets": [address], "labels": meta}],
        "relabel_configs": relabel,
    }


def service_monitor_job(objects: list[dict[str, Any]], address: str) -> dict[str, Any]:
    """The scrape job the Operator generates for the ServiceMonitor in ``objects``, its one target at ``address``."""
    sm = next(o for o in objects if o["kind"] == "ServiceMonitor")
    (ep,) = sm["spec"]["endpoints"]
    svc = next(o for o in objects if o["kind"] == "Service"
               and all(o["metadata"].get("labels", {}).get(k) == v
                       for k, v in sm["spec"]["selector"]["matchLabels"].items()))  # fmt: skip
    ds = next(o for o in objects if o["kind"] == "DaemonSet")
    template = ds["spec"]["template"]
    assert all(template["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
    port = next(p for p in svc["spec"]["ports"] if p["name"] == ep["port"])
    ns = svc["metadata"]["namespace"]
    meta = {
        "__meta_kubernetes_service_name": svc["metadata"]["name"],
        **_labels_meta("__meta_kubernetes_service", svc["metadata"].get("labels", {})),
        "__meta_kubernetes_endpoint_port_name": port["name"],
        "__meta_kubernetes_endpoint_address_target_kind": "Pod",
        "__meta_kubernetes_endpoint_address_target_name": "mlops-obs-exporter-x7k2p",
        **_pod_meta(ns, "mlops-obs-exporter-x7k2p", template["metadata"]["labels"],
                    _container_with_port(template["spec"], port["targetPort"]), port["targetPort"]),
    }  # fmt: skip
    relabel: list[dict[str, Any]] = [{"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}]
    relabel += _keep_selected("__meta_kubernetes_service", sm["spec"]["selector"]["matchLabels"])
    relabel += [
        {"action": "keep", "source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": ep["port"]},
        {"source_labels": ["__meta_kubernetes_endpoint_address_target_kind",
                           "__meta_kubernetes_endpoint_address_target_name"],
         "separator": ";", "regex": "Node;(.*)", "replacement": "${1}", "target_label": "node"},
        {"source_labels": ["__meta_kubernetes_endpoint_address_target_kind",
                           "__meta_kubernetes_endpoint_address_target_name"],
         "separator": ";", "regex": "Pod;(.*)", "replacement": "${1}", "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
    ]  # fmt: skip
    job = {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"}
    return _scrape_job(
        "serviceMonitor", sm, ep, "__meta_kubernetes_service", "targetLabels", job, relabel, meta, address
    )


def pod_monitor_job(objects: list[dict[str, Any]], address: str) -> dict[str, Any]:
    """The scrape job the Operator generates for the PodMonitor in ``objects``, its one target at ``address``."""
    pm = next(o for o in objects if o["kind"] == "PodMonitor")
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    pod = next(o for o in objects if o["kind"] == "Pod")
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
    ns, name = pm["metadata"]["namespace"], pm["metadata"]["name"]
    meta = _pod_meta(pod["metadata"]["namespace"], pod["metadata"]["name"], labels,
                     _container_with_port(pod["spec"], ep["port"]), ep["port"])  # fmt: skip
    relabel: list[dict[str, Any]] = [
        {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
        *_keep_selected("__meta_kubernetes_pod", pm["spec"]["selector"]["matchLabels"]),
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": ep["port"]},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    job = {"target_label": "job", "replacement": f"{ns}/{name}"}
    return _scrape_job("podMonitor", pm, ep, "__meta_kubernetes_pod", "podTargetLabels", job, relabel, meta, address)


def compose_job(address: str) -> dict[str, Any]:
    """The compose Prometheus' scrape job for the sidecar, as shipped, with its target pointed at ``address``."""
    prom = yaml.safe_load((ROOT / "deploy/compose/prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"]
               if any("exporter" in t for sc in j.get("static_configs", []) for t in sc["targets"]))  # fmt: skip
    job = dict(job)
    job["static_configs"] = [{**sc, "targets": [address]} for sc in job["static_configs"]]
    return job


class _Prometheus(PrometheusProcess):
    """A real Prometheus with one given scrape job, the generated recording rules, 1 s intervals."""

    def __init__(self, workdir: Path, job: dict[str, Any], rule_file: Path) -> None:
        super().__init__(workdir, [], rule_files=[rule_file])
        self.job = job

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{**self.job, "scrape_interval": "1s", "scrape_timeout": "1s"}],
        }


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An exporter with fake GPUs and one real rank's snapshot."""
    if not find_binary("prometheus"):
        pytest.fail("prometheus binary not installed (scripts/setup.sh installs it)")
    from mlops_obs.exporter import Exporter, settings
    from mlops_obs.instrument import TrainingMonitor

    work = tmp_path_factory.mktemp("selectors")
    mp = work / "multiproc"
    monitor = TrainingMonitor(job=TRAINING_JOB, rank=0, world_size=1, directory=mp, flush_interval=0.1)
    for _ in range(3):
        with monitor.step(samples=8), monitor.phase("forward"):
            pass
    monitor.flush()
    cfg: dict[str, Any] = {s.key: s.default for s in settings()}
    cfg.update({"web.listen-address": ("127.0.0.1", 0), "sampler.interval": 0.2, "gpu.backend": "fake",
                "multiproc-dir": mp, "collector.training": True, "collector.host": True})  # fmt: skip
    ex = Exporter(cfg).start()
    try:
        yield ex
    finally:
        ex.stop()
        monitor.close()


DEPLOYMENTS = {
    "compose": lambda address: compose_job(address),
    "kubernetes-daemonset": lambda address: service_monitor_job(_docs("exporter-daemonset.yaml"), address),
    "kubernetes-pod-sidecar": lambda address: pod_monitor_job(_docs("training-pod-sidecar.yaml"), address),
}


def _selected(prom: PrometheusProcess, metric: str, sel: str, *extra: str) -> list[dict[str, Any]]:
    return prom.query(metric + mixin_config.selector(sel, *extra))


@pytest.mark.parametrize("deployment", sorted(DEPLOYMENTS))
def test_deployment_series_match_the_mixin_selectors(deployment: str, exporter: Any, tmp_path: Path) -> None:
    """Scraped as the deployment scrapes it, the sidecar's own series carry the job the mixin selects, the
    training series keep the training job's `job`, and the joins' recording rules have a row for it."""
    address = exporter.url.split("//", 1)[1].rstrip("/")
    rule_file = tmp_path / "recording.yml"
    rule_file.write_text(render_files(CFG)[RECORDING_FILE])
    prom = _Prometheus(tmp_path / "prom", DEPLOYMENTS[deployment](address), rule_file).start()
    try:
        scraped = prom.wait_for("up == 1", timeout=60)
        up = _selected(prom, "up", CFG.exporter_selector)
        assert up, f"the scrape target's labels {scraped[0]['metric']} miss {CFG.exporter_selector}"
        instance = {lab: up[0]["metric"][lab] for lab in CFG.instance_labels}
        prom.wait_for(f'mlops_training_steps_total{{job="{TRAINING_JOB}"}}', timeout=30)
        assert _selected(prom, "mlops_node_cpus", CFG.exporter_selector), "host series miss exporter_selector"
        assert _selected(prom, "mlops_scrape_collector_success", CFG.exporter_selector, 'collector="training"')
        training = _selected(prom, "mlops_training_steps_total", CFG.training_selector, f'job="{TRAINING_JOB}"')
        assert training, "training series lost the training job's own `job` label (honor_labels)"
        assert all(training[0]["metric"][lab] == v for lab, v in instance.items())
        gpus = _selected(prom, "mlops_gpu_lost", CFG.gpu_selector)
        assert gpus and all(g["metric"][lab] == v for g in gpus for lab, v in instance.items())
        # The node-name and GPU-owner joins the node and GPU alerts use have a row for this sidecar.
        node = prom.wait_for(rules.NODE_INFO, timeout=30)
        assert [{lab: r["metric"][lab] for lab in CFG.instance_labels} for r in node] == [instance]
        owners = prom.wait_for(rules.GPU_OWNER, timeout=30)
        assert {r["metric"]["gpu"] for r in owners} == {g["metric"]["gpu"] for g in gpus}
    finally:
        prom.stop()
