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
import socket
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "MLOPS_OBS_"
NODE_ENV = ("MLOPS_OBS_NODE", "NODE_NAME")


def node_name(environ: Mapping[str, str] | None = None) -> str:
    """The node this process runs on, the same string wherever a ``node`` label appears (training
    series, ``mlops_exporter_node_info``, ``mlops_gpu_info``, log events): ``MLOPS_OBS_NODE``, else
    ``NODE_NAME`` (Kubernetes' downward API, ``spec.nodeName``), else the host name. The rules join
    series of the SDK, the sidecar and the log shipper on it, and in a pod the host name is the pod's."""
    env = os.environ if environ is None else environ
    for key in NODE_ENV:
        value = env.get(key)
        if value:
            return value
    return socket.gethostname()


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


def parse_http_url(v: Any) -> str | None:
    """An http:// or https:// URL without its trailing slash, or None when unset."""
    s = parse_optional_str(v)
    if s is None:
        return None
    if not s.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {s!r}")
    return s.rstrip("/")


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
# No setting means a wait of more than ten years; far longer ones overflow ``Event.wait`` and
# ``time.sleep`` (``OverflowError`` kills the thread that waits), so every duration is held below it.
MAX_DURATION = 10 * 365 * 86400.0


def format_duration(seconds: float) -> str:
    """The shortest Prometheus-style spelling of ``seconds`` (``10ms``, ``1s``, ``1h``) for messages."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def parse_duration(v: Any) -> float:
    """Prometheus-style durations (``500ms``, ``1s``, ``5m``); a bare number is seconds. At most ten years."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        d = float(v)
        if d < 0 or d != d:
            raise ValueError(f"must not be negative, got {v}")
    else:
        m = _DURATION.match(str(v))
        if not m:
            raise ValueError(f"expected a duration like 500ms, 1s or 5m, got {v!r}")
        d = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if d > MAX_DURATION:
        raise ValueError(f"must be at most {format_duration(MAX_DURATION)}, got {v!r}")
    return d


def positive_duration(v: Any) -> float:
    d = parse_duration(v)
    if d <= 0:
        raise ValueError(f"must be greater than zero, got {v!r}")
    return d


def duration_parser(minimum: float, maximum: float = MAX_DURATION) -> Parser:
    """A duration within ``[minimum, maximum]`` seconds.

    Why bounds: a loop that waits for a duration turns a typo into a fault. ``0.001ms`` between
    sampling rounds keeps a core busy; a wait beyond what ``Event.wait`` accepts kills the thread
    while the exporter keeps reporting its last success.
    """
    lo, hi = format_duration(minimum), format_duration(maximum)

    def parse(v: Any) -> float:
        d = positive_duration(v) if minimum > 0 else parse_duration(v)
        if not minimum <= d <= maximum:
            raise ValueError(f"must be between {lo} and {hi}, got {v!r}")
        return d

    return parse


# How often a background loop (a sampler, a collector's deadline) may run: often enough to be
# useful, rarely enough not to burn a core, and inside what a thread can wait for.
loop_duration = duration_parser(0.01, 3600.0)


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


# --- reading configuration files ----------------------------------------------------------------

# Every configuration file the project reads (settings, web config, mixin config) is a few KiB; the
# cap keeps a wrong path (a log, a device, a model checkpoint) from being read into memory.
MAX_CONFIG_BYTES = 1 << 20
# Deeper nesting than any real configuration; PyYAML composes recursively, and a file of ``[[[[...``
# would otherwise end in a RecursionError (a traceback, not a one-line error).
MAX_YAML_DEPTH = 64


class ConfigFileError(ValueError):
    """A configuration file that cannot be read or parsed; ``str()`` is one line naming the file."""


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases and with a nesting cap.

    Why refuse aliases: a few hundred bytes of nested anchors (the "billion laughs") expand into
    gigabytes when the document is walked, and no configuration of ours needs them. Anchors alone
    are harmless and allowed; every ``*alias`` (merge keys included) is an error at its line.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed", mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str | bytes, name: str = "<string>") -> Any:
    """One YAML document, loaded safely (no aliases, bounded depth); :class:`ConfigFileError` otherwise."""
    loader = _SafeLoader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = f": {e.problem}" if e.problem else ""
        raise ConfigFileError(f"{name!r} is not valid YAML{where}{problem}") from None
    except yaml.YAMLError:
        raise ConfigFileError(f"{name!r} is not valid YAML") from None
    finally:
        loader.dispose()


def read_config_bytes(path: str | os.PathLike[str], max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; :class:`ConfigFileError` otherwise.

    Symbolic links are followed (Kubernetes mounts ConfigMaps and Secrets through them); a FIFO or
    a device is refused before it is read, so a wrong path can neither block nor fill memory.
    """
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ConfigFileError(f"cannot read {name!r}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigFileError(f"{name!r} is not a regular file")
        if st.st_size > max_bytes:
            raise ConfigFileError(f"{name!r} is larger than {max_bytes} bytes")
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed by the file object from here on
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ConfigFileError(f"cannot read {name!r}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:  # grew after the check
        raise ConfigFileError(f"{name!r} is larger than {max_bytes} bytes")
    return data


def read_yaml(path: str | os.PathLike[str], max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Every configuration file goes through here: size cap, regular files only, UTF-8, safe YAML.

    Returns the document (``None`` for an empty or comment-only file); raises :class:`ConfigFileError`
    with one line that names the file.
    """
    data = read_config_bytes(path, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{str(path)!r} is not UTF-8 (byte {e.start})") from None
    return parse_yaml(text, str(path))


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
        data = read_yaml(path)
    except ConfigFileError as e:
        raise ConfigError("config.file", str(e)) from None
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
