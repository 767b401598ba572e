"""``docs/runbooks.md``: one section per alert, generated so that every ``runbook_url`` has a target and the
thresholds quoted there are the ones the rules use."""

from __future__ import annotations

from mlops_obs.mixin.config import MixinConfig
from mlops_obs.mixin.rules import alerts

ACTIONS: dict[str, str] = {
    "GpuXidCritical": "Cordon/drain the node. Look the code up in NVIDIA's XID catalogue; 48/63/64/92/94/95: reset "
    "the GPU (`nvidia-smi -r`) once idle; 79: reboot; repeated codes on one GPU: RMA. Restart the job from its last "
    "checkpoint elsewhere. Note: the rule also fires for an XID counter it has not seen before (a first XID of a "
    "code starts its counter at 1, which `increase()` cannot see), so right after a Prometheus restart with an "
    "empty TSDB, old XIDs re-announce themselves once.",
    "GpuXidError": "Check `dmesg | grep -i xid` on the node and the job's log at that time. Unknown codes are "
    "usually driver issues: compare the driver version (`mlops_gpu_info`) with the rest of the fleet.",
    "GpuEccUncorrectedErrors": "Drain the node; the job on that GPU likely crashed or produced bad results. Reset "
    "the GPU so pending row remaps apply; if errors recur, RMA.",
    "GpuRowRemapFailure": "Take the GPU out of service (drain the node) and open an RMA.",
    "GpuRowRemapPending": "Schedule a GPU reset at the next drain; until then uncorrectable errors may recur.",
    "GpuFellOffBus": "Drain and reboot the node; if the GPU does not come back, reseat or RMA. Jobs on it are hung: "
    "restart them from checkpoints.",
    "GpuMissing": "Compare `nvidia-smi -L` with the expected count; check `dmesg` for PCIe/XID 79. Drain and reboot.",
    "GpuPcieLinkDegraded": "Compare `nvidia-smi -q -d PCIE` current/max width. Reseat the GPU or riser at the next "
    "maintenance; report to the vendor if it persists.",
    "GpuPcieReplays": "Marginal PCIe signal integrity: check for AER messages in `dmesg`, reseat, update firmware.",
    "GpuNvlinkErrors": "Check `nvidia-smi nvlink -e`; reset counters and watch; persistent CRC errors mean a "
    "bad NVLink bridge/baseboard: drain and RMA.",
    "GpuTemperatureNearSlowdown": "Check fans, inlet temperature and airflow of the rack; the GPU will soon throttle.",
    "GpuThermalThrottling": "Same as a hot GPU: cooling. The whole job runs at this GPU's pace.",
    "GpuPowerThrottling": "Check the power limit (`mlops_gpu_power_limit_watts`) against the model's default and "
    "the PSU/rack power budget.",
    "GpuMemoryNearFull": "Expect an OOM: lower the micro-batch, enable activation checkpointing, or check for a "
    "leak (memory growing step over step).",
    "GpuAllocatedButIdle": "Find the owner (`mlops_gpu_process_memory_used_bytes` by pid/job) and ask them to "
    "release it; a hung job needs killing.",
    "GpuHotWhileIdle": "Cooling failure: check fans and heatsink seating before load is put on it.",
    "NodeFilesystemFillingUp": "Find what grows (`du -x --max-depth=2`); rotate logs, prune old checkpoints.",
    "NodeFilesystemAlmostFull": "Free space now: checkpoints and log writes will fail and jobs crash.",
    "NodeMemoryLow": "Reduce data loader workers or prefetch depth; look for a process growing without bound.",
    "NodeMemoryPressure": "The node thrashes: same remedies as low memory; check for swap use.",
    "NodeIoPressure": "Storage is the bottleneck: check the dataset's filesystem and concurrent checkpoints.",
    "NodeCpuPressure": "Too many runnable threads: lower data loader workers, `OMP_NUM_THREADS`, or move "
    "co-located work away.",
    "NodeCpuSaturated": "Input pipelines are CPU bound: precompute or cache transforms, use GPU decoding.",
    "NodeDiskIoSaturated": "The disk is busy all the time: spread checkpoints, use faster local storage.",
    "NodeNetworkErrors": "Check `ip -s link`, the cable/transceiver and the switch port counters.",
    "NodeInfinibandErrors": "Check `ibstat`/`perfquery`; symbol errors mean a bad cable or port: replace it.",
    "NodeClockSkew": "Check `chronyc tracking`; fix NTP before comparing logs across nodes.",
    "NodeClockNotSynchronising": "Start/repair chrony or ntpd; check it can reach its servers.",
    "TrainingStalled": "Open the job's logs around the last step (replay/timeline). A hang in a collective: find "
    "the rank that stopped first (py-spy dump on each rank); kill and restart from the last checkpoint.",
    "TrainingStraggler": "Look at that rank's node and GPU dashboards: throttling, a noisy neighbour, a degraded "
    "link. Move the rank or replace the node.",
    "TrainingStepTimeAnomaly": "Compare phase breakdown before and after; check for a slow node, throttling, "
    "storage or network trouble that started then.",
    "TrainingThroughputRegression": "Same as a step-time anomaly, job-wide: check recent changes (code, data, "
    "nodes) and the straggler scores.",
    "TrainingLowGoodput": "See badput by kind: long restarts, checkpoint time, data waits. Fix the largest.",
    "TrainingNonFiniteLoss": "The run diverges: roll back to the last good checkpoint, lower the learning rate, "
    "check the batch that produced it and mixed-precision scaling.",
    "TrainingCheckpointStale": "Check the checkpoint path and the job's log for save errors; a failure now loses "
    "all work since then.",
    "TrainingDataLoaderBound": "Add data loader workers, pin memory, prefetch, cache the dataset locally.",
    "MlopsExporterDown": "Check the sidecar's container/pod and its log; until it is back the node's alerts are "
    "blind (and inhibited).",
    "MlopsCollectorFailing": "Read the sidecar log for that collector's error (logged once). On nodes without a "
    "GPU, disable the gpu collector (`--no-collector.gpu`).",
    "MlopsCollectorSlow": "A slow NVML call or a huge /proc: see `mlops_scrape_collector_duration_seconds`; raise "
    "the sampler interval or fix the driver.",
    "MlopsScrapeSlow": "Count the sidecar's series; drop per-core or per-process collectors if too many.",
    "MlopsShipperBehind": "Check the store/OpenSearch health and the shipper's retries; it catches up on its own "
    "once the sink accepts writes.",
    "MlopsShipperNotShipping": "The sink refuses or is unreachable: check credentials, URL and the shipper log.",
    "MlopsShipperDeadLetters": "Inspect the dead-letter file for the rejection reason (mapping conflict, size) "
    "and re-ship after fixing it.",
}


def render(cfg: MixinConfig) -> str:
    out = [
        "# Runbooks\n",
        "Generated by `mlops-obs generate` from `mlops_obs/mixin` (thresholds as configured there); one section "
        "per alert, linked from its `runbook_url` annotation.\n",
    ]
    for a in alerts(cfg):
        if a.name not in ACTIONS:
            raise KeyError(f"{a.name} has no runbook action in mlops_obs/mixin/runbooks.py")
        out.append(f"\n## {a.name}\n")
        out.append(f"\nSeverity **{a.severity}**, after `{a.for_}`.\n")
        out.append(f"\n**Meaning.** {a.description}\n")
        out.append(f"\n**Action.** {ACTIONS[a.name]}\n")
        out.append(f"\n```promql\n{a.expr}\n```\n")
    return "".join(out)
