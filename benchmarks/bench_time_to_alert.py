"""Time to alert with the shipped (unscaled) rules at a 15 s scrape and evaluation interval.

Each fault the CPU workload injects runs as its own job, all at once (15 s scrapes leave the machine
mostly idle), against the real stack: the exporter sidecar with its defaults, Prometheus scraping it
every 15 s and evaluating the generated alerting and recording rules every 15 s, and the ranks with the
workload's default ``--flush-interval=auto``: they flush just before the sidecar's rounds once it has
learned the scrape interval, every 15 s before that. For each fault the time is taken from
the fault's injection, as the faulty rank's own JSON log shows it (its error line for a crash or a NaN,
the end of its last step before it hung, its first step for a straggler or a slow loader), to the first
evaluation at which Prometheus had the named alert firing (``ALERTS{alertstate="firing"}``) for that
rank. A job is stopped once its alert fired; the healthy job runs for ``--healthy-minutes`` and must
fire no training alert. Budgets (issue 12): crash, stall and NaN within 90 s; a 2x straggler and slow
data within 5 minutes.

    .venv/bin/python benchmarks/bench_time_to_alert.py                # about 8 minutes
    .venv/bin/python benchmarks/bench_time_to_alert.py --only crash --only stall

Prints a Markdown table (the one in README.md and docs/alerts.md) and, with ``--json``, the raw figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fault_runs import Case, fault_time, fired_alerts, workload_command  # noqa: E402

FAR = 10_000_000  # steps: the jobs run until stopped
AT = 120  # the step a point fault strikes at: the job has a step-time history by then


@dataclass(frozen=True)
class Fault:
    name: str
    case: Case
    alert: str
    budget: float  # seconds


FAULTS = (
    Fault("crash", Case("tta-crash", 2, FAR, (f"crash:rank=1,step={AT}",), "crash", 1, AT, None),
          "TrainingRankFailed", 90.0),
    Fault("stall", Case("tta-stall", 2, FAR, (f"stall:rank=1,step={AT}",), "stall", 1, AT, None,
                        extra=("--timeout=1800",)), "TrainingStalled", 90.0),
    Fault("nan", Case("tta-nan", 2, FAR, (f"nan:rank=1,step={AT}",), "nan_loss", 1, AT, None),
          "TrainingNonFiniteLoss", 90.0),
    Fault("straggler (2x)", Case("tta-straggler", 2, FAR, ("straggler:rank=1,factor=2",), "straggler", 1, None, None),
          "TrainingStraggler", 300.0),
    Fault("slow data", Case("tta-slowdata", 2, FAR, ("slow-data:rank=1,factor=30",), "data_starvation", 1, None,
                            None), "TrainingDataLoaderBound", 300.0),
)  # fmt: skip
HEALTHY = Case("tta-healthy", 2, FAR, (), None, None, None, None)


def _lines(logs: Path, job: str, rank: int) -> list[dict[str, Any]]:
    path = logs / f"{job}-rank{rank}.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def _stop(p: subprocess.Popen[bytes], finish: bool = True) -> None:
    """End a job: finish it cleanly (SIGUSR2: every rank stops after the same step, so the stop raises no
    alert of its own) where its ranks still make steps, else stop it as torchrun would (SIGINT)."""
    if p.poll() is None and finish:
        p.send_signal(signal.SIGUSR2)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    if p.poll() is None:
        p.send_signal(signal.SIGINT)  # the launcher stops its ranks
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(faults: tuple[Fault, ...], healthy_minutes: float, deadline_minutes: float, work: Path) -> dict[str, Any]:
    from mlops_obs.children.prometheus import PrometheusProcess
    from mlops_obs.config import resolve
    from mlops_obs.exporter import Exporter, settings
    from mlops_obs.mixin.config import MixinConfig
    from mlops_obs.mixin.generate import ALERTS_FILE, RECORDING_FILE, render_files
    from mlops_obs.mixin.rules import training_alerts
    from mlops_obs.rankdir import cadence

    mp, logs = work / "mp", work / "logs"
    mp.mkdir()
    files = render_files(MixinConfig())
    for rel in (ALERTS_FILE, RECORDING_FILE):
        (work / Path(rel).name).write_text(files[rel])
    cfg = resolve(settings(), {"web.listen-address": "127.0.0.1:0", "collector.gpu": False, "multiproc-dir": str(mp)},
                  environ={})  # fmt: skip
    ex = Exporter(cfg).start()
    prom = PrometheusProcess(work / "prom", [ex.url.split("//", 1)[1].rstrip("/")], scrape_interval="15s",
                             evaluation_interval="15s",
                             rule_files=[work / Path(ALERTS_FILE).name, work / Path(RECORDING_FILE).name])  # fmt: skip
    prom.start()
    training = {a.name for a in training_alerts(MixinConfig())}
    started = time.time()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    results: dict[str, Any] = {}
    try:
        for c in (*(f.case for f in faults), HEALTHY):
            procs[c.job] = subprocess.Popen(workload_command(c, logs, mp, flush="auto"), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, cwd=ROOT)  # fmt: skip
        pending = {f.case.job: f for f in faults}
        end = time.monotonic() + deadline_minutes * 60
        healthy_end = time.monotonic() + healthy_minutes * 60
        while (pending or time.monotonic() < healthy_end) and time.monotonic() < end:
            time.sleep(5)
            fired = fired_alerts(prom, started, time.time())
            for job, f in list(pending.items()):
                hits = [a for a in fired if a.labels.get("job") == job and a.labels.get("alertname") == f.alert]
                if hits:
                    _stop(procs[job], finish=f.case.kind != "stall")  # a hung rank makes no step
                    assert f.case.rank is not None
                    struck = fault_time(f.case, _lines(logs, job, f.case.rank))
                    first = min(a.first for a in hits)
                    results[f.name] = {"alert": f.alert, "budget": f.budget, "fault_at": struck, "fired_at": first,
                                       "seconds": None if struck is None else first - struck,
                                       "ranks": sorted({str(a.labels.get("rank")) for a in hits})}  # fmt: skip
                    del pending[job]
        for f in pending.values():
            results[f.name] = {"alert": f.alert, "budget": f.budget, "seconds": None, "ranks": []}
        fired = fired_alerts(prom, started, time.time())
        results["cadence"] = cadence.read(mp, time.time())  # what the ranks followed
        results["healthy"] = {
            "minutes": (time.time() - started) / 60,
            "training_alerts": sorted({a.labels["alertname"] for a in fired
                                       if a.labels.get("job") == HEALTHY.job and a.labels["alertname"] in training}),
        }  # fmt: skip
        results["other_alerts"] = sorted({(a.labels["alertname"], a.labels.get("job", ""), a.labels.get("rank", ""))
                                          for a in fired})  # fmt: skip
    finally:
        for job, p in procs.items():
            _stop(p, finish=job != "tta-stall")
        prom.stop()
        ex.stop()
    return results


def table(faults: tuple[Fault, ...], results: dict[str, Any]) -> str:
    rows = ["| fault (2 ranks, rank 1 faulty) | alert | budget | time to alert | names |",
            "|---|---|---|---|---|"]  # fmt: skip
    for f in faults:
        r = results[f.name]
        took = r["seconds"]
        shown = "never" if took is None else f"{took:.0f} s"
        ok = took is not None and took <= f.budget and r["ranks"] == ["1"]
        names = ", ".join(f"rank {x}" for x in r["ranks"]) or "-"
        rows.append(f"| {f.name} | `{f.alert}` | {f.budget:.0f} s | {shown}{'' if ok else ' (**over**)'} | {names} |")
    h = results["healthy"]
    fired = ", ".join(f"`{a}`" for a in h["training_alerts"]) or "no training alert"
    rows.append(f"| none ({h['minutes']:.0f} min healthy run) | - | nothing | {fired} | - |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=[f.name.split()[0] for f in FAULTS],
                    help="run only these faults (repeatable)")  # fmt: skip
    ap.add_argument("--healthy-minutes", type=float, default=7.0)
    ap.add_argument("--deadline-minutes", type=float, default=9.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    faults = tuple(f for f in FAULTS if not a.only or f.name.split()[0] in a.only)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tta-") as d:
        results = run(faults, a.healthy_minutes, a.deadline_minutes, Path(d))
    load = " / ".join(f"{x:.1f}" for x in (*load_before, *os.getloadavg()))
    print(
        f"# time to alert, 15 s scrape and evaluation, shipped rules, ranks following the sidecar's cadence "
        f"({platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; "
        f"load average 1/5/15 min before / after: {load})"
    )
    print(table(faults, results))
    c = results["cadence"]
    print(
        "# the sidecar's cadence the ranks followed, at the end: "
        + (
            f"a scrape every {c['scrape_interval']:g} s"
            if c and c["scrape_interval"]
            else "none (ranks on their fallback)"
        )
    )
    if a.json:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    over = [f.name for f in faults if results[f.name]["seconds"] is None or results[f.name]["seconds"] > f.budget]
    return 1 if over or results["healthy"]["training_alerts"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
