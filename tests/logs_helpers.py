"""Shared pieces of the log tests: writers of sequence-numbered lines, the real shipper as a child
process, and the exact reconciliation (nothing missing, nothing extra) by sequence number."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from mlops_obs.logs.store import EventStore

REPO = Path(__file__).resolve().parent.parent


def line(stream: str, seq: int, **extra: Any) -> bytes:
    """One job-side style JSON line; ``stream`` is the writer's name (a rank), ``seq`` its counter."""
    ts = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    rec = {"event": "step", "stream": stream, "job": "soak", "level": "info", "ts": ts, "seq": seq, **extra}
    return orjson.dumps(rec) + b"\n"


def ship_cmd(sources: Sequence[str], *, store: Path | None = None, opensearch: str | None = None,
             state: Path, once: bool = False, extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    cmd = [sys.executable, "-m", "mlops_obs", "ship", "--log.level", "warn", "--state", str(state)]
    for s in sources:
        cmd += ["--source", s]
    if store is not None:
        cmd += ["--store", str(store)]
    if opensearch is not None:
        cmd += ["--opensearch", opensearch]
    if once:
        cmd.append("--once")
    return cmd + list(extra)


def run_ship(cmd: list[str], *, fault: str | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("MLOPS_OBS_SHIP_FAULT", None)
    if fault:
        env["MLOPS_OBS_SHIP_FAULT"] = fault
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start_ship(cmd: list[str], fault: str | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("MLOPS_OBS_SHIP_FAULT", None)
    if fault:
        env["MLOPS_OBS_SHIP_FAULT"] = fault
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill9(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def reconcile(events: Iterable[dict[str, Any]], expected: dict[str, int], *, key: str = "stream") -> None:
    """Every stream's events carry exactly the sequence numbers 1..expected[stream], each once."""
    seen: dict[str, list[int]] = {s: [] for s in expected}
    for ev in events:
        fields = ev.get("fields") or {}
        stream = fields.get(key)
        if stream is None or ev.get("seq") is None:
            continue
        seen.setdefault(stream, []).append(int(ev["seq"]))
    for stream, n in expected.items():
        got = sorted(seen.get(stream, []))
        missing = sorted(set(range(1, n + 1)) - set(got))
        dupes = len(got) - len(set(got))
        extra = sorted(set(got) - set(range(1, n + 1)))
        assert not missing and not dupes and not extra, (
            f"{stream}: {len(missing)} missing (first {missing[:5]}), {dupes} duplicated, extra {extra[:5]}"
        )
    assert set(seen) == set(expected), f"unexpected streams {set(seen) - set(expected)}"


def store_events(store: Path) -> list[dict[str, Any]]:
    with EventStore(store) as s:
        return s.query()


def store_count(store: Path) -> int:
    if not (store / "events.sqlite3").exists():
        return 0
    with EventStore(store) as s:
        return s.count()
