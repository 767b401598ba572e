"""A real crashed 2-rank workload, shipped into a store and replayed: the crashed rank's traceback is
one error event stamped within a second of the crash, before the other rank's collective errors and
next to the launcher's record of the exit, in ``replay --job`` (the issue's "done when")."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

pytest.importorskip("torch")


def _ts(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s[:26] + "+00:00")


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlops_obs", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]], str]:
    root = tmp_path_factory.mktemp("replay-crash")
    logs, store = root / "logs", root / "store"
    run = _run("workload", "--world-size=2", "--job=crash", f"--log-dir={logs}", "--device=cpu", "--steps=40",
               "--log-every=1", "--timeout=60", "--inject=crash:rank=1,step=8")  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    shipped = _run("ship", "--source", str(logs / "*"), "--store", str(store), "--once", "--log.level", "warn")
    assert shipped.returncode == 0, shipped.stderr
    got = _run("replay", "--store", str(store), "--job", "crash", "--json")
    assert got.returncode == 0, got.stderr
    text = _run("replay", "--store", str(store), "--job", "crash")
    assert text.returncode == 0, text.stderr
    return store, [orjson.loads(x) for x in got.stdout.splitlines()], text.stdout


def test_the_crash_traceback_is_one_error_event_before_the_peers_errors(
    crashed: tuple[Path, list[dict[str, Any]], str],
) -> None:
    _, events, _ = crashed
    assert [(e["@timestamp"], e["source"], e["offset"]) for e in events] == sorted(
        (e["@timestamp"], e["source"], e["offset"]) for e in events
    )
    tracebacks = [e for e in events if "Traceback (most recent call last)" in e["message"] and e["rank"] == 1]
    assert len(tracebacks) == 1, [e["message"][:80] for e in tracebacks]
    tb = tracebacks[0]
    assert tb["level"] == "error" and tb["kind"] == "log"
    assert tb["message"].rstrip().endswith("RuntimeError: injected crash at step 8")
    assert tb["fields"]["ts_source"] == "cri"
    assert not any("injected crash" in e["message"] and e is not tb and e["kind"] == "log" and
                   e["message"].startswith("[rank1]") for e in events)  # fmt: skip
    failed = next(e for e in events if e["message"] == "rank failed" and e["rank"] == 1 and e["kind"] == "log")
    assert abs((_ts(tb["@timestamp"]) - _ts(failed["@timestamp"])).total_seconds()) < 1.0
    i = events.index(tb)
    peer_errors = [j for j, e in enumerate(events) if e["rank"] == 0 and e["kind"] == "log" and e["level"] == "error"]
    assert peer_errors and all(j > i for j in peer_errors)
    exited = next(j for j, e in enumerate(events) if e["kind"] == "launcher" and e["message"] == "rank exited"
                  and e["rank"] == 1)  # fmt: skip
    assert exited > i
    # Between the traceback and the launcher's exit record: only the peer, failing (and, on a busy
    # machine, the end of the step it was in when its peer crashed), nothing of the crashed rank's.
    between = events[i + 1 : exited]
    assert all(e["rank"] == 0 and (e["level"] in ("error", "warning") or e["message"] == "step") for e in between), [
        (e["rank"], e["level"], e["message"][:60]) for e in between
    ]
    assert (_ts(events[exited]["@timestamp"]) - _ts(tb["@timestamp"])).total_seconds() < 10.0


def test_the_terminal_view_of_the_crash(crashed: tuple[Path, list[dict[str, Any]], str]) -> None:
    _, _, text = crashed
    lines = text.splitlines()
    head = next(n for n, x in enumerate(lines) if "[rank1]: Traceback (most recent call last):" in x)
    assert " rank 1 " in lines[head] and " ERROR " in lines[head]
    assert lines[head + 1].startswith(" " * 30) and "[rank1]:" in lines[head + 1]
    exit_line = next(x for x in lines if "rank exited" in x and "rank=1" in x)
    assert " launcher " in exit_line and "exit_code=1" in exit_line
    assert not [x for x in lines if "lost between seq" in x]  # a clean run loses nothing
