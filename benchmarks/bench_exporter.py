#!/usr/bin/env python3
"""Scrape latency, CPU and RSS of the exporter against node_exporter and a naive exporter, in one run.

Reproduce with::

    .venv/bin/python benchmarks/bench_exporter.py            # ~3 minutes on a 2-core VM

The reference node: 8 fake H100s with the full field set (NVLink, ECC, throttling, GPM, one process
each), the host collector, and 8 training ranks (real processes using the SDK, writing snapshots to
the shared --multiproc-dir). Four exporters run side by side on the same machine, each its own
process on a loopback port:

* ``mlops-obs full``: ``mlops-obs exporter`` with every collector, sampling in the background at 1 s;
* ``mlops-obs host``: the same with only the host collector, the like-for-like peer of
* ``node_exporter``: Debian's ``prometheus-node-exporter`` with its default collectors;
* ``naive full``: the same collectors, called at scrape time from a prometheus_client registry, the
  way most Python exporters (nvitop's, gpustat-exporter's) read NVML.

Phase 1 scrapes the four round-robin (keep-alive, ``Accept-Encoding: gzip`` as Prometheus sends)
and reports p50/p99. Phase 2 gives each target a CPU window of ``--duration`` seconds in turn, scraping
it every ``--cpu-scrape-interval`` seconds (default 1 s, so the naive exporter reads NVML as often as
our sampler does), and reports CPU seconds per wall second (% of one core) from ``/proc/<pid>/stat``,
and the RSS at the end. During a target's window the other exporters are paused (SIGSTOP) while the
training ranks keep running: on a 2-core machine the naive exporter's ~50 ms of work a second would
otherwise be charged, through contention and evicted caches, to whoever is measured beside it.
``--cpu-mode=together`` runs one window with everything running, contention included.

The fake NVML answers instantly unless ``--nvml-latency-us`` is given; real NVML calls take tens of
microseconds to tens of milliseconds (``scripts/gpu_check.py`` measures them on a GPU), which the
background sampler hides and a naive exporter does not.

``--mode=15s``, ``--mode=60s`` and ``--mode=idle`` measure what a sidecar costs at the scrape
intervals people use, and with nothing scraping it: ``mlops-obs exporter`` with its defaults (host,
process, training and fake 8-GPU collectors), node_exporter, and (``--baseline-tree``) the same
exporter run from another source tree (the code before a change), all running at once, each scraped
on its own schedule (keep-alive, gzip), with CPU read from ``/proc/<pid>/task/*/schedstat``
(nanoseconds: clock ticks are too coarse at these levels) over one window of ``--window`` seconds
(default 300). Each exporter reads its own rank directory, written by ``--ranks`` training ranks running
the SDK of the same tree with its defaults::

    git worktree add --detach /tmp/base <base-commit>
    .venv/bin/python benchmarks/bench_exporter.py --mode=15s --baseline-tree=/tmp/base
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proc_cpu import process_cpu_ns  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")

RANK_CODE = """
import random, sys, time
from mlops_obs.instrument import TrainingMonitor
m = TrainingMonitor(job="bench", rank=int(sys.argv[1]), world_size=8, directory=sys.argv[2], flush_interval=1.0)
while True:
    with m.step(samples=32, tokens=32 * 512):
        with m.phase("forward"):
            time.sleep(0.02)
        with m.phase("backward"):
            time.sleep(0.03)
    m.record(loss=random.random(), grad_norm=1.0, lr=1e-4)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scenario(pids: list[int], latency_us: float) -> dict[str, Any]:
    devices = []
    for pid in pids:
        devices.append(
            {
                "fan_speed": 40,
                "ecc": {
                    "volatile": {"corrected": 1, "uncorrected": 0},
                    "aggregate": {"corrected": 7, "uncorrected": 0},
                },
                "nvlink_errors": {"replay": 0, "recovery": 0, "crc": 1},
                "throttle": {"power": 0.1, "thermal": 0.01},
                "processes": [{"pid": pid, "used_memory": 60_000_000_000, "sm_util": 85}],
            }
        )
    return {"devices": devices, "call_latency": latency_us / 1e6}


# --- the naive exporter: the same collectors, read on the scrape path ---------------------------------


def naive_server(port: int, config_json: str) -> None:
    from prometheus_client import start_http_server
    from prometheus_client.registry import REGISTRY

    from mlops_obs import collectors
    from mlops_obs.config import resolve
    from mlops_obs.exporter import settings

    # The same settings the exporter resolves, from the same flags: only the read path differs.
    config = resolve(settings(), json.loads(config_json), environ={})
    built = collectors.build(config)

    class ScrapeTime:
        def collect(self) -> Any:
            for c in built:
                yield from c.sample()

    for c in list(REGISTRY._collector_to_names):
        REGISTRY.unregister(c)
    REGISTRY.register(ScrapeTime())  # type: ignore[arg-type,unused-ignore]
    start_http_server(port, addr="127.0.0.1")
    while True:
        time.sleep(3600)


# --- measurement ----------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    path: str = "/metrics"
    latencies: list[float] = field(default_factory=list)
    conn: http.client.HTTPConnection | None = None
    series: int = 0
    bytes_plain: int = 0
    body: bytes = b""  # the last scrape's answer as sent (gzip when the server compressed it)

    def scrape(self) -> float:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Accept": "text/plain;version=0.0.4;q=0.5,*/*;q=0.1", "Accept-Encoding": "gzip"}
        t0 = time.perf_counter()
        try:
            self.conn.request("GET", self.path, headers=headers)
            resp = self.conn.getresponse()
            self.body = resp.read()
            if resp.getheader("Content-Encoding") == "gzip":
                self.body = gzip.decompress(self.body)
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = None
            raise
        dt = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}")
        if resp.will_close:
            self.conn.close()
            self.conn = None
        return dt

    def count_series(self) -> None:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request("GET", self.path)
        body = c.getresponse().read().decode()
        c.close()
        self.bytes_plain = len(body)
        self.series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            tail = f.read().rpartition(")")[2].split()
        return (int(tail[11]) + int(tail[12])) / CLK_TCK

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def cpu_window(measured: list[Target], scraped: list[Target], duration: float, interval: float) -> dict[str, float]:
    """CPU seconds per wall second of each measured target over ``duration``, scraping every ``interval``."""
    for t in scraped:  # a fresh connection: a paused server may have timed the idle one out
        if t.conn is not None:
            t.conn.close()
            t.conn = None
    cpu0 = {t.name: t.cpu_seconds() for t in measured}
    w0 = time.monotonic()
    next_scrape = w0
    while time.monotonic() - w0 < duration:
        if time.monotonic() >= next_scrape:
            for t in scraped:
                t.scrape()
            next_scrape += interval
        time.sleep(0.05)
    wall = time.monotonic() - w0
    return {t.name: (t.cpu_seconds() - cpu0[t.name]) / wall for t in measured}


def wait_ready(t: Target, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if t.proc.poll() is not None:
            raise SystemExit(f"bench: {t.name} exited with {t.proc.returncode} before it was ready")
        try:
            t.scrape()
            return
        except (OSError, http.client.HTTPException, RuntimeError):
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {t.name} not ready on port {t.port} after {timeout:.0f}s") from None
            time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, Linux {platform.release()}, Python {platform.python_version()}"


# --- cadence modes: CPU at real scrape intervals and idle, node_exporter side by side -----------------

CADENCE_RANK_CODE = """
import random, sys, time
from mlops_obs.instrument import TrainingMonitor
m = TrainingMonitor(job="bench", rank=int(sys.argv[1]), world_size=int(sys.argv[3]), directory=sys.argv[2])
while True:
    with m.step(samples=32, tokens=32 * 512):
        with m.phase("forward"):
            time.sleep(0.04)
        with m.phase("backward"):
            time.sleep(0.05)
    m.record(loss=random.random(), grad_norm=1.0, lr=1e-4)
"""


def collector_cpu(body: bytes) -> dict[str, float]:
    """``mlops_scrape_collector_cpu_seconds_total`` by collector, from an exporter's answer."""
    out: dict[str, float] = {}
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith('mlops_scrape_collector_cpu_seconds_total{collector="'):
            name = line.split('"', 2)[1]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def stat_ticks_seconds(pid: int) -> float:
    """user + system of the whole process, dead threads included, in clock ticks: the cross-check."""
    with open(f"/proc/{pid}/stat") as f:
        tail = f.read().rpartition(")")[2].split()
    return (int(tail[11]) + int(tail[12])) / CLK_TCK


def cadence_mode(args: argparse.Namespace, node_exporter: str) -> int:
    interval = {"15s": 15.0, "60s": 60.0, "idle": None}[args.mode]
    trees: list[tuple[str, Path]] = [("mlops-obs", ROOT)]
    if args.baseline_tree is not None:
        trees.append(("mlops-obs (baseline)", args.baseline_tree.resolve()))
    work = Path(tempfile.mkdtemp(prefix="mlops-obs-bench-cadence-"))
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    targets: list[Target] = []
    try:
        for name, tree in trees:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            mp = work / f"mp-{len(targets)}"
            mp.mkdir()
            ranks = [
                subprocess.Popen([py, "-c", CADENCE_RANK_CODE, str(r), str(mp), str(args.ranks)], env=env, cwd=tree)
                for r in range(args.ranks)
            ]
            procs += ranks
            scen = work / f"scenario-{len(targets)}.json"
            pids = [p.pid for p in ranks]
            scen.write_text(json.dumps(scenario((pids * 8)[:8], args.nvml_latency_us)))
            port = free_port()
            cmd = [py, "-m", "mlops_obs", "exporter", f"--web.listen-address=127.0.0.1:{port}", "--gpu.backend=fake",
                   f"--gpu.fake-scenario={scen}", f"--multiproc-dir={mp}", "--log.level=warn"]  # fmt: skip
            # cwd too: ``python -m`` and ``-c`` put the working directory first on sys.path.
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, cwd=tree)
            procs.append(p)
            targets.append(Target(name, p, port))
        ne_port = free_port()
        ne = subprocess.Popen(
            [node_exporter, f"--web.listen-address=127.0.0.1:{ne_port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(ne)
        targets.append(Target("node_exporter", ne, ne_port))
        for t in targets:
            wait_ready(t)
        deadline = time.monotonic() + 60
        while sum(1 for _ in work.glob("mp-*/*.rank.json")) < args.ranks * len(trees):
            if time.monotonic() > deadline:
                raise SystemExit("bench: the training ranks did not write their snapshots within 60s")
            time.sleep(0.2)
        for t in targets:
            t.count_series()
        print(
            f"cadence mode {args.mode}: settling {args.settle:g}s, then a {args.window:g}s window ...", file=sys.stderr
        )
        # Settle at the mode's own schedule, so the window sees the steady state, not start-up.
        t_end = time.monotonic() + args.settle
        next_scrape = time.monotonic()
        cpu0: dict[str, tuple[int, float]] = {}
        w0 = 0.0
        phase_end = t_end
        measuring = False
        scrapes = 0
        first_cpu: dict[str, dict[str, float]] = {}
        last_cpu: dict[str, dict[str, float]] = {}
        while True:
            now = time.monotonic()
            if now >= phase_end:
                if measuring:
                    break
                cpu0 = {t.name: (process_cpu_ns(t.proc.pid), stat_ticks_seconds(t.proc.pid)) for t in targets}
                w0 = now
                phase_end = now + args.window
                measuring = True
                scrapes = 0
            if interval is not None and now >= next_scrape:
                for t in targets:
                    t.scrape()
                scrapes += measuring
                if measuring:
                    # Each collector's rounds between the window's first and last scrape, as the exporter
                    # counts them: where its CPU goes, the rest being HTTP, wake-ups and housekeeping.
                    for t in targets:
                        if t.name != "node_exporter":
                            first_cpu.setdefault(t.name, collector_cpu(t.body))
                            last_cpu[t.name] = collector_cpu(t.body)
                next_scrape += interval
            time.sleep(max(0.0, min(phase_end, next_scrape if interval else phase_end) - time.monotonic()))
        wall = time.monotonic() - w0
        cpu = {
            t.name: ((process_cpu_ns(t.proc.pid) - cpu0[t.name][0]) / 1e9 / wall,
                     (stat_ticks_seconds(t.proc.pid) - cpu0[t.name][1]) / wall)
            for t in targets
        }  # fmt: skip
        rss = {t.name: t.rss_bytes() for t in targets}
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {machine()}")
    what = "no scrapes (idle)" if interval is None else f"a scrape every {interval:g} s ({scrapes} in the window)"
    print(f"mode {args.mode}: {what}; window {wall:.0f} s after {args.settle:g} s settling; {args.ranks} ranks per "
          "exporter (SDK defaults); exporters with their defaults (host, process, training, fake 8-GPU)")  # fmt: skip
    print(f"{'target':<24}{'series':>8}{'CPU %core':>11}{'(ticks)':>9}{'RSS MiB':>9}")
    rows = []
    for t in targets:
        ns, ticks = cpu[t.name]
        print(f"{t.name:<24}{t.series:>8}{ns * 100:>11.3f}{ticks * 100:>9.2f}{rss[t.name] / 2**20:>9.1f}")
        rows.append({"target": t.name, "series": t.series, "cpu_pct": ns * 100, "cpu_pct_ticks": ticks * 100,
                     "rss_mib": rss[t.name] / 2**20})  # fmt: skip
    ne_cpu = cpu["node_exporter"][0]
    print("ratios (CPU):")
    for t in targets:
        if t.name != "node_exporter":
            print(f"  {t.name} / node_exporter: {cpu[t.name][0] / ne_cpu:.2f}x" if ne_cpu else "  n/a")
    if args.baseline_tree is not None:
        base = cpu["mlops-obs (baseline)"][0]
        print(f"  mlops-obs / mlops-obs (baseline): {cpu['mlops-obs'][0] / base:.3f}x" if base else "  n/a")
    per_collector: dict[str, dict[str, float]] = {}
    if interval is not None and scrapes > 1:
        print(f"ms of CPU per {interval:g} s scrape interval (mlops_scrape_collector_cpu_seconds_total between the "
              "window's first and last scrape; 'rest' is the process's schedstat less the rounds: HTTP, "
              "wake-ups, housekeeping, the XID thread):")  # fmt: skip
        for name in first_cpu:
            a, b = first_cpu[name], last_cpu[name]
            per = {c: (b[c] - a.get(c, 0.0)) * 1e3 / (scrapes - 1) for c in b}
            per["rest"] = cpu[name][0] * interval * 1e3 - sum(per.values())
            per_collector[name] = per
            print(f"  {name:<22}" + "  ".join(f"{c} {v:.2f}" for c, v in per.items()))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "window_s": wall, "rows": rows, "per_collector_ms": per_collector},
                                        indent=2))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--scrapes", type=int, default=200, help="Scrapes per target in the latency phase.")
    ap.add_argument("--duration", type=float, default=30.0, help="Seconds of each CPU window.")
    ap.add_argument(
        "--cpu-mode",
        choices=("alone", "together"),
        default="alone",
        help="alone: each target's CPU window runs with the other exporters paused (SIGSTOP), the training "
        "ranks still running, so no target's work inflates another's figure; together: one window, all running.",
    )
    ap.add_argument("--cpu-scrape-interval", type=float, default=1.0, help="Seconds between scrapes, CPU phase.")
    ap.add_argument("--nvml-latency-us", type=float, default=0.0, help="Simulated latency of each fake NVML call.")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    ap.add_argument(
        "--mode",
        choices=("latency", "15s", "60s", "idle"),
        default="latency",
        help="latency: the phases above at a 1 s scrape; 15s, 60s: CPU at that scrape interval; idle: "
        "CPU with no scrapes (see the module's docstring).",
    )
    ap.add_argument("--window", type=float, default=300.0, help="Seconds of the CPU window (cadence modes).")
    ap.add_argument("--settle", type=float, default=60.0, help="Seconds run before the window (cadence modes).")
    ap.add_argument("--ranks", type=int, default=4, help="Training ranks per exporter (cadence modes).")
    ap.add_argument(
        "--baseline-tree",
        type=Path,
        help="Also run the exporter and ranks from this source tree (cadence modes): the before.",
    )
    ap.add_argument("--naive-server", nargs=2, metavar=("PORT", "CONFIG_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.naive_server:
        naive_server(int(args.naive_server[0]), args.naive_server[1])
        return 0

    node_exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if node_exporter is None:
        print(
            "bench: prometheus-node-exporter is not installed (apt-get install prometheus-node-exporter)",
            file=sys.stderr,
        )
        return 2
    if args.mode != "latency":
        return cadence_mode(args, node_exporter)

    work = Path(tempfile.mkdtemp(prefix="mlops-obs-bench-"))
    mp = work / "multiproc"
    mp.mkdir()
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs: list[subprocess.Popen[bytes]] = []
    targets: list[Target] = []
    try:
        ranks = [subprocess.Popen([py, "-c", RANK_CODE, str(r), str(mp)], env=env) for r in range(8)]
        procs += ranks
        scen = work / "scenario.json"
        scen.write_text(json.dumps(scenario([p.pid for p in ranks], args.nvml_latency_us)))
        deadline = time.monotonic() + 60
        while len(list(mp.glob("*.rank.json"))) < 8:
            if time.monotonic() > deadline:
                raise SystemExit("bench: the 8 training ranks did not write their snapshots within 60s")
            time.sleep(0.2)

        common = [
            "--gpu.backend=fake",
            f"--gpu.fake-scenario={scen}",
            f"--multiproc-dir={mp}",
            "--sampler.interval=1s",
            "--log.level=warn",
        ]

        def exporter(name: str, *extra: str) -> Target:
            port = free_port()
            cmd = [py, "-m", "mlops_obs", "exporter", f"--web.listen-address=127.0.0.1:{port}", *common, *extra]
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
            procs.append(p)
            return Target(name, p, port)

        targets.append(exporter("mlops-obs full"))
        targets.append(
            exporter("mlops-obs host", "--no-collector.gpu", "--no-collector.training", "--no-collector.process")
        )
        ne_port = free_port()
        ne = subprocess.Popen(
            [node_exporter, f"--web.listen-address=127.0.0.1:{ne_port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(ne)
        targets.append(Target("node_exporter", ne, ne_port))

        naive_port = free_port()
        naive_cfg = json.dumps({"gpu.backend": "fake", "gpu.fake-scenario": str(scen), "multiproc-dir": str(mp)})
        naive = subprocess.Popen(
            [py, str(Path(__file__).resolve()), "--naive-server", str(naive_port), naive_cfg],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        procs.append(naive)
        targets.append(Target("naive full", naive, naive_port))

        for t in targets:
            wait_ready(t)
        time.sleep(3.0)  # let every sampler finish a few rounds (GPM needs two)
        for t in targets:
            t.count_series()

        print(f"latency phase: {args.scrapes} scrapes per target, round-robin ...", file=sys.stderr)
        for _ in range(args.scrapes):
            for t in targets:
                t.latencies.append(t.scrape())

        print(
            f"CPU phase ({args.cpu_mode}): {args.duration:.0f}s windows, "
            f"a scrape every {args.cpu_scrape_interval:g}s ...",
            file=sys.stderr,
        )
        if args.cpu_mode == "together":
            cpu = cpu_window(targets, targets, args.duration, args.cpu_scrape_interval)
        else:
            cpu = {}
            for t in targets:
                others = [o for o in targets if o is not t]
                for o in others:
                    o.proc.send_signal(signal.SIGSTOP)
                try:
                    time.sleep(1.0)  # let the measured one settle after the previous window
                    cpu.update(cpu_window([t], [t], args.duration, args.cpu_scrape_interval))
                finally:
                    for o in others:
                        o.proc.send_signal(signal.SIGCONT)
        rss = {t.name: t.rss_bytes() for t in targets}
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        shutil.rmtree(work, ignore_errors=True)

    rows: list[dict[str, Any]] = []
    for t in targets:
        rows.append(
            {
                "target": t.name,
                "series": t.series,
                "bytes": t.bytes_plain,
                "p50_ms": pct(t.latencies, 0.50) * 1e3,
                "p99_ms": pct(t.latencies, 0.99) * 1e3,
                "mean_ms": statistics.fmean(t.latencies) * 1e3,
                "cpu_pct": cpu[t.name] * 100,
                "rss_mib": rss[t.name] / 2**20,
            }
        )
    by = {r["target"]: r for r in rows}
    header = f"{'target':<16}{'series':>8}{'p50 ms':>9}{'p99 ms':>9}{'CPU %core':>11}{'RSS MiB':>9}"
    print(f"machine: {machine()}")
    print(
        f"nvml call latency (simulated): {args.nvml_latency_us:g} us; sampling interval 1 s; "
        f"CPU windows of {args.duration:g} s ({args.cpu_mode}) with a scrape every {args.cpu_scrape_interval:g} s"
    )
    print(header)
    for r in rows:
        print(
            f"{r['target']:<16}{r['series']:>8}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['cpu_pct']:>11.2f}"
            f"{r['rss_mib']:>9.1f}"
        )

    def ratio(a: str, b: str, key: str) -> str:
        return f"{by[a][key] / by[b][key]:.2f}x" if by[b][key] else "n/a"

    print("ratios:")
    for a, b in (
        ("mlops-obs full", "naive full"),
        ("mlops-obs host", "node_exporter"),
        ("mlops-obs full", "node_exporter"),
    ):
        print(
            f"  {a} / {b}: p50 {ratio(a, b, 'p50_ms')}, p99 {ratio(a, b, 'p99_ms')}, "
            f"CPU {ratio(a, b, 'cpu_pct')}, RSS {ratio(a, b, 'rss_mib')}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
