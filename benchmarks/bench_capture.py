#!/usr/bin/env python3
"""What the launcher's output capture costs a rank: a chatty writer straight into a file (the old
``<job>-rank<R>.stderr.log``) against the same writer through a pipe into the CRI file
(``mlops_obs.workload.capture``), side by side in one run, and the launcher's CPU during a real run.

Reproduce with::

    .venv/bin/python benchmarks/bench_capture.py            # ~1 minute on a 2-core VM

1. **writers**: ``--writers`` processes at once (1, then 8), each printing ``--lines`` lines of
   ``--size`` bytes to stderr, one ``write`` a line (stderr is line-buffered, as torch's and NCCL's
   prints are), then 200 lines of 40 KiB (split into 16 KiB ``P`` records). Each writer times itself;
   the figure is the median over writers and ``--repeat`` rounds of its wall time, direct and
   captured, and the capture's CPU seconds per MB (this process's CPU, where the reader threads run).
2. **workload**: a real 2-rank ``mlops-obs workload`` run (300 steps, a step line every step); the
   launcher's CPU seconds (supervision, capture, heartbeats) against the ranks' and the wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlops_obs.workload.capture import OutputFile, RankOutput  # noqa: E402

WRITER = """
import sys, time
n, size = int(sys.argv[1]), int(sys.argv[2])
line = "x" * (size - 1)
big = "y" * (40 * 1024)
t = time.perf_counter()
for i in range(n):
    print(line, file=sys.stderr)
for i in range(200):
    print(big, file=sys.stderr)
sys.stdout.write(f"{time.perf_counter() - t}\\n")
"""


def direct(tmp: Path, writers: int, lines: int, size: int) -> list[float]:
    procs = []
    files = []
    for w in range(writers):
        f = open(tmp / f"direct-{w}.log", "wb")  # noqa: SIM115 - closed below
        files.append(f)
        procs.append(subprocess.Popen([sys.executable, "-c", WRITER, str(lines), str(size)], stdout=subprocess.PIPE,
                                      stderr=f, text=True))  # fmt: skip
    out = [float(p.communicate()[0]) for p in procs]
    for f in files:
        f.close()
    return out


def captured(tmp: Path, writers: int, lines: int, size: int) -> tuple[list[float], float, int]:
    procs, caps = [], []
    cpu0 = time.process_time()
    for w in range(writers):
        err_r, err_w = os.pipe()
        out_r, out_w = os.pipe()
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(lines), str(size)], stdout=subprocess.PIPE,
                             stderr=err_w, stdin=subprocess.DEVNULL, text=True)  # fmt: skip
        os.close(err_w)
        os.close(out_w)
        caps.append(RankOutput(OutputFile(tmp / f"cri-{w}.log"), out_r, err_r, f"w{w}"))
        procs.append(p)
    out = [float(p.communicate()[0]) for p in procs]
    for c in caps:
        c.join(60)
    cpu = time.process_time() - cpu0
    written = sum((tmp / f"cri-{w}.log").stat().st_size for w in range(writers))
    return out, cpu, written


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workload(tmp: Path) -> dict[str, float]:
    import psutil

    cmd = [sys.executable, "-m", "mlops_obs", "workload", "--world-size=2", "--steps=300", "--log-every=1",
           "--job=bench", f"--log-dir={tmp / 'wl'}", "--device=cpu"]  # fmt: skip
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    me = psutil.Process(p.pid)
    ranks: dict[int, float] = {}
    launcher = 0.0
    while p.poll() is None:
        try:
            launcher = proc_cpu(p.pid)
            for c in me.children():
                ranks[c.pid] = max(ranks.get(c.pid, 0.0), proc_cpu(c.pid))
        except (OSError, psutil.Error):
            pass
        time.sleep(0.05)
    return {"wall": time.perf_counter() - t, "launcher_cpu": launcher, "ranks_cpu": sum(ranks.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--size", type=int, default=120)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        mb = (args.lines * args.size + 200 * 40 * 1024) / 1e6
        print(f"each writer: {args.lines} lines of {args.size} B + 200 lines of 40 KiB = {mb:.1f} MB")
        print("| writers | direct to a file: writer's wall (median) | through the capture | ratio | capture CPU s/MB |")
        print("|---|---|---|---|---|")
        for writers in (1, 8):
            ds, cs, cpu, total = [], [], 0.0, 0
            for _ in range(args.repeat):
                ds += direct(tmp, writers, args.lines, args.size)
                got, c, w = captured(tmp, writers, args.lines, args.size)
                cs += got
                cpu += c
                total += w
            dm, cm = statistics.median(ds), statistics.median(cs)
            print(f"| {writers} | {dm:.3f} s | {cm:.3f} s | {cm / dm:.2f}x | {cpu / (total / 1e6):.4f} |")
        w = workload(tmp)
        print()
        print(f"workload, 2 ranks x 300 steps, a step line each: wall {w['wall']:.1f} s, ranks' CPU "
              f"{w['ranks_cpu']:.1f} s, launcher's CPU {w['launcher_cpu']:.2f} s "
              f"({100 * w['launcher_cpu'] / max(w['ranks_cpu'], 1e-9):.1f}% of the ranks')")  # fmt: skip


if __name__ == "__main__":
    main()
