"""Per-process GPU attribution: pid -> job/rank, container, pod; and the series it produces."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mlops_obs import rankdir
from mlops_obs.collectors.fake_nvml import FakeNvml
from mlops_obs.collectors.gpu import GpuCollector
from mlops_obs.collectors.gpu_process import (
    Attributor,
    ProcessResolver,
    parse_cgroup,
    parse_environ,
    parse_nspid,
    start_ticks,
)
from mlops_obs.metrics import render
from mlops_obs.rankdir import RankDirectory
from tests.test_gpu_collector import scrape_series, values

CID = "3f1e6b5c2a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f"
POD_UID = "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d"

CGROUPS = {
    "v1 cgroupfs kubepods": (
        f"12:memory:/kubepods/burstable/pod{POD_UID}/{CID}\n11:cpu,cpuacct:/kubepods/burstable/pod{POD_UID}/{CID}\n",
        CID,
        POD_UID,
    ),
    "v2 systemd containerd": (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n",
        CID,
        POD_UID,
    ),
    "v2 docker": (f"0::/system.slice/docker-{CID}.scope\n", CID, None),
    "v1 docker": (f"4:devices:/docker/{CID}\n", CID, None),
    "crio": (f"0::/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/crio-{CID}.scope\n", CID, POD_UID),
    "host process": ("0::/user.slice/user-1000.slice/session-3.scope\n", None, None),
    "empty": ("", None, None),
}


@pytest.mark.parametrize("case", sorted(CGROUPS))
def test_parse_cgroup(case: str) -> None:
    """Container id and pod UID come out of every cgroup layout we meet in clusters."""
    text, container, pod = CGROUPS[case]
    ident = parse_cgroup(text)
    assert (ident.container_id, ident.pod_uid) == (container, pod)


def test_parse_environ_keeps_only_wanted_keys() -> None:
    """Only POD_NAME/POD_NAMESPACE are kept from a process environment (never secrets)."""
    data = b"PATH=/bin\0POD_NAME=trainer-0\0AWS_SECRET_ACCESS_KEY=x\0POD_NAMESPACE=ml\0junk\0"
    assert parse_environ(data) == {"POD_NAME": "trainer-0", "POD_NAMESPACE": "ml"}


def test_parse_nspid_and_start_time() -> None:
    """NSpid lists the pid per namespace; the start time survives a comm with spaces and parens."""
    assert parse_nspid("Name:\tpython\nNSpid:\t41234\t7\n") == (41234, 7)
    assert parse_nspid("Name:\tx\n") == ()
    stat = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10"
    assert start_ticks(stat) == 987654 and start_ticks("4242 (x) S 1") is None


BTIME, START_TICKS = 1764200000, 5555
FAKE_START = BTIME + START_TICKS / 100  # when every fake process started, as its rank records it


def _fake_proc(root: Path, pid: int, nspid: str, cgroup: str, environ: bytes | None) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (root / "stat").write_text(f"cpu 1 2 3\nbtime {BTIME}\n")
    (d / "stat").write_text(f"{pid} (python) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {START_TICKS} 1 1\n")
    (d / "status").write_text(f"Name:\tpython\nNSpid:\t{nspid}\n")
    (d / "cgroup").write_text(cgroup)
    if environ is not None:
        (d / "environ").write_bytes(environ)


def _snap(directory: Path, job: str, rank: int, pid: int, start_time: float = FAKE_START) -> None:
    rankdir.write(
        directory,
        job,
        rank,
        {"v": rankdir.SCHEMA_VERSION, "job": job, "rank": rank, "pid": pid, "updated": time.time(),
         "start_time": start_time},
    )  # fmt: skip


def test_container_rank_found_through_its_namespace_pid(tmp_path: Path) -> None:
    """NVML's host pid maps to the rank that recorded its in-container pid (NSpid), with pod and container."""
    proc, mp = tmp_path / "proc", tmp_path / "mp"
    mp.mkdir()
    cg = CGROUPS["v2 systemd containerd"][0]
    _fake_proc(proc, 41234, "41234\t7", cg, b"POD_NAME=llm-0\0POD_NAMESPACE=train\0")
    _fake_proc(proc, 50000, "50000", "0::/user.slice\n", None)
    _snap(mp, "llm", 3, 7)
    a = Attributor(RankDirectory(mp), proc_root=proc, environ={})
    assert a.labels(41234) == {"job": "llm", "rank": "3", "container": CID[:12], "pod": "llm-0", "namespace": "train"}
    assert a.labels(50000) == {}
    assert a.labels(60000) == {}  # vanished pid: nothing, no error


def test_pod_from_the_sidecars_env_when_in_the_same_pod(tmp_path: Path) -> None:
    """Without a readable environ, a process in the sidecar's own pod gets the sidecar's POD_NAME."""
    proc = tmp_path / "proc"
    cg = CGROUPS["v1 cgroupfs kubepods"][0]
    _fake_proc(proc, 100, "100", cg, None)
    (proc / "self").mkdir()
    (proc / "self" / "cgroup").write_text(cg)
    a = Attributor(None, proc_root=proc, environ={"POD_NAME": "job-0", "POD_NAMESPACE": "ml"})
    assert a.labels(100) == {"container": CID[:12], "pod": "job-0", "namespace": "ml"}
    (proc / "self" / "cgroup").write_text("0::/\n")  # the sidecar is in another pod
    other = Attributor(None, proc_root=proc, environ={"POD_NAME": "job-0"})
    assert other.labels(100) == {"container": CID[:12]}


def test_reused_pid_is_resolved_again_once_the_cached_identity_is_due(tmp_path: Path) -> None:
    """Within ``revalidate`` seconds the cached identity is trusted without reading /proc; after it, a
    pid whose start time changed (a new process under the same number) is resolved from scratch."""
    proc = tmp_path / "proc"
    _fake_proc(proc, 300, "300", CGROUPS["v1 cgroupfs kubepods"][0], None)
    trusting, checking = ProcessResolver(proc, {}, revalidate=3600.0), ProcessResolver(proc, {}, revalidate=0.0)
    first = trusting.identity(300)
    assert first is not None and first.container_id == CID
    assert checking.identity(300) == first
    # pid 300 exits and a process outside any container gets the same pid (another start time)
    (proc / "300" / "stat").write_text("300 (bash) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9999 1 1\n")
    (proc / "300" / "cgroup").write_text("0::/user.slice\n")
    assert trusting.identity(300) == first  # not due yet: no /proc read
    again = checking.identity(300)
    assert again is not None and again.container_id is None


def test_ambiguous_pid_is_not_attributed(tmp_path: Path) -> None:
    """Two ranks in different containers that both recorded pid 7: neither is guessed."""
    proc, mp = tmp_path / "proc", tmp_path / "mp"
    mp.mkdir()
    _fake_proc(proc, 41234, "41234\t7", "0::/\n", None)
    _snap(mp, "a", 0, 7)
    _snap(mp, "b", 0, 7)
    assert Attributor(RankDirectory(mp), proc_root=proc, environ={}).labels(41234) == {}


@pytest.fixture
def child(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "POD_NAME": "trainer-1", "POD_NAMESPACE": "research"}
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    yield p
    p.kill()
    p.wait()


def test_real_process_gets_job_rank_and_pod_and_drops_out_when_it_exits(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    """A live rank process on a GPU: per-process series with job/rank/pod; device series get job/rank."""
    mp = tmp_path / "mp"
    mp.mkdir()
    _snap(mp, "bert", 1, child.pid, psutil.Process(child.pid).create_time())
    c = GpuCollector({"gpu.backend": "fake", "multiproc-dir": mp, "gpu.xid-events": False, "gpu.profile": "full"})
    try:
        c.sample()
        f = c.nvml.lib
        assert isinstance(f, FakeNvml)
        f.devices[5]["processes"] = [
            {"pid": child.pid, "used_memory": 3_000_000_000, "sm_util": 64},
            {"pid": 999_999_123, "used_memory": 1_000},
        ]
        s = scrape_series(render(c.sample()).decode())
        mem = [(dict(lb), v) for (n, lb), v in s.items() if n == "mlops_gpu_process_memory_used_bytes"]
        mine = [lb for lb, v in mem if lb["pid"] == str(child.pid)]
        assert mine == [
            {
                "gpu": "5",
                "uuid": f.devices[5].uuid,
                "pid": str(child.pid),
                "job": "bert",
                "rank": "1",
                "pod": "trainer-1",
                "namespace": "research",
            }
        ]
        assert values(s, "mlops_gpu_process_utilization_ratio", pid=str(child.pid)) == [0.64]
        assert values(s, "mlops_gpu_utilization_ratio", gpu="5", job="bert", rank="1") == [0.87]
        assert values(s, "mlops_gpu_utilization_ratio", gpu="4", job="bert") == []
        # The process exits and NVML stops listing it: its series go, and so does the cache entry.
        child.kill()
        child.wait()
        f.devices[5]["processes"] = []
        s = scrape_series(render(c.sample()).decode())
        assert values(s, "mlops_gpu_process_memory_used_bytes") == []
        assert values(s, "mlops_gpu_utilization_ratio", gpu="5", job="bert") == []
        assert c.attributor.procs._cache == {}
    finally:
        c.close()


def test_process_series_are_bounded_per_gpu() -> None:
    """Past gpu.process-limit, only the largest processes by memory get series."""
    procs = [{"pid": 900_000_000 + i, "used_memory": 1000 * (i + 1)} for i in range(10)]
    c = GpuCollector({"gpu.backend": "fake", "gpu.process-limit": 3, "gpu.xid-events": False, "gpu.profile": "full"})
    try:
        c.sample()
        f = c.nvml.lib
        f.devices[0]["processes"] = procs
        s = scrape_series(render(c.sample()).decode())
        got = sorted(values(s, "mlops_gpu_process_memory_used_bytes", gpu="0"))
        assert got == [8000.0, 9000.0, 10000.0]
    finally:
        c.close()
