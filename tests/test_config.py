"""Configuration layering and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlops_obs.config import (
    ConfigError,
    Setting,
    int_parser,
    list_parser,
    parse_bool,
    parse_duration,
    parse_listen_address,
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
