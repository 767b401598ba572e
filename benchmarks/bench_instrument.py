"""Cost of instrumenting a training step, side by side with the bare loop and prometheus_client.

Part 1 (``--part step``): per-iteration time of a full step record (``step`` + 3 ``phase`` +
``record``) with :class:`TrainingMonitor`, the bare loop, the floor of the record's API shape (four
``with`` blocks over empty context managers, a call and eight clock reads: see :func:`floor`), and
the same record done with plain prometheus_client metrics in multiprocess mode (what a training
process needs to expose metrics without an HTTP server per rank: children resolved once, as its docs
advise), in one process, one run, interleaved in rounds so that machine noise hits all four alike.
Reported as p50/p99 µs and ratios (the monitor over the floor, prometheus_client over the monitor).

Part 2 (``--part workload``): throughput (samples/s) of the reference DDP workload with the monitor
and comm hook on, and with them off (no ``--multiproc-dir``: the no-op mode), alternating runs.

Part 3 (``--part rank``): a rank's CPU per second, flush included, at 10 steps/s (two 50 ms phases
each, sleeping, as a GPU-bound rank waits on its device), with the SDK's defaults, next to the same
loop bare and instrumented at the floor of the API shape (empty ``with`` blocks, a call and the
clock reads: what any instrumentation costs in a loop this slow, where every step runs cold), each
its own process, ``--replicas`` processes of each variant, all at once, CPU read per thread from
``/proc/<pid>/task/*/schedstat`` (:mod:`proc_cpu`) over one ``--window``. One process's figure moves
with where and when the host happens to run it by about as much as the SDK costs (two processes
running the same code in the same window differed by up to 0.15% of a core on the reference VM), so
the report compares each variant's median, and splits it into the training thread's CPU (per wake-up:
the loop runs cold twice a step) and the flush thread's (per flush), which needs no subtraction.
The rank directory holds the cadence a sidecar scraped every ``--scrape-interval`` publishes
(written by this script as ``mlops-obs exporter`` would, refreshed each interval); other monitored
ranks find no cadence (no sidecar); ``--baseline-tree`` adds ranks running the SDK of
another source tree (the code before a change) with its defaults. The rank directories are made under
``--rank-dir-root``, by default ``/dev/shm``: a tmpfs, as the shipped deployments give the ranks (the
pod's ``emptyDir`` with ``medium: Memory``, the node's ``/var/run`` for the DaemonSet, ``/run`` in
compose). On a disk file system a flush's atomic rename costs more (~0.4 ms on this VM's ext4 against
~0.04 ms on tmpfs), which the script's first line names.

    .venv/bin/python benchmarks/bench_instrument.py            # parts 1 and 2
    .venv/bin/python benchmarks/bench_instrument.py --part step --iterations 200000
    .venv/bin/python benchmarks/bench_instrument.py --part rank --window 300 --baseline-tree /tmp/base
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

# prometheus_client picks multiprocess mode at import time from this variable.
_PROM_DIR = tempfile.mkdtemp(prefix="bench-prom-mp-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _PROM_DIR

from prometheus_client import Counter, Gauge, Histogram  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proc_cpu import thread_cpu, thread_major_faults  # noqa: E402

from mlops_obs import rankdir  # noqa: E402
from mlops_obs.instrument import TrainingMonitor  # noqa: E402

perf_ns = time.perf_counter_ns


def bare(n: int, out: list[int]) -> None:
    loss, g, lr = 0.5, 1.0, 0.1
    for _ in range(n):
        t0 = perf_ns()
        _ = (loss, g, lr)
        out.append(perf_ns() - t0)


class _Empty:
    """A context manager that does nothing (the floor's ``with`` target, made once)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        return None


def _no_record(loss: float | None = None, grad_norm: float | None = None, lr: float | None = None) -> None:
    return None


def floor() -> Callable[[int, list[int]], None]:
    """The floor of the record's API shape: the least any implementation of ``with step(): with
    phase(): ... (3 phases); record(loss=, grad_norm=, lr=)`` that times every block runs, that is
    four ``with`` blocks over empty context managers, one call with the three scalars and eight
    clock reads (each block's entry and exit), with nothing stored. Finding the step's and phases'
    context managers (``step(samples=32)``, ``phase("forward")``) is left out, so the floor is below
    what any real implementation can reach."""
    e, rec, perf = _Empty(), _no_record, time.perf_counter

    def run(n: int, out: list[int]) -> None:
        loss, g, lr = 0.5, 1.0, 0.1
        for _ in range(n):
            t0 = perf_ns()
            with e:
                perf()
                with e:
                    perf()
                    perf()
                with e:
                    perf()
                    perf()
                with e:
                    perf()
                    perf()
                rec(loss=loss, grad_norm=g, lr=lr)
                perf()
            out.append(perf_ns() - t0)

    return run


def monitored(m: TrainingMonitor) -> Callable[[int, list[int]], None]:
    step, phase, record = m.step, m.phase, m.record

    def run(n: int, out: list[int]) -> None:
        loss, g, lr = 0.5, 1.0, 0.1
        for _ in range(n):
            t0 = perf_ns()
            with step(samples=32):
                with phase("forward"):
                    pass
                with phase("backward"):
                    pass
                with phase("optimizer"):
                    pass
                record(loss=loss, grad_norm=g, lr=lr)
            out.append(perf_ns() - t0)

    return run


def prometheus_multiprocess() -> Callable[[int, list[int]], None]:
    labels = ["job", "rank", "node"]
    lv = ("bench", "0", "n")
    steps = Counter("bench_steps", "", labels).labels(*lv)
    samples = Counter("bench_samples", "", labels).labels(*lv)
    hist = Histogram("bench_step_duration_seconds", "", labels, buckets=rankdir.STEP_BUCKETS).labels(*lv)
    phase_c = Counter("bench_phase_seconds", "", [*labels, "phase"])
    fwd, bwd, opt = (phase_c.labels(*lv, p) for p in ("forward", "backward", "optimizer"))
    loss_g = Gauge("bench_loss", "", labels, multiprocess_mode="mostrecent").labels(*lv)
    grad_g = Gauge("bench_grad_norm", "", labels, multiprocess_mode="mostrecent").labels(*lv)
    lr_g = Gauge("bench_lr", "", labels, multiprocess_mode="mostrecent").labels(*lv)
    beat = Gauge("bench_last_step", "", labels, multiprocess_mode="mostrecent").labels(*lv)
    perf, wall = time.perf_counter, time.time

    def run(n: int, out: list[int]) -> None:
        loss, g, lr = 0.5, 1.0, 0.1
        for _ in range(n):
            t0 = perf_ns()
            s = perf()
            p = perf()
            fwd.inc(perf() - p)
            p = perf()
            bwd.inc(perf() - p)
            p = perf()
            opt.inc(perf() - p)
            loss_g.set(loss)
            grad_g.set(g)
            lr_g.set(lr)
            d = perf() - s
            steps.inc()
            samples.inc(32)
            hist.observe(d)
            beat.set(wall())
            out.append(perf_ns() - t0)

    return run


def pct(xs: list[int], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000.0


def part_step(iterations: int, rounds: int) -> dict[str, dict[str, float]]:
    """Per-iteration p50/p99 over all rounds, the best round's p50 (the figure least disturbed by
    other load on a shared machine), and the CPU time per iteration of the whole process, all threads
    (so the monitor's flush thread, which folds the queued readings, is counted too)."""
    with tempfile.TemporaryDirectory() as d:
        m = TrainingMonitor("bench", 0, 1, d, node="n", flush_interval=1.0)  # flush thread running, as in use
        variants = {"bare loop": bare, "floor of the API shape": floor(), "TrainingMonitor": monitored(m),
                    "prometheus_client multiprocess": prometheus_multiprocess()}  # fmt: skip
        samples: dict[str, list[int]] = {k: [] for k in variants}
        round_p50: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, float] = dict.fromkeys(variants, 0.0)
        for fn in variants.values():  # warm-up
            fn(2000, [])
        per_round = max(1, iterations // rounds)
        for _ in range(rounds):
            for name, fn in variants.items():
                out: list[int] = []
                c0 = time.process_time()
                fn(per_round, out)
                cpu[name] += time.process_time() - c0
                round_p50[name].append(pct(out, 0.50))
                samples[name].extend(out)
        m.close()
    return {
        k: {
            "p50_us": pct(v, 0.50),
            "p99_us": pct(v, 0.99),
            "best_round_p50_us": min(round_p50[k]),
            "cpu_us": cpu[k] / len(v) * 1e6,
            "n": len(v),
        }
        for k, v in samples.items()
    }


def _workload_rate(instrumented: bool, steps: int, world: int, root: Path) -> tuple[float, float]:
    """(whole-run, best-window) samples/s of one run, from rank 0's per-step log timestamps.

    The best 50-step window is the figure least disturbed by other load on a shared machine; the
    timestamps come from the same log lines in both modes, so the measurement itself is identical.
    """
    run = root / f"run-{time.monotonic_ns()}"
    args = [sys.executable, "-m", "mlops_obs", "workload", f"--world-size={world}", f"--steps={steps}",
            f"--log-dir={run / 'logs'}", "--log-every=1", "--device=cpu", "--job=bench"]  # fmt: skip
    if instrumented:
        args.append(f"--multiproc-dir={run / 'mp'}")
    subprocess.run(args, check=True, capture_output=True, timeout=600)
    lines = [orjson.loads(x) for x in (run / "logs" / "bench-rank0.jsonl").read_bytes().splitlines()]
    ts = [_parse_ts(x["ts"]) for x in lines if x["event"] == "step"]
    skip = max(1, len(ts) // 10)  # warm-up
    ts = ts[skip:]
    batch_all_ranks = 64 * world
    whole = (len(ts) - 1) * batch_all_ranks / (ts[-1] - ts[0])
    w = min(50, len(ts) - 1)
    best = max(w * batch_all_ranks / (ts[i + w] - ts[i]) for i in range(len(ts) - w))
    return whole, best


def _parse_ts(s: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def part_workload(steps: int, world: int, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(repeats):  # alternate, so drifting machine load hits both modes alike
            for mode in (False, True):
                runs[mode].append(_workload_rate(mode, steps, world, Path(d)))
    return {
        "off_whole": statistics.median(r[0] for r in runs[False]),
        "on_whole": statistics.median(r[0] for r in runs[True]),
        "off_best": statistics.median(r[1] for r in runs[False]),
        "on_best": statistics.median(r[1] for r in runs[True]),
    }


BARE = "bare loop"
FLOOR = "floor of the API shape (empty with blocks)"
RANK_LOOP = """
import sys, time
directory = sys.argv[1] if len(sys.argv) > 1 else None
if directory == "--floor":
    class Empty:
        def __enter__(self): return None
        def __exit__(self, et, ev, tb): return None
    def record(loss=None, grad_norm=None, lr=None): return None
    e, perf = Empty(), time.perf_counter
    while True:
        with e:
            perf()
            with e:
                perf()
                time.sleep(0.05)
                perf()
            with e:
                perf()
                time.sleep(0.05)
                perf()
            record(loss=0.5, grad_norm=1.0, lr=1e-4)
            perf()
elif directory:
    from mlops_obs.instrument import TrainingMonitor
    rank = int(sys.argv[3]) if sys.argv[2:3] == ["--rank"] else 0
    m = TrainingMonitor(job="bench", rank=rank, world_size=1, directory=directory)
    step, phase, record = m.step, m.phase, m.record
    while True:
        with step(samples=32):
            with phase("forward"):
                time.sleep(0.05)
            with phase("backward"):
                time.sleep(0.05)
            record(loss=0.5, grad_norm=1.0, lr=1e-4)
else:
    while True:
        time.sleep(0.05)
        time.sleep(0.05)
"""


@dataclass
class RankCpu:
    """One rank process's CPU over the window: its main (training) thread's and its other threads'
    (the SDK's flush thread; its signal watcher sleeps in a read), as fractions of a core, how many
    times each ran, and their major page faults."""

    main: float
    other: float
    main_runs: int
    other_runs: int
    main_majflt: int
    other_majflt: int
    wall: float

    def per_run(self, share: float, runs: int) -> float:
        """Seconds of CPU a run of a thread that used ``share`` of a core over the window in ``runs`` runs."""
        return share * self.wall / runs

    @property
    def total(self) -> float:
        return self.main + self.other


Sample = tuple[dict[int, tuple[int, int]], dict[int, int]]  # a process's thread_cpu and thread_major_faults


def _sample(pid: int) -> Sample:
    return thread_cpu(pid), thread_major_faults(pid)


def _rank_cpu(pid: int, before: Sample, after: Sample, wall: float) -> RankCpu:
    def delta(tid: int) -> tuple[int, int, int]:
        a, b = before[0].get(tid, (0, 0)), after[0][tid]
        return b[0] - a[0], b[1] - a[1], after[1].get(tid, 0) - before[1].get(tid, 0)

    m = delta(pid) if pid in after[0] else (0, 0, 0)
    others = [delta(t) for t in after[0] if t != pid]
    o = [sum(x[i] for x in others) for i in range(3)]
    return RankCpu(m[0] / 1e9 / wall, o[0] / 1e9 / wall, m[1], o[1], m[2], o[2], wall)


def _fs_type(path: Path) -> str:
    """The file system type ``path`` is on, from /proc/self/mounts (the longest mount point above it)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1].rstrip("/") + "/") and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def _default_rank_dir_root() -> Path | None:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def part_rank(
    window: float,
    settle: float,
    scrape_interval: float,
    baseline: Path | None,
    dir_root: Path | None = None,
    replicas: int = 3,
) -> dict[str, list[RankCpu]]:
    """Each variant's processes' CPU over the window (``replicas`` processes of each, started
    interleaved): one process's figure moves with where and when the host runs it by about as much as
    the SDK costs, so the report compares medians."""
    from mlops_obs.rankdir import cadence

    root = Path(tempfile.mkdtemp(prefix="bench-rank-", dir=dir_root))
    print(f"rank directories under {root} ({_fs_type(root)})", flush=True)
    here = str(Path(__file__).resolve().parent.parent)
    scraped, alone = root / "scraped", root / "alone"
    scraped.mkdir()
    alone.mkdir()
    variants: list[tuple[str, list[str], str]] = [
        (BARE, [], here),
        (FLOOR, ["--floor"], here),
        (f"SDK defaults, sidecar scraped every {scrape_interval:g}s", [str(scraped)], here),
        ("SDK defaults, no sidecar", [str(alone)], here),
    ]
    if baseline is not None:
        (root / "base").mkdir()
        variants.append(("SDK defaults, baseline tree", [str(root / "base")], str(baseline.resolve())))

    def publish() -> None:  # what a sidecar scraped every scrape_interval writes
        now = time.time()
        nxt = now + scrape_interval - (now % scrape_interval)
        cadence.write(scraped, cadence.make(scrape_interval, nxt, cadence_lead, now))

    cadence_lead = 0.1
    publish()
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for _ in range(replicas):
            for name, args, tree in variants:
                env = {**os.environ, "PYTHONPATH": tree}
                # cwd too: ``python -c`` puts the working directory first on sys.path. Every replica of
                # a monitored variant shares the directory, as a node's ranks do (each its own rank).
                rank = ["--rank", str(sum(1 for n, _ in procs if n == name))] if args and args[0] != "--floor" else []
                procs.append(
                    (name, subprocess.Popen([sys.executable, "-c", RANK_LOOP, *args, *rank], env=env, cwd=tree))
                )
        end = time.monotonic() + settle
        while time.monotonic() < end:
            time.sleep(min(scrape_interval, max(0.0, end - time.monotonic())))
            publish()
        c0 = [_sample(p.pid) for _, p in procs]
        w0 = time.monotonic()
        end = w0 + window
        while time.monotonic() < end:
            time.sleep(min(scrape_interval, max(0.0, end - time.monotonic())))
            publish()
        c1 = [_sample(p.pid) for _, p in procs]
        wall = time.monotonic() - w0
        out: dict[str, list[RankCpu]] = {name: [] for name, _, _ in variants}
        for (name, p), before, after in zip(procs, c0, c1):
            out[name].append(_rank_cpu(p.pid, before, after, wall))
        return out
    finally:
        for _, p in procs:
            p.kill()
            p.wait()


def report_rank(r: dict[str, list[RankCpu]], window: float, settle: float) -> None:
    """Medians over each variant's processes: the total, the main thread's CPU per wake-up (the loop
    sleeps twice a step, so the training thread runs cold 20 times a second), and the flush thread's."""
    med = statistics.median
    n = len(r[BARE])
    print(f"\na rank at 10 steps/s, CPU over a {window:g} s window (after {settle:g} s), median of {n} processes "
          "each, % of one core (min-max):")  # fmt: skip
    for name, xs in r.items():
        tot = [x.total * 100 for x in xs]
        wake = med(x.per_run(x.main, x.main_runs) * 1e6 for x in xs) if all(x.main_runs for x in xs) else 0.0
        line = f"  {name:46s} {med(tot):.4f} ({min(tot):.4f}-{max(tot):.4f})  training thread {wake:5.1f} µs a wake-up"
        if all(x.other_runs for x in xs):
            per_flush = med(x.per_run(x.other, x.other_runs) * 1e3 for x in xs)
            line += f", flush thread {med(x.other for x in xs) * 100:.4f} ({per_flush:.2f} ms a wake-up)"
        faults = med(x.main_majflt + x.other_majflt for x in xs)
        if faults:  # pages read back from disk: the host reclaiming cold file pages, not the code's own work
            line += f", {faults:g} major page faults"
        print(line)
    print("  above the bare loop (each variant's median less the bare loop's):")
    bare_total, bare_main = med(x.total for x in r[BARE]), med(x.main for x in r[BARE])
    for name, xs in r.items():
        if name != BARE:
            total, main = med(x.total for x in xs) - bare_total, med(x.main for x in xs) - bare_main
            other = med(x.other for x in xs)
            print(f"    {name:44s} {total * 100:+.4f}  (training thread {main * 100:+.4f}, "
                  f"flush thread {other * 100:+.4f})")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("step", "workload", "rank", "all"), default="all")
    ap.add_argument("--window", type=float, default=300.0, help="Seconds of the CPU window (part rank).")
    ap.add_argument("--settle", type=float, default=30.0, help="Seconds run before the window (part rank).")
    ap.add_argument("--scrape-interval", type=float, default=15.0, help="The sidecar's scrape interval (part rank).")
    ap.add_argument("--replicas", type=int, default=3, help="Processes of each variant (part rank).")
    ap.add_argument("--baseline-tree", type=Path, help="Also run a rank with this source tree's SDK (part rank).")
    ap.add_argument(
        "--rank-dir-root",
        type=Path,
        default=_default_rank_dir_root(),
        help="Where the rank directories are made (part rank; default /dev/shm, a tmpfs, as deployed).",
    )
    ap.add_argument("--iterations", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.platform()}")  # fmt: skip
    if a.part in ("step", "all"):
        r = part_step(a.iterations, a.rounds)
        base = r["bare loop"]["p50_us"]
        print(f"\nper-iteration time, {r['bare loop']['n']} iterations each (µs):")
        for name, v in r.items():
            print(f"  {name:32s} p50 {v['p50_us']:6.2f}  p99 {v['p99_us']:6.2f}  net p50 {v['p50_us'] - base:6.2f}  "
                  f"best-round p50 {v['best_round_p50_us']:6.2f}  CPU/iteration {v['cpu_us']:6.2f}")  # fmt: skip
        mon, flo = r["TrainingMonitor"], r["floor of the API shape"]
        print(f"  TrainingMonitor / floor: p50 {mon['p50_us'] / flo['p50_us']:.2f}x, best-round p50 "
              f"{mon['best_round_p50_us'] / flo['best_round_p50_us']:.2f}x, net of the bare loop p50 "
              f"{(mon['p50_us'] - base) / (flo['p50_us'] - base):.2f}x")  # fmt: skip
        ours = r["TrainingMonitor"]["p50_us"] - base
        theirs = r["prometheus_client multiprocess"]["p50_us"] - base
        ours99 = r["TrainingMonitor"]["p99_us"] - base
        theirs99 = r["prometheus_client multiprocess"]["p99_us"] - base
        print(f"  prometheus_client multiprocess / TrainingMonitor (net): p50 {theirs / ours:.1f}x, "
              f"p99 {theirs99 / ours99:.1f}x")  # fmt: skip
    if a.part == "rank":
        ranks = part_rank(a.window, a.settle, a.scrape_interval, a.baseline_tree, a.rank_dir_root, a.replicas)
        report_rank(ranks, a.window, a.settle)
        return 0
    if a.part in ("workload", "all"):
        w = part_workload(a.steps, a.world_size, a.repeats)
        print(f"\nreference workload, {a.world_size} ranks x {a.steps} steps, median of {a.repeats} alternating runs "
              "each (samples/s, all ranks):")  # fmt: skip
        print(f"  {'':26s} {'whole run':>10s} {'best 50-step window':>20s}")
        print(f"  {'without instrumentation':26s} {w['off_whole']:10,.0f} {w['off_best']:20,.0f}")
        print(f"  {'with instrumentation':26s} {w['on_whole']:10,.0f} {w['on_best']:20,.0f}")
        print(f"  {'with / without':26s} {w['on_whole'] / w['off_whole']:10.3f} {w['on_best'] / w['off_best']:20.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
