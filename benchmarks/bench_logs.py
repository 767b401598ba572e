#!/usr/bin/env python3
"""Structured logs, end to end, against baselines in the same run; results as ratios.

Reproduce with::

    .venv/bin/python benchmarks/bench_logs.py            # ~2 minutes on a 2-core VM
    .venv/bin/python benchmarks/bench_logs.py --quick    # smaller counts
    .venv/bin/python benchmarks/bench_logs.py --only shipper --only latency

Rates are CPU time (so "per core"), best of 3 runs (best of 2 for the shipper): the 2-core VM is
shared, and a run that shares its core is slower in CPU time too.

1. Job-side logging to a file, events/s per core (CPU time of the logging loop): ours
   (``mlops_obs.logs.configure(..., "json")``: fused stamp processor, redaction, orjson) against
   structlog's documented JSON set-up (contextvars + add_log_level + TimeStamper + JSONRenderer with
   the standard json module) and stdlib ``logging`` with a JSON formatter.
2. Shipper into the embedded store, events/s per core (CPU time of the process, the shipper is one
   thread): ``Shipper`` ``--once`` over N job-side lines into the store (chunked schema v2), against
   a naive loop (``json.loads`` each line, one ``INSERT`` per line into a per-event table with the
   indexes replay needs, the store's v1 schema; one commit per 5000 lines).
3. ``_bulk`` body build, docs/s per core: our orjson NDJSON against opensearch-py's helpers
   (``expand_action`` + ``_chunk_actions``, what ``streaming_bulk``/``bulk`` run) on the same events.
4. Follow latency: a line appended while ``mlops-obs ship`` follows the file, until a store query
   returns it; p50 and p90 over 40 lines.

The logs issue's floors (on the reference machine): logging >= 200k/s/core, shipper >= 100k/s/core,
bulk >= 300k docs/s/core and >= 3x the helpers, follow latency p50 <= 1 s. The cadence issue's
(16) targets, printed next to each rate as ours/target: logging 300k/s/core, shipper 200k/s/core.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlops_obs.logs import configure, get_logger
from mlops_obs.logs.opensearch import bulk_lines
from mlops_obs.logs.shipper import Shipper, ShipperOptions
from mlops_obs.logs.store import EventStore, StoreSink

CTX = {"job": "bench", "rank": 0, "node": "n1", "run_id": "r1"}

# The naive baseline's table: one row per event with the indexes replay needs, which is what the
# store itself was before schema v2 (the store no longer has it, so the benchmark creates it).
V1_SCHEMA = """
CREATE TABLE events (
    id TEXT NOT NULL UNIQUE, ts TEXT NOT NULL, kind TEXT NOT NULL, job TEXT, rank INTEGER, node TEXT,
    level TEXT, message TEXT NOT NULL, seq INTEGER, source TEXT NOT NULL, off INTEGER NOT NULL, fields BLOB NOT NULL
);
CREATE INDEX events_ts ON events (ts, source, off);
CREATE INDEX events_job ON events (job, rank, ts);
CREATE INDEX events_notable ON events (level, ts) WHERE level NOT IN ('debug', 'info');
CREATE INDEX events_kind ON events (kind, ts) WHERE kind != 'log';
"""


REPEATS = 3
# Events (docs) per second per core: (the logs issue's floor, the cadence issue's target or None).
TARGETS: dict[str, tuple[float, float | None]] = {
    "logging": (200_000, 300_000),
    "shipper": (100_000, 200_000),
    "bulk": (300_000, None),
}


def cpu_rate(n: int, fn: Any) -> float:
    t0 = time.process_time()
    fn()
    return n / max(time.process_time() - t0, 1e-9)


def best_rate(n: int, fn: Any, repeats: int | None = None) -> float:
    """Best of ``repeats`` CPU-time rates: on a VM whose cores are shared, a run that shared its core
    (SMT sibling, cache) with another job is slower in CPU time too; the best run is the code's cost."""
    return max(cpu_rate(n, fn) for _ in range(repeats or REPEATS))


def bench_logging(n: int, tmp: Path) -> dict[str, float]:
    out: dict[str, float] = {}

    def loop(log: Any) -> None:
        for i in range(n):
            log.info("step", step=i, loss=0.25, lr=3e-4)

    with open(tmp / "ours.jsonl", "wb") as f:
        configure("info", "json", stream=f, context=CTX, capture_stdlib=False)
        out["ours"] = best_rate(n, lambda: loop(get_logger()))

    with open(tmp / "structlog.jsonl", "w") as f:
        structlog.reset_defaults()
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.dict_tracebacks,
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
            logger_factory=structlog.WriteLoggerFactory(file=f),
            cache_logger_on_first_use=True,
        )
        structlog.contextvars.bind_contextvars(**CTX)
        out["structlog_default_json"] = best_rate(n, lambda: loop(structlog.get_logger()))
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()

    class JsonFormatter(logging.Formatter):
        def format(self, r: logging.LogRecord) -> str:
            d = {"ts": self.formatTime(r), "level": r.levelname, "event": r.getMessage(), **CTX}
            d.update(getattr(r, "kv", {}))
            return json.dumps(d)

    lg = logging.getLogger("bench.stdlib")
    lg.propagate = False
    with open(tmp / "stdlib.jsonl", "w") as f:
        h = logging.StreamHandler(f)
        h.setFormatter(JsonFormatter())
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        out["stdlib_json"] = best_rate(
            n, lambda: [lg.info("step", extra={"kv": {"step": i, "loss": 0.25, "lr": 3e-4}}) for i in range(n)]
        )
        lg.removeHandler(h)
    return out


def write_lines(path: Path, n: int) -> None:
    with open(path, "wb") as f:
        configure("info", "json", stream=f, context=CTX, capture_stdlib=False)
        log = get_logger()
        for i in range(n):
            log.info("step", step=i, loss=0.25, lr=3e-4)
    structlog.reset_defaults()


def bench_shipper(n: int, tmp: Path) -> dict[str, float]:
    logs = tmp / "logs"
    logs.mkdir()
    write_lines(logs / "bench-rank0.jsonl", n)
    naive = _naive_loader(logs)
    out: dict[str, float] = {}
    rates = []
    for rep in range(2):  # best of 2, each into a fresh store from a fresh checkpoint
        sh = Shipper(
            ShipperOptions(sources=[str(logs / "*.jsonl")], state_dir=tmp / f"state{rep}"),
            StoreSink(tmp / f"store{rep}"),
        )
        rates.append(cpu_rate(n, lambda: sh.run(once=True)))  # noqa: B023 - called within the iteration
        sh.close()
        with EventStore(tmp / f"store{rep}") as s:
            assert s.count() == n, s.count()
    out["ours"] = max(rates)

    rates = []
    for rep in range(2):
        naive_dir = tmp / f"naive{rep}"
        naive_dir.mkdir()
        db = sqlite3.connect(naive_dir / "events.sqlite3", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(V1_SCHEMA)
        db.close()
        rates.append(cpu_rate(n, lambda: naive(naive_dir)))  # noqa: B023 - called within the iteration
    out["naive_insert_per_line"] = max(rates)
    return out


def _naive_loader(logs: Path) -> Any:
    def naive(naive_dir: Path) -> None:
        db = sqlite3.connect(naive_dir / "events.sqlite3", isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN")
        with open(logs / "bench-rank0.jsonl", "rb") as f:
            off = 0
            for i, raw in enumerate(f):
                rec = json.loads(raw)
                ts = rec.pop("ts")
                db.execute(
                    "INSERT OR IGNORE INTO events (id, ts, kind, job, rank, node, level, message, seq, source, off,"
                    " fields) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (f"x-{off}", ts, "log", rec.pop("job"), rec.pop("rank"), rec.pop("node"), rec.pop("level"),
                     rec.pop("event"), rec.pop("seq"), "f", off, json.dumps(rec)),
                )  # fmt: skip
                off += len(raw)
                if i % 5000 == 4999:
                    db.execute("COMMIT")
                    db.execute("BEGIN")
        db.execute("COMMIT")
        db.close()

    return naive


def bench_bulk(n: int) -> dict[str, float]:
    from opensearchpy import OpenSearch
    from opensearchpy.helpers.actions import _chunk_actions, expand_action

    evs = [
        {"_id": f"fid-{i}", "@timestamp": "2026-03-04T00:00:00.000001Z", "kind": "log", "job": "bench", "rank": 0,
         "node": "n1", "level": "info", "message": "step", "seq": i, "source": "/logs/bench-rank0.jsonl",
         "offset": i * 150, "fields": {"step": i, "loss": 0.25, "lr": 3e-4, "run_id": "r1"}}
        for i in range(n)
    ]  # fmt: skip
    out: dict[str, float] = {}

    def ours() -> None:
        lines = bulk_lines(evs, "mlops-logs")
        b"".join(lines)

    out["ours"] = best_rate(n, ours)
    serializer = OpenSearch(hosts=["http://127.0.0.1:9"]).transport.serializer

    def helpers() -> None:
        actions = (
            {"_op_type": "create", "_index": "mlops-logs-2026.03.04", **{k: v for k, v in e.items()}} for e in evs
        )
        for _, chunk in _chunk_actions(map(expand_action, actions), 5000, 5 << 20, serializer):
            "\n".join(chunk)

    out["opensearch_py_helpers"] = best_rate(n, helpers)
    return out


def bench_latency(samples: int, tmp: Path) -> dict[str, float]:
    logs = tmp / "follow"
    logs.mkdir()
    path = logs / "bench-rank0.jsonl"
    path.write_bytes(b"")
    store = tmp / "follow-store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlops_obs", "ship", "--source", str(logs / "*.jsonl"), "--store", str(store),
         "--log.level", "warn"],
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    lat = []
    try:
        with open(path, "ab") as f:
            f.write(b'{"event":"warmup","seq":0,"ts":"2026-01-01T00:00:00.000000Z"}\n')
            f.flush()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if (store / "events.sqlite3").exists():
                    with EventStore(store) as s:
                        if s.count() >= 1:
                            break
                time.sleep(0.05)
            s = EventStore(store)
            for i in range(1, samples + 1):
                t0 = time.monotonic()
                ts = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
                f.write(orjson.dumps({"event": "probe", "seq": i, "ts": ts}) + b"\n")
                f.flush()
                while s.count() < i + 1:
                    time.sleep(0.005)
                lat.append(time.monotonic() - t0)
                time.sleep(0.05)
            s.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat.sort()
    return {"p50_s": statistics.median(lat), "p90_s": lat[int(len(lat) * 0.9) - 1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--only",
        choices=("logging", "shipper", "bulk", "latency"),
        action="append",
        help="run only these sections (repeatable; default: all)",
    )
    args = ap.parse_args()
    only = set(args.only or ("logging", "shipper", "bulk", "latency"))
    n_log, n_ship, n_bulk, n_lat = (20_000, 20_000, 20_000, 10) if args.quick else (200_000, 200_000, 100_000, 40)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as d:
        tmp = Path(d)
        lg = bench_logging(n_log, tmp) if "logging" in only else None
        sh = bench_shipper(n_ship, tmp) if "shipper" in only else None
        bk = bench_bulk(n_bulk) if "bulk" in only else None
        lat = bench_latency(n_lat, tmp) if "latency" in only else None
    for title, key, rates in (
        (f"1. job-side logging to a file ({n_log} events), events/s per core", "logging", lg),
        (f"2. shipper into the embedded store ({n_ship} lines), events/s per core", "shipper", sh),
        (f"3. _bulk body build ({n_bulk} docs), docs/s per core", "bulk", bk),
    ):
        if rates:
            print(f"\n{title}")
            for k, v in rates.items():
                print(f"   {k:28s} {v:12,.0f}   ours/this = {rates['ours'] / v:5.2f}x")
            floor, target = TARGETS[key]
            print(f"   {'floor (logs issue)':28s} {floor:12,.0f}   ours/this = {rates['ours'] / floor:5.2f}x")
            if target is not None:
                print(f"   {'target (issue 16)':28s} {target:12,.0f}   ours/this = {rates['ours'] / target:5.2f}x")
    if lat:
        print(f"\n4. follow latency, line written -> queryable in the store ({n_lat} lines)")
        print(f"   p50 {lat['p50_s'] * 1000:.0f} ms   p90 {lat['p90_s'] * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
