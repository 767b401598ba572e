#!/usr/bin/env python3
"""``mlops-obs rca`` over a store of 1 million events from a 64-rank job, against the naive full pass,
in one run; results as wall time, peak RSS and their ratios.

Reproduce with::

    .venv/bin/python benchmarks/bench_rca.py               # builds the store (~1-2 min here), then measures
    .venv/bin/python benchmarks/bench_rca.py --keep /tmp/rca-store   # reuse the store on a second run
    .venv/bin/python benchmarks/bench_rca.py --events 200000         # smaller

The job: 64 ranks each logging a JSON line per step as the reference workload does (``rank starting``,
``step`` with its loss every 100 ms, a checkpoint line every 500 steps, a warning now and then), until
rank 37 raises at step N and the other ranks fail in the all-reduce with gloo's "Connection closed by
peer"; every rank's stderr holds its traceback. The files are shipped into the store by the real
shipper (``--once``), so the chunks are those production makes.

Measured, each as its own process (best of 3, wall clock and peak RSS from ``wait4``):

1. ``mlops-obs rca --store S --job bench --json``: the fast path (chunk metadata, the severity index,
   each rank's last chunks; only those chunks are decoded);
2. the baseline: the same analysis over every event of the job from ``EventStore.query(job=...)``,
   which is what a tool without the fast path does (and what ``rca`` falls back to for a store schema
   it does not know).

The issue's floor: (1) under 3 s and at most 200 MiB RSS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlops_obs.logs.shipper import Shipper, ShipperOptions
from mlops_obs.logs.store import EventStore, StoreSink

JOB = "bench"
RANKS = 64
CULPRIT = 37
T0 = dt.datetime(2026, 3, 4, 1, 0, 0, tzinfo=dt.UTC)
GLOO = ("RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
        "peer [127.0.0.1]:20651. This is typically caused by a remote worker crashing.")  # fmt: skip


def ts(seconds: float) -> str:
    return (T0 + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _line(out: bytearray, ctx: dict[str, object], seq: int, t: float, event: str, level: str = "info",
          **kv: object) -> None:  # fmt: skip
    out.extend(orjson.dumps({**kv, "event": event, **ctx, "level": level, "ts": ts(t), "seq": seq}) + b"\n")


def write_job(logs: Path, events: int) -> int:
    """The 64 ranks' JSON logs and stderr files; returns the step at which rank 37 fails."""
    per_rank = events // RANKS
    step = 0
    for r in range(RANKS):
        ctx: dict[str, object] = {"job": JOB, "rank": r, "node": f"node{r // 8:02d}", "run_id": "bench-1"}
        out = bytearray()
        _line(out, ctx, 1, 0.001 * r, "rank starting", world_size=RANKS, backend="nccl", pid=1000 + r)
        n, step = 1, 0
        while n < per_rank - 1:  # every rank runs the same steps: lockstep
            t = 5.0 + 0.1 * step + 0.0001 * r
            n += 1
            _line(out, ctx, n, t, "step", step=step, loss=round(2.3 - step * 1e-5, 6))
            if step % 500 == 499:
                n += 1
                _line(out, ctx, n, t + 0.01, "checkpoint saved", step=step, path="/ckpt/x.pt")
            if step % 3001 == 3000:
                n += 1
                _line(out, ctx, n, t + 0.02, "slow collective", "warning", step=step, seconds=1.2)
            step += 1
        t_fail = 5.0 + 0.1 * step
        if r == CULPRIT:
            _line(out, ctx, n + 1, t_fail, "rank failed", "error", step=step,
                  error="RuntimeError: CUDA error: an illegal memory access")  # fmt: skip
        else:
            _line(out, ctx, n + 1, t_fail + 0.4 + 0.001 * r, "rank failed", "error", step=step, error=GLOO)
        (logs / f"{JOB}-rank{r}.jsonl").write_bytes(bytes(out))
        err = "RuntimeError: CUDA error: an illegal memory access" if r == CULPRIT else GLOO
        (logs / f"{JOB}-rank{r}.stderr.log").write_text(
            f'[rank{r}]: Traceback (most recent call last):\n[rank{r}]:   File "train.py", line 140, in main\n'
            f"[rank{r}]:     loss.backward()\n[rank{r}]: {err}\n"
        )
    return step


def build(store: Path, events: int) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-rca-logs-") as d:
        logs = Path(d)
        fail_step = write_job(logs, events)
        sh = Shipper(ShipperOptions(sources=[str(logs / "*")], state_dir=logs / "state"), StoreSink(store))
        sh.run(once=True)
        sh.close()
    (store / "bench-fail-step").write_text(str(fail_step))
    return fail_step


BASELINE = """
import sys, orjson
from mlops_obs.logs.store import EventStore
from mlops_obs.rca.sources import EventStream
from mlops_obs.rca.verdict import analyse
with EventStore(sys.argv[1]) as s:
    events = s.query(job=sys.argv[2])
report, _ = analyse(EventStream(lambda: events), sys.argv[2])
print(orjson.dumps(report.to_json()).decode())
"""


def measure(cmd: list[str]) -> tuple[float, float, bytes]:
    """Wall seconds, peak RSS (MiB) and stdout of one run of ``cmd``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        err = p.stderr.read() if p.stderr else b""
        out.seek(0)
        body = out.read()
    if p.returncode not in (0, 1):
        raise SystemExit(f"{cmd[:4]} failed ({p.returncode}): {err.decode()[-500:]}")
    return wall, ru.ru_maxrss / 1024.0, body


def best(cmd: list[str], n: int = 3) -> tuple[float, float, bytes]:
    runs = [measure(cmd) for _ in range(n)]
    return min(r[0] for r in runs), min(r[1] for r in runs), runs[0][2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, help="store directory to build once and reuse")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="bench-rca-") as d:
        store = args.keep or Path(d) / "store"
        if not (store / "bench-fail-step").exists():
            t0 = time.perf_counter()
            build(store, args.events)
            print(f"built the store in {time.perf_counter() - t0:.1f} s")
        fail_step = int((store / "bench-fail-step").read_text())
        with EventStore(store) as s:
            n = s.count()
            chunks = s._db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        size = sum(f.stat().st_size for f in store.glob("events.sqlite3*")) / 1048576
        print(f"store: {n:,} events of {RANKS} ranks in {chunks:,} chunks, {size:.0f} MiB")

        fast_cmd = [sys.executable, "-m", "mlops_obs", "rca", "--store", str(store), "--job", JOB, "--json"]
        wall, rss, out = best(fast_cmd, args.repeats)
        got = orjson.loads(out)["root_cause"]
        assert (got["kind"], got["rank"], got["step"]) == ("crash", CULPRIT, fail_step), got
        base_cmd = [sys.executable, "-c", BASELINE, str(store), JOB]
        b_wall, b_rss, b_out = best(base_cmd, args.repeats)
        b_got = orjson.loads(b_out)["root_cause"]
        assert (b_got["kind"], b_got["rank"], b_got["step"]) == (got["kind"], got["rank"], got["step"]), b_got

        from mlops_obs.rca.sources import ChunkStore
        from mlops_obs.rca.verdict import analyse

        cs = ChunkStore(store)
        analyse(cs, JOB)
        print(f"\nverdict: {got['kind']} on rank {got['rank']} at step {got['step']} (both paths agree)")
        print(f"fast path decoded {cs.chunks_decoded:,} of {chunks:,} chunks ({cs.events_decoded:,} events)")
        print(f"\n{'':38s} {'wall s':>8s} {'peak RSS MiB':>13s}")
        print(f"{'rca --store (fast path)':38s} {wall:8.2f} {rss:13.0f}")
        print(f"{'full pass over EventStore.query()':38s} {b_wall:8.2f} {b_rss:13.0f}")
        print(f"{'ratio (full / fast)':38s} {b_wall / wall:7.1f}x {b_rss / rss:12.1f}x")
        floor = wall < 3.0 and rss <= 200
        print(f"\nfloor (under 3 s, at most 200 MiB): {'met' if floor else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
