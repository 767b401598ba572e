"""One typed configuration for every command: flags > ``MLOPS_OBS_*`` env > ``--config.file`` YAML > defaults.

Each command declares its settings as :class:`Setting` objects; :func:`add_to_parser` turns them into
Prometheus-style flags (``--web.listen-address``, ``--collector.gpu`` / ``--no-collector.gpu``) and
:func:`resolve` layers the sources. Flags carry no defaults of their own (``None`` means "not given"),
so a value in the environment or the YAML file is only overridden by a flag the user really typed.

Every bad value raises :class:`ConfigError` naming the key, which the CLI prints as one line and exits
non-zero. Secrets are never settings: settings name *files* (``web.config.file``) or env variables.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "MLOPS_OBS_"


class ConfigError(ValueError):
    """A configuration value that cannot be used; ``str()`` is the one line the user sees."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key
        self.why = why


Parser = Callable[[Any], Any]


@dataclass(frozen=True)
class Setting:
    """A configuration key: its flag is ``--KEY``, its env variable ``MLOPS_OBS_KEY`` (dots/dashes -> _)."""

    key: str
    parse: Parser
    default: Any
    help: str
    kind: str = "value"  # "value" | "bool" | "list"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    positional_alias: tuple[str, ...] = field(default_factory=tuple)

    @property
    def env(self) -> str:
        return ENV_PREFIX + re.sub(r"[.\-]", "_", self.key).upper()

    @property
    def dest(self) -> str:
        return "cfg:" + self.key


# --- value parsers -------------------------------------------------------------------------------


def parse_str(v: Any) -> str:
    if not isinstance(v, str | int | float):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return str(v)


def parse_optional_str(v: Any) -> str | None:
    if v is None or v == "":
        return None
    return parse_str(v)


def parse_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def int_parser(minimum: int | None = None, maximum: int | None = None) -> Parser:
    def parse(v: Any) -> int:
        if isinstance(v, bool):
            raise ValueError(f"expected an integer, got {v!r}")
        try:
            n = int(str(v).strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {v!r}") from None
        if minimum is not None and n < minimum:
            raise ValueError(f"must be >= {minimum}, got {n}")
        if maximum is not None and n > maximum:
            raise ValueError(f"must be <= {maximum}, got {n}")
        return n

    return parse


def float_parser(minimum: float | None = None) -> Parser:
    def parse(v: Any) -> float:
        try:
            x = float(str(v).strip())
        except ValueError:
            raise ValueError(f"expected a number, got {v!r}") from None
        if minimum is not None and x < minimum:
            raise ValueError(f"must be >= {minimum}, got {x}")
        return x

    return parse


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(v: Any) -> float:
    """Prometheus-style durations (``500ms``, ``1s``, ``5m``); a bare number is seconds."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        if v < 0:
            raise ValueError(f"must not be negative, got {v}")
        return float(v)
    m = _DURATION.match(str(v))
    if not m:
        raise ValueError(f"expected a duration like 500ms, 1s or 5m, got {v!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def positive_duration(v: Any) -> float:
    d = parse_duration(v)
    if d <= 0:
        raise ValueError(f"must be greater than zero, got {v!r}")
    return d


def parse_listen_address(v: Any) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; an empty host means all interfaces, as in Prometheus."""
    s = str(v).strip()
    m = re.match(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)$", s)
    if not m:
        raise ValueError(f"expected HOST:PORT, got {v!r}")
    port = int(m.group("port"))
    if port > 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    host = m.group("v6") or m.group("host") or "0.0.0.0"
    return host, port


def choice_parser(*choices: str) -> Parser:
    def parse(v: Any) -> str:
        s = str(v).strip().lower()
        if s not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {v!r}")
        return s

    return parse


def list_parser(item: Parser = parse_str) -> Parser:
    """Lists come as a YAML list, repeated flags, or a comma-separated env value."""

    def parse(v: Any) -> list[Any]:
        if v is None:
            return []
        if isinstance(v, str):
            parts: Iterable[Any] = [p for p in (x.strip() for x in v.split(",")) if p]
        elif isinstance(v, list | tuple):
            parts = v
        else:
            raise ValueError(f"expected a list, got {type(v).__name__}")
        return [item(p) for p in parts]

    return parse


def parse_path(v: Any) -> Path:
    s = parse_str(v)
    if not s:
        raise ValueError("must not be empty")
    return Path(s).expanduser()


def parse_optional_path(v: Any) -> Path | None:
    if v is None or v == "":
        return None
    return parse_path(v)


# "warn" as Prometheus spells it, "warning" as our own log lines and Python's logging do: both mean the same.
LOG_LEVELS = ("debug", "info", "warn", "warning", "error")

COMMON_SETTINGS: tuple[Setting, ...] = (
    Setting("log.level", choice_parser(*LOG_LEVELS), "info", "Only log messages at or above this level."),
    Setting("log.format", choice_parser("logfmt", "json"), "logfmt", "Output format of this process's own log."),
)


# --- wiring -----------------------------------------------------------------------------------------


def add_to_parser(parser: argparse.ArgumentParser, settings: Iterable[Setting]) -> None:
    parser.add_argument(
        "--config.file",
        dest="cfg:config.file",
        default=None,
        metavar="PATH",
        help=f"YAML file with settings (keys as the flag names). Env: {ENV_PREFIX}CONFIG_FILE.",
    )
    for s in settings:
        env_note = f" Env: {s.env}."
        default_note = f" Default: {s.default}." if s.default not in (None, [], "") else ""
        if s.kind == "bool":
            parser.add_argument(
                "--" + s.key,
                dest=s.dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=s.help + default_note + env_note,
            )
        elif s.kind == "list":
            parser.add_argument(
                "--" + s.key,
                dest=s.dest,
                action="append",
                default=None,
                metavar=s.metavar or "VALUE",
                help=s.help + " Repeatable." + env_note,
            )
        else:
            parser.add_argument(
                "--" + s.key,
                dest=s.dest,
                default=None,
                metavar=s.metavar or "VALUE",
                help=s.help + default_note + env_note,
            )


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"web": {"listen-address": x}}`` and ``{"web.listen-address": x}`` mean the same."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and not key.startswith("labels"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("config.file", f"cannot read {str(path)!r}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError("config.file", f"{str(path)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("config.file", f"{str(path)!r} must hold a mapping of settings")
    return _flatten(data)


class Config(dict[str, Any]):
    """Resolved settings by key, plus where each came from (for ``--help``-style diagnostics)."""

    sources: dict[str, str]

    def __init__(self) -> None:
        super().__init__()
        self.sources = {}


def resolve(
    settings: Iterable[Setting],
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    known_keys: Iterable[str] = (),
) -> Config:
    """Layer flags over env over the YAML file over defaults, parsing and validating every value.

    ``known_keys`` are keys of *other* commands: a shared config file may hold them without error.
    """
    settings = list(settings)
    env = os.environ if environ is None else environ
    flag_values: Mapping[str, Any]
    if args is None:
        flag_values = {}
    elif isinstance(args, argparse.Namespace):
        flag_values = vars(args)
    else:
        flag_values = {("cfg:" + k if not k.startswith("cfg:") else k): v for k, v in args.items()}

    file_path = flag_values.get("cfg:config.file") or env.get(ENV_PREFIX + "CONFIG_FILE")
    file_values = load_config_file(file_path) if file_path else {}
    by_key = {s.key: s for s in settings}
    unknown = sorted(set(file_values) - set(by_key) - set(known_keys))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key in {file_path}")

    cfg = Config()
    for s in settings:
        raw: Any
        if flag_values.get(s.dest) is not None:
            raw, source = flag_values[s.dest], "flag"
        elif s.env in env:
            raw, source = env[s.env], "env"
        elif s.key in file_values:
            raw, source = file_values[s.key], "file"
        else:
            cfg[s.key] = s.default
            cfg.sources[s.key] = "default"
            continue
        try:
            cfg[s.key] = s.parse(raw)
        except (ValueError, TypeError) as e:
            origin = {"flag": f"--{s.key}", "env": s.env, "file": f"{s.key} in {file_path}"}[source]
            raise ConfigError(s.key, f"{e} (from {origin})") from None
        cfg.sources[s.key] = source
    cfg["config.file"] = file_path
    return cfg
