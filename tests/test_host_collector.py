"""The host and process collectors end to end: fixtures and the real /proc in, parsed exposition out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlops_obs import rankdir
from mlops_obs.children import free_port
from mlops_obs.collectors import host_parse as hp
from mlops_obs.collectors.host import DEFAULT_NET_EXCLUDE, HostCollector, ProcFiles, read_timex
from mlops_obs.collectors.process import ProcessCollector
from mlops_obs.metrics import render

FIX = Path(__file__).parent / "fixtures"


def host_config(procfs: Path, sysfs: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "path.procfs": procfs,
        "path.sysfs": sysfs,
        "host.per-cpu": False,
        "host.filesystem-paths": [],
        "host.disk-device-exclude": re.compile(hp.DEFAULT_DISK_EXCLUDE),
        "host.network-device-exclude": re.compile(DEFAULT_NET_EXCLUDE),
    }
    cfg.update(extra)
    return cfg


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def names(text: bytes) -> set[str]:
    return {name for name, _ in samples(text)}


def test_gpu_node_fixture_has_every_host_family(tmp_path: Path) -> None:
    """PSI, InfiniBand, disks, network and file systems all come out in base units."""
    cfg = host_config(
        FIX / "proc" / "gpu-node", FIX / "sys" / "ib-node", **{"host.filesystem-paths": [tmp_path, "/no/such/dir"]}
    )
    out = render(HostCollector(cfg).sample())
    s = samples(out)
    assert s[("mlops_node_cpu_seconds_total", (("mode", "user"),))] == pytest.approx(22553.37)
    assert s[("mlops_node_cpus", ())] == 4
    assert s[("mlops_node_load", (("window", "15m"),))] == 1.07
    assert s[("mlops_node_memory_available_bytes", ())] == 998765432 * 1024
    assert s[("mlops_node_swap_used_bytes", ())] == (8388604 - 8126460) * 1024
    assert s[("mlops_node_pressure_io_stalled_seconds_total", ())] == pytest.approx(612.003112)
    assert s[("mlops_node_pressure_cpu_waiting_seconds_total", ())] == pytest.approx(9.627263)
    assert ("mlops_node_pressure_cpu_stalled_seconds_total", ()) not in s  # not in the contract: cpu full is 0
    assert s[("mlops_node_disk_read_bytes_total", (("device", "nvme0n1"),))] == 943212352 * 512
    assert ("mlops_node_disk_read_bytes_total", (("device", "nvme0n1p1"),)) not in s
    assert s[("mlops_node_network_receive_drop_total", (("device", "eth0"),))] == 17
    assert not any(k[0].startswith("mlops_node_network") and ("device", "vethab12cd3") in k[1] for k in s)
    rx = s[("mlops_node_infiniband_port_receive_bytes_total", (("device", "mlx5_0"), ("port", "1")))]
    assert rx == 3735102217415 * 4
    assert (
        s[("mlops_node_infiniband_port_errors_total", (("device", "mlx5_0"), ("port", "1"), ("type", "link_downed")))]
        == 1
    )
    port = (("device", "mlx5_0"), ("port", "1"))
    assert s[("mlops_node_infiniband_port_state_id", port)] == 4
    assert s[("mlops_node_infiniband_port_rate_bytes_per_second", port)] == 50e9
    assert s[("mlops_node_infiniband_port_state_id", (("device", "mlx5_1"), ("port", "1")))] == 1
    assert ("mlops_node_infiniband_port_rate_bytes_per_second", (("device", "mlx5_1"), ("port", "1"))) not in s
    # Only the existing path is reported; its mount point comes from the fixture's mountinfo.
    fs = [k for k in s if k[0] == "mlops_node_filesystem_avail_bytes"]
    assert fs == [("mlops_node_filesystem_avail_bytes", (("mountpoint", "/"), ("path", str(tmp_path))))]
    assert s[("mlops_node_filesystem_size_bytes", fs[0][1])] >= s[fs[0]] > 0
    assert "mlops_node_cpu_core_seconds_total" not in names(out)


def test_absent_sources_are_absent_not_zero() -> None:
    """No PSI, no InfiniBand, no MemAvailable: no series and no empty families, never zeros."""
    out = render(HostCollector(host_config(FIX / "proc" / "old-kernel", FIX / "sys" / "plain-node")).sample())
    got = names(out)
    assert not [n for n in got if "pressure" in n or "infiniband" in n]
    assert "mlops_node_memory_available_bytes" not in got
    assert b"pressure" not in out and b"infiniband" not in out
    assert "mlops_node_memory_total_bytes" in got
    assert "mlops_node_disk_io_time_seconds_total" in got


def test_per_cpu_is_opt_in() -> None:
    cfg = host_config(FIX / "proc" / "gpu-node", FIX / "sys" / "plain-node", **{"host.per-cpu": True})
    s = samples(render(HostCollector(cfg).sample()))
    assert s[("mlops_node_cpu_core_seconds_total", (("cpu", "3"), ("mode", "system")))] == pytest.approx(1246.31)


def test_real_proc_and_sys_of_this_machine() -> None:
    """The collector runs on the machine itself and yields the core families."""
    cfg = host_config(Path("/proc"), Path("/sys"), **{"host.filesystem-paths": [Path("/")]})
    got = names(render(HostCollector(cfg).sample()))
    for name in ("mlops_node_cpu_seconds_total", "mlops_node_load", "mlops_node_memory_total_bytes",
                 "mlops_node_filesystem_avail_bytes", "mlops_node_network_receive_bytes_total"):  # fmt: skip
        assert name in got
    if Path("/proc/pressure/io").exists():
        assert "mlops_node_pressure_io_waiting_seconds_total" in got


@pytest.mark.skipif(shutil.which("prometheus-node-exporter") is None, reason="prometheus-node-exporter not installed")
def test_timex_agrees_with_node_exporter() -> None:
    """Our adjtimex(2) read gives node_exporter's node_timex_sync_status and maxerror."""
    ours = read_timex()
    assert ours is not None
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus-node-exporter", "--collector.disable-defaults", "--collector.timex",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        text = ""
        for _ in range(100):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.1)
        theirs = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        ours = read_timex()
        assert ours is not None
        assert ours["sync_status"] == theirs["node_timex_sync_status"]
        assert ours["offset_seconds"] == pytest.approx(theirs["node_timex_offset_seconds"], abs=0.01)
        assert ours["maxerror_seconds"] == pytest.approx(theirs["node_timex_maxerror_seconds"], abs=0.01)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- process collector -------------------------------------------------------------------------------


def write_snap(directory: Path, job: str, rank: int, pid: int, start_time: float) -> None:
    rankdir.write(
        directory,
        job,
        rank,
        {"v": rankdir.SCHEMA_VERSION, "job": job, "rank": rank, "pid": pid, "start_time": start_time,
         "updated": time.time()},
    )  # fmt: skip


def test_process_collector_on_fixture_and_pid_reuse(tmp_path: Path) -> None:
    """Ranks are labelled job/rank/pid; a pid that started after its snapshot is someone else's."""
    proc_start = 1764200000 + 171234 / 100  # btime + start ticks of fixture pid 4242
    write_snap(tmp_path, "llm", 0, 4242, proc_start + 1.5)
    write_snap(tmp_path, "llm", 1, 4243, proc_start - 600)  # pid 4243 started 600 s after this rank did
    write_snap(tmp_path, "llm", 2, 99999, proc_start)  # exited: no /proc entry
    cfg = {"multiproc-dir": tmp_path, "path.procfs": FIX / "proc" / "gpu-node"}
    s = samples(render(ProcessCollector(cfg).sample()))
    lv = (("job", "llm"), ("pid", "4242"), ("rank", "0"))
    assert s[("mlops_process_cpu_seconds_total", lv)] == pytest.approx(1313.46)
    assert s[("mlops_process_threads", lv)] == 37
    assert s[("mlops_process_open_fds", lv)] == 11
    assert s[("mlops_process_resident_memory_bytes", lv)] > 0
    assert {dict(k[1])["pid"] for k in s} == {"4242"}


def test_process_collector_follows_a_real_process(tmp_path: Path) -> None:
    """A live child process is measured from the real /proc and its series go when it exits."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"  # past exec, interpreter loaded
        write_snap(tmp_path, "demo", 3, child.pid, psutil.Process(child.pid).create_time())
        collector = ProcessCollector({"multiproc-dir": tmp_path, "path.procfs": Path("/proc")})
        s = samples(render(collector.sample()))
        lv = (("job", "demo"), ("pid", str(child.pid)), ("rank", "3"))
        assert s[("mlops_process_threads", lv)] >= 1
        assert s[("mlops_process_resident_memory_bytes", lv)] > 1024 * 1024
        assert s[("mlops_process_open_fds", lv)] >= 3
        cpu0 = s[("mlops_process_cpu_seconds_total", lv)]
        assert samples(render(collector.sample()))[("mlops_process_cpu_seconds_total", lv)] >= cpu0  # kept fd
        assert list(collector.files._fds) == [f"/proc/{child.pid}/stat"]
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert samples(render(collector.sample())) == {}
    assert collector.files._fds == {}  # the exited process's descriptor is closed, not kept


def test_process_collector_without_directory_is_empty() -> None:
    assert list(ProcessCollector({"multiproc-dir": None}).sample()) == []


def test_proc_files_reread_kept_descriptors_and_reopen_regular_files(tmp_path: Path) -> None:
    """A procfs file is kept open and re-read fresh; a regular file replaced by a rename is seen."""
    files = ProcFiles()
    comm = f"/proc/self/task/{threading.get_native_id()}/comm"  # this thread's name: ours to change
    original = files.read(comm)
    assert original
    try:
        with open(comm, "w") as w:
            w.write("procfiles-test")
        # new content through the same kept descriptor
        assert files.read(comm) == "procfiles-test\n" and list(files._fds) == [comm]
    finally:
        with open(comm, "w") as w:
            w.write(original.strip())
    f = tmp_path / "stat"
    f.write_text("one")
    assert files.read(str(f)) == "one"
    (tmp_path / "new").write_text("two")
    os.replace(tmp_path / "new", f)
    assert files.read(str(f)) == "two" and str(f) not in files._fds
    assert files.read(str(tmp_path / "absent")) is None
    files.close()
    assert files._fds == {}


def test_open_fds_from_procfs_size_match_a_listing() -> None:
    """The stat(2) size of /proc/<pid>/fd (Linux 6.2+) is used as the fd count only on procfs, and
    gives what listing the directory gives; a plain directory (a fixture) is always listed."""
    from mlops_obs.collectors import process as proc_mod

    assert proc_mod.is_procfs("/proc")
    assert not proc_mod.is_procfs(str(FIX / "proc" / "gpu-node"))
    child = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(9)]; "
         "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        fd_dir = f"/proc/{child.pid}/fd"
        assert proc_mod.count_fds(fd_dir, True) == len(os.listdir(fd_dir)) >= 12
        assert proc_mod.count_fds(fd_dir, False) == len(os.listdir(fd_dir))
    finally:
        child.kill()
        child.wait()
    assert proc_mod.count_fds(fd_dir, True) is None  # exited
