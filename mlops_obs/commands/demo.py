"""``mlops-obs demo``: one incident end to end on embedded defaults, finishing by itself.

The whole stack, each part the real one: the alert sink (in this process) writing into an event store,
Alertmanager (child process) routing to it with the generated routing and inhibitions, the exporter
sidecar (in this process), Prometheus (child process) scraping it and evaluating the mixin's generated
alerts and recording rules, the log shipper (a thread) filling the store from the ranks' logs, and a
2-rank DDP workload (child processes) with the scenario's fault injected. When the workload has ended
and the alert the fault should raise is in the store, the demo runs the root-cause analysis over the
store and Prometheus and prints its verdict and the HTML report's path.

The rules are the shipped ones on a clock :data:`SPEED` times faster (``mixin_config.scaled``: every
``for:``, window and wait divided by it, a 0.5 s scrape and evaluation standing for the 15 s the rules are
sized for), so an alert sized for minutes fires within the demo's minute; the demo says so when it
starts. Everything it starts is stopped before it returns, on every path (a fault, Ctrl-C, SIGTERM,
SIGHUP); the work directory (logs, store, rules, TSDB, report) is kept for browsing.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from mlops_obs.children import find_binary
from mlops_obs.children.alertmanager import AlertmanagerProcess
from mlops_obs.children.prometheus import PrometheusProcess
from mlops_obs.commands.workload import WORKLOAD_SETTINGS
from mlops_obs.config import (
    COMMON_SETTINGS,
    ConfigError,
    Setting,
    choice_parser,
    int_parser,
    parse_bool,
    parse_listen_address,
    parse_optional_path,
)
from mlops_obs.mixin.rules import STRAGGLER
from mlops_obs.rankdir import RankDirectory, Snapshot
from mlops_obs.workload.launcher import StopRequest, launch, make_directory

SPEED = 30  # the rules' clock runs this many times faster: a 0.5 s scrape and evaluation stand for 15 s
SCRAPE = "500ms"
ALERT_WAIT_SECONDS = 45.0  # after the workload ended, how long the alert may take to reach the store
PROGRESS_EVERY = 5.0  # seconds between progress lines


@dataclass(frozen=True)
class Scenario:
    """One fault the demo injects (on the last rank), the alert it must raise, the verdict it must get."""

    name: str
    inject: tuple[str, ...]  # with {rank} and {step} filled in
    steps: int  # default run length: long enough for the scaled windows and `for:` to pass
    fault_step: int | None
    alert: str | None
    kind: str | None  # the root cause rca must name (None: healthy)
    about: str
    min_world: int = 1
    workload: tuple[tuple[str, Any], ...] = ()


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("none", (), 3000, None, None, None, "a healthy run: no training alert fires and the verdict is healthy"),
    Scenario("crash", ("crash:rank={rank},step={step}",), 300, 150, "TrainingRankFailed", "crash",
             "rank {rank} raises an exception at step {step}; the launcher then stops the other ranks"),
    # TrainingNonFiniteLoss (a warning) fires too; the critical TrainingRankFailed of the same rank mutes it.
    Scenario("nan", ("nan:rank={rank},step={step}",), 300, 150, "TrainingRankFailed", "nan_loss",
             "rank {rank}'s loss turns NaN at step {step}"),
    Scenario("stall", ("stall:rank={rank},step={step},seconds=300",), 300, 150, "TrainingStalled", "stall",
             "rank {rank} hangs at step {step}; the launcher dumps every rank's stack after 3 s without a step, "
             "its peers give up on the all-reduce after 10 s", min_world=2,
             workload=(("timeout", 10.0), ("stall-after", 3.0))),
    Scenario("straggler", ("straggler:rank={rank},factor=4",), 1200, None, "TrainingStraggler", "straggler",
             "rank {rank} computes 4 times slower than its peers, who wait for it in every all-reduce",
             min_world=2),
    Scenario("slow-data", ("slow-data:rank={rank},factor=30",), 800, None, "TrainingDataLoaderBound",
             "data_starvation", "rank {rank}'s input pipeline is 30 times slower", min_world=2),
)}  # fmt: skip
DEFAULT_SCENARIO = "crash"  # a fault, its alert, the peers' symptoms, the verdict that tells them apart

DEMO_SETTINGS: tuple[Setting, ...] = (
    Setting("scenario", choice_parser(*SCENARIOS), DEFAULT_SCENARIO,
            "The fault to inject (none: a healthy run).", metavar="|".join(SCENARIOS)),
    Setting("steps", int_parser(1), None, "Training steps per rank (default: the scenario's).", metavar="N"),
    Setting("world-size", int_parser(1, 16), 2, "Number of ranks.", metavar="N"),
    Setting("workdir", parse_optional_path, None, "Where logs, the store, metric snapshots, the TSDB and the "
            "report go (default: a new temporary directory, kept after exit).", metavar="DIR"),
    Setting("web.listen-address", parse_listen_address, ("127.0.0.1", 0),
            "Exporter address (port 0: a free port).", metavar="HOST:PORT"),
    Setting("keep-running", parse_bool, False,
            "Keep exporter, Prometheus and Alertmanager up for browsing until Ctrl-C.", kind="bool"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + DEMO_SETTINGS)


def _say(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)


class Stopped(Exception):
    """A stop signal arrived; the demo unwinds and exits 128 + its number."""


def run(cfg: Mapping[str, Any]) -> int:
    from mlops_obs.logs import configure

    configure(cfg["log.level"] if cfg["log.level"] != "info" else "warn", cfg["log.format"])
    sc = SCENARIOS[cfg["scenario"]]
    world = int(cfg["world-size"])
    if world < sc.min_world:
        raise ConfigError("world-size", f"scenario {sc.name} needs at least {sc.min_world} ranks, got {world}")
    workdir = Path(cfg["workdir"] or tempfile.mkdtemp(prefix="mlops-obs-demo-"))
    make_directory("workdir", workdir)
    with StopRequest().installed() as stop:
        try:
            return _demo(cfg, sc, workdir, stop)
        except Stopped:
            assert stop.signum is not None
            _say(f"{signal.Signals(stop.signum).name} received: everything stopped")
            return 128 + stop.signum


def _check(stop: StopRequest) -> None:
    if stop.signum is not None:
        raise Stopped()


@dataclass
class Stack:
    """What the demo runs, for the steps after training to read."""

    workdir: Path
    job: str
    store_dir: Path
    prom: PrometheusProcess | None
    alertmanager: AlertmanagerProcess | None


def _demo(cfg: Mapping[str, Any], sc: Scenario, workdir: Path, stop: StopRequest) -> int:
    """Start the stack (each part stopped on the way out, whatever happens), train, analyse."""
    from mlops_obs.rca.times import stamp

    world = int(cfg["world-size"])
    steps = int(cfg["steps"] or sc.steps)
    rank = world - 1
    step = None if sc.fault_step is None else max(1, min(sc.fault_step, steps // 2))
    job = f"demo-{sc.name}"
    since = stamp(time.time())
    _say(f"mlops-obs demo: scenario {sc.name}: {sc.about.format(rank=rank, step=step)}")
    _say(f"  work directory: {workdir}")
    with contextlib.ExitStack() as cleanup:
        stack = _start(cfg, workdir, job, cleanup, stop)
        _check(stop)
        shipper = _start_shipper(workdir / "logs", stack.store_dir, cleanup)
        wl_cfg: dict[str, Any] = {s.key: s.default for s in COMMON_SETTINGS + WORKLOAD_SETTINGS}
        # A fixed flush, not the workload's default (follow the sidecar): the rules run 30x faster while a
        # rank with no cadence to follow (Prometheus not installed: nothing scrapes the sidecar) falls
        # back to 15 s, and the progress lines read the snapshots.
        wl_cfg.update({"world-size": world, "steps": steps, "log-dir": workdir / "logs", "job": job,
                       "multiproc-dir": workdir / "multiproc", "flush-interval": 0.25, "device": "auto",
                       "log-every": 1, **dict(sc.workload),
                       "inject": [x.format(rank=rank, step=step) for x in sc.inject]})  # fmt: skip
        _say(f"training {world} ranks x {steps} steps (PyTorch DDP), job {job}...")
        alerts = _AlertWatch(stack.store_dir, job)
        cleanup.callback(alerts.close)
        t0 = time.monotonic()
        last = [t0]

        def timed(line: str) -> None:
            _say(f"  [{time.monotonic() - t0:5.1f}s] {line}")

        def progress() -> None:
            for line in alerts.new():
                timed(line)
            if time.monotonic() - last[0] >= PROGRESS_EVERY:
                last[0] = time.monotonic()
                timed(_progress(workdir / "multiproc", steps, world))

        rc = _train(wl_cfg, stop, progress)
        _check(stop)
        _say(f"workload finished with exit code {rc} in {time.monotonic() - t0:.1f}s")
        if sc.alert and stack.prom and stack.alertmanager:
            _wait_for_alert(alerts, sc.alert, rank, stop, timed)
        if stack.prom:
            _fired(stack.prom, job, alerts)
        shipper.drain()
        _check(stop)
        _summary(workdir / "multiproc", stack.prom, job)
        ok = _analyse(stack, sc, rank, step, since)
        if cfg.get("keep-running"):
            _say("exporter, Prometheus and Alertmanager keep running; press Ctrl-C to stop.")
            stop.wait()
    _say(f"stopped. Logs, store and report stay in {workdir}")
    return 0 if ok else 1


def _start(cfg: Mapping[str, Any], workdir: Path, job: str, cleanup: contextlib.ExitStack,
           stop: StopRequest) -> Stack:  # fmt: skip
    """Alert sink, Alertmanager, exporter, Prometheus with the scaled rules; each stop registered."""
    from mlops_obs.config import resolve
    from mlops_obs.exporter import Exporter
    from mlops_obs.exporter import settings as exporter_settings
    from mlops_obs.logs import get_logger
    from mlops_obs.logs.alerts import AlertIntake, AlertReceiver
    from mlops_obs.logs.store import StoreSink
    from mlops_obs.mixin.config import MixinConfig
    from mlops_obs.mixin.generate import ALERTMANAGER_FILE, ALERTS_FILE, RECORDING_FILE, render_files

    store_dir = workdir / "store"
    sink = StoreSink(store_dir)
    cleanup.callback(sink.close)
    receiver = AlertReceiver(("127.0.0.1", 0), AlertIntake(sink, deadline=10.0)).start()
    cleanup.callback(receiver.stop)
    _say(f"  alert sink: {receiver.url}/alerts -> store {store_dir}")
    host, port = cfg["web.listen-address"]
    ex_cfg = resolve(
        exporter_settings(),
        {"web.listen-address": f"{host}:{port}", "sampler.interval": "0.25s", "training.retention": "1h",
         "multiproc-dir": str(workdir / "multiproc"), "host.filesystem-paths": ["/", str(workdir)]},
        environ={},
    )  # fmt: skip
    try:
        exporter = Exporter(ex_cfg, get_logger(component="exporter")).start()
    except OSError as e:
        raise ConfigError("web.listen-address", f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    cleanup.callback(exporter.stop)
    metrics_url = exporter.url + "/metrics"
    _say(f"  exporter:   {metrics_url}")
    stack = Stack(workdir, job, store_dir, None, None)
    missing = [c.name.capitalize() for c in (PrometheusProcess, AlertmanagerProcess) if not find_binary(*c.binaries)]
    if missing:
        _say(f"  {' and '.join(missing)} not installed (bash scripts/setup.sh installs them): no metrics or "
             "alerts, the verdict comes from the logs alone")  # fmt: skip
        return stack
    files = render_files(MixinConfig(), sink_url=receiver.url + "/alerts", time_scale=1 / SPEED)
    rules_dir = workdir / "rules"
    rules_dir.mkdir(exist_ok=True)
    rule_files = []
    for rel in (ALERTS_FILE, RECORDING_FILE):
        rule_files.append(rules_dir / Path(rel).name)
        rule_files[-1].write_text(files[rel])
    n_alerts = sum(len(g["rules"]) for g in yaml.safe_load(files[ALERTS_FILE])["groups"])
    n_rec = sum(len(g["rules"]) for g in yaml.safe_load(files[RECORDING_FILE])["groups"])
    try:
        am = AlertmanagerProcess(workdir / "alertmanager", yaml.safe_load(files[ALERTMANAGER_FILE]))
        cleanup.callback(am.stop)
        am.start()
        _check(stop)
        prom = PrometheusProcess(workdir / "prometheus", [metrics_url.split("//", 1)[1].split("/", 1)[0]],
                                 scrape_interval=SCRAPE, evaluation_interval=SCRAPE, rule_files=rule_files,
                                 alertmanagers=[am.address])  # fmt: skip
        cleanup.callback(prom.stop)
        prom.start()
    except (OSError, RuntimeError, TimeoutError) as e:
        _say(f"  could not start Prometheus/Alertmanager ({str(e).splitlines()[0]}); the verdict comes from the "
             "logs alone")  # fmt: skip
        return stack
    stack.prom, stack.alertmanager = prom, am
    _say(f"  prometheus: {prom.url}/alerts  ({n_alerts} alerts, {n_rec} recording rules from the mixin)")
    _say(f"  alertmanager: {am.url}  (the generated routing and inhibitions, to the alert sink)")
    _say(f"  rules on a {SPEED}x faster clock (the demo's copy): a {SCRAPE} scrape and evaluation stand for 15s, every "
         f"for:, window and wait divided by {SPEED} (for: 2m -> 4s); the shipped rules are in alerts/")  # fmt: skip
    return stack


class _Shipper:
    """The log shipper on a thread, following the log directory into the store."""

    def __init__(self, logs: Path, store_dir: Path) -> None:
        from mlops_obs.logs.shipper import Shipper, ShipperOptions
        from mlops_obs.logs.store import StoreSink

        opts = ShipperOptions(sources=[str(logs / "*")], state_dir=store_dir / "shipper-state", poll_interval=0.2,
                              scan_interval=0.5)  # fmt: skip
        self.shipper = Shipper(opts, StoreSink(store_dir))
        self.thread = threading.Thread(target=self.shipper.run, name="shipper", daemon=True)
        self.thread.start()

    def drain(self) -> None:
        """Stop following, then ship everything the files hold now."""
        self.stop()
        self.shipper.stop_event.clear()
        self.shipper.run(once=True)

    def stop(self) -> None:
        self.shipper.stop_event.set()
        self.thread.join()

    def close(self) -> None:
        self.stop()
        self.shipper.close()


def _start_shipper(logs: Path, store_dir: Path, cleanup: contextlib.ExitStack) -> _Shipper:
    logs.mkdir(parents=True, exist_ok=True)
    s = _Shipper(logs, store_dir)
    cleanup.callback(s.close)
    _say(f"  logs:       {logs} (shipped into the store as they are written)")
    return s


class _AlertWatch:
    """The job's alerts as the alert sink stored them: what is new since the last look."""

    def __init__(self, store_dir: Path, job: str) -> None:
        from mlops_obs.logs.store import EventStore

        self.store = EventStore(store_dir)
        self.job = job
        self.seen: set[str] = set()
        self.firing: list[dict[str, Any]] = []

    def new(self) -> list[str]:
        out = []
        for ev in self.store.query(kind="alert", job=self.job):
            if ev["_id"] in self.seen:
                continue
            self.seen.add(ev["_id"])
            f = ev.get("fields") or {}
            if f.get("status") == "firing":
                self.firing.append(ev)
            out.append(f"alert {f.get('status')}: {ev.get('message')} (stored by the alert sink)")
        return out

    def fired(self, name: str, rank: int) -> bool:
        return any((ev.get("fields") or {}).get("alertname") == name and ev.get("rank") == rank for ev in self.firing)

    def close(self) -> None:
        self.store.close()


def _wait_for_alert(alerts: _AlertWatch, name: str, rank: int, stop: StopRequest, say: Callable[[str], None]) -> None:
    deadline = time.monotonic() + ALERT_WAIT_SECONDS
    while True:
        for line in alerts.new():
            say(line)
        if alerts.fired(name, rank):
            return
        _check(stop)
        if time.monotonic() > deadline:
            say(f"{name} for rank {rank} did not reach the store within {ALERT_WAIT_SECONDS:.0f}s")
            return
        time.sleep(0.5)


def _fired(prom: PrometheusProcess, job: str, alerts: _AlertWatch) -> None:
    """What Prometheus fired for the job, and which of those Alertmanager's inhibitions kept from the sink."""
    res = prom.query(f'count by (alertname, rank) (last_over_time(ALERTS{{job="{job}",alertstate="firing"}}[1h]))')
    fired = sorted((m.get("alertname", "?"), m.get("rank", "")) for m in (r["metric"] for r in res))
    alerts.new()
    stored = {(str((ev.get("fields") or {}).get("alertname")), str(ev.get("rank") or "")) for ev in alerts.firing}

    def show(names: list[tuple[str, str]]) -> str:
        return ", ".join(name + (f" (rank {rank})" if rank else "") for name, rank in names)

    muted = [x for x in fired if x not in stored]
    _say(f"Prometheus fired for {job}: {show(fired) or 'nothing'}"
         + (f"; muted by Alertmanager's inhibitions: {show(muted)}" if muted else ""))  # fmt: skip


def _analyse(stack: Stack, sc: Scenario, rank: int, step: int | None, since: str) -> bool:
    """``mlops-obs rca`` over the store (and Prometheus): the verdict, the report, whether it is right."""
    from mlops_obs.commands.rca import fetch_metrics, text_report
    from mlops_obs.rca.report import render_html
    from mlops_obs.rca.sources import open_store
    from mlops_obs.rca.verdict import analyse

    html = stack.workdir / "report.html"
    prom = stack.prom.url if stack.prom else None
    cmd = f"mlops-obs rca --store {stack.store_dir} --job {stack.job} --since {since}"
    _say(f"root-cause analysis ({cmd}{f' --prometheus {prom}' if prom else ''} --html {html}):")
    source = open_store(stack.store_dir)
    try:
        facts = source.facts(stack.job, since, None)
        metrics = fetch_metrics({"prometheus": prom, "since": since}, stack.job, facts.first, facts.last)
        report, facts = analyse(source, stack.job, since=since, metrics=metrics, facts=facts)
    finally:
        source.close()
    html.write_text(render_html(report, facts, metrics), encoding="utf-8")
    (stack.workdir / "report.json").write_bytes(orjson.dumps(report.to_json(), default=str))
    _say(text_report(report))
    _say(f"report: {html}")
    root = report.root
    got = ("healthy", None) if root is None else (root.kind, root.rank)
    want = ("healthy", None) if sc.kind is None else (sc.kind, rank)
    if got != want or (step is not None and root is not None and root.step != step):
        _say(f"the verdict does not name the injected fault (expected {want[0]}"
             + (f" rank {rank}" if sc.kind else "") + (f" step {step}" if step is not None else "") + ")")  # fmt: skip
        return False
    return True


def _loss(snap: Snapshot) -> str | None:
    """The last loss, formatted; snapshots write a NaN or infinite loss as a string."""
    v = (snap.get("gauges") or {}).get("loss")
    if v is None:
        return None
    try:
        return f"{float(v):.4f}"
    except (TypeError, ValueError):
        return str(v)


def _progress(mp_dir: Path, steps: int, world: int) -> str:
    snaps = {int(s["rank"]): s for s in RankDirectory(mp_dir, retention=None).snapshots()}
    parts = []
    for r in range(world):
        s = snaps.get(r)
        if s is None:
            parts.append(f"rank{r}: starting")
        else:
            loss = _loss(s)
            parts.append(f"rank{r}: {s['steps']}/{steps}" + (f" loss={loss}" if loss is not None else ""))
    return "  ".join(parts)


def _train(wl_cfg: Mapping[str, Any], stop: StopRequest, progress: Callable[[], None]) -> int:
    """Run the launcher on a thread (stopped through ``stop``), calling ``progress`` every second."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["rc"] = launch(wl_cfg, sys.stdout, stop)
        except BaseException as e:  # handed to the main thread, which reports it
            result["error"] = e

    # The launcher starts and supervises the ranks on this one thread: the ranks' parent-death
    # signal follows the thread that started them.
    worker = threading.Thread(target=work, name="workload", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=1.0)
        progress()
    if "error" in result:
        raise result["error"]
    return int(result["rc"])


def _summary(mp_dir: Path, prom: PrometheusProcess | None, job: str) -> None:
    snaps = sorted(RankDirectory(mp_dir, retention=None).snapshots(), key=lambda s: int(s["rank"]))
    _say("summary (from the ranks' hand-off files):")
    for s in snaps:
        n = max(1, int(s["steps"]))
        mean_ms = 1000.0 * float(s["step_seconds_sum"]) / n
        loss = _loss(s)
        _say(f"  rank {s['rank']}: {s.get('state', '?')}, {s['steps']} steps, mean step {mean_ms:.1f} ms"
             + (f", last loss {loss}" if loss is not None else ""))  # fmt: skip
    if prom is None:
        return
    # The recording rule scores running ranks only: the last score each rank had.
    scores = prom.query(f'last_over_time({STRAGGLER}{{job="{job}"}}[1h])')
    if scores:
        shown = ", ".join(f"rank {r['metric'].get('rank')}: {float(r['value'][1]):.2f}" for r in scores)
        _say(f"  straggler score from Prometheus (1 = typical, < 0.75 flagged): {shown}")
    phases = prom.query(f'sum by (phase) (mlops_training_phase_seconds_total{{job="{job}"}})')
    total = sum(float(r["value"][1]) for r in phases)
    if total > 0:
        shown = ", ".join(
            f"{r['metric'].get('phase')} {100 * float(r['value'][1]) / total:.0f}%"
            for r in sorted(phases, key=lambda r: -float(r["value"][1]))
            if float(r["value"][1]) > 0
        )
        _say(f"  where step time went (Prometheus): {shown}")
