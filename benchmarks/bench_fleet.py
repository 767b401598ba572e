#!/usr/bin/env python3
"""What one Prometheus holds of an mlops-obs fleet: ingestion, memory, rule evaluation and dashboard latency.

Reproduce with::

    .venv/bin/python benchmarks/bench_fleet.py --sizes 10,50,100,200 --json fleet.json   # ~25 min, 2 cores
    .venv/bin/python benchmarks/bench_fleet.py --quick                                  # seconds: the smoke test

One simulator process (:mod:`fleet_sim`) serves N nodes' bodies, rendered from the real exporter (8 fake
H100s, host, process and 8 SDK ranks; about one node in eight idle), on N loopback ports. For each fleet
size a fresh Debian ``prometheus`` (2.42) scrapes them every ``--scrape-interval`` with the repository's
recording and alerting rules (``alerts/mlops-*.yml``) evaluated at the same interval. After
``--warmup`` seconds of scraping the benchmark reads Prometheus' own metrics and runs every dashboard
panel query (``mlops_obs.mixin.dashboards``, variables set to All, ``$__rate_interval`` = 4 scrape
intervals, as Grafana sets it) ``--repeats`` times, both as an instant query and as a range query over
all the data present at one point per scrape interval. It reports, per size:

* ingested samples/s (``prometheus_tsdb_head_samples_appended_total``: scrapes and recording rules)
  and Prometheus' CPU (``process_cpu_seconds_total``, in cores);
* RSS per active series (``process_resident_memory_bytes`` / ``prometheus_tsdb_head_series``) and the
  marginal bytes per series between sizes (the fixed overhead removed);
* each rule group's evaluation time (``prometheus_rule_group_last_duration_seconds``, median of the
  evaluations seen after the warm-up's first half);
* the p95 latency of every dashboard query,

then extrapolates linearly where one Prometheus stops: memory, a rule group's evaluation time reaching
the evaluation interval, and CPU reaching the machine's cores. Range-window rules and range queries
touch more samples once an hour of data exists than after a warm-up of minutes: ``--growth`` samples
the rule groups through a longer run at the largest size to measure that slope.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet_sim  # noqa: E402

from mlops_obs.children import find_binary  # noqa: E402
from mlops_obs.children.prometheus import PrometheusProcess  # noqa: E402

GiB = 1024**3


def rule_files() -> list[Path]:
    return sorted((ROOT / "alerts").glob("mlops-*.yml"))


def dashboard_queries(rate_interval: str) -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expression) for every panel query, variables set to All."""
    from mlops_obs.mixin import config, dashboards

    out = []
    for stem, d in dashboards.dashboards(config.MixinConfig()).items():
        for row in d.rows:
            for p in row.panels:
                for q in p.queries:
                    expr = q.expr.replace("$__rate_interval", rate_interval)
                    out.append((stem, p.title, re.sub(r"\$\{?(job|node|rank|gpu)\}?", ".*", expr)))
    return out


def prom_metrics(prom: PrometheusProcess) -> dict[str, float]:
    """Prometheus' own metrics we read, from its /metrics (not scraped: no series added to the TSDB)."""
    conn = http.client.HTTPConnection("127.0.0.1", prom.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    wanted = (
        "process_resident_memory_bytes",
        "prometheus_tsdb_head_series ",
        "process_cpu_seconds_total",
        "prometheus_tsdb_head_samples_appended_total",
        "prometheus_rule_group_last_duration_seconds",
        "go_memstats_heap_inuse_bytes",
        "prometheus_rule_group_iterations_missed_total",
        "prometheus_target_interval_length_seconds",
    )
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            key, _, val = line.rpartition(" ")
            if key.startswith("prometheus_tsdb_head_samples_appended_total"):
                out["prometheus_tsdb_head_samples_appended_total"] = out.get(
                    "prometheus_tsdb_head_samples_appended_total", 0.0
                ) + float(val)  # one series per sample type in newer versions
            else:
                out[key] = float(val)
    return out


def groups_of(m: dict[str, float], prefix: str) -> dict[str, float]:
    out = {}
    for k, v in m.items():
        if k.startswith(prefix):
            g = re.search(r'rule_group="[^"]*;([^"]+)"', k)
            if g:
                out[g.group(1)] = v
    return out


@dataclass
class SizeResult:
    nodes: int
    head_series: float = 0.0
    samples_per_s: float = 0.0
    cpu_cores: float = 0.0
    rss: float = 0.0
    heap_inuse: float = 0.0
    data_span_s: float = 0.0
    rule_groups_s: dict[str, float] = field(default_factory=dict)
    rule_groups_max_s: dict[str, float] = field(default_factory=dict)
    iterations_missed: float = 0.0
    scrape_interval_p99_s: float = 0.0  # how late scrapes ran: Prometheus keeping up or not
    simulator_cpu_cores: float = 0.0
    loadavg: float = 0.0  # the machine's 1-minute load at the end of the warm-up: how contended it was
    queries: list[dict[str, Any]] = field(default_factory=list)
    growth: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rss_per_series(self) -> float:
        return self.rss / self.head_series if self.head_series else 0.0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def timed_query(prom: PrometheusProcess, path: str, params: dict[str, str]) -> tuple[float, int]:
    """Seconds for one API query and the number of series it returned; raises on an error answer.

    Its own connection and a long timeout: at a large fleet on a busy machine one query can take seconds,
    and a slow answer is a measurement, not a failure."""
    conn = http.client.HTTPConnection("127.0.0.1", prom.port, timeout=300)
    t0 = time.perf_counter()
    try:
        conn.request("GET", f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    dt = time.perf_counter() - t0
    data = json.loads(body)
    if resp.status != 200 or data.get("status") != "success":
        raise RuntimeError(f"{path} failed ({resp.status}): {data.get('error', body[:200])}")
    return dt, len(data["data"]["result"])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        tail = f.read().rpartition(")")[2].split()
    return (int(tail[11]) + int(tail[12])) / os.sysconf("SC_CLK_TCK")


def measure_size(
    n: int, ports: list[int], sim_pid: int, work: Path, args: argparse.Namespace, growth: bool = False
) -> SizeResult:
    si = args.scrape_interval
    prom = PrometheusProcess(
        work / f"prom-{n}",
        [f"127.0.0.1:{p}" for p in ports[:n]],
        scrape_interval=f"{si:g}s",
        evaluation_interval=f"{si:g}s",
        rule_files=rule_files(),
    )
    res = SizeResult(n)
    prom.start(timeout=120)
    try:
        prom.wait_for("count(up == 1)", lambda r: bool(r) and float(r[0]["value"][1]) >= n, timeout=4 * si + 120)
        t_up = time.time() - si  # the first scrapes happened within the interval before everyone was up
        print(f"  {n} nodes: all targets up; warming up {args.warmup:g}s", file=sys.stderr)
        snaps: list[tuple[float, dict[str, float]]] = []
        sim_cpu: list[float] = []
        end = time.monotonic() + args.warmup
        while True:
            snaps.append((time.monotonic(), prom_metrics(prom)))
            sim_cpu.append(cpu_seconds(sim_pid))
            if time.monotonic() >= end:
                break
            time.sleep(min(si, max(0.0, end - time.monotonic())))
        (ta, a), (tb, b) = snaps[len(snaps) // 2], snaps[-1]
        dt = tb - ta
        res.samples_per_s = (
            b["prometheus_tsdb_head_samples_appended_total"] - a["prometheus_tsdb_head_samples_appended_total"]
        ) / dt
        res.cpu_cores = (b["process_cpu_seconds_total"] - a["process_cpu_seconds_total"]) / dt
        res.simulator_cpu_cores = (sim_cpu[-1] - sim_cpu[len(snaps) // 2]) / dt
        res.scrape_interval_p99_s = max(
            (
                v
                for k, v in b.items()
                if k.startswith("prometheus_target_interval_length_seconds") and 'quantile="0.99"' in k
            ),
            default=0.0,
        )
        res.rss = b["process_resident_memory_bytes"]
        res.heap_inuse = b.get("go_memstats_heap_inuse_bytes", 0.0)
        res.head_series = b["prometheus_tsdb_head_series"]
        res.loadavg = os.getloadavg()[0]
        late = [groups_of(m, "prometheus_rule_group_last_duration_seconds") for _, m in snaps[len(snaps) // 2 :]]
        for g in late[-1]:
            seen = [d[g] for d in late if g in d]
            res.rule_groups_s[g] = statistics.median(seen)
            res.rule_groups_max_s[g] = max(seen)
        res.iterations_missed = sum(groups_of(b, "prometheus_rule_group_iterations_missed_total").values())
        print(
            f"  {n} nodes: {res.head_series:.0f} series, {res.samples_per_s:.0f} samples/s, "
            f"RSS {res.rss / GiB:.2f} GiB; running {len(dashboard_queries('1m'))} dashboard queries "
            f"x{args.repeats}",
            file=sys.stderr,
        )
        res.data_span_s = time.time() - t_up
        if not args.query_max_nodes or n <= args.query_max_nodes:
            res.queries = run_queries(prom, t_up, args)
        if growth:
            res.growth = measure_growth(prom, t_up, res.queries, args)
    finally:
        prom.stop()
    return res


def run_queries(prom: PrometheusProcess, t_up: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    si = args.scrape_interval
    queries = dashboard_queries(f"{4 * si:g}s")
    inst: list[list[float]] = [[] for _ in queries]
    rng: list[list[float]] = [[] for _ in queries]
    series = [0] * len(queries)
    errors: list[str | None] = [None] * len(queries)
    # Every run of a query asks about the same instant and the same range (the data present when the phase
    # starts), so its repeats measure the same work however long the phase takes on a busy machine.
    now = time.time()
    for _ in range(args.repeats):
        for i, (_, _, expr) in enumerate(queries):  # round-robin: no query runs twice in a row
            try:
                dt, k = timed_query(prom, "query", {"query": expr, "time": f"{now:.3f}"})
                inst[i].append(dt)
                series[i] = k
                dt, _ = timed_query(
                    prom,
                    "query_range",
                    {"query": expr, "start": f"{t_up:.3f}", "end": f"{now:.3f}", "step": f"{si:g}s"},
                )
                rng[i].append(dt)
            except (RuntimeError, OSError) as e:
                errors[i] = str(e)[:200]
    return [
        {
            "dashboard": d,
            "panel": p,
            "expr": e,
            "series": series[i],
            "error": errors[i] or (None if inst[i] and rng[i] else "no successful run"),
            "instant_p95_s": pct(inst[i], 0.95) if inst[i] else None,
            "range_p95_s": pct(rng[i], 0.95) if rng[i] else None,
        }
        for i, (d, p, e) in enumerate(queries)
    ]


def measure_growth(
    prom: PrometheusProcess, t_up: float, queries: list[dict[str, Any]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Rule group durations and the slowest range queries' latency as minutes of data accumulate."""
    out = []
    slow = sorted((q for q in queries if not q["error"]), key=lambda q: -q["range_p95_s"])[:3]
    end = time.monotonic() + args.growth
    while True:
        m = prom_metrics(prom)
        now = time.time()
        ranges = {}
        for q in slow:
            dt, _ = timed_query(
                prom,
                "query_range",
                {"query": q["expr"], "start": f"{t_up:.3f}", "end": f"{now:.3f}", "step": f"{args.scrape_interval:g}s"},
            )
            ranges[q["panel"]] = dt
        out.append(
            {
                "data_span_s": now - t_up,
                "rss": m["process_resident_memory_bytes"],
                "rule_groups_s": groups_of(m, "prometheus_rule_group_last_duration_seconds"),
                "range_s": ranges,
            }
        )
        if time.monotonic() >= end:
            return out
        time.sleep(min(60.0, max(0.0, end - time.monotonic())))


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope (slope 0 with fewer than two distinct x)."""
    if len(set(xs)) < 2:
        return (ys[0] if ys else 0.0), 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def extrapolate(results: list[SizeResult], interval: float, cores: int) -> dict[str, Any]:
    ns = [float(r.nodes) for r in results]
    big = results[-1]
    per_node = big.head_series / big.nodes
    rss0, rss_slope = fit([r.head_series for r in results], [r.rss for r in results])
    cpu0, cpu_slope = fit(ns, [r.cpu_cores for r in results])
    out: dict[str, Any] = {
        "series_per_node": per_node,
        "marginal_bytes_per_series": rss_slope,
        "fixed_rss": rss0,
        "cpu_cores_per_100_nodes": cpu_slope * 100,
    }
    if rss_slope > 0:
        out["nodes_at_rss_gib"] = {g: (g * GiB - rss0) / (rss_slope * per_node) for g in (16, 64, 128)}
    if cpu_slope > 0:
        out["nodes_at_cores"] = (cores - cpu0) / cpu_slope
    groups: dict[str, float] = {}
    for g in big.rule_groups_s:
        b0, b1 = fit(ns, [r.rule_groups_s.get(g, 0.0) for r in results])
        groups[g] = (interval - b0) / b1 if b1 > 0 else float("inf")
    out["nodes_at_eval_interval"] = groups
    big = _with_queries(results)
    slow = sorted((q for q in big.queries if not q["error"]), key=lambda q: -q["range_p95_s"])
    # A 3 h dashboard at one point per scrape interval evaluates 3 h / span times more steps with data.
    out["slowest_at_1000_nodes"] = [
        {
            "dashboard": q["dashboard"],
            "panel": q["panel"],
            "instant_p95_s": q["instant_p95_s"] * 1000 / big.nodes,
            "range_p95_s": q["range_p95_s"] * 1000 / big.nodes,
            "range_3h_s": q["range_p95_s"] * 1000 / big.nodes * 10800 / max(big.data_span_s, 1.0),
            "expr": q["expr"],
        }
        for q in slow[:10]
    ]
    return out


def _with_queries(results: list[SizeResult]) -> SizeResult:
    """The largest size whose dashboard queries were run (``--query-max-nodes`` skips the larger ones)."""
    return max((r for r in results if r.queries), key=lambda r: r.nodes, default=results[-1])


def table(results: list[SizeResult]) -> str:
    lines = [
        "| nodes | head series | samples/s | Prometheus CPU (cores) | RSS (GiB) | RSS/series (B) "
        "| slowest rule group (ms) | all groups (ms) | dashboard p95 instant, median / max (ms) "
        "| dashboard p95 range, median / max (ms) | scrape interval p99 (s) | load average |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        inst = [q["instant_p95_s"] * 1000 for q in r.queries if not q["error"]]
        rng = [q["range_p95_s"] * 1000 for q in r.queries if not q["error"]]
        slow = max(r.rule_groups_s.values(), default=0.0) * 1000
        total = sum(r.rule_groups_s.values()) * 1000
        qi = f"{statistics.median(inst):.1f} / {max(inst):.1f}" if inst else "not run"
        qr = f"{statistics.median(rng):.1f} / {max(rng):.1f}" if rng else "not run"
        lines.append(
            f"| {r.nodes} | {r.head_series:,.0f} | {r.samples_per_s:,.0f} | {r.cpu_cores:.2f} | {r.rss / GiB:.2f} "
            f"| {r.rss_per_series:,.0f} | {slow:.1f} | {total:.1f} | {qi} | {qr} "
            f"| {r.scrape_interval_p99_s:.2f} | {r.loadavg:.1f} |"
        )
    return "\n".join(lines)


def report(results: list[SizeResult], extra: dict[str, Any], args: argparse.Namespace) -> str:
    big = results[-1]
    out = [table(results), "", f"Rule groups at {big.nodes} nodes (median / max of the last evaluations, ms):"]
    for g, v in sorted(big.rule_groups_s.items()):
        out.append(f"  {g}: {v * 1000:.1f} / {big.rule_groups_max_s[g] * 1000:.1f}")
    qbig = _with_queries(results)
    out.append(
        f"Slowest dashboard queries at {qbig.nodes} nodes (p95 ms: instant / range over "
        f"{qbig.data_span_s / 60:.0f} min of data):"
    )
    for q in sorted((q for q in qbig.queries if not q["error"]), key=lambda q: -q["range_p95_s"])[:12]:
        out.append(
            f"  {q['dashboard']}/{q['panel']}: {q['instant_p95_s'] * 1000:.1f} / "
            f"{q['range_p95_s'] * 1000:.1f}  {q['expr'][:110]}"
        )
    failed = [q for r in results for q in r.queries if q["error"]]
    out.append(f"Failed queries: {len(failed)}" + "".join(f"\n  {q['panel']}: {q['error']}" for q in failed[:5]))
    out.append(f"Extrapolation (linear in nodes, {extra['series_per_node']:.0f} series a node):")
    out.append(
        f"  marginal memory {extra['marginal_bytes_per_series']:,.0f} B/series, "
        f"fixed {extra['fixed_rss'] / GiB:.2f} GiB"
    )
    for g, nodes in extra.get("nodes_at_rss_gib", {}).items():
        out.append(f"  RSS reaches {g} GiB at ~{nodes:,.0f} nodes")
    if "nodes_at_cores" in extra:
        out.append(
            f"  Prometheus CPU reaches {os.cpu_count()} cores at ~{extra['nodes_at_cores']:,.0f} nodes "
            f"({extra['cpu_cores_per_100_nodes']:.2f} cores per 100 nodes)"
        )
    for g, nodes in sorted(extra["nodes_at_eval_interval"].items(), key=lambda kv: kv[1]):
        out.append(f"  rule group {g} takes the whole {args.scrape_interval:g}s interval at ~{nodes:,.0f} nodes")
    for q in extra["slowest_at_1000_nodes"][:5]:
        out.append(
            f"  at 1000 nodes ~{q['instant_p95_s'] * 1000:.0f} ms instant, ~{q['range_3h_s']:.1f} s for a 3 h "
            f"range: {q['dashboard']}/{q['panel']}"
        )
    out.append(f"Simulator CPU at {big.nodes} nodes: {big.simulator_cpu_cores:.2f} cores")
    if big.growth:
        out.append(
            "As data accumulates at the largest size (data span min: slowest rule group ms, RSS GiB, "
            "slowest range queries s):"
        )
        for gpt in big.growth:
            slow = max(gpt["rule_groups_s"].values(), default=0.0) * 1000
            rq = ", ".join(f"{v:.2f}" for v in gpt["range_s"].values())
            out.append(f"  {gpt['data_span_s'] / 60:5.1f}: {slow:8.1f}  {gpt['rss'] / GiB:.2f}  {rq}")
    return "\n".join(out)


def write_json(args: argparse.Namespace, results: list[SizeResult], extra: dict[str, Any] | None = None) -> None:
    doc = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
        "results": [{**r.__dict__, "rss_per_series": r.rss_per_series} for r in results],
        "extrapolation": extra,
    }
    args.json.write_text(json.dumps(doc, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="10,50,100,200", help="Fleet sizes (nodes), comma-separated, ascending.")
    ap.add_argument("--scrape-interval", type=float, default=15.0, help="Seconds; also the evaluation interval.")
    ap.add_argument("--warmup", type=float, default=180.0, help="Seconds of scraping before measuring.")
    ap.add_argument("--repeats", type=int, default=10, help="Runs of each dashboard query (p95 over these).")
    ap.add_argument(
        "--growth",
        type=float,
        default=0.0,
        help="At the largest size, keep sampling rule group durations this many seconds more.",
    )
    ap.add_argument(
        "--query-max-nodes",
        type=int,
        default=0,
        help="Above this many nodes, skip the dashboard queries (0: never skip); their latency is "
        "then extrapolated from the sizes that ran them.",
    )
    ap.add_argument("--ranks", type=int, default=fleet_sim.RANKS_PER_NODE, help="SDK ranks in the template body.")
    ap.add_argument("--templates", type=Path, help="Rendered template bodies to reuse (fleet_sim.py render).")
    ap.add_argument("--quick", action="store_true", help="1 and 2 nodes, 1 s intervals: the smoke test, in seconds.")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    ap.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="Measure nothing: report (and extrapolate from) the sizes in these --json files.",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.scrape_interval, args.warmup, args.repeats, args.ranks = "1,2", 1.0, 3.0, 2, 2
    if args.report:
        results = sorted(
            (
                SizeResult(**{k: v for k, v in r.items() if k != "rss_per_series"})
                for f in args.report
                for r in json.loads(f.read_text())["results"]
            ),
            key=lambda r: r.nodes,
        )
        args.scrape_interval = json.loads(args.report[0].read_text())["args"]["scrape_interval"]
        extra = extrapolate(results, args.scrape_interval, os.cpu_count() or 1)
        print(report(results, extra, args))
        if args.json:
            write_json(args, results, extra)
        return 0
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if not find_binary("prometheus"):
        print("bench: prometheus is not installed (apt-get install prometheus)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="mlops-obs-fleet-") as tmp:
        work = Path(tmp)
        tmpl = args.templates
        if tmpl is None:
            print(f"rendering template bodies from real exporters ({args.ranks} ranks) ...", file=sys.stderr)
            tmpl = work / "templates.json"
            tmpl.write_text(json.dumps(fleet_sim.render_templates(args.ranks, gap=min(4.0, 2 * args.scrape_interval))))
        ready = work / "ports.json"
        sim = subprocess.Popen(
            [
                sys.executable,
                str(Path(fleet_sim.__file__)),
                "serve",
                "--templates",
                str(tmpl),
                "--nodes",
                str(sizes[-1]),
                "--ready",
                str(ready),
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        results: list[SizeResult] = []
        try:
            deadline = time.monotonic() + 120
            while not ready.exists():
                if sim.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench: the fleet simulator did not start")
                time.sleep(0.1)
            ports = [int(m["port"]) for m in json.loads(ready.read_text())]
            for n in sizes:
                results.append(measure_size(n, ports, sim.pid, work, args, growth=n == sizes[-1] and args.growth > 0))
                if args.json:  # after every size: a long run stopped part-way keeps what it measured
                    write_json(args, results)
        finally:
            sim.terminate()
            sim.wait(timeout=30)
    extra = extrapolate(results, args.scrape_interval, os.cpu_count() or 1)
    print(report(results, extra, args))
    if args.json:
        write_json(args, results, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
