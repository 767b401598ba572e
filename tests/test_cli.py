"""The ``mlops-obs`` command as a user runs it: version, one-line errors, the exporter process itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlops_obs import __version__
from mlops_obs.prometheus_server import free_port, http_get
from tests.conftest import require_binary

CLI = [sys.executable, "-m", "mlops_obs"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"mlops-obs {__version__}"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["exporter", "--web.listen-address=nohost"], {}, "web.listen-address: expected HOST:PORT"),
        (["exporter", "--sampler.interval=-1s"], {}, "sampler.interval: expected a duration"),
        (["exporter"], {"MLOPS_OBS_COLLECTOR_DEADLINE": "0"}, "collector.deadline: must be greater than zero"),
        (["exporter", "--config.file=/nonexistent/x.yml"], {}, "config.file: cannot read '/nonexistent/x.yml'"),
        (["workload", "--world-size=0"], {}, "world-size: must be >= 1"),
        (["exporter", "--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(args: list[str], env: dict[str, str], message: str) -> None:
    r = run_cli(*args, env={**os.environ, **env})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0]


def test_bad_yaml_value_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "exporter.yml"
    cfg.write_text("web:\n  telemetry-path: metrics\n")
    r = run_cli("exporter", f"--config.file={cfg}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"mlops-obs exporter: error: web.telemetry-path: must be an absolute path other than / and /-/..., "
        f"got 'metrics' (from web.telemetry-path in {cfg})"
    ]


def test_exporter_process_serves_valid_metrics(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    from mlops_obs.instrument import TrainingMonitor

    mp = tmp_path / "mp"
    for rank in (0, 1):
        m = TrainingMonitor(job="cli-test", rank=rank, world_size=2, directory=mp, node="n1")
        with m.step(samples=8):
            with m.phase("forward"):
                pass
            m.record(loss=1.5, lr=0.1)
        m.close()

    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "exporter", f"--web.listen-address=127.0.0.1:{port}", f"--multiproc-dir={mp}", "--log.format=json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if http_get(base + "/-/ready", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "exporter never became ready"
            time.sleep(0.1)
        assert http_get(base + "/-/healthy")[0] == 200
        code, landing = http_get(base + "/")
        assert code == 200 and b"/metrics" in landing
        assert http_get(base + "/nope")[0] == 404
        code, body = http_get(base + "/metrics")
        assert code == 200
        text = body.decode()
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }
        for rank in ("0", "1"):
            assert samples[("mlops_training_steps_total", (("job", "cli-test"), ("node", "n1"), ("rank", rank)))] == 1
        assert samples[("mlops_scrape_collector_success", (("collector", "host"),))] == 1
        assert samples[("mlops_scrape_collector_success", (("collector", "training"),))] == 1
        assert any(name == "mlops_node_cpu_seconds_total" for name, _ in samples)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert b"exporter listening" in err


def test_disabled_collector_is_absent(start_exporter: object) -> None:
    ex = start_exporter(**{"collector.host": "false", "collector.gpu": "false"})  # type: ignore[operator]
    deadline = time.monotonic() + 30
    while http_get(ex.url + "/-/ready")[0] != 200:  # every enabled collector finished its first round
        assert time.monotonic() < deadline, "exporter never became ready"
        time.sleep(0.05)
    body = http_get(ex.url + "/metrics")[1].decode()
    assert "mlops_node_cpu_seconds_total" not in body
    assert 'collector="host"' not in body
    assert 'mlops_scrape_collector_success{collector="training"} 1' in body
