"""``docs/runbooks.md``: one section per alert, generated so that every ``runbook_url`` has a target and the
thresholds quoted there are the ones the rules use."""

from __future__ import annotations

from mlops_obs.mixin.alertmanager import JOB_ROOT_CAUSES, JOB_SYMPTOMS
from mlops_obs.mixin.config import MixinConfig
from mlops_obs.mixin.rules import alerts

REPLAY = "mlops-obs replay --store DIR --job <job>"
"""The command a runbook points to for a job's timeline (see docs/replay.md; ``--opensearch URL`` instead of
``--store DIR`` where the logs go to OpenSearch)."""

ACTIONS: dict[str, str] = {
    "GpuXidCritical": "Cordon/drain the node. Look the code up in NVIDIA's XID catalogue; 48/63/64/92/94/95: reset "
    "the GPU (`nvidia-smi -r`) once idle; 79: reboot; repeated codes on one GPU: RMA. Restart the job (its `job` "
    "label: the GPU's owner) from its last checkpoint elsewhere. The rule also fires for an XID counter it has not "
    "seen in the hour before its window (a first XID of a code starts its counter at 1, which `increase()` cannot "
    "see), so after a Prometheus restart with an empty TSDB, old XIDs re-announce themselves once.",
    "GpuXidError": "Check `dmesg | grep -i xid` on the node and the job's log at that time. Unknown codes are "
    "usually driver issues: compare the driver version (`mlops_gpu_info`) with the rest of the fleet.",
    "GpuEccUncorrectedErrors": "Drain the node; the job on that GPU likely crashed or produced bad results. Reset "
    "the GPU so pending row remaps apply; if errors recur, RMA. A volatile count already non-zero when the sidecar "
    "first reported it (errors since the driver loaded) fires once too: a reset clears it.",
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
    "TrainingRankFailed": "The alert names the first rank to fail and why (`reason`/`detail`: the exception type, "
    "the signal, the exit code, or `vanished` when the process disappeared without a word: SIGKILL, the OOM "
    "killer, a segfault). Read the job's timeline around the failure: `" + REPLAY + " --around <the alert's "
    "startsAt> --window 2m` (every rank, the launcher's exit records and the node's alerts in one order; the "
    "failed rank's traceback is one error event), then `mlops-obs rca --store DIR --job <job>`; for `vanished`, "
    "check `dmesg` on its node for the OOM killer. Its "
    "peers' stall and slowdown are muted while this fires. Restart the job from its last checkpoint once fixed.",
    "TrainingStalled": "The named rank is not waiting for its peers: it is stuck in its own code, data loader or "
    "device (the others wait for it in a collective). Take a stack dump of that rank (`py-spy dump --pid PID`, the "
    "pid is on `mlops_process_cpu_seconds_total{job=...,rank=...}`), check its GPU (`nvidia-smi`, XIDs on the GPU "
    "dashboard) and its log around the last step: `" + REPLAY + " --rank <rank> --since 15m` (its last lines, "
    "the launcher's stack dumps and its node's alerts); then kill the job and restart it from the last "
    "checkpoint. A "
    "phase the job declares as an expected pause (checkpoint, evaluation) suspends this alert, for at most the "
    "configured maximum pause.",
    "TrainingStalledRankMissing": "Every rank that reports waits in a collective for one that does not: compare "
    "`mlops_training_world_size` with the ranks on the training dashboard to find it (`" + REPLAY + " --since "
    "15m --kind launcher` lists the ranks the launcher started and saw exit), then check its node "
    "(`TrainingNodeDown`, `MlopsExporterDown`) and whether a sidecar scrapes it at all. If every rank does report, "
    "they wait in mismatched collectives (a code path only some ranks take): dump their stacks (`py-spy dump`).",
    "TrainingNodeDown": "Prometheus lost the sidecar of the rank's node while the rank was running: check the node "
    "(`kubectl get node`, the cloud console), its network and the sidecar pod; `" + REPLAY + " --node <node> "
    "--since 30m` shows the node's last lines and alerts. The job's other ranks wait for this "
    "one until the collective times out; their stall and slowdown are muted while this fires. Restart the job "
    "without the node.",
    "TrainingStraggler": "Look at that rank's node and GPU dashboards: throttling, a noisy neighbour, a degraded "
    "link, a busy CPU (its process CPU on the training dashboard). Move the rank or replace the node. The score "
    "is a recording rule over every sidecar, so it compares ranks across nodes and pods.",
    "TrainingStepTimeAnomaly": "Compare phase breakdown before and after; check for a slow node, throttling, "
    "storage or network trouble that started then.",
    "TrainingThroughputRegression": "Same as a step-time anomaly, job-wide: check recent changes (code, data, "
    "nodes) and the straggler scores.",
    "TrainingLowGoodput": 'See "Time by kind" on the training dashboard: start-up, data waits, checkpoint saves, '
    "restarts, and unaccounted time (hung or idle). Fix the largest share.",
    "TrainingNonFiniteLoss": "The run diverges: roll back to the last good checkpoint, lower the learning rate, "
    "check the batch that produced it and mixed-precision scaling.",
    "TrainingCheckpointStale": "Check the checkpoint path and the job's log for save errors "
    "(`mlops_training_checkpoint_failures_total`); a job that never saves needs checkpointing enabled. A failure "
    "now loses all work since the last save.",
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
    "MlopsShipperFailing": "Read `sink_error` in the shipper's stats.json (or its log): a damaged store needs "
    "`mlops-obs store salvage`, a full or read-only state directory space or permissions, a refusing sink its "
    "credentials or health.",
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
        if a.name in JOB_ROOT_CAUSES:
            out.append(f"\nWhile it fires, Alertmanager mutes in the same job: {', '.join(JOB_SYMPTOMS)}.\n")
        out.append(f"\n**Meaning.** {a.description}\n")
        out.append(f"\n**Action.** {ACTIONS[a.name]}\n")
        out.append(f"\n```promql\n{a.expr}\n```\n")
    return "".join(out)
