"""The whole reference node's ``/metrics`` body on fixed inputs, for the golden comparison.

Eight fake H100s (every field, one process each), the host collector on the recorded ``gpu-node``
procfs and ``ib-node`` sysfs fixtures, eight ranks' snapshot files with fixed content (rank 0 on the
fixture's pid 4242, so the process collector reports it; ranks 1-7 claim GPUs 1-7's processes, whose
pids no process has, so they stay unattributed: a pid is a rank's only when its process started when
the snapshot says), sampled by the
real sampler for three rounds, with the GPU collector's ``full`` profile (every series it can report;
``profile="default"`` gives the default profile's body instead). Values that move with the clock (the
fake's energy, NVLink, PCIe and throttle counters, the kernel's adjtimex figures, durations and CPU
seconds) are masked; everything else, text and order, is compared byte for byte with
``tests/fixtures/golden/node-metrics.txt``.

Only long-standing entry points are used (``collectors.build``, ``Sampler``, ``settings()``, the
snapshot file name and format written by hand), so the same script runs on an older checkout that
reads the same snapshot schema version (3: rank lifecycle, current phase, step medians)::

    PYTHONPATH=<checkout> .venv/bin/python tests/golden_node.py > tests/fixtures/golden/node-metrics.txt
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import yaml

FIX = Path(__file__).resolve().parent / "fixtures"
GOLDEN = FIX / "golden" / "node-metrics.txt"

# Sample names whose values depend on when the round ran.
VARYING = re.compile(
    r"^(mlops_gpu_energy_joules_total|mlops_gpu_nvlink_(transmit|receive)_bytes_total|"
    r"mlops_gpu_pcie_(transmit|receive)_bytes_total|mlops_gpu_throttle_seconds_total|mlops_node_timex_\w+|"
    r"mlops_scrape_collector_duration_seconds|mlops_scrape_collector_cpu_seconds_total|"
    r"mlops_exporter_cpu_seconds_total|mlops_exporter_resident_memory_bytes)(\{.*\})? "
)

RANK_PIDS = [4242, *(999_999_001 + i for i in range(7))]  # above any pid_max: never a live process here
GPU_PIDS = [999_999_100, *RANK_PIDS[1:]]  # GPU 0's process belongs to no rank


def _schema_version() -> int:
    try:
        from mlops_obs.rankdir import SCHEMA_VERSION  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        from mlops_obs.instrument.snapshot import SCHEMA_VERSION  # type: ignore[no-redef,unused-ignore]
    return int(SCHEMA_VERSION)


def _snapshot(rank: int) -> dict[str, Any]:
    steps = 1000 + 10 * rank
    return {
        "v": _schema_version(),
        "job": "golden",
        "rank": rank,
        "world_size": 8,
        "node": "node-a",
        "pid": RANK_PIDS[rank],
        "start_time": 1764201713.0,  # just after the fixture's pid 4242 started: not a reused pid
        "updated": 1764300000.0 + rank,
        # Rank 6 failed, rank 7 finished, the others run: rank 0 saves a checkpoint, rank 1 computes,
        # the rest wait for it in the all-reduce.
        "state": {6: "failed", 7: "finished"}.get(rank, "running"),
        "end_time": 1764299999.75 if rank >= 6 else None,
        "failure": {"reason": "exception", "detail": "torch.OutOfMemoryError"} if rank == 6 else None,
        "phase": {
            "name": {0: "checkpoint", 1: "backward"}.get(rank, "collective"),
            "activity": {0: "pause", 1: "work"}.get(rank, "collective"),
            "since": 1764299999.5 - rank,
        },
        "steps": steps,
        "failed_steps": rank % 2,
        "samples": steps * 32,
        "tokens": steps * 32 * 512,
        "step_seconds_sum": steps * 0.25,
        "step_buckets": [0, 0, 0, 0, 0, 0, 0, steps - 5, 3, 2, 0, 0, 0, 0, 0, 0, 0],
        "phase_seconds": {"forward": 80.5 + rank, "backward": 120.25, "data_wait": 3.5, "collective": 20.0},
        "gauges": {"loss": 2.5 - rank / 10, "grad_norm": 1.25, "learning_rate": 0.0003, "mfu": 0.41}
        | ({"cuda_memory_allocated": 1.5e10} if rank < 4 else {}),
        "nonfinite_loss": 1 if rank == 3 else 0,
        "last_step_time": 1764299999.5,
        "recent_steps": 256,
        "step_median": 0.25,
        "step_compute_median": 0.2 + (0.15 if rank == 5 else 0.0) + rank / 1000,
        "goodput_seconds": steps * 0.24,
        "badput_seconds": {"startup": 30.0, "data_loading": 3.5} | ({"evaluation": 12.0} if rank == 0 else {}),
        "checkpoint_buckets": [0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0] if rank == 0 else [0] * 13,
        "checkpoint_seconds_sum": 1.75 if rank == 0 else 0.0,
        "failed_checkpoints": 1 if rank == 0 else 0,
        "last_checkpoint_time": 1764299000.0 if rank == 0 else 0.0,
        "collectives": steps * 3,
    }


def node_metrics(work: Path, profile: str = "full", per_cpu: bool = True) -> str:
    """Three sampling rounds of every collector over the fixed inputs; the scrape body, masked.

    ``per_cpu`` turns on the host collector's per-core series (off by default in the sidecar), which the
    golden file covers too."""
    from mlops_obs import collectors, exporter
    from mlops_obs.config import resolve
    from mlops_obs.exporter.sampler import Sampler

    mp = work / "mp"
    mp.mkdir()
    for rank in range(8):
        (mp / f"golden.{rank}.rank.json").write_bytes(orjson.dumps(_snapshot(rank)))
    devices = [
        {
            "fan_speed": 40,
            "ecc": {"volatile": {"corrected": 1, "uncorrected": 0}, "aggregate": {"corrected": 7, "uncorrected": 0}},
            "nvlink_errors": {"replay": 0, "recovery": 0, "crc": 1},
            "throttle": {"power": 0.1, "thermal": 0.01},
            "remapped_rows": {"correctable": 2, "uncorrectable": 0, "pending": i == 3, "failure": False},
            "pci_bus_id": f"00000000:{0x18 + i:02X}:00.0",
            "processes": [{"pid": GPU_PIDS[i], "used_memory": 60_000_000_000 + i, "sm_util": 80 + i}],
        }
        for i in range(8)
    ]
    scenario = work / "node.yaml"
    scenario.write_text(yaml.safe_dump({"devices": devices}))
    values = {
        "web.listen-address": "127.0.0.1:0",
        "gpu.backend": "fake",
        "gpu.fake-scenario": str(scenario),
        "gpu.xid-events": False,
        "multiproc-dir": str(mp),
        "training.retention": "87000h",
        "path.procfs": str(FIX / "proc" / "gpu-node"),
        "path.sysfs": str(FIX / "sys" / "ib-node"),
        "host.filesystem-paths": [],
        "host.per-cpu": per_cpu,
    }
    saved = os.environ.pop("NODE_NAME", None)
    os.environ["NODE_NAME"] = "node-a"
    try:
        settings = exporter.settings()
        if any(s.key == "gpu.profile" for s in settings):  # an older checkout has only the full set
            values["gpu.profile"] = profile
        cfg = resolve(settings, values, environ={})
        built = collectors.build(cfg)
        static = exporter.static_text() if hasattr(exporter, "static_text") else exporter._build_info()
        sampler = Sampler(built, 1.0, 60.0, _NullLog(), static=static)
        try:
            for _ in range(3):
                for c in built:
                    sampler.sample_once(c)
            body = sampler.scrape().decode()
        finally:
            sampler.stop()
    finally:
        os.environ.pop("NODE_NAME", None)
        if saved is not None:
            os.environ["NODE_NAME"] = saved
    return "".join(
        (m.group(0) + "<varies>\n" if (m := VARYING.match(line)) else line + "\n") for line in body.splitlines()
    )


class _NullLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **kw: None


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        sys.stdout.write(node_metrics(Path(d)))
