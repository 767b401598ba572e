"""Configuration layering and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlops_obs.config import (
    MAX_CONFIG_BYTES,
    MAX_DURATION,
    ConfigError,
    ConfigFileError,
    Setting,
    format_duration,
    int_parser,
    list_parser,
    loop_duration,
    parse_bool,
    parse_duration,
    parse_listen_address,
    parse_yaml,
    read_yaml,
    resolve,
)

SETTINGS = [
    Setting("web.listen-address", parse_listen_address, ("0.0.0.0", 9477), "addr"),
    Setting("sampler.interval", parse_duration, 1.0, "interval"),
    Setting("collector.gpu", parse_bool, True, "gpu", kind="bool"),
    Setting("steps", int_parser(1), 10, "steps"),
    Setting("source", list_parser(), [], "globs", kind="list"),
]


def test_defaults_when_nothing_is_given() -> None:
    cfg = resolve(SETTINGS, {}, environ={})
    assert cfg["web.listen-address"] == ("0.0.0.0", 9477)
    assert cfg["sampler.interval"] == 1.0
    assert cfg.sources["steps"] == "default"


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("web:\n  listen-address: 127.0.0.1:1000\nsampler.interval: 3s\nsteps: 7\ncollector.gpu: false\n")
    env = {"MLOPS_OBS_CONFIG_FILE": str(f), "MLOPS_OBS_SAMPLER_INTERVAL": "500ms", "MLOPS_OBS_STEPS": "9"}
    cfg = resolve(SETTINGS, {"steps": "11"}, environ=env)
    assert cfg["web.listen-address"] == ("127.0.0.1", 1000)  # file (nested form)
    assert cfg["sampler.interval"] == 0.5  # env over file
    assert cfg["steps"] == 11  # flag over env
    assert cfg["collector.gpu"] is False  # file over default
    assert cfg.sources == {
        "web.listen-address": "file",
        "sampler.interval": "env",
        "collector.gpu": "file",
        "steps": "flag",
        "source": "default",
    }


def test_lists_from_env_are_comma_separated() -> None:
    cfg = resolve(SETTINGS, {}, environ={"MLOPS_OBS_SOURCE": "a/*.log, b/*.jsonl"})
    assert cfg["source"] == ["a/*.log", "b/*.jsonl"]


@pytest.mark.parametrize(
    ("flags", "env", "expect"),
    [
        (
            {"web.listen-address": "nope"},
            {},
            "web.listen-address: expected HOST:PORT, got 'nope' (from --web.listen-address)",
        ),
        ({}, {"MLOPS_OBS_SAMPLER_INTERVAL": "fast"}, "sampler.interval: expected a duration"),
        ({"steps": "0"}, {}, "steps: must be >= 1, got 0"),
        ({"web.listen-address": "1.2.3.4:70000"}, {}, "port must be 0-65535"),
        ({}, {"MLOPS_OBS_COLLECTOR_GPU": "maybe"}, "collector.gpu: expected true or false"),
    ],
)
def test_bad_values_name_the_key(flags: dict[str, str], env: dict[str, str], expect: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve(SETTINGS, flags, environ=env)
    assert expect in str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_and_invalid_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config.file: cannot read .*missing.yml"):
        resolve(SETTINGS, {"config.file": str(tmp_path / "missing.yml")}, environ={})
    bad = tmp_path / "bad.yml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve(SETTINGS, {"config.file": str(bad)}, environ={})
    listy = tmp_path / "list.yml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve(SETTINGS, {"config.file": str(listy)}, environ={})


def test_unknown_file_key_is_an_error_unless_another_command_knows_it(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz: unknown key"):
        resolve(SETTINGS, {"config.file": str(f)}, environ={})
    assert resolve(SETTINGS, {"config.file": str(f)}, environ={}, known_keys={"stepz"})["steps"] == 10


def test_bad_value_in_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("steps: many\n")
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 'many' \(from steps in .*c.yml\)"):
        resolve(SETTINGS, {"config.file": str(f)}, environ={})


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("2s", 2.0), ("5m", 300.0), ("1h", 3600.0), ("1.5", 1.5), (3, 3.0)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_listen_address_forms() -> None:
    assert parse_listen_address(":9100") == ("0.0.0.0", 9100)
    assert parse_listen_address("[::1]:9100") == ("::1", 9100)
    assert parse_listen_address("localhost:0") == ("localhost", 0)


# --- reading configuration files safely ---------------------------------------------------------------


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """``width ** levels`` leaves in a few hundred bytes of YAML aliases, once anything walks them."""
    nest = [f"&l0 [{', '.join(['x'] * width)}]"]
    nest += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(nest) + "]"


def test_a_yaml_alias_bomb_in_a_settings_file_is_one_line_error(tmp_path: Path) -> None:
    """A settings value built from nested aliases would expand to gigabytes when parsed as a list."""
    f = tmp_path / "c.yml"
    f.write_text(f"source: {alias_bomb()}\n")
    with pytest.raises(ConfigError, match=r"config.file: .*c.yml' is not valid YAML at line 1: YAML aliases") as e:
        resolve(SETTINGS, {"config.file": str(f)}, environ={})
    assert "\n" not in str(e.value)


def test_anchors_without_aliases_and_ordinary_yaml_still_load(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("steps: &s 5\nsource: [a, b]\n")
    assert read_yaml(f) == {"steps": 5, "source": ["a", "b"]}
    assert read_yaml(tmp_path / "c.yml") == parse_yaml(f.read_text())
    f.write_text("# nothing\n")
    assert read_yaml(f) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"a: " + b"[" * 200 + b"]" * 200 + b"\n", "nested deeper than 64 levels"),
        (b"a: 1\n" + b"#" * (MAX_CONFIG_BYTES + 1), "larger than"),
        (b"a: '\xff\xfe'\n", "not UTF-8"),
        (b"a: [1,\n", "not valid YAML at line 2"),
        (b"a: !!python/object:os.system ls\n", "not valid YAML"),
    ],
)
def test_config_files_that_are_refused_with_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    f = tmp_path / "c.yml"
    f.write_bytes(content)
    with pytest.raises(ConfigFileError, match=message) as e:
        read_yaml(f)
    assert "\n" not in str(e.value) and str(f) in str(e.value)


def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO (nobody writing) or a device as a config path: refused at once, never read."""
    fifo = tmp_path / "fifo.yml"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(ConfigFileError, match="not a regular file"):
            read_yaml(path)


def test_symlinked_config_files_are_followed(tmp_path: Path) -> None:
    """Kubernetes mounts ConfigMaps and Secrets through symbolic links."""
    (tmp_path / "real.yml").write_text("steps: 3\n")
    (tmp_path / "link.yml").symlink_to(tmp_path / "real.yml")
    assert read_yaml(tmp_path / "link.yml") == {"steps": 3}


# --- durations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [("10ms", True), ("1s", True), ("1h", True), ("0.001ms", False), ("9ms", False), ("61m", False),
     ("999999999999h", False), ("0", False)],
)  # fmt: skip
def test_loop_durations_are_bounded(value: str, ok: bool) -> None:
    if ok:
        assert loop_duration(value) > 0
    else:
        with pytest.raises(ValueError, match=r"must be between 10ms and 1h|must be at most|must be greater than zero"):
            loop_duration(value)


def test_no_duration_overflows_a_wait() -> None:
    with pytest.raises(ValueError, match="must be at most 87600h"):
        parse_duration("999999999999h")
    with pytest.raises(ValueError, match="must be at most"):
        parse_duration(1e300)
    assert parse_duration("87600h") == MAX_DURATION
    assert format_duration(0.01) == "10ms" and format_duration(3600) == "1h" and format_duration(1.5) == "1.5s"


@pytest.mark.parametrize(
    "flag", ["--sampler.interval=0.001ms", "--sampler.interval=999999999999h", "--collector.deadline=0.001ms",
             "--collector.deadline=999999999999h"],
)  # fmt: skip
def test_exporter_refuses_absurd_sampler_durations(flag: str) -> None:
    """One line and exit 2 at start-up, not a burnt core or a dead sampler thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLOPS_OBS_")}
    p = subprocess.run(
        [sys.executable, "-m", "mlops_obs", "exporter", "--web.listen-address=127.0.0.1:0", flag],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert p.returncode == 2
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 1 and flag.split("=")[0][2:] in lines[0], lines
