"""``mlops-obs demo`` end to end: the crash scenario (its alert stored by the alert sink, the verdict, the
report), a healthy run, and a stop by SIGTERM, each leaving no process behind. The three run at once,
so the suite pays for the slowest."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import psutil
import pytest

from mlops_obs.logs.store import EventStore
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


class Demo:
    """One ``mlops-obs demo`` as a child, with every process it started seen while it ran."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-m", "mlops_obs", "demo", f"--workdir={workdir}", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)  # fmt: skip
        self.lines: list[str] = []
        self.started = threading.Event()  # the ranks are training
        self.seen: dict[int, tuple[float, str]] = {}  # pid -> (create time, name)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._reader.start()
        self._watcher.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "rank1: " in line and "starting" not in line:
                self.started.set()

    def _watch(self) -> None:
        try:
            me = psutil.Process(self.proc.pid)
            while self.proc.poll() is None:
                for c in me.children(recursive=True):
                    try:
                        self.seen.setdefault(c.pid, (c.create_time(), c.name()))
                    except psutil.Error:
                        pass
                time.sleep(0.1)
        except psutil.Error:
            pass

    def wait(self, timeout: float = 400) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        self._watcher.join(timeout=10)
        return rc, "".join(self.lines)

    def survivors(self) -> list[str]:
        out = []
        for pid, (created, name) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{pid} {name}")
            except psutil.Error:
                continue
        return out


def test_demo_crash_healthy_and_stopped(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    require_binary("prometheus")
    require_binary("prometheus-alertmanager")
    demos = [
        Demo(tmp_path / "crash"),  # no --scenario: the README's first command
        Demo(tmp_path / "none", "--scenario=none", "--steps=300"),
        Demo(tmp_path / "stopped", "--scenario=none", "--steps=1000000"),
    ]
    try:
        check(*demos, tmp_path)
    finally:
        for d in demos:  # a failed check leaves none running: the demo stops everything on SIGTERM
            if d.proc.poll() is None:
                d.proc.terminate()
                d.wait()


def check(crash: Demo, healthy: Demo, stopped: Demo, tmp_path: Path) -> None:
    assert stopped.started.wait(timeout=300), "".join(stopped.lines)
    stopped.proc.send_signal(signal.SIGTERM)
    rc, out = stopped.wait()
    assert rc == 128 + signal.SIGTERM, out
    assert "SIGTERM received: everything stopped" in out
    assert stopped.survivors() == []
    assert any("prometheus" in name for _, name in stopped.seen.values()), stopped.seen

    rc, out = crash.wait()
    assert rc == 0, out
    assert "scenario crash: rank 1 raises an exception at step 150" in out
    assert "rules on a 30x faster clock (the demo's copy)" in out
    assert "alert firing: [FIRING] TrainingRankFailed: Rank 1 of job demo-crash" in out
    report = orjson.loads((tmp_path / "crash" / "report.json").read_bytes())
    root = report["root_cause"]
    assert (report["verdict"], root["kind"], root["rank"], root["step"]) == ("fault", "crash", 1, 150), root
    assert "job demo-crash: FAULT: crash (rank 1, node " in out
    assert any(e["source"] == "alert" for e in root["evidence"]), root["evidence"]
    html = tmp_path / "crash" / "report.html"
    assert f"report: {html}" in out and "<title>rca demo-crash: fault</title>" in html.read_text()
    with EventStore(tmp_path / "crash" / "store") as s:
        stored = [e for e in s.query(kind="alert", job="demo-crash") if e["fields"]["status"] == "firing"]
        assert s.query(job="demo-crash", rank=1, level="error"), "the shipper filled the store"
    assert ("TrainingRankFailed", 1) in {(e["fields"]["alertname"], e["rank"]) for e in stored}
    assert crash.survivors() == []

    rc, out = healthy.wait()
    assert rc == 0, out
    assert "job demo-none: HEALTHY: every rank (2) finished" in out
    assert orjson.loads((tmp_path / "none" / "report.json").read_bytes())["root_cause"] is None
    assert "Prometheus fired for demo-none: nothing" in out
    with EventStore(tmp_path / "none" / "store") as s:
        assert s.query(kind="alert", job="demo-none") == []
    assert healthy.survivors() == []


def test_demo_rejects_bad_settings() -> None:
    for args, err in (
        (["--steps=abc"], "steps: expected an integer, got 'abc' (from --steps)"),
        (["--scenario=stall", "--world-size=1"], "world-size: scenario stall needs at least 2 ranks, got 1"),
        (["--scenario=oops"], "scenario: must be one of none, crash, nan, stall, straggler, slow-data, got 'oops' "
                              "(from --scenario)"),
    ):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "mlops_obs", "demo", *args], capture_output=True, text=True)
        assert (r.returncode, r.stderr.strip()) == (2, f"mlops-obs demo: error: {err}"), r.stderr
