"""Alerts already stored (``kind="alert"``, from the alert sink) as findings: a firing alert is the
mixin's own verdict on a series, so it counts as evidence of the kind it names."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from mlops_obs.rca.detectors.registry import Context, detector
from mlops_obs.rca.model import Finding, event_evidence
from mlops_obs.rca.times import epoch, stamp

# alertname -> (kind, role), for every alert of the mixin (mlops_obs/mixin/rules.py) that is evidence of a
# kind; tests/test_rca_detectors.py checks that each alert the mixin defines is here or in NOT_EVIDENCE.
ALERT_KINDS: dict[str, tuple[str, str]] = {
    "TrainingRankFailed": ("crash", "fault"),
    "TrainingNonFiniteLoss": ("nan_loss", "fault"),
    "TrainingStalled": ("stall", "fault"),
    # Every reporting rank waits in a collective for one that does not report: a stall with no rank.
    "TrainingStalledRankMissing": ("stall", "fault"),
    "TrainingNodeDown": ("node_down", "fault"),
    "TrainingStraggler": ("straggler", "anomaly"),
    "TrainingDataLoaderBound": ("data_starvation", "anomaly"),
    "GpuXidCritical": ("gpu_xid", "fault"),
    "GpuXidError": ("gpu_xid", "fault"),
    "GpuFellOffBus": ("gpu_xid", "fault"),
    "GpuMissing": ("gpu_xid", "fault"),  # a GPU lost from the driver, as after XID 79
    "GpuEccUncorrectedErrors": ("gpu_ecc", "fault"),
    "GpuRowRemapFailure": ("gpu_ecc", "fault"),
    "GpuRowRemapPending": ("gpu_ecc", "anomaly"),
    "GpuThermalThrottling": ("thermal_throttle", "anomaly"),
    "GpuTemperatureNearSlowdown": ("thermal_throttle", "anomaly"),
    "NodeMemoryPressure": ("node_memory_pressure", "anomaly"),
    "NodeMemoryLow": ("node_memory_pressure", "anomaly"),
    "NodeFilesystemAlmostFull": ("disk_full", "anomaly"),
    "NodeFilesystemFillingUp": ("disk_full", "anomaly"),
}
# The mixin's alerts that name no kind of their own, and why: a job's symptoms (their cause is another
# alert's kind or the logs'), hardware or host conditions that no kind stands for, and the monitoring
# pipeline's own health.
NOT_EVIDENCE: dict[str, str] = {
    "TrainingStepTimeAnomaly": "a symptom: slower steps follow from a straggler, starved data or throttling",
    "TrainingThroughputRegression": "a symptom of the job as a whole",
    "TrainingLowGoodput": "a symptom of the job as a whole",
    "TrainingCheckpointStale": "says nothing of why the job failed",
    "GpuPcieLinkDegraded": "a degraded link, no failure kind",
    "GpuPcieReplays": "link errors the hardware corrects, no failure kind",
    "GpuNvlinkErrors": "link errors, no failure kind (an XID names a fatal one)",
    "GpuPowerThrottling": "a power cap, no failure kind",
    "GpuMemoryNearFull": "a warning; the CUDA OOM itself is in the rank's log",
    "GpuAllocatedButIdle": "waste, not a fault",
    "GpuHotWhileIdle": "cooling health, not a fault of the job",
    "NodeIoPressure": "host contention, no failure kind",
    "NodeCpuPressure": "host contention, no failure kind",
    "NodeCpuSaturated": "host contention, no failure kind",
    "NodeDiskIoSaturated": "host contention, no failure kind",
    "NodeNetworkErrors": "link errors, no failure kind",
    "NodeInfinibandErrors": "link errors, no failure kind",
    "NodeClockSkew": "skews the evidence's times, is no fault of the job",
    "NodeClockNotSynchronising": "skews the evidence's times, is no fault of the job",
    # A sidecar down says nothing of the job by itself; TrainingNodeDown is the same event joined to the
    # ranks that ran there.
    "MlopsExporterDown": "the monitoring pipeline's health; TrainingNodeDown is its evidence for a job",
    "MlopsCollectorFailing": "the monitoring pipeline's health",
    "MlopsCollectorSlow": "the monitoring pipeline's health",
    "MlopsScrapeSlow": "the monitoring pipeline's health",
    "MlopsShipperBehind": "the monitoring pipeline's health",
    "MlopsShipperNotShipping": "the monitoring pipeline's health",
    "MlopsShipperFailing": "the monitoring pipeline's health",
    "MlopsShipperDeadLetters": "the monitoring pipeline's health",
}
# Alerts from other rule sets (kube-prometheus, node-mixin), recognised by shape.
_BY_SHAPE: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"^Training\w*(?:Crash|Failed|Failure)\w*$"), "crash", "fault"),
    (re.compile(r"^(?:Node|Host)(?:Down|Unreachable|Lost)$"), "node_down", "fault"),
)


def kind_of(alertname: str) -> tuple[str, str] | None:
    got = ALERT_KINDS.get(alertname)
    if got or alertname in NOT_EVIDENCE:
        return got
    for rx, kind, role in _BY_SHAPE:
        if rx.match(alertname):
            return kind, role
    return None


def _labels(ev: Mapping[str, Any]) -> dict[str, str]:
    fields = ev.get("fields")
    labels = fields.get("labels") if isinstance(fields, Mapping) else None
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}


def _started(ev: Mapping[str, Any]) -> str:
    """When the alert began firing (``startsAt``), which is nearer the fault than the notification."""
    fields = ev.get("fields")
    starts = fields.get("startsAt") if isinstance(fields, Mapping) else None
    if isinstance(starts, str) and starts[:4].isdigit() and starts[:4] > "0001":
        try:
            return stamp(epoch(starts))
        except (ValueError, OverflowError):
            pass
    return str(ev.get("@timestamp"))


@detector("alerts")
def alerts(ctx: Context) -> Iterable[Finding]:
    """One finding per firing alert (the first notification of each fingerprint)."""
    seen: set[str] = set()
    for n in ctx.facts.alerts:
        ev = n.event
        fields = ev.get("fields")
        if not isinstance(fields, Mapping) or fields.get("status") != "firing":
            continue
        name = str(fields.get("alertname") or "")
        got = kind_of(name)
        if got is None:
            continue
        fp = str(fields.get("fingerprint") or ev.get("_id"))
        if fp in seen:
            continue
        seen.add(fp)
        kind, role = got
        labels = _labels(ev)
        rank_s = labels.get("rank", "")
        rank = int(rank_s) if rank_s.lstrip("-").isdigit() else None
        node = labels.get("node") or (labels.get("instance", "").rpartition(":")[0] or labels.get("instance")) or None
        summary = str(ev.get("message") or name)
        yield Finding(
            kind,
            role,
            rank,
            f"alert {summary.removeprefix('[FIRING] ')}",
            _started(ev),
            "medium",
            node,
            None,
            [event_evidence(ev)],
        )
