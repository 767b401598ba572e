#!/usr/bin/env python3
"""Real-GPU check: the exporter next to the reference workload on CUDA, in under 5 minutes.

Run on a machine with an NVIDIA GPU, driver and a CUDA build of torch::

    .venv/bin/python scripts/gpu_check.py --output docs/gpu-check-output.md

What it does, and why each step:

1. Measures the latency of every NVML call the GPU collector makes (20 real rounds in-process),
   because those figures decide what must stay off the scrape path.
2. Starts ``mlops-obs exporter`` (real NVML) and scrapes it once a second before, during and after
   ``mlops-obs workload --device cuda`` (one rank per GPU).
3. Checks the GPU series are sane: collector success throughout, utilisation above 0 while training,
   memory used rising above the idle baseline, power within its enforced limit, temperature below
   the shutdown threshold, a non-zero SM clock, an energy counter that never goes down, and the
   training ranks' processes attributed to the job.
4. Prints a Markdown report (and writes it with ``--output``) and exits 0 only if every check passed.

Without a GPU it exits 2 at once with one line saying what is missing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

JOB = "gpucheck"
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class NoGpu(RuntimeError):
    """This machine cannot run the check; ``str()`` is the one line the user sees."""


@dataclass
class Scrape:
    t: float
    phase: str  # "idle" | "training" | "after"
    series: Series
    seconds: float  # how long the scrape itself took


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class CallLatency:
    function: str
    calls: int
    p50_us: float
    p99_us: float
    max_us: float
    cpu_p50_us: float = float("nan")  # the calling thread's CPU time: what the sidecar's CPU budget pays


@dataclass
class Report:
    machine: dict[str, str]
    checks: list[Check]
    latencies: list[CallLatency]
    loaded_latencies: list[CallLatency] = field(default_factory=list)
    round_ms: list[float] = field(default_factory=list)
    scrape_ms: list[float] = field(default_factory=list)
    exporter: dict[str, float] = field(default_factory=dict)
    workload_rc: int | None = None
    collector_cpu_pct: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


# --- pure parts (tested without a GPU) ------------------------------------------------------------------


def parse_scrape(text: str) -> Series:
    from prometheus_client.parser import text_string_to_metric_families

    out: Series = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def by_gpu(series: Series, name: str) -> dict[str, float]:
    """``{gpu index: value}`` for a per-GPU family (MIG and per-link series left out)."""
    out: dict[str, float] = {}
    for (n, lb), v in series.items():
        labels = dict(lb)
        if n == name and "gpu" in labels and "gpu_instance" not in labels and "link" not in labels:
            out[labels["gpu"]] = v
    return out


def collector_cpu(series: Series) -> dict[str, float]:
    """``{collector: CPU seconds so far}`` from ``mlops_scrape_collector_cpu_seconds_total``."""
    return {
        dict(lb).get("collector", "?"): v
        for (n, lb), v in series.items()
        if n == "mlops_scrape_collector_cpu_seconds_total"
    }


def percentile(values: Iterable[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def evaluate(scrapes: list[Scrape], job: str = JOB, power_tolerance: float = 1.05) -> list[Check]:
    """The sanity checks over the scrapes of one run (idle baseline, training, after)."""
    checks: list[Check] = []
    idle = [s for s in scrapes if s.phase == "idle"]
    training = [s for s in scrapes if s.phase == "training"]
    if not idle or not training:
        return [Check("scrapes collected", False, f"{len(idle)} idle and {len(training)} training scrapes")]

    success = [s.series.get(("mlops_scrape_collector_success", (("collector", "gpu"),))) for s in scrapes]
    bad = sum(1 for v in success if v != 1.0)
    checks.append(
        Check("gpu collector success", bad == 0, f"{len(success) - bad}/{len(success)} scrapes had success 1")
    )

    gpus = sorted(
        by_gpu(training[-1].series, "mlops_gpu_utilization_ratio") or by_gpu(idle[-1].series, "mlops_gpu_info")
    )
    if not gpus:
        return [*checks, Check("GPU series present", False, "no mlops_gpu_utilization_ratio series during training")]

    util = {g: max(by_gpu(s.series, "mlops_gpu_utilization_ratio").get(g, 0.0) for s in training) for g in gpus}
    checks.append(
        Check(
            "utilisation above 0 while training",
            all(v > 0 for v in util.values()),
            ", ".join(f"gpu{g} max {v:.0%}" for g, v in util.items()),
        )
    )

    base = {g: min(by_gpu(s.series, "mlops_gpu_memory_used_bytes").get(g, float("inf")) for s in idle) for g in gpus}
    peak = {g: max(by_gpu(s.series, "mlops_gpu_memory_used_bytes").get(g, 0.0) for s in training) for g in gpus}
    checks.append(
        Check(
            "memory used rises during training",
            all(peak[g] > base[g] for g in gpus),
            ", ".join(f"gpu{g} {base[g] / 2**20:.0f} -> {peak[g] / 2**20:.0f} MiB" for g in gpus),
        )
    )

    worst = 0.0
    missing_power = False
    for s in scrapes:
        power, limit = by_gpu(s.series, "mlops_gpu_power_usage_watts"), by_gpu(s.series, "mlops_gpu_power_limit_watts")
        for g in gpus:
            if g not in power or g not in limit or limit[g] <= 0:
                missing_power = True
                continue
            worst = max(worst, power[g] / limit[g])
    checks.append(
        Check(
            "power within its enforced limit",
            not missing_power and 0 < worst <= power_tolerance,
            f"highest power/limit {worst:.0%}" + (" (power or limit missing)" if missing_power else ""),
        )
    )

    temp_ok, temp_detail = True, []
    for g in gpus:
        temps = [by_gpu(s.series, "mlops_gpu_temperature_celsius").get(g) for s in scrapes]
        shutdown = by_gpu(scrapes[-1].series, "mlops_gpu_shutdown_temperature_celsius").get(g, 110.0)
        vals = [t for t in temps if t is not None]
        ok = bool(vals) and min(vals) > 0 and max(vals) < shutdown
        temp_ok &= ok
        temp_detail.append(f"gpu{g} {min(vals, default=0):.0f}-{max(vals, default=0):.0f} C (shutdown {shutdown:.0f})")
    checks.append(Check("temperature sane", temp_ok, ", ".join(temp_detail)))

    clocks = {g: max(by_gpu(s.series, "mlops_gpu_sm_clock_hertz").get(g, 0.0) for s in training) for g in gpus}
    checks.append(
        Check(
            "SM clock above 0 while training",
            all(v > 0 for v in clocks.values()),
            ", ".join(f"gpu{g} {v / 1e6:.0f} MHz" for g, v in clocks.items()),
        )
    )

    energy_ok, energy_detail = True, []
    for g in gpus:
        e = [by_gpu(s.series, "mlops_gpu_energy_joules_total").get(g) for s in scrapes]
        vals = [x for x in e if x is not None]
        mono = bool(vals) and all(b >= a for a, b in itertools.pairwise(vals))
        energy_ok &= mono
        energy_detail.append(f"gpu{g} +{(vals[-1] - vals[0]) if vals else 0:.0f} J")
    checks.append(Check("energy counter never decreases", energy_ok, ", ".join(energy_detail)))

    ranks: set[str] = set()
    for s in training:
        ranks |= evaluate_ranks(s.series, job)
    checks.append(
        Check(
            "training processes attributed to the job",
            bool(ranks),
            f"ranks seen on GPUs: {', '.join(sorted(ranks)) or 'none'}",
        )
    )
    return checks


def evaluate_ranks(series: Series, job: str = JOB) -> set[str]:
    """The ranks of ``job`` whose processes the exporter attributed on a GPU in one scrape."""
    return {
        dict(lb).get("rank", "?")
        for (n, lb), _ in series.items()
        if n == "mlops_gpu_process_memory_used_bytes" and dict(lb).get("job") == job
    }


def latencies(stats: Mapping[str, Any]) -> list[CallLatency]:
    """Per NVML function: calls, p50/p99/max in microseconds, slowest first."""
    out = []
    for fn, st in stats.items():
        samples = list(getattr(st, "samples", []) or [])
        if not samples:
            continue
        cpu = list(getattr(st, "cpu_samples", []) or [])
        out.append(
            CallLatency(
                fn,
                len(samples),
                percentile(samples, 0.5) * 1e6,
                percentile(samples, 0.99) * 1e6,
                max(samples) * 1e6,
                percentile(cpu, 0.5) * 1e6,
            )
        )
    return sorted(out, key=lambda c: -c.p50_us)


def latency_table(title: str, rows: list[CallLatency]) -> list[str]:
    lines = ["", f"## {title}", "", "| function | calls | p50 us | p99 us | max us | CPU p50 us |"]
    lines.append("|---|---|---|---|---|---|")
    lines += [
        f"| {c.function} | {c.calls} | {c.p50_us:.1f} | {c.p99_us:.1f} | {c.max_us:.1f} | {c.cpu_p50_us:.1f} |"
        for c in rows
    ]
    return lines


def render_report(r: Report) -> str:
    lines = ["# GPU check", ""]
    lines += [f"- {k}: {v}" for k, v in r.machine.items()]
    lines += ["", f"Result: **{'PASS' if r.ok else 'FAIL'}**", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {'ok' if c.ok else 'FAIL'} | {c.detail} |" for c in r.checks]
    if r.round_ms:
        lines += [
            "",
            f"GPU collector round (all devices): p50 {percentile(r.round_ms, 0.5):.2f} ms, "
            f"max {max(r.round_ms):.2f} ms over {len(r.round_ms)} rounds",
        ]
    if r.scrape_ms:
        lines += [
            f"Exporter scrape: p50 {percentile(r.scrape_ms, 0.5):.2f} ms, p99 {percentile(r.scrape_ms, 0.99):.2f}"
            f" ms over {len(r.scrape_ms)} scrapes"
        ]
    if r.exporter:
        lines += [
            f"Exporter: {r.exporter.get('cpu_pct', float('nan')):.2f}% of one core, "
            f"RSS {r.exporter.get('rss_mib', float('nan')):.1f} MiB"
        ]
    if r.collector_cpu_pct:
        lines += ["Per collector (% of one core): " + ", ".join(f"{k} {v:.2f}" for k, v in r.collector_cpu_pct.items())]
    if r.workload_rc is not None:
        lines += [f"Workload exit code: {r.workload_rc}"]
    lines += latency_table("NVML call latency, GPU idle (real driver; first calls open the device)", r.latencies)
    if r.loaded_latencies:
        lines += latency_table(
            "NVML call latency while training (every call every round, and calls the collector avoids)",
            r.loaded_latencies,
        )
    if r.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


# --- the run (needs a GPU) ---------------------------------------------------------------------------------


def preflight() -> dict[str, str]:
    """GPU, driver and CUDA torch present, or :class:`NoGpu` naming what is missing."""
    try:
        import pynvml
    except ImportError:
        raise NoGpu("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()  # type: ignore[no-untyped-call,unused-ignore]
    except Exception as e:
        raise NoGpu(f"NVML is not available ({e}): this check needs an NVIDIA GPU and driver") from None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise NoGpu("NVML sees no GPU")
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        driver = pynvml.nvmlSystemGetDriverVersion()
    finally:
        pynvml.nvmlShutdown()
    try:
        import torch
    except ImportError:
        raise NoGpu("torch is not installed (pip install -e '.[torch]')") from None
    if not torch.cuda.is_available():
        raise NoGpu(f"torch {torch.__version__} has no usable CUDA (a CPU build, or a driver mismatch)")

    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return {
        "GPU": f"{count} x {text(name)}",
        "driver": text(driver),
        "torch": str(torch.__version__),
        "CUDA (torch)": str(torch.version.cuda),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def measure_nvml(rounds: int, every_call: bool = False) -> tuple[list[CallLatency], list[float]]:
    """Per-call latency over ``rounds`` collector rounds; ``every_call`` also reads the counters and
    per-process utilisation every round and times the calls the collector avoids (PCIe throughput,
    per-process utilisation from timestamp 0), so their cost is on record."""
    from mlops_obs.collectors import gpu as gpu_module

    config: dict[str, Any] = {"gpu.backend": "nvml", "gpu.xid-events": False, "gpu.profile": "full"}
    if every_call:
        config["gpu.counter-interval"] = 0.0
    c = gpu_module.GpuCollector(config)
    c.nvml.keep_samples = True
    times = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            list(c.sample())
            times.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.05)
        rows = latencies(c.nvml.stats)
        if every_call:
            lib, handle = c.nvml.lib, c.nvml.handles()[0]
            probes = (
                ("nvmlDeviceGetPcieThroughput (fallback, not called)", lib.nvmlDeviceGetPcieThroughput,
                 (handle, gpu_module.PCIE_TX)),
                ("nvmlDeviceGetProcessUtilization from timestamp 0", lib.nvmlDeviceGetProcessUtilization, (handle, 0)),
            )  # fmt: skip
            for label, fn, args in probes:
                wall, cpu = [], []
                for _ in range(5):
                    c0, t0 = time.thread_time(), time.perf_counter()
                    try:
                        fn(*args)
                    except Exception:
                        pass
                    wall.append(time.perf_counter() - t0)
                    cpu.append(time.thread_time() - c0)
                rows.append(
                    CallLatency(label, 5, percentile(wall, 0.5) * 1e6, percentile(wall, 0.99) * 1e6, max(wall) * 1e6,
                                percentile(cpu, 0.5) * 1e6)
                )  # fmt: skip
        return rows, times
    finally:
        c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> Report:
    machine = preflight()
    deadline = time.monotonic() + args.budget
    lat, rounds = measure_nvml(20)
    work = Path(tempfile.mkdtemp(prefix="mlops-obs-gpu-check-"))
    mp, logs = work / "multiproc", work / "logs"
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    exporter = subprocess.Popen(
        [
            py,
            "-m",
            "mlops_obs",
            "exporter",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--multiproc-dir={mp}",
            "--sampler.interval=1s",
            "--gpu.profile=full",  # every field: the check reads the shutdown threshold
            "--log.level=warn",
        ],
        env=env,
    )
    workload: subprocess.Popen[bytes] | None = None
    scrapes: list[Scrape] = []
    report = Report(machine, [], lat, round_ms=rounds)

    def scrape(phase: str) -> None:
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read().decode()
        took = time.perf_counter() - t0  # the scrape alone, not our parsing of it
        scrapes.append(Scrape(time.time(), phase, parse_scrape(body), took))
        if phase == "training" and args.scrape_output:
            args.scrape_output.write_text(body)  # the last training scrape, for promtool and the docs

    try:
        ready = url.rsplit("/", 1)[0] + "/-/ready"
        for _ in range(150):  # as a readiness probe would: the first round opens NVML, which takes a while
            try:
                with urllib.request.urlopen(ready, timeout=10):
                    break
            except OSError:  # refused while starting, 503 until every collector finished a round
                if exporter.poll() is not None:
                    raise NoGpu(f"the exporter exited with {exporter.returncode}") from None
                time.sleep(0.2)
        scrape("idle")
        time.sleep(2.5)  # a few sampler rounds for the idle baseline
        for _ in range(3):
            scrape("idle")
            time.sleep(1)
        cpu0 = scrapes[-1].series.get(("mlops_exporter_cpu_seconds_total", ()), 0.0)
        per0 = collector_cpu(scrapes[-1].series)
        t_cpu0 = time.monotonic()
        world = args.world_size or int(machine["GPU"].split(" x ")[0])
        workload = subprocess.Popen(
            [
                py,
                "-m",
                "mlops_obs",
                "workload",
                "--device=cuda",
                f"--world-size={world}",
                f"--steps={args.steps}",
                f"--batch-size={args.batch_size}",
                f"--job={JOB}",
                f"--multiproc-dir={mp}",
                f"--log-dir={logs}",
                "--log.level=warn",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        while workload.poll() is None and time.monotonic() < deadline - 15:
            time.sleep(1)
            scrape("training")
            if not report.loaded_latencies and evaluate_ranks(scrapes[-1].series):
                report.loaded_latencies, _ = measure_nvml(10, every_call=True)
        if workload.poll() is None:
            report.notes.append(
                f"workload stopped at the {args.budget:.0f}s budget before finishing {args.steps} steps"
            )
            workload.terminate()
            try:
                workload.wait(10)
            except subprocess.TimeoutExpired:
                workload.kill()
        report.workload_rc = workload.wait()
        for _ in range(3):
            time.sleep(1)
            scrape("after")
        cpu1 = scrapes[-1].series.get(("mlops_exporter_cpu_seconds_total", ()), 0.0)
        rss = scrapes[-1].series.get(("mlops_exporter_resident_memory_bytes", ()), float("nan"))
        wall = max(1e-9, time.monotonic() - t_cpu0)
        report.exporter = {"cpu_pct": 100 * (cpu1 - cpu0) / wall, "rss_mib": rss / 2**20}
        per1 = collector_cpu(scrapes[-1].series)
        report.collector_cpu_pct = {k: 100 * (v - per0.get(k, 0.0)) / wall for k, v in sorted(per1.items())}
    finally:
        if workload is not None and workload.poll() is None:
            workload.kill()
        exporter.terminate()
        try:
            exporter.wait(10)
        except subprocess.TimeoutExpired:
            exporter.kill()
        shutil.rmtree(work, ignore_errors=True)
    report.scrape_ms = [s.seconds * 1e3 for s in scrapes]
    report.checks = evaluate(scrapes)
    if report.workload_rc not in (0, None) and not report.notes:
        report.checks.append(Check("workload finished", False, f"exit code {report.workload_rc}"))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Exporter + CUDA workload sanity check (needs an NVIDIA GPU).")
    ap.add_argument("--steps", type=int, default=3000, help="Training steps per rank (the run is capped anyway).")
    ap.add_argument("--batch-size", type=int, default=4096, help="Samples per step per rank.")
    ap.add_argument("--world-size", type=int, default=0, help="Ranks (default: one per GPU).")
    ap.add_argument("--budget", type=float, default=270.0, help="Seconds for the whole check (at most 300).")
    ap.add_argument("--output", type=Path, help="Also write the Markdown report here (e.g. under docs/).")
    ap.add_argument("--scrape-output", type=Path, help="Write the last /metrics body seen during training here.")
    args = ap.parse_args(argv)
    if not 30 <= args.budget <= 300:
        print("gpu_check: --budget must be between 30 and 300 seconds", file=sys.stderr)
        return 2
    try:
        report = run(args)
    except NoGpu as e:
        print(f"gpu_check: cannot run here: {e}", file=sys.stderr)
        return 2
    text = render_report(report)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
