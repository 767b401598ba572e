"""The exporter command's errors as a user meets them: a ``--multiproc-dir`` it cannot list, a port in
use, and sampler durations out of their range, at start-up and on reload (issue 11, items 2 and 6)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

CLI = [sys.executable, "-m", "mlops_obs"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return None


@pytest.mark.parametrize(
    ("make", "why"),
    [("regular file", "Not a directory"), ("under a file", "Not a directory"), ("link loop", "symbolic links")],
)
def test_a_multiproc_dir_that_cannot_be_listed_fails_the_training_collector(
    tmp_path: Path, make: str, why: str
) -> None:
    """A ``--multiproc-dir`` that is a regular file (or under one, or a link loop) is the training and
    process collectors' failure (success 0, one log line naming the directory), not an empty success;
    the rest of the exporter serves on."""
    mp = tmp_path / "mp"
    if make == "regular file":
        mp.write_text("not a directory\n")
    elif make == "under a file":
        (tmp_path / "file").write_text("x\n")
        mp = tmp_path / "file" / "mp"
    else:
        mp.symlink_to(mp)
    port = _free_port()
    args = [f"--web.listen-address=127.0.0.1:{port}", f"--multiproc-dir={mp}", "--sampler.interval=0.2s"]
    proc = subprocess.Popen(
        [*CLI, "exporter", *args, "--no-collector.gpu", "--no-collector.host", "--log.format=logfmt"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline:
            body = _get(f"http://127.0.0.1:{port}/metrics")
            if body and 'mlops_scrape_collector_success{collector="training"}' in body:
                break
            time.sleep(0.1)
        assert body is not None
        assert 'mlops_scrape_collector_success{collector="training"} 0' in body
        assert 'mlops_scrape_collector_success{collector="process"} 0' in body
        assert 'mlops_scrape_collector_success{collector="shipper"} 1' in body
        time.sleep(1.0)  # a few more rounds: the failure is logged once, not every round
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    failed = [line for line in err.splitlines() if "collector failed" in line and "collector=training" in line]
    assert len(failed) == 1, err
    assert str(mp) in failed[0] and why in failed[0]


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    """As in every command: one line naming the setting and the address, exit 2 (not a log line and 1)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [*CLI, "exporter", f"--web.listen-address=127.0.0.1:{port}", "--no-collector.gpu"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"mlops-obs exporter: error: web.listen-address: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("sampler.interval", "999999999999h"),  # once killed the sampler threads while success stayed 1
        ("sampler.interval", "0.001ms"),  # once made every sampler thread spin, a core gone
        ("collector.deadline", "999999999999h"),
        ("collector.deadline", "0.001ms"),
    ],
)
def test_sampler_durations_out_of_range_are_refused_at_start(flag: str, value: str) -> None:
    r = subprocess.run([*CLI, "exporter", f"--{flag}={value}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mlops-obs exporter: error: {flag}: "), r.stderr


@pytest.mark.parametrize("value", ["999999999999h", "0.001ms"])
def test_sampler_durations_out_of_range_are_refused_on_reload(tmp_path: Path, start_exporter: Any, value: str) -> None:
    """The same bounds hold when a reload brings the value: the reload fails and the sampler keeps its
    interval and its threads."""
    conf = tmp_path / "exporter.yml"
    conf.write_text(yaml.safe_dump({"collector.gpu": False, "collector.host": False}))
    ex = start_exporter(**{"config.file": conf})
    interval = ex.sampler.interval
    conf.write_text(yaml.safe_dump({"sampler.interval": value}))
    ok, msg = ex.reload()
    assert not ok and "sampler.interval" in msg
    assert ex.sampler.interval == interval
    assert all(t.is_alive() for t in ex.sampler._threads.values())
