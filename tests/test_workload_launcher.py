"""The workload launcher as an operator and a process manager meet it: every way of stopping it stops its
ranks, and a run that cannot start says why in one line before any rank starts.

The jobs here stall at their first step (``stall:rank=0,step=0``: the other ranks then wait in the
all-reduce), so nothing but the launcher's handling ever ends them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import psutil
import pytest

from mlops_obs.children import free_port
from mlops_obs.rankdir import RankDirectory, cadence
from tests.conftest import wait_for

WORLD = 2


def _command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mlops_obs", "workload", f"--world-size={WORLD}", "--steps=5", "--job=sig",
            f"--log-dir={tmp_path / 'logs'}", "--device=cpu", "--inject=stall:rank=0,step=0", *args]  # fmt: skip


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[str], list[psutil.Process]]]]:
    """Start a launcher (``preexec`` sets its inherited signal dispositions) and return it with its ranks."""
    started: list[psutil.Process] = []

    def start(preexec: Callable[[], None] | None = None) -> tuple[subprocess.Popen[str], list[psutil.Process]]:
        proc = subprocess.Popen(_command(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=preexec)  # fmt: skip
        me = psutil.Process(proc.pid)
        wait_for(lambda: len(me.children()) == WORLD or proc.poll() is not None, "the ranks to start")
        assert proc.poll() is None, proc.communicate()
        ranks = me.children()
        started.extend([psutil.Process(proc.pid), *ranks])
        return proc, ranks

    yield start
    for p in started:  # whatever a failing test left running
        if _alive(p):
            p.kill()


@pytest.mark.parametrize(
    ("sig", "inherited"),
    [
        (signal.SIGTERM, signal.SIG_DFL),  # kill, timeout, systemd, Kubernetes
        (signal.SIGHUP, signal.SIG_DFL),  # the terminal went away
        # A launcher started in the background by a script inherits SIGINT ignored; kill -INT still stops it.
        (signal.SIGINT, signal.SIG_IGN),
    ],
    ids=["SIGTERM", "SIGHUP", "SIGINT-inherited-ignored"],
)
def test_stop_signal_stops_every_rank_and_exits_128_plus_signal(
    launcher: Callable[..., tuple[subprocess.Popen[str], list[psutil.Process]]],
    sig: signal.Signals,
    inherited: signal.Handlers,
) -> None:
    proc, ranks = launcher(lambda: signal.signal(sig, inherited))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"workload: {sig.name} received; stopping the ranks" in err
    assert not [r.pid for r in ranks if _alive(r)]


def test_hangup_under_nohup_leaves_the_job_running(
    launcher: Callable[..., tuple[subprocess.Popen[str], list[psutil.Process]]],
) -> None:
    """SIGHUP inherited ignored is nohup's request. Both signals are pending together and the kernel hands
    over the lower number first, so a launcher acting on SIGHUP would exit 129, not 143."""
    proc, ranks = launcher(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    os.kill(proc.pid, signal.SIGHUP)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not [r.pid for r in ranks if _alive(r)]


def test_ranks_die_with_a_sigkilled_launcher(
    launcher: Callable[..., tuple[subprocess.Popen[str], list[psutil.Process]]], tmp_path: Path
) -> None:
    proc, ranks = launcher()
    # Each rank logs "rank starting" after asking for its parent-death signal.
    logs = [tmp_path / "logs" / f"sig-rank{r}.jsonl" for r in range(WORLD)]
    wait_for(lambda: all(p.exists() and b"rank starting" in p.read_bytes() for p in logs), "the ranks to start up")
    proc.kill()
    proc.communicate(timeout=30)
    wait_for(lambda: not any(_alive(r) for r in ranks), "the ranks to die with their launcher")


def test_ranks_follow_the_sidecar_by_default_and_finish_cleanly_on_sigusr2(tmp_path: Path) -> None:
    """With the default ``--flush-interval=auto`` a rank flushes on the sidecar's published cadence (every
    2 s here: not a fixed fast interval, nor the 15 s a rank with no cadence falls back to); SIGUSR2 ends
    the run early with every rank stopping after the same step, finished, exit code 0."""
    mp, logs = tmp_path / "mp", tmp_path / "logs"
    mp.mkdir()
    now = time.time()
    period = 2.0
    cadence.write(mp, cadence.make(period, now + period, 0.05, now))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlops_obs", "workload", f"--world-size={WORLD}", "--steps=10000000", "--job=fin",
         f"--log-dir={logs}", f"--multiproc-dir={mp}", "--device=cpu", "--log-every=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    snapshot = mp / "fin.0.rank.json"
    versions: dict[int, int] = {}  # rank 0's snapshot: inode (a new file for each flush) -> its mtime

    def flushes() -> int:
        try:
            st = snapshot.stat()
        except FileNotFoundError:
            return 0
        versions.setdefault(st.st_ino, st.st_mtime_ns)
        return len(versions)

    try:
        wait_for(lambda: flushes() >= 1 or proc.poll() is not None, "rank 0's first snapshot", timeout=120)
        assert proc.poll() is None, proc.communicate()
        # The first snapshot is written at start-up, off the cadence; then 4 on it, 3 periods apart.
        wait_for(lambda: flushes() >= 5, "flushes on the sidecar's cadence", timeout=30)
        proc.send_signal(signal.SIGUSR2)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    on_cadence = sorted(versions.values())[1:5]
    assert (on_cadence[-1] - on_cadence[0]) / 1e9 >= 3 * period - 2.0, on_cadence  # a late first one: shorter
    assert proc.returncode == 0, err
    (told,) = [ln for ln in err.splitlines() if "asked to finish early" in ln]
    steps = int(told.split("stops after ")[1].split()[0])
    for r in range(WORLD):
        lines = [orjson.loads(x) for x in (logs / f"fin-rank{r}.jsonl").read_bytes().splitlines()]
        assert [x["step"] for x in lines if x["event"] == "step"][-1] == steps - 1
        assert (lines[-1]["event"], lines[-1]["steps"]) == ("training finished", steps)
    states = {s["rank"]: s["state"] for s in RankDirectory(mp).snapshots()}
    assert states == dict.fromkeys(range(WORLD), "finished")
    launcher_log = [orjson.loads(x) for x in (logs / "fin-launcher.jsonl").read_bytes().splitlines()]
    assert [x["steps"] for x in launcher_log if x["event"] == "finish requested"] == [steps]


def test_a_rank_whose_launcher_is_already_gone_ends_at_once() -> None:
    """The launcher can die before the rank asks for its death signal; the rank sees a changed parent."""
    code = "from mlops_obs.workload.train import die_with_launcher; die_with_launcher(); print('survived')"
    env = {**os.environ, "MLOPS_OBS_LAUNCHER_PID": str(os.getpid() + 1_000_000)}  # never this rank's parent
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL and "survived" not in r.stdout
    env["MLOPS_OBS_LAUNCHER_PID"] = str(os.getpid())  # the real parent: the rank goes on
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "survived\n", r.stderr


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlops_obs", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip


def _one_line(r: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(p in lines[0] for p in parts), r.stderr


def test_cuda_without_a_gpu_is_one_line_before_any_rank(tmp_path: Path) -> None:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    r = _run("workload", "--device=cuda", f"--log-dir={tmp_path / 'logs'}", env={"CUDA_VISIBLE_DEVICES": ""})
    _one_line(r, "mlops-obs workload: error: device: cuda requested but ")
    assert not (tmp_path / "logs").exists()  # checked before anything was started or created


@pytest.mark.parametrize("key", ["log-dir", "multiproc-dir"])
def test_directory_under_a_regular_file_is_one_line(tmp_path: Path, key: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = _run("workload", "--device=cpu", f"--log-dir={tmp_path / 'logs'}", f"--{key}={blocker / 'sub'}")
    _one_line(r, f"mlops-obs workload: error: {key}: cannot create directory '{blocker / 'sub'}': Not a directory")
    r = _run("workload", "--device=cpu", f"--log-dir={tmp_path / 'logs'}", f"--{key}={blocker}")
    _one_line(r, f"mlops-obs workload: error: {key}: cannot create directory '{blocker}': a file of that name exists")


def test_demo_workdir_under_a_regular_file_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = _run("demo", f"--workdir={blocker / 'demo'}")
    _one_line(r, "mlops-obs demo: error: workdir: cannot create directory", "Not a directory")


def test_demo_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        r = _run("demo", f"--workdir={tmp_path / 'demo'}", f"--web.listen-address=127.0.0.1:{port}")
    _one_line(r, f"mlops-obs demo: error: web.listen-address: cannot listen on 127.0.0.1:{port}: ")
    assert not list((tmp_path / "demo").glob("logs/*"))  # no rank started


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("20s", "must be between 50ms and 15s, got '20s' (or auto: follow the sidecar)"),  # no stall heartbeat
        ("1ms", "must be between 50ms and 15s, got '1ms' (or auto: follow the sidecar)"),  # a core on writes
        ("sometimes", "expected a duration like 500ms, 1s or 5m, got 'sometimes' (or auto: follow the sidecar)"),
    ],
)
def test_a_flush_interval_out_of_bounds_is_one_line(tmp_path: Path, value: str, message: str) -> None:
    r = _run("workload", "--device=cpu", f"--log-dir={tmp_path / 'logs'}", f"--flush-interval={value}")
    _one_line(r, f"mlops-obs workload: error: flush-interval: {message} (from --flush-interval)")
    assert not (tmp_path / "logs").exists()


def test_the_flush_setting_reaches_the_ranks() -> None:
    """``auto`` (the default) is ``None`` to the ranks' monitor: follow the sidecar; a duration is fixed."""
    from mlops_obs.commands import workload
    from mlops_obs.config import resolve
    from mlops_obs.workload.launcher import rank_options

    settings = workload.add_arguments(argparse.ArgumentParser())
    for given, want in (({}, None), ({"flush-interval": "auto"}, None), ({"flush-interval": "250ms"}, 0.25)):
        cfg = resolve(settings, given, environ={})
        assert orjson.loads(orjson.dumps(rank_options(cfg)))["flush_interval"] == want
    assert resolve(settings, {}, environ={"MLOPS_OBS_FLUSH_INTERVAL": "AUTO"})["flush-interval"] is None
