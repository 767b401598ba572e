"""Remote write into a central store: the agent-mode Prometheus a cluster runs, and the snippet for one it has.

Past one Prometheus (``docs/scale.md`` has the numbers), each cluster keeps a Prometheus close to its
nodes that only scrapes and forwards (agent mode: a write-ahead log, no local queries, no rules) and a
central store (VictoriaMetrics, Thanos Receive, Mimir) holds everything. The rules and dashboards stay
the same: the store evaluates ``alerts/mlops-*.yml`` (``vmalert`` for VictoriaMetrics, the ruler for
Mimir and Thanos) and Grafana points at it. Two things make that work unchanged:

* the scrape keeps the training job's own ``job`` label (``honor_labels``), as the mixin's selectors
  expect, and the job name matches :attr:`MixinConfig.exporter_selector`;
* every cluster adds one external label (``cluster`` by default) so the same node names in two clusters
  stay apart in the store; our rules aggregate ``by (job)`` / ``by (node)`` and so keep it.

Sharding one cluster over several agents (or several full Prometheus servers) is by node: ``shards`` /
``shard`` add a ``hashmod`` relabelling on the target address that keeps each node's series on exactly
one shard, so a per-node rule never needs two shards' data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mlops_obs.mixin.config import MixinConfig


@dataclass(frozen=True)
class RemoteWriteConfig:
    # The store's remote-write endpoint: VictoriaMetrics single-node http://HOST:8428/api/v1/write, its
    # cluster version http://VMINSERT:8480/insert/0/prometheus/api/v1/write, Mimir .../api/v1/push,
    # Thanos Receive http://HOST:19291/api/v1/receive.
    url: str = "http://victoria-metrics:8428/api/v1/write"
    # This cluster's name, added to every series as cluster_label; unique across the clusters of one store.
    cluster: str = "cluster-a"
    cluster_label: str = "cluster"
    # The sidecars this agent scrapes (static; replace with kubernetes_sd_configs on Kubernetes).
    targets: tuple[str, ...] = ("localhost:9477",)
    scrape_interval: str = "15s"
    # hashmod sharding by target: this agent keeps the targets whose address hashes to `shard` of `shards`.
    shards: int = 1
    shard: int = 0
    # Basic auth towards the store; the password is read from a file, never written into the config.
    username: str | None = None
    password_file: str | None = None
    # Queue tuning: samples a request carries, and how long a partial batch may wait. A node sends
    # ~1,500 series every scrape interval; 2,000 samples a request keeps requests few and small.
    max_samples_per_send: int = 2000
    batch_send_deadline: str = "5s"
    max_shards: int = 50


def _job_name(cfg: MixinConfig) -> str:
    """The scrape job whose name the mixin's exporter selector expects (``job="..."``), else mlops-obs."""
    m = re.search(r'\bjob="([^"]+)"', cfg.exporter_selector)
    return m.group(1) if m else "mlops-obs"


def remote_write_block(rw: RemoteWriteConfig) -> dict[str, Any]:
    """One ``remote_write`` entry: the same for an agent and for a full Prometheus that also forwards."""
    block: dict[str, Any] = {
        "url": rw.url,
        "name": f"central-{rw.cluster}",
        "queue_config": {
            "max_samples_per_send": rw.max_samples_per_send,
            "batch_send_deadline": rw.batch_send_deadline,
            "max_shards": rw.max_shards,
        },
        # Exemplars and native histograms are not produced by the sidecar; metadata helps the store's UI.
        "metadata_config": {"send": True},
    }
    if rw.username:
        block["basic_auth"] = {"username": rw.username, "password_file": rw.password_file}
    return block


def scrape_config(rw: RemoteWriteConfig, cfg: MixinConfig) -> dict[str, Any]:
    sc: dict[str, Any] = {
        "job_name": _job_name(cfg),
        "scrape_interval": rw.scrape_interval,
        # Our series carry the training job's own `job` label; keep it, as for a Pushgateway.
        "honor_labels": True,
        "static_configs": [{"targets": list(rw.targets)}],
    }
    if rw.shards > 1:
        if not 0 <= rw.shard < rw.shards:
            raise ValueError(f"shard must be in [0, {rw.shards}), got {rw.shard}")
        sc["relabel_configs"] = [
            {
                "source_labels": ["__address__"],
                "modulus": rw.shards,
                "target_label": "__tmp_shard",
                "action": "hashmod",
            },
            {"source_labels": ["__tmp_shard"], "regex": str(rw.shard), "action": "keep"},
        ]
    return sc


def agent_config(rw: RemoteWriteConfig, cfg: MixinConfig | None = None) -> dict[str, Any]:
    """A whole Prometheus configuration for ``prometheus --enable-feature=agent``: scrape and forward."""
    cfg = cfg or MixinConfig()
    return {
        "global": {
            "scrape_interval": rw.scrape_interval,
            "external_labels": {rw.cluster_label: rw.cluster},
        },
        "scrape_configs": [scrape_config(rw, cfg)],
        "remote_write": [remote_write_block(rw)],
    }


def remote_write_snippet(rw: RemoteWriteConfig) -> dict[str, Any]:
    """What to add to an existing full Prometheus so it also forwards to the central store."""
    return {
        "global": {"external_labels": {rw.cluster_label: rw.cluster}},
        "remote_write": [remote_write_block(rw)],
    }


def vmalert_args(
    rule_files: list[str], datasource_url: str, notifier_url: str, evaluation_interval: str = "15s"
) -> list[str]:
    """vmalert's flags to evaluate our rule files against VictoriaMetrics and write the results back
    (recording rules' series and ``ALERTS``), notifying the same Alertmanager a local Prometheus would."""
    return [
        *(f"-rule={f}" for f in rule_files),
        f"-datasource.url={datasource_url}",
        f"-remoteWrite.url={datasource_url}",
        f"-remoteRead.url={datasource_url}",  # restores alerts' for: state after a restart
        f"-notifier.url={notifier_url}",
        f"-evaluationInterval={evaluation_interval}",
    ]


AGENT_FILE = "deploy/remote-write/prometheus-agent.yml"
SNIPPET_FILE = "deploy/remote-write/remote-write.yml"


def remote_write_files(rw: RemoteWriteConfig | None = None, cfg: MixinConfig | None = None) -> dict[str, Any]:
    """Relative path -> document, for ``mlops-obs generate`` to serialise beside the other generated files."""
    rw = rw or RemoteWriteConfig()
    return {AGENT_FILE: agent_config(rw, cfg), SNIPPET_FILE: remote_write_snippet(rw)}
