"""The sidecar process in a training pod: it names its node, and after SIGTERM it goes on sampling and
serving for its shutdown delay, so the ranks' final state (written as the trainer exits) is scraped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlops_obs.children import free_port, http_get
from mlops_obs.instrument import TrainingMonitor

CLI = [sys.executable, "-m", "mlops_obs"]


def _start(mp: Path, *args: str, node: str = "node-x") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "MLOPS_OBS_NODE": node}
    proc = subprocess.Popen([*CLI, "exporter", f"--web.listen-address=127.0.0.1:{port}", f"--multiproc-dir={mp}",
                             "--sampler.interval=0.1s", "--no-collector.host", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if http_get(base + "/-/ready", timeout=1)[0] == 200:
                return proc, base
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "exporter never became ready"
        time.sleep(0.1)


def _scrape_until(base: str, text: bytes, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        body = http_get(base + "/metrics")[1]
        if text in body or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def test_the_final_state_written_after_sigterm_is_still_served(tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    m = TrainingMonitor("pod", 0, 1, mp, node="node-x", flush_interval=60)
    with m.step(samples=1):
        pass
    m.flush()
    proc, base = _start(mp, "--web.shutdown-delay=5s")
    try:
        body = _scrape_until(base, b'state="running"} 1')
        assert b'mlops_exporter_node_info{node="node-x"} 1' in body
        proc.send_signal(signal.SIGTERM)  # the pod stops: the sidecar and the trainer together
        stopped = time.monotonic()
        m.close(error=RuntimeError("preempted"))  # the trainer's last word, after the sidecar's SIGTERM
        body = _scrape_until(base, b'reason="exception"')
        assert b'mlops_training_rank_failure_info{detail="RuntimeError",job="pod",node="node-x",rank="0",' in body
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - stopped >= 4.5  # it waited its delay (less the clocks' granularity)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=20)
    assert b"exporter stopping after the shutdown delay" in err


@pytest.mark.parametrize(
    "signals", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT,)], ids=["sigterm-twice", "sigint"]
)
def test_a_second_sigterm_or_a_sigint_stops_at_once(tmp_path: Path, signals: tuple[signal.Signals, ...]) -> None:
    proc, _ = _start(tmp_path, "--web.shutdown-delay=10m")
    try:
        proc.send_signal(signals[0])
        if len(signals) > 1:
            assert proc.stderr is not None
            for line in proc.stderr:  # the first signal taken (two pending SIGTERMs would be one)
                if b"exporter stopping after the shutdown delay" in line:
                    break
            proc.send_signal(signals[1])
        assert proc.wait(timeout=60) == 0  # not the ten minutes of the delay
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=20)
