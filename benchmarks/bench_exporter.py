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
"""

from __future__ import annotations

import argparse
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

    def scrape(self) -> float:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Accept": "text/plain;version=0.0.4;q=0.5,*/*;q=0.1", "Accept-Encoding": "gzip"}
        t0 = time.perf_counter()
        try:
            self.conn.request("GET", self.path, headers=headers)
            resp = self.conn.getresponse()
            resp.read()
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
