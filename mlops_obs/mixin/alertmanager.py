"""The generated ``alertmanager.yml``: routing by severity, grouping by job, and the inhibitions that stop
one broken node from paging about everything it hosts.

Inhibitions use the node label of :class:`MixinConfig` because a sidecar that is down makes every GPU
and training alert of its node either stale or unknowable; the root cause is the only useful page.
"""

from __future__ import annotations

from typing import Any

from mlops_obs.mixin.config import MixinConfig
from mlops_obs.mixin.rules import alerts


def alertmanager_config(cfg: MixinConfig, sink_url: str | None = None) -> dict[str, Any]:
    sink = {"url": sink_url or cfg.alert_sink_url, "send_resolved": True}
    critical_hooks = [sink]
    if cfg.critical_webhook_url:
        critical_hooks.append({"url": cfg.critical_webhook_url, "send_resolved": True})
    names = [a.name for a in alerts(cfg)]
    node_scoped = sorted(n for n in names if n.startswith(("Gpu", "Training", "Node")))
    return {
        "global": {"resolve_timeout": "5m"},
        "route": {
            "receiver": "alert-sink",
            "group_by": ["job", "alertname"],
            "group_wait": cfg.group_wait,
            "group_interval": cfg.group_interval,
            "repeat_interval": cfg.repeat_interval,
            "routes": [
                {"matchers": ['severity="critical"'], "receiver": "critical"},
                {"matchers": ['severity="warning"'], "receiver": "warning"},
            ],
        },
        "receivers": [
            {"name": "alert-sink", "webhook_configs": [sink]},
            {"name": "critical", "webhook_configs": critical_hooks},
            {"name": "warning", "webhook_configs": [sink]},
        ],
        "inhibit_rules": [
            {
                # The sidecar (hence the node's view) is gone: its GPU, node and training alerts are noise.
                "source_matchers": ['alertname="MlopsExporterDown"'],
                "target_matchers": [f'alertname=~"{"|".join(node_scoped)}"'],
                "equal": [cfg.node_label],
            },
            {
                # A critical problem makes the warnings of the same node, job and rank secondary (host
                # alerts carry no rank: theirs compare equal, so a full disk silences the node's warnings).
                "source_matchers": ['severity="critical"'],
                "target_matchers": ['severity="warning"'],
                "equal": [cfg.node_label, "job", "rank"],
            },
        ],
    }
