"""The generated ``alertmanager.yml``: routing by severity, grouping by job, and the inhibitions that page for
a root cause and mute the symptoms it causes.

Three inhibitions, each about one scope:

* **a sidecar** (``MlopsExporterDown``): every alert computed from that sidecar's series (equal
  ``instance_labels``) is stale or unknowable while it is down. ``TrainingNodeDown`` is kept: it is the
  same event told to the job's owner.
* **a job**: a root cause of a job's trouble (a rank failed, a rank's node went down, its GPU reported a
  fatal XID, uncorrectable ECC, a failed remap or fell off the bus) mutes the symptoms it causes in that
  job (the peers' stall, throughput, step time, stragglers, goodput, data waits, checkpoints). GPU
  alerts carry the job through the GPU's owner (``mlops_gpu_owner_info``); an unowned GPU's alert has no
  ``job`` and mutes nothing of a job.
* **one thing**: a critical alert mutes warnings about the same sidecar, job, rank and GPU.

Alertmanager treats a label missing on both sides as equal, so every inhibition compares labels that its
targets always carry (training alerts always have ``job``).
"""

from __future__ import annotations

from typing import Any

from mlops_obs.mixin.config import MixinConfig
from mlops_obs.mixin.rules import alerts

# A job's root causes and the symptoms they cause in it.
JOB_ROOT_CAUSES = ("TrainingRankFailed", "TrainingNodeDown", "GpuXidCritical", "GpuFellOffBus",
                   "GpuEccUncorrectedErrors", "GpuRowRemapFailure")  # fmt: skip
JOB_SYMPTOMS = ("TrainingStalled", "TrainingStalledRankMissing", "TrainingThroughputRegression",
                "TrainingStepTimeAnomaly", "TrainingStraggler", "TrainingLowGoodput", "TrainingDataLoaderBound",
                "TrainingCheckpointStale")  # fmt: skip
# Alerts that name the same event as MlopsExporterDown to another audience, or are about a whole job.
NOT_SIDECAR_SCOPED = ("MlopsExporterDown", "TrainingNodeDown", "TrainingStalledRankMissing",
                      "TrainingThroughputRegression", "TrainingLowGoodput", "TrainingCheckpointStale")  # fmt: skip


def _names(names: list[str] | tuple[str, ...]) -> str:
    return f'alertname=~"{"|".join(sorted(names))}"'


def alertmanager_config(cfg: MixinConfig, sink_url: str | None = None) -> dict[str, Any]:
    sink = {"url": sink_url or cfg.alert_sink_url, "send_resolved": True}
    critical_hooks = [sink]
    if cfg.critical_webhook_url:
        critical_hooks.append({"url": cfg.critical_webhook_url, "send_resolved": True})
    names = {a.name for a in alerts(cfg)}
    unknown = (set(JOB_ROOT_CAUSES) | set(JOB_SYMPTOMS) | set(NOT_SIDECAR_SCOPED)) - names
    if unknown:
        raise KeyError(f"inhibitions name alerts that do not exist: {sorted(unknown)}")
    sidecar_scoped = sorted(names - set(NOT_SIDECAR_SCOPED))
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
                # The sidecar (hence the node's view) is gone: what it reported is stale or unknowable.
                "source_matchers": ['alertname="MlopsExporterDown"'],
                "target_matchers": [_names(sidecar_scoped)],
                "equal": list(cfg.instance_labels),
            },
            {
                # A rank failed, its node went down or its GPU broke: the job's stall, slowness and waste
                # follow from it.
                "source_matchers": [_names(JOB_ROOT_CAUSES)],
                "target_matchers": [_names(JOB_SYMPTOMS)],
                "equal": ["job"],
            },
            {
                # A critical problem makes the warnings about the same sidecar, job, rank and GPU secondary
                # (host alerts carry no rank or GPU: theirs compare equal, so a full disk silences the
                # node's host warnings, not its GPUs' or its jobs').
                "source_matchers": ['severity="critical"'],
                "target_matchers": ['severity="warning"'],
                "equal": [*cfg.instance_labels, "job", "rank", "gpu"],
            },
        ],
    }
