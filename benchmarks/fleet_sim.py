#!/usr/bin/env python3
"""A simulated fleet of mlops-obs sidecars: one process serving N nodes' ``/metrics`` on N loopback ports.

Hundreds of real exporters would not fit in one machine's memory, and what a Prometheus pays for is the
series, their labels and how their values move, not who rendered them. So the bodies come from the real
exporter, rendered a handful of times (:func:`render_templates`: ``mlops-obs exporter`` on the fake NVML
backend with its host, process and training collectors and real ranks using the SDK), and every
simulated node serves one of them with its own identity and values:

* labels: GPU UUIDs, process ids, the training ``job``, the global ``rank`` and the ``node`` differ per
  node; ranks of one job are spread over consecutive nodes (8 a node), jobs span 1 to 32 nodes, and a
  share of the nodes run no job (the "idle" body: GPUs allocated to nobody);
* counters advance at the rate the real exporter's two renderings showed, scaled per node (so
  ``rate()`` sees realistic, differing throughputs), histograms stay cumulative, integers stay integers;
* live gauges (ratios, temperatures, power, clocks, memory in use, durations, loss) move on a slow
  per-series sine, configuration gauges (limits, totals, info, flags, world size) stay fixed, and
  ``*_timestamp_seconds`` gauges keep their age (a heartbeat stays fresh, as on a healthy node) while
  ``*_time_seconds`` (process start times) stay put.

Bodies are served uncompressed (a real sidecar gzips when asked): on loopback the simulator would spend
its CPU compressing and Prometheus decompressing, and neither is what the fleet benchmark measures.

Run ``fleet_sim.py serve --templates T.json --nodes N --ready FILE``; it writes the ports as JSON to FILE
once every port listens, and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_NODE = "tmpl-node"
TEMPLATE_JOB = "tmpl-job"
RANKS_PER_NODE = 8

RANK_CODE = """
import random, sys, time
from mlops_obs.instrument import TrainingMonitor
m = TrainingMonitor(job=sys.argv[3], rank=int(sys.argv[1]), world_size=int(sys.argv[4]), directory=sys.argv[2],
                    node=sys.argv[5], flush_interval=0.5)
while True:
    with m.step(samples=32, tokens=32 * 512):
        with m.phase("data"):
            time.sleep(0.005)
        with m.phase("forward"):
            time.sleep(0.02)
        with m.phase("backward"):
            time.sleep(0.03)
    m.record(loss=random.random(), grad_norm=1.0, lr=1e-4)
"""

# Gauges whose value moves with the workload; every other gauge is configuration or state and stays fixed.
LIVE_GAUGE = re.compile(
    r"_(ratio|celsius|watts|hertz|used_bytes|free_bytes|available_bytes|avail_bytes|reserved_bytes|seconds"
    r"|load|loss|grad_norm|learning_rate|per_second)$"
)
COUNTER_KINDS = {"counter", "histogram", "summary"}
SERIES_LINE = re.compile(r"^([^ {]+)(\{.*\})? (\S+)$")


# --- rendering the real bodies ----------------------------------------------------------------------------


def _scenario(pids: list[int], busy: bool) -> dict[str, Any]:
    devices = []
    for i in range(RANKS_PER_NODE):
        dev: dict[str, Any] = {
            "ecc": {"volatile": {"corrected": 1, "uncorrected": 0}, "aggregate": {"corrected": 7, "uncorrected": 0}},
            "nvlink_errors": {"replay": 0, "recovery": 0, "crc": 1},
            "throttle": {"power": 0.1, "thermal": 0.01},
        }
        if busy:
            dev["processes"] = [{"pid": pids[i % len(pids)], "used_memory": 60_000_000_000, "sm_util": 85}]
        else:
            dev.update(
                utilization=0,
                memory_utilization=0,
                memory_used=600_000_000,
                power_mw=70_000,
                gpm={"sm_active": 0.0, "tensor_active": 0.0, "dram_active": 0.0, "graphics_engine_active": 0.0},
            )
        devices.append({"count": 1, **dev})
    return {"devices": devices}


def _get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def _wait(pred: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"fleet_sim: {what} within {timeout:g}s")
        time.sleep(0.1)


def render_templates(ranks: int = RANKS_PER_NODE, gap: float = 4.0) -> dict[str, Any]:
    """Two renderings ``gap`` seconds apart of a training node (``ranks`` SDK ranks, 8 busy fake H100s,
    host and process collectors) and of an idle node (same GPUs, no processes, no ranks)."""
    from mlops_obs.children import free_port

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"gap": gap, "bodies": {}}
    with tempfile.TemporaryDirectory(prefix="fleet-tmpl-") as tmp:
        work = Path(tmp)
        try:
            mp = work / "mp"
            mp.mkdir()
            (work / "mp-idle").mkdir()
            ranks_p = [
                subprocess.Popen(
                    [sys.executable, "-c", RANK_CODE, str(r), str(mp), TEMPLATE_JOB, str(ranks), TEMPLATE_NODE], env=env
                )
                for r in range(ranks)
            ]
            procs += ranks_p
            _wait(lambda: len(list(mp.glob("*.rank.json"))) >= ranks, f"{ranks} ranks did not write snapshots")
            urls = {}
            for kind, busy, mpdir in (("training", True, mp), ("idle", False, work / "mp-idle")):
                scen = work / f"{kind}.json"
                scen.write_text(json.dumps(_scenario([p.pid for p in ranks_p], busy)))
                port = free_port()
                cmd = [
                    sys.executable,
                    "-m",
                    "mlops_obs",
                    "exporter",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--gpu.backend=fake",
                    f"--gpu.fake-scenario={scen}",
                    f"--multiproc-dir={mpdir}",
                    "--sampler.interval=0.5s",
                    "--log.level=warn",
                ]
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
                urls[kind] = f"http://127.0.0.1:{port}/metrics"

            def ready(url: str) -> bool:
                try:  # the GPU counter interval needs two rounds before utilisation ratios appear
                    return "mlops_gpu_sm_active_ratio" in _get(url, 2)
                except OSError:
                    return False

            for url in urls.values():
                _wait(lambda u=url: ready(u), f"the template exporter at {url} was not ready")
            first = {k: _get(u) for k, u in urls.items()}
            time.sleep(gap)  # the rate of every counter comes from this real interval
            for k, u in urls.items():
                out["bodies"][k] = [first[k], _get(u)]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    out["ranks"] = ranks
    return out


# --- templates and nodes ------------------------------------------------------------------------------------


@dataclass
class Template:
    """One rendered body split into a ``%r``-format string and per-sample value arrays."""

    fmt: str
    base: np.ndarray[Any, np.dtype[np.float64]]  # value in the second rendering
    rate: np.ndarray[Any, np.dtype[np.float64]]  # per second, counters only
    live: np.ndarray[Any, np.dtype[np.bool_]]  # jittered gauges
    stamp: np.ndarray[Any, np.dtype[np.bool_]]  # *_timestamp_seconds: keep their age
    integral: np.ndarray[Any, np.dtype[np.bool_]]
    names: list[str]
    series: int

    @classmethod
    def parse(cls, first: str, second: str, gap: float) -> Template:
        before = {}
        for line in first.splitlines():
            if line and not line.startswith("#"):
                key, _, val = line.rpartition(" ")
                before[key] = float(val)
        kinds: dict[str, str] = {}
        fmt: list[str] = []
        base, rate, live, stamp, integral, names = [], [], [], [], [], []
        family = ""
        for line in second.splitlines():
            if line.startswith("# TYPE "):
                _, _, family, kind = line.split(" ", 3)
                kinds[family] = kind
            if not line or line.startswith("#"):
                fmt.append(line.replace("%", "%%"))
                continue
            m = SERIES_LINE.match(line)
            if m is None:
                raise ValueError(f"fleet_sim: cannot parse exposition line {line[:120]!r}")
            key, value = line.rsplit(" ", 1)
            name = m.group(1)
            kind = kinds.get(family, "untyped") if name.startswith(family) else "untyped"
            v2 = float(value)
            v1 = before.get(key, v2)
            counter = kind in COUNTER_KINDS and not name.endswith("_created") and "quantile=" not in key
            fmt.append(key.replace("%", "%%") + " %r")
            base.append(v2)
            rate.append(max(0.0, (v2 - v1) / gap) if counter else 0.0)
            is_stamp = "timestamp" in name and not counter
            stamp.append(is_stamp)
            fixed = counter or is_stamp or name.endswith("_time_seconds") or v2 == 0.0  # e.g. a start time
            live.append(not fixed and bool(LIVE_GAUGE.search(name)))
            integral.append(v2 == int(v2) and v1 == int(v1) and not is_stamp if math.isfinite(v2) else False)
            names.append(name)
        return cls(
            fmt="\n".join(fmt) + "\n",
            base=np.array(base),
            rate=np.array(rate),
            live=np.array(live),
            stamp=np.array(stamp),
            integral=np.array(integral),
            names=names,
            series=len(base),
        )


@dataclass
class NodeSpec:
    index: int
    kind: str  # template name
    job: str | None
    first_rank: int
    world_size: int


def plan_fleet(n: int, seed: int = 1) -> list[NodeSpec]:
    """Jobs of 1..32 nodes over consecutive nodes, about one node in eight idle, deterministic for a seed."""
    rnd = random.Random(seed)
    specs: list[NodeSpec] = []
    job_sizes = (1, 2, 4, 8, 16, 32)
    i = j = 0
    while i < n:
        if rnd.random() < 0.12:
            specs.append(NodeSpec(i, "idle", None, 0, 0))
            i += 1
            continue
        size = min(rnd.choice(job_sizes), n - i)
        for k in range(size):
            specs.append(NodeSpec(i + k, "training", f"job-{j:04d}", k * RANKS_PER_NODE, size * RANKS_PER_NODE))
        i, j = i + size, j + 1
    return specs


class Node:
    """One simulated sidecar: its template with its labels substituted, and its own value variation."""

    def __init__(self, spec: NodeSpec, tmpl: Template, t0: float, seed: int) -> None:
        rnd = np.random.default_rng(seed)
        self.spec = spec
        self.tmpl = tmpl
        name = f"gpu-node-{spec.index:04d}"
        fmt = tmpl.fmt.replace(f'node="{TEMPLATE_NODE}"', f'node="{name}"')
        fmt = fmt.replace("-fake-", f"-{spec.index:04x}-")  # GPU UUIDs
        fmt = re.sub(r'pid="(\d+)"', lambda m: f'pid="{int(m.group(1)) + 1000 * spec.index}"', fmt)
        if spec.job is not None:
            fmt = fmt.replace(f'job="{TEMPLATE_JOB}"', f'job="{spec.job}"')
            fmt = re.sub(r'rank="(\d+)"', lambda m: f'rank="{int(m.group(1)) + spec.first_rank}"', fmt)
        self.fmt = fmt
        self.base = tmpl.base.copy()
        for i, metric in enumerate(tmpl.names):
            if metric == "mlops_training_world_size":
                self.base[i] = spec.world_size
        self.speed = rnd.uniform(0.8, 1.2)  # this node's throughput relative to the template's
        self.level = np.where(tmpl.live, rnd.uniform(0.85, 1.1, tmpl.series), 1.0)
        self.phase = rnd.uniform(0, 2 * math.pi, tmpl.series)
        self.age = t0 - tmpl.base  # seconds since each timestamp gauge was set, at t0
        self.t0 = t0

    def body(self, now: float) -> bytes:
        t = self.tmpl
        v = self.base + t.rate * (self.speed * (now - self.t0))
        wave = self.base * self.level * (1.0 + 0.05 * np.sin(now / 300.0 + self.phase))
        v = np.where(t.live, wave, v)
        v = np.where(t.stamp, now - self.age, v)
        v = np.where(t.integral, np.floor(v), v)
        return (self.fmt % tuple(v.tolist())).encode()


def build_fleet(templates: dict[str, Any], n: int, seed: int = 1) -> list[Node]:
    gap = float(templates["gap"])
    parsed = {k: Template.parse(b[0], b[1], gap) for k, b in templates["bodies"].items()}
    now = time.time()
    return [Node(s, parsed[s.kind], now, seed * 100_003 + s.index) for s in plan_fleet(n, seed)]


# --- serving ---------------------------------------------------------------------------------------------


async def _serve_node(node: Node, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].split()
            if len(line) < 2 or line[0] != b"GET":
                status, body = b"405 Method Not Allowed", b"GET /metrics\n"
            elif line[1].split(b"?")[0] != b"/metrics":
                status, body = b"404 Not Found", b"GET /metrics\n"
            else:
                status, body = b"200 OK", node.body(time.time())
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve(nodes: list[Node], ready: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = []
    ports = []
    for node in nodes:
        srv = await asyncio.start_server(
            lambda r, w, n=node: _serve_node(n, r, w),
            "127.0.0.1",
            0,
            backlog=16,
        )
        servers.append(srv)
        ports.append(int(srv.sockets[0].getsockname()[1]))
    meta = [{"port": p, "kind": n.spec.kind, "job": n.spec.job, "series": n.tmpl.series} for p, n in zip(ports, nodes)]
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.rename(ready)  # atomically: the reader sees all ports or none
    await stop.wait()
    for srv in servers:
        srv.close()


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="Render the template bodies from real exporters into a JSON file.")
    r.add_argument("out", type=Path)
    r.add_argument("--ranks", type=int, default=RANKS_PER_NODE)
    s = sub.add_parser("serve", help="Serve N simulated nodes until SIGTERM.")
    s.add_argument("--templates", type=Path, required=True)
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--ready", type=Path, required=True, help="Where to write the ports (JSON) once listening.")
    s.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.cmd == "render":
        args.out.write_text(json.dumps(render_templates(args.ranks)))
        return 0
    raise_fd_limit(2 * args.nodes + 64)  # a listening socket and a scrape connection per node
    nodes = build_fleet(json.loads(args.templates.read_text()), args.nodes, args.seed)
    asyncio.run(_serve(nodes, args.ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
