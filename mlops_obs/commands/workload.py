"""``mlops-obs workload``: the reference PyTorch DDP job with fault injection, one process a rank.

The settings and the wiring live here: the stop signals are handled for the whole run, and the
machinery (checks, starting the ranks, supervising and stopping them) is :mod:`mlops_obs.workload.launcher`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlops_obs.config import (
    COMMON_SETTINGS,
    Setting,
    choice_parser,
    duration_parser,
    float_parser,
    format_duration,
    int_parser,
    parse_optional_path,
    parse_path,
    parse_str,
    positive_duration,
)
from mlops_obs.rankdir.cadence import MAX_FLUSH_INTERVAL, MIN_FLUSH_INTERVAL
from mlops_obs.workload.faults import parse_inject
from mlops_obs.workload.launcher import STALL_AFTER, STALL_FACTOR

_fixed_flush = duration_parser(MIN_FLUSH_INTERVAL, MAX_FLUSH_INTERVAL)


def parse_flush_interval(v: Any) -> float | None:
    """``auto`` (``None``: the monitor follows the sidecar's cadence) or a fixed flush interval. The fixed
    one is held within the cadence's bounds: a longer one would leave the stall alert without the
    heartbeat it needs (:data:`~mlops_obs.rankdir.cadence.MAX_FLUSH_INTERVAL`), a shorter one burns a
    core on writes nobody reads."""
    if isinstance(v, str) and v.strip().lower() == "auto":
        return None
    try:
        return float(_fixed_flush(v))
    except ValueError as e:
        raise ValueError(f"{e} (or auto: follow the sidecar)") from None


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
    Setting("flush-interval", parse_flush_interval, None,
            "When ranks hand their metrics to the sidecar: auto (the default) follows the sidecar's published "
            f"cadence, just before each of its rounds, at least every {format_duration(MAX_FLUSH_INTERVAL)}; a "
            f"duration ({format_duration(MIN_FLUSH_INTERVAL)} to {format_duration(MAX_FLUSH_INTERVAL)}) flushes "
            "at that fixed interval instead.", metavar="auto|DURATION"),
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
    Setting("stall-after", duration_parser(0.0), STALL_AFTER,
            "Dump every rank's stacks when no rank completed a step for this long and for --stall-factor "
            "median step times (0: never).", metavar="DURATION"),
    Setting("stall-factor", float_parser(1.0), STALL_FACTOR,
            "A stall is at least this many median step times without a completed step.", metavar="K"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + WORKLOAD_SETTINGS)


def run(cfg: Mapping[str, Any]) -> int:
    from mlops_obs.workload.launcher import StopRequest, launch

    with StopRequest().installed() as stop:
        return launch(cfg, stop=stop)
