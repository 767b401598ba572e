"""What the workload leaves for replay and root-cause analysis, from two real 2-rank runs side by side.

- a crash (rank 1 raises at step 8): the ranks' output in CRI files with the time of each line, the
  crashed rank's traceback stamped at the crash, the launcher's JSON log of starts, exits and the stop;
- a hang (rank 1 blocks at step 10): the launcher sees no step completed for longer than the job's
  cadence allows and dumps every rank's stacks once (the hung rank in its own code, its peer inside
  torch, and the flight recorder showing which collective rank 1 never joined); then the launcher is
  stopped with SIGTERM: another dump, each rank logs that it was stopped, and the launcher exits 143.

Both start at once (module fixture) and each test asserts on what its run left; they synchronise on the
files the run writes, never on sleeps.
"""

from __future__ import annotations

import datetime as dt
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from mlops_obs.rca.detectors.stacks import main_thread, parse_stack, where
from mlops_obs.workload.signals import read_dumps
from tests.conftest import wait_for

pytest.importorskip("torch")

CRI = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([FP]) (.*)$")


@dataclass
class Run:
    job: str
    logs: Path
    proc: subprocess.Popen[str]
    out: str = ""
    err: str = ""

    def finish(self, timeout: float = 240) -> Run:
        if self.proc.returncode is None:
            self.out, self.err = self.proc.communicate(timeout=timeout)
        return self

    def jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.logs / f"{self.job}-{name}.jsonl"
        if not path.exists():
            return []
        return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]

    def cri(self, rank: int) -> list[tuple[str, str, str, str]]:
        out = []
        for line in (self.logs / f"{self.job}-rank{rank}.log").read_text().split("\n")[:-1]:
            m = CRI.match(line)
            assert m, line
            out.append((m.group(1), m.group(2), m.group(3), m.group(4)))
        return out


def _start(root: Path, job: str, *args: str) -> Run:
    logs = root / job
    cmd = [sys.executable, "-m", "mlops_obs", "workload", "--world-size=2", f"--job={job}", f"--log-dir={logs}",
           "--device=cpu", *args]  # fmt: skip
    return Run(job, logs, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    root = tmp_path_factory.mktemp("evidence")
    crash = ["--steps=40", "--log-every=1", "--timeout=60", "--inject=crash:rank=1,step=8"]
    hang = ["--steps=400", "--log-every=5", "--timeout=120", "--stall-after=2s", "--stall-factor=5",
            "--inject=stall:rank=1,step=10"]  # fmt: skip
    started = {"crash": _start(root, "crash", *crash), "hang": _start(root, "hang", *hang)}
    try:
        yield started
    finally:
        for r in started.values():
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.communicate()


def ts(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s[:26].rstrip("Z") + "+00:00")


def test_crash_output_is_cri_with_the_traceback_stamped_at_the_crash(runs: dict[str, Run]) -> None:
    run = runs["crash"].finish()
    assert run.proc.returncode == 1, run.err
    assert not list(run.logs.glob("*.stderr.log"))
    recs = run.cri(1)
    err = [(t, text) for t, stream, tag, text in recs if stream == "stderr"]
    assert any(text == "[rank1]: Traceback (most recent call last):" for _, text in err), recs
    crash_at = next(t for t, text in err if text == "[rank1]: RuntimeError: injected crash at step 8")
    failed = next(x for x in run.jsonl("rank1") if x["event"] == "rank failed")
    # The traceback line carries the time it was written: within a second of the rank's own record.
    assert abs((ts(crash_at) - ts(failed["ts"])).total_seconds()) < 1.0
    exited = next(x for x in run.jsonl("launcher") if x["event"] == "rank exited" and x["rank"] == 1)
    assert ts(failed["ts"]) <= ts(crash_at) <= ts(exited["ts"])
    for rank in (0, 1):
        times = [t for t, *_ in run.cri(rank)]
        assert times == sorted(times)


def test_crash_launcher_log_records_starts_exits_and_the_stop(runs: dict[str, Run]) -> None:
    run = runs["crash"].finish()
    recs = run.jsonl("launcher")
    assert all(r["kind"] == "launcher" and r["job"] == "crash" and r["node"] and r["run_id"] for r in recs)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert [r["ts"] for r in recs] == sorted(r["ts"] for r in recs)
    events = [r["event"] for r in recs]
    assert events[:3] == ["launcher starting", "rank started", "rank started"]
    assert events[-1] == "launcher finished" and recs[-1]["exit_code"] == 1 and recs[-1]["level"] == "error"
    started = {r["rank"]: r["pid"] for r in recs if r["event"] == "rank started"}
    assert sorted(started) == [0, 1]
    exits = {r["rank"]: r for r in recs if r["event"] == "rank exited"}
    assert sorted(exits) == [0, 1] and {r["pid"] for r in exits.values()} == set(started.values())
    first = min(exits.values(), key=lambda r: r["seq"])
    assert (first["rank"], first.get("exit_code"), first["level"]) == (1, 1, "error"), recs
    stop = next(r for r in recs if r["event"] == "stopping ranks") if "stopping ranks" in events else None
    if stop is not None:  # rank 0 may have failed on its own (the peer's connection closed) before the stop
        assert stop["reason"] == "rank 1 exited with code 1" and stop["failed_rank"] == 1
        assert stop["failed_exit_code"] == 1 and "exit_code" not in stop
        assert stop["seq"] > first["seq"]
    # rank 0 ended either by itself on the lost peer (exit code 1) or by the launcher's SIGTERM
    zero = exits[0]
    assert zero.get("exit_code") == 1 or (zero.get("signal") == "SIGTERM" and zero["stopped_by_launcher"])
    assert "workload: rank 1 exited with code 1; stopping the other ranks" in run.err  # the stderr line stays


def test_step_lines_carry_their_data_wait_and_collective_time(runs: dict[str, Run]) -> None:
    run = runs["crash"].finish()
    for rank in (0, 1):
        steps = [x for x in run.jsonl(f"rank{rank}") if x["event"] == "step"]
        assert [x["step"] for x in steps] == list(range(8))
        for x in steps:
            assert 0 <= x["data_wait_s"] < x["step_s"] and 0 <= x["collective_s"] < x["step_s"], x
        assert all(x["collective_s"] > 0 for x in steps)  # every step all-reduces its gradients


def _hang_dumps(run: Run) -> dict[int, list[dict[str, Any]]]:
    return {r: read_dumps(run.logs / f"hang-rank{r}.stack") for r in (0, 1)}


def test_hang_is_detected_once_and_every_ranks_stack_is_dumped(runs: dict[str, Run]) -> None:
    run = runs["hang"]

    def stalled() -> dict[str, Any] | None:
        return next((x for x in run.jsonl("launcher") if x["event"] == "stall detected" and x["steps"] == [10, 10]),
                    None)  # fmt: skip

    wait_for(lambda: stalled() is not None or run.proc.poll() is not None, "the stall to be detected", timeout=180)
    stall = stalled()
    assert stall is not None, run.finish().err
    assert stall["threshold_s"] >= 2.0 and stall["idle_s"] >= stall["threshold_s"] and stall["level"] == "warning"
    wait_for(lambda: any(x["event"] == "stack dumps" and x["seq"] > stall["seq"] for x in run.jsonl("launcher")),
             "the dumps")  # fmt: skip
    report = next(x for x in run.jsonl("launcher") if x["event"] == "stack dumps" and x["seq"] > stall["seq"])
    assert report["reason"].startswith("stall: no rank completed a step for") and report["missing"] == []
    assert report["ranks"] == [0, 1]
    dumps = _hang_dumps(run)
    spots = {}
    enqueued = {}
    for rank, ds in dumps.items():
        d = next(d for d in ds if d["request"]["reason"] == report["reason"])
        assert d["request"]["rank"] == rank and d["trailer"]["rank"] == rank
        assert "Current thread" in d["stack"]
        spots[rank] = where(main_thread(parse_stack(d["stack"])) or [])
        fr = d["trailer"]["flight_recorder"]
        assert fr["backend"] == "gloo" and fr["entries"] > 0
        enqueued[rank] = fr["pg_status"]["0"]["last_enqueued_collective"]
    frame, in_torch = spots[1]
    assert (frame.func, frame.file.endswith("workload/train.py"), in_torch) == ("_hang", True, False)
    assert spots[0][1] is True  # the peer waits inside torch (the all-reduce in backward)
    # The flight recorder says the same: rank 0 entered a collective that rank 1 never did.
    assert enqueued[0] > enqueued[1]
    assert "dumping stacks" in (run.err or "") or run.proc.poll() is None


def test_hang_stopped_by_sigterm_dumps_again_and_each_rank_says_it_was_stopped(runs: dict[str, Run]) -> None:
    run = runs["hang"]
    wait_for(lambda: any(x["event"] == "stack dumps" for x in run.jsonl("launcher")) or run.proc.poll() is not None,
             "the stall dumps", timeout=180)  # fmt: skip
    assert run.proc.poll() is None, run.finish().err
    run.proc.send_signal(signal.SIGTERM)
    run.finish(timeout=120)
    assert run.proc.returncode == 128 + signal.SIGTERM, run.err
    recs = run.jsonl("launcher")
    stop = next(x for x in recs if x["event"] == "stopping ranks")
    assert (stop["reason"], stop["signal"], stop["ranks"]) == ("SIGTERM received", "SIGTERM", [0, 1])
    dumped = next(x for x in recs if x["event"] == "stack dumps" and x["reason"] == "SIGTERM received")
    assert dumped["seq"] > stop["seq"] and dumped["missing"] == []
    exits = [x for x in recs if x["event"] == "rank exited"]
    assert sorted(x["rank"] for x in exits) == [0, 1]
    assert all(x["signal"] == "SIGTERM" and x["stopped_by_launcher"] and x["level"] == "warning" for x in exits)
    for rank in (0, 1):
        said = [x for x in run.jsonl(f"rank{rank}") if x["event"] == "rank stopped by signal"]
        assert len(said) == 1 and said[0]["signal"] == "SIGTERM" and said[0]["level"] == "warning"
        assert said[0]["step"] == 10  # the step they were in (rank 1 hung in it, rank 0 waited in it)
        assert len([d for d in _hang_dumps(run)[rank] if d["request"]["reason"] == "SIGTERM received"]) == 1


def _ship(run: Run, store: Path) -> list[dict[str, Any]]:
    """Ship the run's log directory into ``store`` (``mlops-obs ship --once``); its events in time order."""
    from mlops_obs.logs.store import EventStore

    r = subprocess.run([sys.executable, "-m", "mlops_obs", "ship", "--once", f"--source={run.logs}/*",
                        f"--store={store}"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    with EventStore(store) as s:
        return list(s.query(job=run.job))


def _rca(store: Path, job: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "mlops_obs", "rca", f"--store={store}", f"--job={job}", "--json"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode in (0, 1, 3), r.stderr
    return dict(orjson.loads(r.stdout))


def test_crash_replays_as_one_traceback_before_the_peers_errors_next_to_the_exit(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    """Issue 13's "done when": shipped, the crashed rank's traceback is one error event stamped within a
    second of the crash, before the other rank's collective error, next to the launcher's exit record."""
    run = runs["crash"].finish()
    evs = _ship(run, tmp_path / "store")
    keys = [(e["@timestamp"], e["source"], e["offset"]) for e in evs]
    assert keys == sorted(keys)
    assert all(e["node"] for e in evs)  # every event says which node's clock dated it
    crash = [e for e in evs if e["kind"] == "log" and "RuntimeError: injected crash at step 8" in e["message"]
             and e["fields"].get("raw")]  # fmt: skip
    assert len(crash) == 1, [e["message"][:80] for e in crash]  # the traceback once, as one event
    tb = crash[0]
    assert (tb["level"], tb["rank"], tb["fields"]["ts_source"]) == ("error", 1, "cri")
    assert tb["message"].startswith("[rank1]: Traceback (most recent call last):")
    assert tb["fields"]["lines"] >= 4
    failed = next(e for e in evs if e["message"] == "rank failed" and e["rank"] == 1)
    assert abs((ts(tb["@timestamp"]) - ts(failed["@timestamp"])).total_seconds()) < 1.0
    peer = [e for e in evs if e["rank"] == 0 and e["level"] == "error" and e["fields"].get("raw")]
    assert peer and all(e["@timestamp"] > tb["@timestamp"] for e in peer)
    exit_rec = next(e for e in evs if e["kind"] == "launcher" and e["message"] == "rank exited" and e["rank"] == 1)
    assert exit_rec["fields"]["exit_code"] == 1 and exit_rec["level"] == "error"
    i, j = evs.index(tb), evs.index(exit_rec)
    between = [e for e in evs[i + 1 : j] if e["rank"] == 1 or e["kind"] == "launcher"]
    assert i < j and all(e["level"] in ("debug", "info") for e in between), between  # nothing else about it
    verdict = _rca(tmp_path / "store", "crash")
    root = verdict["root_cause"]
    assert (verdict["verdict"], root["kind"], root["rank"], root["step"]) == ("fault", "crash", 1, 8)


def test_hang_stacks_reach_the_store_and_name_the_hung_rank(runs: dict[str, Run], tmp_path: Path) -> None:
    """The dumps are stored as ``kind="stack"`` events, and rca reads them: rank 1 is in its own code
    while rank 0 waits in torch."""
    run = runs["hang"]
    wait_for(lambda: run.proc.poll() is not None, "the hang run to be stopped", timeout=240)
    evs = _ship(run.finish(), tmp_path / "store")
    stacks = [e for e in evs if e["kind"] == "stack"]
    assert {e["rank"] for e in stacks} == {0, 1}
    stall = [e for e in stacks if e["fields"]["reason"].startswith("stall:")]
    assert len(stall) == 2 and all("Current thread" in e["fields"]["stack"] for e in stall)
    assert all("ts_source" not in e["fields"] and e["fields"]["flight_recorder"]["backend"] == "gloo" for e in stall)
    launcher = [e for e in evs if e["kind"] == "launcher"]
    assert [e["message"] for e in launcher].count("stall detected") == 1
    verdict = _rca(tmp_path / "store", "hang")
    root = verdict["root_cause"]
    assert (verdict["verdict"], root["kind"], root["rank"]) == ("fault", "stall", 1), verdict
    assert any(ev["source"] == "stack" for ev in root["evidence"])
    assert "_hang" in root["summary"]
