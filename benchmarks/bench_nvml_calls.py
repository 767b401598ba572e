#!/usr/bin/env python3
"""Per-call CPU of the NVML getters the GPU collector could use, direct against batched.

Needs a real GPU (the fake backend's costs are Python's, not the driver's). For each group of values
the collector reads, it times the direct getters (``nvmlDeviceGetViolationStatus`` once per reason,
``nvmlDeviceGetTotalEnergyConsumption``, ...) against one ``nvmlDeviceGetFieldValues`` call for the
same values, side by side in the same run, and prints both values so that units can be compared.
This is how the collector's choice of calls was made (see docs/gpu.md)::

    python benchmarks/bench_nvml_calls.py --reps 20 --output docs/nvml-calls-h200.md

CPU is the calling thread's (``time.thread_time``): the sidecar's budget, as opposed to wall time,
which includes calls that sleep in the driver (PCIe throughput waits 20 ms but uses ~0.5 ms CPU).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, float, Any]:
    """(median wall us, median CPU us, last result or the error) over ``reps`` calls."""
    wall, cpu, result = [], [], None
    for _ in range(reps):
        c0, t0 = time.thread_time(), time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # NVMLError_NotSupported and friends: timed all the same
            result = e
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return statistics.median(wall) * 1e6, statistics.median(cpu) * 1e6, result


def field_values(nvml: Any, h: Any, ids: list[int]) -> list[Any]:
    out = []
    for v in nvml.nvmlDeviceGetFieldValues(h, ids):
        if int(v.nvmlReturn) != 0:
            out.append(f"err {int(v.nvmlReturn)}")
            continue
        names = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
        t = int(v.valueType)
        out.append(getattr(v.value, names[t] if t < len(names) else "ullVal"))
    return out


def groups(nvml: Any, h: Any) -> list[tuple[str, Callable[[], Any], list[int]]]:
    """(what, the direct getters for it, the field ids that carry the same values)."""
    return [
        (
            "throttle time, 8 reasons",
            lambda: [nvml.nvmlDeviceGetViolationStatus(h, p).violationTime for p in (0, 1, 2, 3, 4, 5, 10, 11)],
            list(range(74, 82)),
        ),
        ("energy", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h), [83]),
        ("PCIe replays", lambda: nvml.nvmlDeviceGetPcieReplayCounter(h), [94]),
        (
            "ECC totals, 4",
            lambda: [nvml.nvmlDeviceGetTotalEccErrors(h, t, s) for t in (0, 1) for s in (0, 1)],
            [3, 5, 4, 6],
        ),
        ("remapped rows", lambda: nvml.nvmlDeviceGetRemappedRows(h), [142, 143, 144, 145]),
        ("power usage", lambda: nvml.nvmlDeviceGetPowerUsage(h), [186]),
        ("memory temperature", lambda: None, [82]),
        ("PCIe bytes (counters)", lambda: None, [197, 198]),
        (
            "every counter above in one call",
            lambda: None,
            [*range(74, 82), 83, 94, 3, 5, 4, 6, 142, 143, 144, 145, 197, 198],
        ),
        ("GPU utilisation", lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu, []),
        ("memory info", lambda: nvml.nvmlDeviceGetMemoryInfo(h).used, []),
        ("running processes", lambda: len(nvml.nvmlDeviceGetComputeRunningProcesses(h)), []),
        ("fan speed", lambda: nvml.nvmlDeviceGetFanSpeed(h), []),
    ]


def gpm_rows(nvml: Any, h: Any, reps: int) -> list[str]:
    """GPM: one sample, and metrics between two samples for 1 and for 4 metrics."""
    try:
        if not int(nvml.nvmlGpmQueryDeviceSupport(h).isSupportedDevice):
            return ["| GPM | not supported on this device | | |"]
        s1, s2 = nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()
    except Exception as e:
        return [f"| GPM | {e} | | |"]
    rows = []
    w, c, _ = timed(lambda: nvml.nvmlGpmSampleGet(h, s1), reps)
    rows.append(f"| GPM sample | nvmlGpmSampleGet | {w:.1f} | {c:.1f} |")
    time.sleep(0.2)
    nvml.nvmlGpmSampleGet(h, s2)
    for ids in ([2], [2, 5, 10, 1]):
        mg = nvml.c_nvmlGpmMetricsGet_t()
        mg.version = 1
        mg.numMetrics = len(ids)
        mg.sample1, mg.sample2 = s1, s2
        for i, mid in enumerate(ids):
            mg.metrics[i].metricId = mid
        w, c, r = timed(functools.partial(nvml.nvmlGpmMetricsGet, mg), reps)
        value = r if isinstance(r, Exception) else round(float(mg.metrics[0].value), 2)
        rows.append(f"| GPM metrics x{len(ids)} | nvmlGpmMetricsGet -> {value} | {w:.1f} | {c:.1f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="Calls per getter (the median is reported).")
    ap.add_argument("--gpu", type=int, default=0, help="Device index.")
    ap.add_argument("--output", type=Path, help="Also write the Markdown table here.")
    args = ap.parse_args(argv)
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception as e:
        print(f"bench_nvml_calls: NVML is not available here ({e}); it needs an NVIDIA GPU", file=sys.stderr)
        return 2
    try:
        h = nvml.nvmlDeviceGetHandleByIndex(args.gpu)
        name = nvml.nvmlDeviceGetName(h)
        lines = [
            f"# NVML call cost: {name} (driver {nvml.nvmlSystemGetDriverVersion()}), {args.reps} calls each, medians",
            "",
            "| values | direct getters: result | wall us | CPU us | one nvmlDeviceGetFieldValues: result "
            "| wall us | CPU us |",
            "|---|---|---|---|---|---|---|",
        ]
        for what, direct, ids in groups(nvml, h):
            d = timed(direct, args.reps)
            f = timed(functools.partial(field_values, nvml, h, ids), args.reps) if ids else None
            dres = "" if d[2] is None else str(d[2])[:80]
            cells = [what, dres, f"{d[0]:.1f}", f"{d[1]:.1f}"] if dres else [what, "(none)", "", ""]
            cells += [str(f[2])[:120], f"{f[0]:.1f}", f"{f[1]:.1f}"] if f else ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "| GPM | call -> first metric | wall us | CPU us |", "|---|---|---|---|"]
        lines += gpm_rows(nvml, h, args.reps)
    finally:
        nvml.nvmlShutdown()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
