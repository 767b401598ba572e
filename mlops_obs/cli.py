"""The ``mlops-obs`` command line: one entry point, one subcommand a module.

Each command module provides ``add_arguments(parser) -> list[Setting]`` (its settings, turned into
flags here) and ``run(config) -> int``. Modules keep heavy imports (torch) inside ``run`` so that
``mlops-obs --help`` and the exporter start fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from mlops_obs import __version__
from mlops_obs.config import ENV_PREFIX, ConfigError, Setting, add_to_parser, resolve

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mlops_obs.commands.demo", "Run exporter + 2-rank workload + Prometheus, print a summary, exit."),
    "exporter": ("mlops_obs.commands.exporter", "Run the sidecar exporter (GPU, host, training metrics)."),
    "ship": ("mlops_obs.commands.ship", "Ship log files into the embedded store or OpenSearch, checkpointed."),
    "generate": (
        "mlops_obs.commands.generate",
        "Write dashboards, alert rules and their tests (--check: fail if stale).",
    ),
    "alert-sink": ("mlops_obs.commands.alert_sink", "Receive Alertmanager webhooks and store each alert as an event."),
    "workload": (
        "mlops_obs.commands.workload",
        "Run the reference PyTorch DDP workload (with fault injection).",
    ),
    "rca": ("mlops_obs.commands.rca", "Name a job's root cause (kind, rank, step, evidence); --html for a report."),
    "store": ("mlops_obs.commands.store", "Check the event store, or salvage its readable chunks into a new one."),
    "replay": (
        "mlops_obs.commands.replay",
        "Replay a job's events across ranks, launcher and node alerts in one time order.",
    ),
    "bundle": ("mlops_obs.commands.bundle", "Pack a job's incident (events, series, snapshots) into a .tar.gz."),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 without the usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _load(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name][0])


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first non-option word), if any."""
    for a in argv:
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, list[Setting]]]:
    """The parser; with ``only``, just that command's module is imported (``mlops-obs exporter`` should
    not pay for grafanalib or torch), the others are listed by name and help text."""
    parser = _Parser(prog="mlops-obs", description="Observability and ops for ML training clusters.")
    parser.add_argument("--version", action="version", version=f"mlops-obs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    per_command: dict[str, list[Setting]] = {}
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            settings = list(_load(name).add_arguments(p))
            add_to_parser(p, settings)
            per_command[name] = settings
    return parser, per_command


def all_setting_keys() -> set[str]:
    """Keys of every command: a config file shared between commands may hold any of them."""
    return {s.key for settings in build_parser()[1].values() for s in settings}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, per_command = build_parser(_chosen(argv) or "")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    has_file = bool(getattr(args, "cfg:config.file", None) or os.environ.get(ENV_PREFIX + "CONFIG_FILE"))
    try:
        known = all_setting_keys() if has_file else set()
        cfg = resolve(per_command[args.command], args, known_keys=known)
    except ConfigError as e:
        print(f"mlops-obs {args.command}: error: {e}", file=sys.stderr)
        return 2
    # Non-setting arguments a command declared itself (positionals) ride along under their dest.
    for k, v in vars(args).items():
        if not k.startswith("cfg:") and k != "command":
            cfg.setdefault(k, v)
    try:
        return int(_load(args.command).run(cfg) or 0)
    except ConfigError as e:
        print(f"mlops-obs {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # What the environment refused (a directory under a regular file, a port in use, a full disk):
        # the user's to fix, so one line naming it, not a traceback.
        print(f"mlops-obs {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def describe_os_error(e: OSError) -> str:
    """``Not a directory: '/a/b'``: the reason and the path(s), without the errno number."""
    why = e.strerror or str(e) or type(e).__name__
    paths = [
        repr(os.fsdecode(f) if isinstance(f, bytes) else str(f)) for f in (e.filename, e.filename2) if f is not None
    ]
    return f"{why}: {' -> '.join(paths)}" if paths else why


if __name__ == "__main__":
    raise SystemExit(main())
