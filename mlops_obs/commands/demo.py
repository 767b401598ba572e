"""``mlops-obs demo``: the whole path on embedded defaults, finishing by itself.

Exporter (in this process) -> 2-rank DDP workload (child processes) -> Prometheus (child process,
when its binary is on PATH) -> a summary read back from Prometheus' API. Everything it starts is
stopped before it returns; the work directory (logs, metrics hand-off, TSDB) is kept for browsing.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from mlops_obs.children import find_binary
from mlops_obs.children.prometheus import PrometheusProcess
from mlops_obs.commands.workload import WORKLOAD_SETTINGS
from mlops_obs.config import (
    COMMON_SETTINGS,
    Setting,
    int_parser,
    parse_bool,
    parse_listen_address,
    parse_optional_path,
)
from mlops_obs.mixin.config import MixinConfig
from mlops_obs.mixin.rules import STRAGGLER, recording_groups
from mlops_obs.rankdir import RankDirectory, Snapshot
from mlops_obs.workload.launcher import StopRequest, launch, make_directory

DEMO_SETTINGS: tuple[Setting, ...] = (
    Setting("steps", int_parser(1), 2000, "Training steps per rank.", metavar="N"),
    Setting("world-size", int_parser(1, 16), 2, "Number of ranks.", metavar="N"),
    Setting("workdir", parse_optional_path, None, "Where logs, metric snapshots and the TSDB go (default: a new "
            "temporary directory, kept after exit).", metavar="DIR"),
    Setting("web.listen-address", parse_listen_address, ("127.0.0.1", 0),
            "Exporter address (port 0: a free port).", metavar="HOST:PORT"),
    Setting("keep-running", parse_bool, False, "Keep exporter and Prometheus up for browsing until Ctrl-C.",
            kind="bool"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    return list(COMMON_SETTINGS + DEMO_SETTINGS)


def _say(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)


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


def run(cfg: Mapping[str, Any]) -> int:
    from mlops_obs.logs import configure

    configure(cfg["log.level"] if cfg["log.level"] != "info" else "warn", cfg["log.format"])
    workdir = Path(cfg["workdir"] or tempfile.mkdtemp(prefix="mlops-obs-demo-"))
    make_directory("workdir", workdir)
    with StopRequest().installed() as stop:
        return _demo(cfg, workdir, stop)


def _demo(cfg: Mapping[str, Any], workdir: Path, stop: StopRequest) -> int:
    """Exporter, Prometheus and the workload, each stopped on the way out whatever happens."""
    from mlops_obs.config import ConfigError, resolve
    from mlops_obs.exporter import Exporter
    from mlops_obs.exporter import settings as exporter_settings
    from mlops_obs.logs import get_logger

    log_dir, mp_dir = workdir / "logs", workdir / "multiproc"
    steps, world = int(cfg["steps"]), int(cfg["world-size"])
    _say(f"mlops-obs demo: work directory {workdir}")

    host, port = cfg["web.listen-address"]
    ex_cfg = resolve(
        exporter_settings(),
        {"web.listen-address": f"{host}:{port}", "sampler.interval": "0.5s", "multiproc-dir": str(mp_dir),
         "training.retention": "1h", "host.filesystem-paths": ["/", str(workdir)]},
        environ={},
    )  # fmt: skip
    try:
        exporter = Exporter(ex_cfg, get_logger(component="exporter")).start()
    except OSError as e:
        raise ConfigError("web.listen-address", f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    prom: PrometheusProcess | None = None
    try:
        metrics_url = exporter.url + "/metrics"
        _say(f"  exporter:   {metrics_url}")
        if find_binary("prometheus"):
            host_port = metrics_url.split("//", 1)[1].split("/", 1)[0]
            # The mixin's recording rules: what operators see (the straggler score is one, over every sidecar).
            rules_file = workdir / "recording-rules.yml"
            rules_file.write_text(yaml.safe_dump(recording_groups(MixinConfig()), sort_keys=False))
            prom = PrometheusProcess(workdir / "prometheus", [host_port], rule_files=[rules_file])
            try:
                prom.start()
                example = "/graph?g0.expr=rate(mlops_training_samples_total[30s])"
                _say(f"  prometheus: {prom.url}  (try: {prom.url}{example})")
            except (OSError, RuntimeError, TimeoutError) as e:
                prom.stop()
                prom = None
                _say(f"  prometheus: could not start ({str(e).splitlines()[0]}); going on without it")
        else:
            _say("  prometheus: not installed (apt-get install prometheus); skipping it")

        wl_cfg: dict[str, Any] = {s.key: s.default for s in COMMON_SETTINGS + WORKLOAD_SETTINGS}
        wl_cfg.update({"world-size": world, "steps": steps, "log-dir": log_dir, "multiproc-dir": mp_dir,
                       "job": "demo", "flush-interval": 0.5, "device": "auto"})  # fmt: skip
        _say(f"  logs:       {log_dir}")
        _say(f"training {world} ranks x {steps} steps (PyTorch DDP)...")
        t0 = time.monotonic()
        rc = _train(wl_cfg, stop, lambda: _say(f"  [{time.monotonic() - t0:5.1f}s] {_progress(mp_dir, steps, world)}"))
        if stop.signum is not None:
            _say(f"{signal.Signals(stop.signum).name} received: workload stopped")
            return 128 + stop.signum
        _say(f"workload finished with exit code {rc} in {time.monotonic() - t0:.1f}s")
        _summary(mp_dir, prom, world, steps)
        if cfg.get("keep-running"):
            _say("exporter and Prometheus keep running; press Ctrl-C to stop.")
            stop.wait()
    finally:
        if prom:
            prom.stop()
        exporter.stop()
        _say(f"stopped. Logs and data stay in {workdir}")
    return rc


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


def _summary(mp_dir: Path, prom: PrometheusProcess | None, world: int, steps: int) -> None:
    snaps = sorted(RankDirectory(mp_dir, retention=None).snapshots(), key=lambda s: int(s["rank"]))
    _say("summary (from the ranks' hand-off files):")
    for s in snaps:
        n = max(1, int(s["steps"]))
        mean_ms = 1000.0 * float(s["step_seconds_sum"]) / n
        sps = float(s["samples"]) / max(1e-9, float(s["step_seconds_sum"]))
        loss = _loss(s)
        _say(f"  rank {s['rank']}: {s['steps']} steps, {s['samples']} samples, mean step {mean_ms:.2f} ms, "
             f"{sps:,.0f} samples/s" + (f", final loss {loss}" if loss is not None else ""))  # fmt: skip
    if prom is None:
        return
    try:
        prom.wait_for(
            "mlops_training_steps_total",
            lambda r: len(r) >= world and all(float(x["value"][1]) >= steps for x in r),
            timeout=15,
        )
    except TimeoutError:
        _say("  (Prometheus has not scraped the final step counts yet)")
    _say("summary (queried from Prometheus):")
    for r in prom.query("mlops_training_steps_total"):
        _say(f"  mlops_training_steps_total{{job={r['metric'].get('job')!r}, rank={r['metric'].get('rank')!r}}} "
             f"= {float(r['value'][1]):.0f}")  # fmt: skip
    # The recording rule scores running ranks only: the last score each rank had before it finished.
    scores = prom.query(f"last_over_time({STRAGGLER}[1h])")
    if scores:
        shown = ", ".join(f"rank {r['metric'].get('rank')}: {float(r['value'][1]):.2f}" for r in scores)
        _say(f"  straggler score (1 = typical, < 0.75 flagged): {shown}")
    phases = prom.query('sum by (phase) (mlops_training_phase_seconds_total{job="demo"})')
    total = sum(float(r["value"][1]) for r in phases)
    if total > 0:
        shown = ", ".join(
            f"{r['metric'].get('phase')} {100 * float(r['value'][1]) / total:.0f}%"
            for r in sorted(phases, key=lambda r: -float(r["value"][1]))
            if float(r["value"][1]) > 0
        )
        _say(f"  where step time went: {shown}")
    for expr, label in (
        ("sum(count by (__name__) ({__name__=~'mlops_node_.+'}))", "host series"),
        ("count(mlops_scrape_collector_success == 1)", "collectors succeeding"),
        ("count(mlops_scrape_collector_success == 0)", "collectors failing/unavailable"),
    ):
        res = prom.query(expr)
        _say(f"  {label}: {res[0]['value'][1] if res else 0}")
