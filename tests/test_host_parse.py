"""The pure /proc and /sys parsers, on fixtures recorded from other kernels and machines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlops_obs.collectors import host_parse as hp

PROC = Path(__file__).parent / "fixtures" / "proc"
SYS = Path(__file__).parent / "fixtures" / "sys"
NODE = PROC / "gpu-node"


def text(p: Path) -> str:
    return p.read_text()


def test_stat_converts_ticks_to_seconds_per_mode_and_core() -> None:
    """/proc/stat ticks become seconds; guest columns are not separate modes."""
    cpu = hp.parse_stat(text(NODE / "stat"), ticks_per_second=100)
    assert cpu.total["user"] == pytest.approx(22553.37)
    assert cpu.total["idle"] == pytest.approx(889122.33)
    assert cpu.total["steal"] == 0
    assert set(cpu.total) == set(hp.CPU_MODES)
    assert sorted(cpu.per_cpu) == ["0", "1", "2", "3"]
    assert cpu.per_cpu["0"]["softirq"] == pytest.approx(98.05)


def test_stat_from_old_kernel_with_fewer_columns() -> None:
    """A kernel with 8 CPU columns gives the modes it has, without guest."""
    cpu = hp.parse_stat(text(PROC / "old-kernel" / "stat"), ticks_per_second=100)
    assert cpu.total["steal"] == pytest.approx(0.05)
    assert list(cpu.per_cpu) == ["0"]


def test_loadavg() -> None:
    assert hp.parse_loadavg(text(NODE / "loadavg")) == (3.52, 2.91, 1.07)
    with pytest.raises(ValueError, match="loadavg"):
        hp.parse_loadavg("1.0\n")


def test_meminfo_in_bytes_and_counts_left_alone() -> None:
    """kB means KiB; HugePages_Total has no unit and stays a count."""
    mem = hp.parse_meminfo(text(NODE / "meminfo"))
    assert mem["MemTotal"] == 1056478152 * 1024
    assert mem["SwapTotal"] - mem["SwapFree"] == (8388604 - 8126460) * 1024
    assert mem["HugePages_Total"] == 0
    assert "MemAvailable" not in hp.parse_meminfo(text(PROC / "old-kernel" / "meminfo"))


def test_pressure_totals_are_seconds() -> None:
    """PSI ``total=`` is microseconds; both some and full lines are read."""
    assert hp.parse_pressure(text(NODE / "pressure" / "io")) == {"some": 734.211987, "full": 612.003112}
    assert hp.parse_pressure(text(NODE / "pressure" / "cpu"))["some"] == pytest.approx(9.627263)
    # A kernel before 5.13 has no "full" line for cpu.
    assert hp.parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=42\n") == {"some": 4.2e-05}


def test_diskstats_default_exclude_drops_partitions_loop_and_ram() -> None:
    disks = hp.parse_diskstats(text(NODE / "diskstats"), re.compile(hp.DEFAULT_DISK_EXCLUDE))
    assert sorted(disks) == ["dm-0", "nvme0n1", "nvme1n1", "sr0"]
    d = disks["nvme0n1"]
    assert d.read_bytes == 943212352 * 512
    assert d.written_bytes == 4098765432 * 512
    assert d.io_time_seconds == pytest.approx(4312.345)
    # Kernels before 4.18 have 14 fields; they parse the same.
    assert disks["nvme1n1"].io_time_seconds == pytest.approx(512.345)
    assert "sda1" in hp.parse_diskstats(text(PROC / "old-kernel" / "diskstats"))


def test_net_dev_columns_and_exclusion() -> None:
    nets = hp.parse_net_dev(text(NODE / "net" / "dev"), re.compile(r"^(veth|cali|lxc)"))
    assert sorted(nets) == ["eth0", "ib0", "lo"]
    eth = nets["eth0"]
    assert (eth.receive_bytes, eth.receive_errors, eth.receive_drop) == (9776951012345, 3, 17)
    assert (eth.transmit_bytes, eth.transmit_errors, eth.transmit_drop) == (18440012345, 0, 2)
    assert nets["ib0"].transmit_errors == 1


def test_mountinfo_unescapes_and_finds_longest_mount() -> None:
    mounts = hp.parse_mountinfo(text(NODE / "self" / "mountinfo"))
    assert ("/scratch/ckpt store", "nfs4") in mounts
    assert hp.mountpoint_of("/scratch/ckpt store/run1", mounts) == "/scratch/ckpt store"
    assert hp.mountpoint_of("/scratch/ckpt", mounts) == "/scratch"
    assert hp.mountpoint_of("/home/user", mounts) == "/"
    assert hp.mountpoint_of("/dev/shm", mounts) == "/dev/shm"


def _ib_files(port_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    def files(d: Path) -> dict[str, str]:
        return {p.name: p.read_text() for p in d.iterdir()} if d.is_dir() else {}

    return files(port_dir / "counters"), files(port_dir / "counters_ext")


def test_infiniband_port_data_is_four_octet_words() -> None:
    """port_rcv_data counts 4-byte units; the error counters keep their kernel names."""
    port = hp.parse_ib_port(*_ib_files(SYS / "ib-node" / "class" / "infiniband" / "mlx5_0" / "ports" / "1"))
    assert port.receive_bytes == 3735102217415 * 4
    assert port.transmit_bytes == 3821948117102 * 4
    assert port.errors["port_rcv_errors"] == 3
    assert port.errors["link_downed"] == 1
    assert port.errors["port_xmit_discards"] == 17
    assert "port_xmit_wait" not in port.errors  # a congestion counter, not an error


def test_infiniband_prefers_64_bit_extended_counters() -> None:
    """counters_ext/*_64 wins; a port without data counters reports none rather than zero."""
    port = hp.parse_ib_port(*_ib_files(SYS / "ib-node" / "class" / "infiniband" / "mlx5_1" / "ports" / "1"))
    assert port.receive_bytes == 98765432100 * 4
    assert port.errors["symbol_error"] == 5
    bare = hp.parse_ib_port({"symbol_error": "0\n"})
    assert bare.receive_bytes is None and bare.transmit_bytes is None


def test_pid_stat_with_parentheses_in_the_command_name() -> None:
    """Fields are counted from the last ')', so a comm like 'python -m (train)' parses."""
    st = hp.parse_pid_stat(text(NODE / "4242" / "stat"), ticks_per_second=100, page_size=4096)
    assert st.cpu_seconds == pytest.approx((123456 + 7890) / 100)
    assert st.threads == 37
    assert st.rss_bytes == 2621440 * 4096
    assert st.start_ticks == 171234
    with pytest.raises(ValueError):
        hp.parse_pid_stat("garbage", 100, 4096)


def test_btime() -> None:
    assert hp.parse_btime(text(NODE / "stat")) == 1764200000
    assert hp.parse_btime("cpu 1 2 3\n") is None


def test_timex_values_follow_node_exporter() -> None:
    """Offset in µs unless STA_NANO; TIME_ERROR (5) means unsynchronised."""
    assert hp.timex_values(0, 1500, 0, 16000) == {
        "offset_seconds": 0.0015,
        "sync_status": 1.0,
        "maxerror_seconds": 0.016,
    }
    v = hp.timex_values(5, -2_000_000, hp.STA_NANO, 16_000_000)
    assert v["offset_seconds"] == pytest.approx(-0.002)
    assert v["sync_status"] == 0.0


def test_infiniband_state_and_rate() -> None:
    """A 4X NDR port trained at 400 Gb/s is 50 GB/s; unknown text gives no value."""
    assert hp.parse_ib_state("4: ACTIVE\n") == 4
    assert hp.parse_ib_state("1: DOWN") == 1
    assert hp.parse_ib_state("") is None
    assert hp.parse_ib_rate("400 Gb/sec (4X NDR)\n") == 50e9
    assert hp.parse_ib_rate("2.5 Gb/sec (1X SDR)") == 2.5e9 / 8
    assert hp.parse_ib_rate("unknown") is None
