"""The ``mlops-obs`` command as a user runs it: version, one-line errors, the exporter process itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlops_obs import __version__
from mlops_obs.children import free_port, http_get
from mlops_obs.cli import COMMANDS, build_parser, main
from mlops_obs.config import Setting, parse_path, resolve
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


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_warning_is_a_log_level_of_every_command(command: str) -> None:
    """Our own log lines say ``level=warning``; the flag takes that spelling as well as Prometheus' ``warn``."""
    parser, per_command = build_parser(command)
    for level in ("warn", "warning"):
        cfg = resolve(per_command[command], parser.parse_args([command, f"--log.level={level}"]), environ={})
        assert cfg["log.level"] == level


def test_warning_level_filters_like_warn() -> None:
    r = subprocess.run(
        [*CLI[:1], "-c", "from mlops_obs.logs import configure, get_logger\n"
         "configure('warning', 'json')\nlog = get_logger()\nlog.info('hidden')\nlog.warning('shown')"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [orjson.loads(x)["event"] for x in r.stderr.splitlines()] == ["shown"]


def test_workload_takes_warning_on_the_command_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_cli("workload", "--log.level=warning", f"--log-dir={blocker}")  # fails later, at the log directory
    assert r.returncode == 2
    assert r.stderr.startswith("mlops-obs workload: error: log-dir: "), r.stderr


def test_an_os_error_escaping_a_command_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The common wrapper: whatever the environment refuses is one line and exit 2, never a traceback."""
    command = types.ModuleType("mlops_obs_test_mkdir_command")
    command.add_arguments = lambda parser: [Setting("path", parse_path, Path("x"), "Directory to create.")]  # type: ignore[attr-defined]
    command.run = lambda cfg: cfg["path"].mkdir(parents=True) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, command.__name__, command)
    monkeypatch.setitem(COMMANDS, "mkdir", (command.__name__, "Create a directory."))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["mkdir", f"--path={blocker / 'sub'}"]) == 2
    assert capsys.readouterr().err == f"mlops-obs mkdir: error: Not a directory: '{blocker / 'sub'}'\n"
    assert main(["mkdir", f"--path={tmp_path / 'fine'}"]) == 0 and (tmp_path / "fine").is_dir()


@pytest.mark.parametrize("command", ["replay", "rca", "bundle"])
def test_opensearch_readers_offer_only_the_settings_a_reader_uses(command: str) -> None:
    """Request size, retries, retention and template set-up mean nothing to a command that only reads."""
    from mlops_obs.logs.opensearch import OPENSEARCH_READ_SETTINGS, OPENSEARCH_WRITE_SETTINGS

    _, per_command = build_parser(command)
    keys = {s.key for s in per_command[command]}
    assert {s.key for s in OPENSEARCH_READ_SETTINGS} <= keys
    assert not keys & {s.key for s in OPENSEARCH_WRITE_SETTINGS}
    _, ship = build_parser("ship")
    assert {s.key for s in OPENSEARCH_READ_SETTINGS + OPENSEARCH_WRITE_SETTINGS} <= {s.key for s in ship["ship"]}
