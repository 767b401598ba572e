"""``mlops-obs workload``: launch the reference DDP job as N rank processes, like torchrun does.

Each rank is a separate ``python -m mlops_obs.workload.train`` process with the torchrun environment
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so the sidecar sees real, independent
processes. As torchrun's agent does, when one rank fails the others are stopped and the launcher
exits with that rank's code.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from mlops_obs.child_process import free_port
from mlops_obs.config import (
    COMMON_SETTINGS,
    ConfigError,
    Setting,
    choice_parser,
    float_parser,
    int_parser,
    parse_optional_path,
    parse_path,
    parse_str,
    positive_duration,
)
from mlops_obs.workload.faults import Fault, FaultError, check_world, parse_fault, parse_inject

WORKLOAD_SETTINGS: tuple[Setting, ...] = (
    Setting("world-size", int_parser(1, 64), 2, "Number of rank processes.", metavar="N"),
    Setting("steps", int_parser(1), 100, "Training steps per rank.", metavar="N"),
    Setting("log-dir", parse_path, Path("logs"), "Directory for the ranks' JSON log files.", metavar="DIR"),
    Setting("multiproc-dir", parse_optional_path, None,
            "Directory shared with the exporter sidecar (metrics hand-off). None: no metrics.", metavar="DIR"),
    Setting("job", parse_str, "workload", "Job name, the `job` label of every metric and log line."),
    Setting("batch-size", int_parser(1), 64, "Samples per step per rank.", metavar="N"),
    Setting("device", choice_parser("auto", "cpu", "cuda"), "auto",
            "auto: CUDA with NCCL where available, else CPU with gloo."),
    Setting("flush-interval", positive_duration, 0.5, "How often ranks hand their metrics to the sidecar.",
            metavar="DURATION"),
    Setting("log-every", int_parser(1), 10, "Log a step line every N steps.", metavar="N"),
    Setting("timeout", positive_duration, 600.0, "Collective timeout before a stuck job fails.",
            metavar="DURATION"),
    Setting("inject", parse_inject, [],
            "Inject a fault: KIND:key=value,... with KIND nan|straggler|stall|crash|slow-data|oom, e.g. "
            "stall:rank=1,step=50 or straggler:rank=2,factor=3 (in the environment: ';'-separated).",
            kind="list", metavar="KIND:K=V,..."),
    Setting("checkpoint-every", int_parser(0), 0, "Rank 0 saves a checkpoint every N steps (0: never).",
            metavar="N"),
    Setting("peak-flops", float_parser(0.0), 0.0,
            "Peak FLOP/s of one device for MFU (0: known GPUs auto-detected, none on CPU).", metavar="FLOPS"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + WORKLOAD_SETTINGS)


def rank_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What every rank needs from the launcher's config, passed as JSON through the environment."""
    return {
        "steps": cfg["steps"],
        "log_dir": str(cfg["log-dir"]),
        "multiproc_dir": str(cfg["multiproc-dir"]) if cfg.get("multiproc-dir") else None,
        "batch_size": cfg["batch-size"],
        "device": cfg["device"],
        "flush_interval": cfg["flush-interval"],
        "log_every": cfg["log-every"],
        "log_level": cfg["log.level"],
        "timeout": cfg["timeout"],
        "inject": [str(x) for x in cfg.get("inject") or []],
        "checkpoint_every": cfg.get("checkpoint-every", 0),
        "peak_flops": cfg.get("peak-flops", 0.0),
    }


def check_faults(cfg: Mapping[str, Any]) -> list[Fault]:
    """Validate ``--inject`` against this run before any rank starts (one-line :class:`ConfigError`)."""
    try:
        faults = [parse_fault(x) for x in cfg.get("inject") or []]
        check_world(faults, int(cfg["world-size"]))
    except FaultError as e:
        raise ConfigError("inject", str(e)) from None
    for f in faults:
        if f.kind == "oom" and not _cuda_selected(str(cfg.get("device", "auto"))):
            raise ConfigError("inject", f"{f}: a CUDA out-of-memory needs a GPU; this run trains on CPU")
        if f.kind in ("nan", "stall", "crash", "oom") and f.step >= int(cfg["steps"]):
            raise ConfigError("inject", f"{f}: step {f.step} is never reached with --steps={cfg['steps']}")
    return faults


def _cuda_selected(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return bool(torch.cuda.is_available())


def launch(cfg: Mapping[str, Any], out: Any = sys.stderr) -> int:
    """Start the ranks and supervise them; raises :class:`ConfigError` for an unusable ``--inject``."""
    faults = check_faults(cfg)
    for f in faults:
        print(f"workload: injecting {f}", file=out)
    log_dir: Path = cfg["log-dir"]
    log_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("multiproc-dir"):
        Path(cfg["multiproc-dir"]).mkdir(parents=True, exist_ok=True)
    world = int(cfg["world-size"])
    port = free_port()
    run_id = f"{cfg['job']}-{int(time.time())}"
    opts = orjson.dumps(rank_options(cfg)).decode()
    procs: list[subprocess.Popen[bytes]] = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            MLOPS_OBS_JOB=str(cfg["job"]),
            MLOPS_OBS_RUN_ID=run_id,
            MLOPS_OBS_WORKLOAD=opts,
            OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        )
        stderr_path = log_dir / f"{cfg['job']}-rank{rank}.stderr.log"
        with open(stderr_path, "ab") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mlops_obs.workload.train"],
                    env=env,
                    stdout=err,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                )
            )
    return supervise(procs, out)


def supervise(procs: list[subprocess.Popen[bytes]], out: Any, grace: float = 10.0) -> int:
    """Wait for all ranks; on the first failure stop the rest (SIGTERM, then SIGKILL) and return its code."""
    failed: tuple[int, int] | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            for rank, code in enumerate(codes):
                if code not in (None, 0) and failed is None:
                    failed = (rank, code)
                    print(f"workload: rank {rank} exited with code {code}; stopping the other ranks", file=out)
            if failed or all(c is not None for c in codes):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        failed = failed or (-1, 130)
    if failed:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return failed[1] if failed[1] > 0 else 1
    return 0


def run(cfg: Mapping[str, Any]) -> int:
    return launch(cfg)
