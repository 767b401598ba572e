"""One set of reference-workload runs, each fault the CPU workload injects plus a healthy run, that both
the fault-to-alert matrix (``test_alerts_e2e.py``) and the root-cause scorecard (``test_rca_scorecard.py``)
read: the runs are the expensive part, so the suite pays for them once.

The stack is the real one: the exporter sidecar (in this process), Prometheus evaluating the mixin's
rules scaled to a clock 15 times faster (a 1 s scrape and evaluation standing for the 15 s the rules are
sized for, see ``mixin_config.scaled``), Alertmanager with the generated routing and inhibitions, and
the alert sink writing into its own event store. Every job starts at once (separate jobs on one node, as
on a shared machine), so the runs cost the slowest one, not their sum. After they end the fixture waits
for their final state to be scraped and for the alerts they must raise, then records every alert that
fired (``ALERTS``, from Prometheus' history) with the time it first fired.

The stack must stay as responsive as a deployed sidecar while ~30 ranks keep both cores of a CI machine
busy: a stall of 4-5 s in this process (4-5 failed 1 s scrapes) fires ``TrainingNodeDown`` for every job
still running, the healthy one included. Two things make this process unlike a deployed sidecar, and are
undone here. (1) It has no CPU of its own: the ranks run at :data:`RANK_NICENESS`, as on a node where the
sidecar container has its CPU request. (2) Its heap holds what pytest and torch imported (~200k objects)
that a real sidecar never has: a full collection walking them held the GIL, and so the exporter's loop,
sampler and handlers, for ~0.17 s of CPU, 3.7-4 s of wall time at the share of the CPU this process had
(measured: 3-4 failed scrapes in a row). They are frozen while the jobs run, as ``mlops-obs exporter``
freezes its start-up objects (``tune_gc``).

``fault_time`` reads when each fault struck from the ranks' own JSON logs; the time-to-alert benchmark
(``benchmarks/bench_time_to_alert.py``) uses it with the unscaled rules.
"""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from mlops_obs.children.prometheus import PrometheusProcess

ROOT = Path(__file__).resolve().parent.parent
TIME_SCALE = 1 / 15  # Prometheus here scrapes and evaluates every 1 s, standing for 15 s
# The ranks flush at a fixed interval here. Following the sidecar (the workload's default) they would
# flush every 1 s, just before its rounds; but a rank with no cadence to follow (before the sidecar has
# learned the scrape interval, or when it saw none for three intervals) falls back to
# MAX_FLUSH_INTERVAL, 15 s on every clock: 225 s on this one, far past the scaled stall floor (4 s).
# A fixed flush a fifth of the scaled scrape keeps every rank's data as fresh as following keeps it at
# the shipped 15 s; benchmarks/bench_time_to_alert.py runs the default, unscaled.
FLUSH = "200ms"
# The ranks' niceness (inherited from their launcher): CPU left over by the stack (sidecar, Prometheus,
# Alertmanager) goes to them, as where the sidecar container has its own CPU request (deploy/).
RANK_NICENESS = 10


@dataclass(frozen=True)
class Case:
    job: str
    world: int
    steps: int
    inject: tuple[str, ...]
    kind: str | None  # the root cause rca must name (None: healthy)
    rank: int | None
    step: int | None
    logs_only: str | None  # the kind the logs alone give (None: the same as with metrics)
    other: tuple[str, int] | None = None
    extra: tuple[str, ...] = ()
    alerts: tuple[str, ...] = ()  # alerts that must fire naming `rank` (and no other rank)
    # Train until each of `alerts` reached the alert store firing, then finish cleanly (`steps` is a cap).
    until_alerted: bool = False


STALL = ("--timeout=25",)  # the peers' all-reduce gives up after 25 s: the job then fails
# A straggler or a slow loader alerts only while its job runs (a finished rank is no longer slow), after
# the scaled window and `for:` (8 s each), and reaches the alert store a group wait later: whatever a step
# costs on the machine, those jobs train until their alert is stored, then finish cleanly (SIGUSR2 to the
# launcher), `UNTIL_ALERTED` steps being only a cap. The healthy run trains long enough for the windows.
UNTIL_ALERTED = 1_000_000
# How long a job waits for its alert before it is finished anyway (the matrix then says what is missing).
ALERT_WAIT_SECONDS = 300.0
CASES = (
    # Healthy, with checkpoints and a peak FLOP/s (MFU) so that every training panel has data.
    Case("healthy", 2, 500, (), None, None, None, None, extra=("--checkpoint-every=100", "--peak-flops=1e9")),
    Case("nan-w2-last", 2, 30, ("nan:rank=1,step=6",), "nan_loss", 1, 6, None,
         alerts=("TrainingNonFiniteLoss", "TrainingRankFailed")),
    Case("nan-w4-first", 4, 30, ("nan:rank=0,step=8",), "nan_loss", 0, 8, None,
         alerts=("TrainingNonFiniteLoss", "TrainingRankFailed")),
    Case("crash-w2-first", 2, 30, ("crash:rank=0,step=7",), "crash", 0, 7, None, alerts=("TrainingRankFailed",)),
    Case("crash-w4-last", 4, 30, ("crash:rank=3,step=5",), "crash", 3, 5, None, alerts=("TrainingRankFailed",)),
    Case("stall-w2-last", 2, 30, ("stall:rank=1,step=6,seconds=300",), "stall", 1, 6, None, extra=STALL,
         alerts=("TrainingStalled",)),
    Case("stall-w4-first", 4, 30, ("stall:rank=0,step=5,seconds=300",), "stall", 0, 5, None, extra=STALL,
         alerts=("TrainingStalled",)),
    Case("straggler-w2-last", 2, UNTIL_ALERTED, ("straggler:rank=1,factor=4",), "straggler", 1, None, "healthy",
         alerts=("TrainingStraggler",), until_alerted=True),
    Case("slowdata-w4-last", 4, UNTIL_ALERTED, ("slow-data:rank=3,factor=30",), "data_starvation", 3, None,
         "healthy", alerts=("TrainingDataLoaderBound",), until_alerted=True),
    Case("straggler-crash-w4", 4, 40, ("straggler:rank=0,factor=4", "crash:rank=3,step=20"), "crash", 3, 20, None,
         other=("straggler", 0), alerts=("TrainingRankFailed",)),
)  # fmt: skip


@dataclass
class Fired:
    """One alert as Prometheus fired it: its labels, and when it was first and last seen firing."""

    labels: dict[str, str]
    first: float
    last: float


@dataclass
class Runs:
    root: Path
    mp: Path
    logs: Path
    prom: PrometheusProcess
    alert_store: Any  # the alert sink's EventStore
    am: Any  # AlertmanagerProcess
    mixin: Any  # the scaled MixinConfig the rules were rendered from
    codes: dict[str, int]
    started: float
    ended: float
    fired: list[Fired] = field(default_factory=list)

    def alerts(self, job: str) -> list[Fired]:
        return [f for f in self.fired if f.labels.get("job") == job]

    def launcher_stderr(self, job: str, tail: int = 2000) -> str:
        """The end of what ``job``'s launcher wrote to its standard error (for failure messages)."""
        try:
            return (self.root / "launchers" / f"{job}.stderr").read_text(errors="replace")[-tail:]
        except OSError as e:
            return f"(unreadable: {e})"

    def log_lines(self, job: str, rank: int) -> list[dict[str, Any]]:
        path = self.logs / f"{job}-rank{rank}.jsonl"
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def fault_time(case: Case, lines: list[dict[str, Any]]) -> float | None:
    """When ``case``'s fault struck its rank, from that rank's JSON log lines (Unix time): the error
    it logged (crash, NaN), the end of its last step before it hung (stall), its first step (a
    straggler or a slow loader is slow from the start)."""
    steps = [ln for ln in lines if ln.get("event") == "step"]
    if case.kind in ("crash", "nan_loss"):
        errors = [ln for ln in lines if ln.get("level") == "error"]
        return _ts(errors[0]) if errors else None
    if case.kind == "stall":
        return _ts(steps[-1]) if steps else None
    return _ts(steps[0]) if steps else None


def _ts(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(line["ts"]).replace("Z", "+00:00")).timestamp()


def fired_alerts(prom: PrometheusProcess, start: float, end: float, step: float = 1.0) -> list[Fired]:
    """Every alert that was firing between ``start`` and ``end``, from Prometheus' ``ALERTS`` history."""
    data = prom.api("query_range", query='ALERTS{alertstate="firing"}', start=f"{start:.3f}", end=f"{end:.3f}",
                    step=f"{step:g}")  # fmt: skip
    out = []
    for r in data["result"]:
        times = [float(t) for t, _ in r["values"]]
        labels = {k: v for k, v in r["metric"].items() if k not in ("__name__", "alertstate")}
        out.append(Fired(labels, min(times), max(times)))
    return sorted(out, key=lambda f: f.first)


def workload_command(case: Case, logs: Path, mp: Path, *more: str, flush: str = FLUSH) -> list[str]:
    """The reference workload's command line for ``case``; ``flush`` is its ``--flush-interval``."""
    return [sys.executable, "-m", "mlops_obs", "workload", f"--world-size={case.world}", f"--steps={case.steps}",
            f"--job={case.job}", f"--log-dir={logs}", f"--multiproc-dir={mp}", f"--flush-interval={flush}",
            "--log-every=1", "--device=cpu", *(f"--inject={x}" for x in case.inject), *case.extra, *more]  # fmt: skip


def start_runs(root: Path) -> tuple[Runs, list[Any]]:
    """Start the stack and every case; returns the runs and what to stop at the end."""
    import yaml

    from mlops_obs.children.alertmanager import AlertmanagerProcess
    from mlops_obs.config import resolve
    from mlops_obs.exporter import Exporter, settings
    from mlops_obs.logs.alerts import AlertIntake, AlertReceiver
    from mlops_obs.logs.store import EventStore, StoreSink
    from mlops_obs.mixin import config as mixin_config
    from mlops_obs.mixin.generate import ALERTMANAGER_FILE, ALERTS_FILE, RECORDING_FILE, render_files

    mp, logs = root / "mp", root / "logs"
    mp.mkdir()
    stop: list[Any] = []
    store = EventStore(root / "alerts-store")
    stop.append(store.close)
    intake = AlertIntake(StoreSink(root / "alerts-store"))
    stop.append(intake.sink.close)
    sink = AlertReceiver(("127.0.0.1", 0), intake).start()
    stop.append(sink.stop)
    base = mixin_config.MixinConfig()
    files = render_files(base, sink_url=sink.url + "/alerts", time_scale=TIME_SCALE)
    for rel in (ALERTS_FILE, RECORDING_FILE):
        (root / Path(rel).name).write_text(files[rel])
    am = AlertmanagerProcess(root / "am", yaml.safe_load(files[ALERTMANAGER_FILE])).start()
    stop.append(am.stop)
    cfg = resolve(settings(), {"web.listen-address": "127.0.0.1:0", "sampler.interval": "0.2s",
                               "collector.host": True, "collector.gpu": False, "collector.training": True,
                               "multiproc-dir": str(mp)}, environ={})  # fmt: skip
    ex = Exporter(cfg).start()
    stop.append(ex.stop)
    prom = PrometheusProcess(
        root / "prom",
        [ex.url.split("//", 1)[1].rstrip("/")],
        scrape_interval="1s",
        evaluation_interval="1s",
        rule_files=[root / Path(ALERTS_FILE).name, root / Path(RECORDING_FILE).name],
        alertmanagers=[am.address],
    ).start()
    stop.append(prom.stop)
    runs = Runs(root, mp, logs, prom, store, am, mixin_config.scaled(base, TIME_SCALE), {}, time.time(), 0.0)
    return runs, stop[::-1]


def run_all(root: Path) -> tuple[Runs, list[Any]]:
    """Every case at once, to its end; their final state scraped and the alerts they raise fired.

    What this process holds when they start (pytest, torch, the modules of the tests before) is out of
    the cyclic collector's reach while they run (see the module's docstring), and back in it after.
    """
    gc.collect()
    gc.freeze()
    try:
        return _run_all(root)
    finally:
        gc.unfreeze()


def _run_all(root: Path) -> tuple[Runs, list[Any]]:
    runs, stop = start_runs(root)
    procs: dict[str, subprocess.Popen[str]] = {}
    (root / "launchers").mkdir()
    try:
        for c in CASES:
            cmd = ["nice", "-n", str(RANK_NICENESS), *workload_command(c, runs.logs, runs.mp)]
            # Standard error into a file, not a pipe nobody reads while the jobs run (a launcher writing
            # more than a pipe holds would block); Runs.launcher_stderr reads it for failure messages.
            with open(root / "launchers" / f"{c.job}.stderr", "wb") as err:
                procs[c.job] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=ROOT)
        runs.codes = _wait(runs, procs)
        # The ranks' final snapshots reach Prometheus with the first scrape after a sampler round that
        # followed the last exit.
        runs.ended = time.time() + 0.5
        want = sum(c.world for c in CASES)
        runs.prom.wait_for(f"count(timestamp(mlops_training_rank_state) > {runs.ended:.3f}) / 3", timeout=60,
                           ok=lambda r: bool(r) and float(r[0]["value"][1]) >= want)  # fmt: skip
        # Alerts on the runs' last state (a failed rank) fire a `for:` and an evaluation later.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _missing(runs):
            time.sleep(0.5)
        runs.fired = fired_alerts(runs.prom, runs.started, time.time())
    except BaseException:
        for fn in stop:
            fn()
        raise
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return runs, stop


def stored_alert(runs: Runs, alertname: str, job: str) -> dict[str, Any] | None:
    """The alert as the sink stored it, firing, once Alertmanager delivered it; ``None`` before."""
    for ev in runs.alert_store.query(kind="alert", job=job):
        if ev["fields"].get("alertname") == alertname and ev["fields"].get("status") == "firing":
            return dict(ev)
    return None


def _wait(runs: Runs, procs: dict[str, subprocess.Popen[str]]) -> dict[str, int]:
    """Every job's exit code once all have ended; each ``until_alerted`` job is asked to finish once its
    alerts are in the store (or after :data:`ALERT_WAIT_SECONDS`)."""
    waiting = {c.job: c for c in CASES if c.until_alerted}
    give_up = time.monotonic() + ALERT_WAIT_SECONDS
    deadline = time.monotonic() + 600
    while any(p.poll() is None for p in procs.values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs still running: {[j for j, p in procs.items() if p.poll() is None]}")
        for job, c in list(waiting.items()):
            if all(stored_alert(runs, a, job) for a in c.alerts) or time.monotonic() > give_up:
                procs[job].send_signal(signal.SIGUSR2)  # its launcher: every rank stops after the same step
                del waiting[job]
        time.sleep(0.5)
    return {job: int(p.returncode) for job, p in procs.items()}


def _missing(runs: Runs) -> list[tuple[str, str]]:
    now = fired_alerts(runs.prom, runs.started, time.time())
    fired = {(f.labels.get("alertname"), f.labels.get("job")) for f in now}
    return [(a, c.job) for c in CASES for a in c.alerts if (a, c.job) not in fired]
