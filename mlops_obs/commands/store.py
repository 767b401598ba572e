"""``mlops-obs store check|salvage``: look after the embedded event store's database file.

``check DIR`` runs SQLite's ``integrity_check`` read-only and exits 0 when the store is whole, 1
with the problems otherwise. ``salvage DIR NEW_DIR`` copies every chunk that still reads and decodes
into a new store (the damaged one is opened read-only and left as it is), and says how many chunks
were lost. Then point the shipper at ``NEW_DIR`` (or move it into place); the shipper's checkpoint
stays valid, and events of lost chunks come back only by re-shipping their files from the start
(remove the checkpoint), which is harmless for those still there (ids are kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mlops_obs.config import COMMON_SETTINGS, ConfigError, Setting


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    # Optional to argparse so that the common flags parse alone; run() asks for what is missing in one line.
    parser.add_argument("action", nargs="?", choices=("check", "salvage"), help="check: integrity; salvage: copy")
    parser.add_argument("directory", nargs="?", type=Path, help="the store directory (holding events.sqlite3)")
    parser.add_argument("target", nargs="?", type=Path, help="salvage: a new directory for the copy")
    return list(COMMON_SETTINGS)


def run(cfg: dict[str, Any]) -> int:
    from mlops_obs.logs.store import check_store, salvage_store

    directory: Path | None = cfg.get("directory")
    if not cfg.get("action") or directory is None:
        raise ConfigError("store", "usage: mlops-obs store check DIR | mlops-obs store salvage DIR NEW_DIR")
    if cfg["action"] == "check":
        problems = check_store(directory)
        if not problems:
            print(f"store {directory}: ok")
            return 0
        print(f"store {directory}: damaged: {problems[0]}", file=sys.stderr)
        for p in problems[1:]:
            print(f"  {p}", file=sys.stderr)
        print(f"  copy what is readable with: mlops-obs store salvage {directory} NEW_DIR", file=sys.stderr)
        return 1
    target: Path | None = cfg.get("target")
    if target is None:
        raise ConfigError("store", "salvage needs a new directory for the copy: mlops-obs store salvage DIR NEW_DIR")
    try:
        chunks, events, lost = salvage_store(directory, target)
    except ValueError as e:
        print(f"mlops-obs store: error: {e}", file=sys.stderr)
        return 2
    print(f"salvaged {chunks} chunks ({events} events) into {target}; {lost} chunks unreadable")
    return 0
