#!/usr/bin/env python3
"""Scrape latency and CPU of the exporter's HTTP server, old (threaded ``http.server``) against new
(asyncio + h11, ``mlops_obs.web``), in one run, with and without 500 slow connections open.

Reproduce with::

    .venv/bin/python benchmarks/bench_http.py              # ~1 minute on a 2-core VM

Each server runs in its own process with the same realistic sampler behind it: 8 fake H100s with the
full field set and the host collector, sampled every second (~200 KB of exposition text). The old
server is the one of commit ``--baseline-rev`` (the last before ``mlops_obs.web``), read from git,
so both are measured on this machine in the same run. For each server, in turn (the other one
paused with SIGSTOP, so neither is charged for the other's work):

1. **quiet**: ``--scrapes`` scrapes of ``/metrics`` on one kept-alive connection, identity and
   gzip (``Accept-Encoding: gzip`` as Prometheus sends); p50/p99, and the server's CPU per scrape
   (from ``/proc/<pid>/stat``, less its idle CPU rate over the same wall time).
2. **500 slow**: 500 connections are opened, each sending one more header line every 2 s (a
   slowloris; reopened when the server closes one). Then ``--slow-scrapes`` requests each of
   ``/metrics`` (gzip) on the kept-alive connection, and of ``/-/healthy`` and ``/metrics`` on a
   fresh connection each time (as a kubelet probe, and a Prometheus after an idle close, do). A
   request that fails or takes over 5 s counts as failed.

Reported as p50/p99 in milliseconds, failures, and new/old ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_exporter  # noqa: E402
from bench_exporter import CLK_TCK, free_port, pct  # noqa: E402

# main before mlops_obs.web: exporter/server.py on ThreadingHTTPServer.
BASELINE_REV = "970ed093e349ac61e8aa2dfdcf2ab7fc6d3ceb3a"
TIMEOUT = 5.0


# --- the server processes -------------------------------------------------------------------------------


def _old_server_class(rev: str, work: Path) -> Any:
    """``ExporterServer`` of ``rev``, loaded from git with its web config module beside it."""
    import importlib

    pkg = work / "oldserver"
    pkg.mkdir(exist_ok=True)
    for name in ("server", "web_config"):
        src = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:mlops_obs/exporter/{name}.py"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        src = src.replace("from mlops_obs.exporter.web_config import", "from oldserver_web_config import")
        (pkg / f"oldserver_{name}.py").write_text(src)
    sys.path.insert(0, str(pkg))
    return importlib.import_module("oldserver_server").ExporterServer


def serve(kind: str, port: int, rev: str, work: Path) -> None:
    from mlops_obs import collectors
    from mlops_obs.config import resolve
    from mlops_obs.exporter import settings
    from mlops_obs.exporter.sampler import Sampler
    from mlops_obs.logs import configure, get_logger

    configure("warn", "logfmt")
    log = get_logger(component="bench")
    scen = work / f"scenario-{kind}.json"
    scen.write_text(json.dumps(bench_exporter.scenario([os.getpid()] * 8, 0.0)))
    cfg = resolve(
        settings(),
        {"gpu.backend": "fake", "gpu.fake-scenario": str(scen), "collector.process": False,
         "collector.training": False, "sampler.interval": "1s"},
        environ={},
    )  # fmt: skip
    sampler = Sampler(collectors.build(cfg), 1.0, 5.0, log)
    if kind == "old":
        cls = _old_server_class(rev, work)
    else:
        from mlops_obs.exporter.server import ExporterServer as cls
    server = cls(("127.0.0.1", port), sampler, "/metrics", log=log, max_requests=40)
    sampler.start()
    server.start_background()
    signal.sigwait({signal.SIGTERM})


# --- clients --------------------------------------------------------------------------------------------


def request(conn: http.client.HTTPConnection, path: str, gz: bool) -> tuple[float, int]:
    headers = {"Accept-Encoding": "gzip"} if gz else {}
    t0 = time.perf_counter()
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    dt = time.perf_counter() - t0
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}")
    return dt, len(data)


def fresh(port: int, path: str, gz: bool) -> float:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        t0 = time.perf_counter()
        request(c, path, gz)
        return time.perf_counter() - t0  # connect included
    finally:
        c.close()


class Slowloris:
    """``n`` connections each sending one header line every ``every`` seconds; reopened when closed."""

    def __init__(self, port: int, n: int, every: float = 2.0) -> None:
        self.port, self.n, self.every = port, n, every
        self.stop = threading.Event()
        self.reopened = 0
        self.open_now = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            s.setblocking(False)
            return s
        except OSError:
            return None

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        socks: list[socket.socket | None] = [self._open() for _ in range(self.n)]
        for s in socks:
            if s is not None:
                sel.register(s, selectors.EVENT_READ)
        i = 0
        while not self.stop.is_set():
            for key, _ in sel.select(timeout=self.every / self.n):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    closed = s.recv(4096) == b""
                except (BlockingIOError, InterruptedError):
                    closed = False
                except OSError:
                    closed = True
                if closed:
                    sel.unregister(s)
                    s.close()
                    socks[socks.index(s)] = None
            s = socks[i]
            if s is None:
                s = socks[i] = self._open()
                self.reopened += 1
                if s is not None:
                    sel.register(s, selectors.EVENT_READ)
            else:
                try:
                    s.send(b"X-Slow-%d: 1\r\n" % i)
                except OSError:
                    pass
            self.open_now = sum(1 for x in socks if x is not None)
            i = (i + 1) % self.n
        for x in socks:
            if x is not None:
                x.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        tail = f.read().rpartition(")")[2].split()
    return (int(tail[11]) + int(tail[12])) / CLK_TCK


def measure(pid: int, port: int, scrapes: int, slow: int, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Idle CPU rate (the sampler's rounds), to be taken off the per-scrape figure.
    c0, w0 = cpu_seconds(pid), time.monotonic()
    time.sleep(3.0)
    idle_rate = (cpu_seconds(pid) - c0) / (time.monotonic() - w0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    for gz in (False, True):
        lat: list[float] = []
        size = 0
        c0, w0 = cpu_seconds(pid), time.monotonic()
        for _ in range(scrapes):
            dt, size = request(conn, "/metrics", gz)
            lat.append(dt)
        wall = time.monotonic() - w0
        cpu = (cpu_seconds(pid) - c0 - idle_rate * wall) / scrapes
        key = "gzip" if gz else "identity"
        out[f"quiet {key}"] = {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "cpu": cpu, "bytes": size, "failed": 0}
    loris = Slowloris(port, slow)
    loris.thread.start()
    time.sleep(3.0)  # every slow connection has sent a few lines
    phases = (("500 slow, /metrics gzip kept-alive", None), ("500 slow, /-/healthy fresh", "/-/healthy"),
              ("500 slow, /metrics gzip fresh", "/metrics"))  # fmt: skip
    for label, path in phases:
        lat, failed = [], 0
        for _ in range(n):
            try:
                if path is None:
                    lat.append(request(conn, "/metrics", True)[0])
                else:
                    lat.append(fresh(port, path, path == "/metrics"))
            except (OSError, http.client.HTTPException, RuntimeError):
                failed += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            time.sleep(0.02)
        p50, p99 = (pct(lat, 0.5), pct(lat, 0.99)) if lat else (float("nan"), float("nan"))
        out[label] = {"p50": p50, "p99": p99, "cpu": None, "bytes": None, "failed": failed, "n": n}
    out["slow connections open at the end"] = loris.open_now
    loris.stop.set()
    loris.thread.join()
    conn.close()
    return out


def machine() -> str:
    return f"{bench_exporter.machine()}, load {os.getloadavg()[0]:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--scrapes", type=int, default=2000, help="Scrapes per quiet phase (CPU ticks are 10 ms).")
    ap.add_argument("--slow-scrapes", type=int, default=60, help="Requests per phase with slow connections.")
    ap.add_argument("--slow", type=int, default=500, help="Slow connections in the second phase.")
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="Commit whose exporter/server.py is 'old'.")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    ap.add_argument("--serve", nargs=3, metavar=("KIND", "PORT", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.baseline_rev, Path(args.serve[2]))
        return 0

    work = Path(tempfile.mkdtemp(prefix="mlops-obs-bench-http-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for kind in ("old", "new"):
            port = free_port()
            p = subprocess.Popen(
                [sys.executable, __file__, "--baseline-rev", args.baseline_rev, "--serve", kind, str(port), str(work)],
                env=env,
            )
            servers[kind] = (p, port)
        for kind, (p, port) in servers.items():
            deadline = time.monotonic() + 60
            while True:
                try:
                    fresh(port, "/-/ready", False)
                    break
                except (OSError, http.client.HTTPException, RuntimeError):
                    if p.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"bench: the {kind} server did not become ready") from None
                    time.sleep(0.2)
        results: dict[str, dict[str, Any]] = {}
        for kind in ("old", "new"):
            other = servers["new" if kind == "old" else "old"][0]
            other.send_signal(signal.SIGSTOP)
            try:
                results[kind] = measure(
                    servers[kind][0].pid, servers[kind][1], args.scrapes, args.slow, args.slow_scrapes
                )
            finally:
                other.send_signal(signal.SIGCONT)
    finally:
        for p, _ in servers.values():
            p.send_signal(signal.SIGTERM)
        for p, _ in servers.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    print(f"# bench_http: {machine()}")
    print(
        f"# baseline: {args.baseline_rev[:12]} exporter/server.py; body {results['new']['quiet identity']['bytes']} B"
    )
    print()
    print("| phase | old p50 ms | old p99 ms | old failed | new p50 ms | new p99 ms | new failed | p50 new/old |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, new in results["new"].items():
        if not isinstance(new, dict):
            continue
        old = results["old"][label]
        ratio = new["p50"] / old["p50"] if old["p50"] == old["p50"] and old["p50"] else float("nan")
        n = f"/{new['n']}" if "n" in new else ""
        print(
            f"| {label} | {old['p50'] * 1e3:.2f} | {old['p99'] * 1e3:.2f} | {old['failed']}{n} | "
            f"{new['p50'] * 1e3:.2f} | {new['p99'] * 1e3:.2f} | {new['failed']}{n} | {ratio:.2f} |"
        )
    print()
    for label in ("quiet identity", "quiet gzip"):
        o, n = results["old"][label]["cpu"], results["new"][label]["cpu"]
        print(f"CPU per scrape, {label}: old {o * 1e3:.3f} ms, new {n * 1e3:.3f} ms (new/old {n / o:.2f})")
    for kind in ("old", "new"):
        print(f"{kind}: slow connections still open at the end: {results[kind]['slow connections open at the end']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
