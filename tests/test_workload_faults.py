"""The reference workload with 4 ranks and each injected fault, observed through the exporter sidecar
(and a real Prometheus), as an operator would see it: the fault's own evidence, and each rank's
lifecycle (how it ended, and where a hung job's ranks are).

One exporter, one Prometheus and one hand-off directory serve the whole module; each fault runs as
its own job name, so the runs share the sidecar as jobs on a real node do.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlops_obs.children import find_binary, http_get
from mlops_obs.children.prometheus import PrometheusProcess

pytest.importorskip("torch")

WORLD = 4
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Env:
    def __init__(self, root: Path, exporter: Any, prom: PrometheusProcess | None) -> None:
        self.root = root
        self.mp = root / "mp"
        self.logs = root / "logs"
        self.exporter = exporter
        self.prom = prom

    def command(self, job: str, steps: int, *args: str) -> list[str]:
        """A fixed fast flush: the tests scrape when they look, not on a cadence the ranks could follow."""
        return [sys.executable, "-m", "mlops_obs", "workload", f"--world-size={WORLD}", f"--steps={steps}",
                f"--job={job}", f"--log-dir={self.logs}", f"--multiproc-dir={self.mp}", "--flush-interval=0.2",
                "--log-every=1", "--device=cpu", *args]  # fmt: skip

    def workload(self, job: str, steps: int, *args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
        """Run a job to its end (generous timeout: 4 ranks importing torch on a loaded 2-core box)."""
        return subprocess.run(self.command(job, steps, *args), capture_output=True, text=True, timeout=timeout)

    def start_workload(self, job: str, steps: int, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(job, steps, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip

    def scrape(self) -> Samples:
        code, body = http_get(self.exporter.url + "/metrics")
        assert code == 200
        out: Samples = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def wait(self, ok: Callable[[Samples], bool], timeout: float = 15.0) -> Samples:
        """Scrape until ``ok`` holds: the sidecar samples in the background, so the final snapshot
        shows up within a sampler interval or two."""
        deadline = time.monotonic() + timeout
        samples = self.scrape()
        while not ok(samples) and time.monotonic() < deadline:
            time.sleep(0.2)
            samples = self.scrape()
        return samples

    def log_lines(self, job: str, rank: int) -> list[dict[str, Any]]:
        path = self.logs / f"{job}-rank{rank}.jsonl"
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def per_rank(samples: Samples, name: str, job: str, **labels: str) -> dict[int, float]:
    out = {}
    for (n, lv), v in samples.items():
        d = dict(lv)
        if n == name and d.get("job") == job and all(d.get(k) == x for k, x in labels.items()):
            out[int(d["rank"])] = v
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from mlops_obs.config import resolve
    from mlops_obs.exporter import Exporter, settings

    root = tmp_path_factory.mktemp("faults")
    (root / "mp").mkdir()
    cfg = resolve(settings(), {"web.listen-address": "127.0.0.1:0", "sampler.interval": "0.2s",
                               "collector.host": False, "collector.gpu": False, "collector.training": True,
                               "multiproc-dir": str(root / "mp")}, environ={})  # fmt: skip
    ex = Exporter(cfg).start()
    prom = None
    if find_binary("prometheus"):
        host_port = ex.url.split("//", 1)[1]
        prom = PrometheusProcess(root / "prom", [host_port], scrape_interval="1s").start()
    try:
        yield Env(root, ex, prom)
    finally:
        if prom:
            prom.stop()
        ex.stop()


def test_straggler_and_slow_data_move_their_metrics(env: Env) -> None:
    """A 12x-slow rank has the only step compute median far above the others' (also in Prometheus); a
    slow loader shows as that rank's data wait; the others wait in the all-reduce; checkpoints, goodput,
    badput and MFU are exported; every rank finished.

    The two slow ranks must not compete for last place in the all-reduce, or which of them waits there
    depends on the machine: the straggler's delay is 11 times its compute time (milliseconds, more
    under load) against the loader's fixed 5 ms, so the straggler always arrives last.
    """
    steps = 45
    r = env.workload("slow", steps, "--inject=straggler:rank=1,factor=12", "--inject=slow-data:rank=2,factor=6",
                     "--checkpoint-every=15", "--peak-flops=1e11")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "injecting straggler:rank=1,factor=12" in r.stderr
    s = env.wait(lambda s: per_rank(s, "mlops_training_steps_total", "slow") == dict.fromkeys(range(WORLD), steps))
    assert per_rank(s, "mlops_training_steps_total", "slow") == dict.fromkeys(range(WORLD), float(steps))

    compute = per_rank(s, "mlops_training_step_compute_median_seconds", "slow")
    wall = per_rank(s, "mlops_training_step_median_seconds", "slow")
    assert set(compute) == set(wall) == set(range(WORLD))
    assert [r for r, v in compute.items() if v > 2 * max(compute[k] for k in compute if k != r)] == [1], compute
    # Lockstep: every rank's wall time is the straggler's, whatever its own compute time.
    assert all(wall[k] >= compute[k] for k in wall) and min(wall.values()) > 0.5 * compute[1], (wall, compute)
    assert per_rank(s, "mlops_training_rank_state", "slow", state="finished") == dict.fromkeys(range(WORLD), 1.0)
    assert not per_rank(s, "mlops_training_rank_failure_info", "slow")

    def phase(p: str) -> dict[int, float]:
        return per_rank(s, "mlops_training_phase_seconds_total", "slow", phase=p)

    fwd, wait, coll = phase("forward"), phase("data_wait"), phase("collective")
    assert fwd[1] > 2 * max(fwd[0], fwd[2], fwd[3])
    # The loader sleeps at least 5 ms a batch; the others' waits are microseconds of work plus whatever
    # preemption a loaded machine adds.
    assert wait[2] >= steps * 0.005 and max(wait, key=lambda k: wait[k]) == 2, wait
    # The others wait in the all-reduce for the straggler, ranks 0 and 3 about as long as its injected
    # delay (its extra forward time; rank 2 arrives late itself); the straggler waits only for the
    # all-reduce itself. Compared with the delay, not with the straggler's own wait: the all-reduce's
    # duration grows with the machine's load alone.
    delay = fwd[1] - max(fwd[0], fwd[3])
    assert min(coll, key=lambda k: coll[k]) == 1, coll
    assert coll[0] - coll[1] > 0.5 * delay and coll[3] - coll[1] > 0.5 * delay, (coll, delay)
    badput = per_rank(s, "mlops_training_badput_seconds_total", "slow", kind="data_loading")
    assert max(badput, key=lambda k: badput[k]) == 2
    assert all(v > 0 for v in per_rank(s, "mlops_training_badput_seconds_total", "slow", kind="startup").values())
    goodput = per_rank(s, "mlops_training_goodput_seconds_total", "slow")
    sums = per_rank(s, "mlops_training_step_duration_seconds_sum", "slow")
    assert all(0 < goodput[k] <= sums[k] + 1e-9 for k in range(WORLD))
    assert per_rank(s, "mlops_training_checkpoint_duration_seconds_count", "slow") == {0: 3.0}
    assert per_rank(s, "mlops_training_last_checkpoint_timestamp_seconds", "slow")[0] > time.time() - 120
    mfu = per_rank(s, "mlops_training_mfu_ratio", "slow")
    assert set(mfu) == set(range(WORLD)) and all(0 <= v < 1 for v in mfu.values())
    assert all(math.isfinite(v) for v in per_rank(s, "mlops_training_loss", "slow").values())

    if env.prom is None:
        pytest.skip("prometheus binary not installed (apt-get install prometheus); CI installs it")
    flagged = env.prom.wait_for('topk(1, mlops_training_step_compute_median_seconds{job="slow"})', timeout=20)
    assert [x["metric"]["rank"] for x in flagged] == ["1"]

    # The per-rank JSON logs carry the identity and an unbroken per-process sequence.
    for rank in range(WORLD):
        lines = env.log_lines("slow", rank)
        assert all(x["job"] == "slow" and x["rank"] == rank and x["node"] for x in lines)
        seqs = [x["seq"] for x in lines]
        assert seqs == list(range(1, len(seqs) + 1))
        assert [x["step"] for x in lines if x["event"] == "step"] == list(range(steps))


def test_nan_loss_is_caught_before_backward_and_stops_the_job(env: Env) -> None:
    r = env.workload("nan", 14, "--inject=nan:rank=3,step=6")
    assert r.returncode == 1
    assert "rank 3 exited with code 1" in r.stderr
    s = env.wait(lambda s: per_rank(s, "mlops_training_nonfinite_loss_total", "nan").get(3) == 1)
    assert per_rank(s, "mlops_training_nonfinite_loss_total", "nan") == {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0}
    assert per_rank(s, "mlops_training_failed_steps_total", "nan")[3] == 1
    assert per_rank(s, "mlops_training_steps_total", "nan")[3] == 6
    assert math.isnan(per_rank(s, "mlops_training_loss", "nan")[3])
    last = env.log_lines("nan", 3)[-1]
    assert (last["event"], last["level"], last["step"]) == ("non-finite loss, stopping", "error", 6)
    assert last["loss"] == "nan"
    # The rank that stopped on its loss check failed first, with the error's type; its peers after it.
    failures, first = _failures(env, "nan")
    assert failures[3] == ("exception", "mlops_obs.instrument.torch.NonFiniteLossError") and first == 3, failures


def _failures(env: Env, job: str) -> tuple[dict[int, tuple[str, str]], int]:
    """Each rank's (reason, detail) once all have ended, and the rank that failed first."""
    s = env.wait(lambda s: len(per_rank(s, "mlops_training_rank_state", job, state="running")) == WORLD
                 and not any(per_rank(s, "mlops_training_rank_state", job, state="running").values()))  # fmt: skip
    assert per_rank(s, "mlops_training_rank_state", job, state="failed") == dict.fromkeys(range(WORLD), 1.0), s
    out = {}
    for (n, lv), _ in s.items():
        d = dict(lv)
        if n == "mlops_training_rank_failure_info" and d["job"] == job:
            out[int(d["rank"])] = (d["reason"], d["detail"])
    ends = per_rank(s, "mlops_training_rank_end_timestamp_seconds", job)
    return out, min(ends, key=lambda k: ends[k])


def test_crash_exits_non_zero_with_traceback_and_failed_step(env: Env) -> None:
    r = env.workload("crash", 14, "--inject=crash:rank=2,step=5")
    assert r.returncode == 1
    s = env.wait(lambda s: per_rank(s, "mlops_training_failed_steps_total", "crash").get(2) == 1)
    assert per_rank(s, "mlops_training_failed_steps_total", "crash")[2] == 1
    assert per_rank(s, "mlops_training_steps_total", "crash")[2] == 5
    stderr = (env.logs / "crash-rank2.log").read_text()  # the rank's output, in the CRI log format
    assert " stderr F [rank2]: Traceback" in stderr
    assert " stderr F [rank2]: RuntimeError: injected crash at step 5" in stderr
    failed = [x for x in env.log_lines("crash", 2) if x["level"] == "error"]
    assert [(x["event"], x["step"]) for x in failed] == [("rank failed", 5)]
    assert "exception" in failed[0]
    failures, first = _failures(env, "crash")
    assert failures[2] == ("exception", "RuntimeError") and first == 2, failures


def test_stall_freezes_every_heartbeat_while_the_job_stays_up(env: Env) -> None:
    """A hung rank: every rank stops at the same step (the others block in the all-reduce), every
    heartbeat goes stale, the processes stay alive, and nothing is logged; an operator then stops it."""
    t0 = time.time()
    proc = env.start_workload("stall", 14, "--inject=stall:rank=1,step=6")
    try:

        def frozen(s: Samples) -> bool:
            beats = per_rank(s, "mlops_training_last_step_timestamp_seconds", "stall")
            return (
                per_rank(s, "mlops_training_steps_total", "stall") == dict.fromkeys(range(WORLD), 6.0)
                and len(beats) == WORLD
                and all(b < time.time() - 3 for b in beats.values())
            )

        s = env.wait(frozen, timeout=240)
        assert frozen(s), s
        assert proc.poll() is None  # hung, not dead
        # The hung rank is in its step, working; the others wait for it in the all-reduce.
        now_in = {
            int(dict(lv)["rank"]): (dict(lv)["phase"], dict(lv)["activity"])
            for (n, lv), _ in s.items()
            if n == "mlops_training_current_phase_start_timestamp_seconds" and dict(lv)["job"] == "stall"
        }
        assert now_in == {
            0: ("collective", "collective"),
            1: ("step", "work"),
            2: ("collective", "collective"),
            3: ("collective", "collective"),
        }, now_in
        assert per_rank(s, "mlops_training_failed_steps_total", "stall") == dict.fromkeys(range(WORLD), 0.0)
        assert all(t0 < b for b in per_rank(s, "mlops_training_last_step_timestamp_seconds", "stall").values())
        lines = env.log_lines("stall", 1)
        assert not [x for x in lines if x["level"] == "error"]
        assert [x["step"] for x in lines if x["event"] == "step"][-1] == 5
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the launcher stops every rank, as torchrun does
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # Stopped by the launcher's SIGTERM at once, even the ranks blocked in the all-reduce (C++), within
    # its grace period (a rank still up after it would be SIGKILLed and read as vanished).
    failures, _ = _failures(env, "stall")
    assert failures == dict.fromkeys(range(WORLD), ("signal", "SIGTERM")), failures


def test_bad_or_impossible_faults_are_refused_in_one_line(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mlops_obs", "workload", "--world-size=4", "--steps=20",
                               f"--log-dir={tmp_path}", "--device=cpu", *args],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    for args, why in [
        (["--inject=oom:rank=0,step=3"], "a CUDA out-of-memory needs a GPU; this run trains on CPU"),
        (["--inject=stall:rank=4,step=3"], "rank 4 does not exist with --world-size=4"),
        (["--inject=melt:rank=1"], "unknown fault kind 'melt'"),
        (["--inject=crash:rank=1,step=30"], "step 30 is never reached with --steps=20"),
        (["--inject=stall:rank=1,step=2", "--inject=stall:rank=1,step=5"], "more than one stall fault for rank 1"),
    ]:
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and why in r.stderr, r.stderr
    assert not list(tmp_path.glob("*.jsonl"))  # nothing started
