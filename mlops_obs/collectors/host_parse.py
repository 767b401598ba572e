"""Pure parsers for the ``/proc`` and ``/sys`` files the host collectors read.

Kept apart from the reading (node_exporter's ``getLoad`` / ``parseLoad`` split) so each parser is
tested on recorded fixtures from other kernels and machines (InfiniBand hosts, PSI-enabled kernels)
without needing them here. Parsers take text and return plain numbers in base units; they never
touch the file system, and a line they do not understand is skipped rather than failing the file,
because kernels add columns over time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

# /proc/stat columns after the "cpuN" label, in kernel order. guest and guest_nice are already
# included in user and nice (as node_exporter notes), so they are not modes of their own here.
CPU_MODES: tuple[str, ...] = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors whatever the device's block size


@dataclass(frozen=True)
class CpuTimes:
    total: dict[str, float]  # mode -> seconds, all CPUs together
    per_cpu: dict[str, dict[str, float]]  # cpu index -> mode -> seconds


def parse_stat(text: str, ticks_per_second: float) -> CpuTimes:
    """``/proc/stat`` CPU lines, in seconds (the kernel counts USER_HZ ticks)."""
    total: dict[str, float] = {}
    per_cpu: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        fields = line.split()
        label, values = fields[0], fields[1:]
        modes: dict[str, float] = {}
        for mode, raw in zip(CPU_MODES, values):
            try:
                modes[mode] = int(raw) / ticks_per_second
            except ValueError:
                break
        if label == "cpu":
            total = modes
        else:
            per_cpu[label[3:]] = modes
    return CpuTimes(total, per_cpu)


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """``/proc/loadavg``: the 1, 5 and 15 minute load averages."""
    parts = text.split()
    if len(parts) < 3:
        raise ValueError(f"expected at least 3 fields in loadavg, got {text.strip()!r}")
    return float(parts[0]), float(parts[1]), float(parts[2])


def _meminfo_value(rest: str) -> float | None:
    """The value after ``Key:`` in bytes (``kB`` there means KiB); unit-less values are counts."""
    parts = rest.split()
    if not parts:
        return None
    try:
        value = float(parts[0])
    except ValueError:
        return None
    return value * 1024 if len(parts) > 1 and parts[1] == "kB" else value


def parse_meminfo(text: str) -> dict[str, float]:
    """``/proc/meminfo`` in bytes (``kB`` there means KiB); unit-less lines are counts."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and (value := _meminfo_value(rest)) is not None:
            out[key.strip()] = value
    return out


def parse_meminfo_keys(text: str, keys: Iterable[str]) -> dict[str, float]:
    """What :func:`parse_meminfo` gives for ``keys`` only, found with ``str.rfind`` (the last line
    of a key wins, as there) instead of splitting every line: the host collector reads 4 of the ~55
    lines every round, and parsing them all would cost a tenth of its round."""
    out: dict[str, float] = {}
    t = "\n" + text
    for key in keys:
        i = t.rfind(f"\n{key}:")
        if i < 0:
            continue
        j = t.find("\n", i + 1)
        value = _meminfo_value(t[i + len(key) + 2 : j if j >= 0 else len(t)])
        if value is not None:
            out[key] = value
    return out


def parse_pressure(text: str) -> dict[str, float]:
    """A ``/proc/pressure/*`` file: ``{"some": seconds, "full": seconds}`` from the ``total=`` (µs) fields.

    The averages are left out on purpose: Prometheus derives any window from the counter with
    ``rate()``, while the kernel's fixed 10/60/300 s windows cannot be aggregated across nodes.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] not in ("some", "full"):
            continue
        for field in parts[1:]:
            name, _, value = field.partition("=")
            if name == "total":
                out[parts[0]] = int(value) / 1e6
    return out


@dataclass(frozen=True)
class DiskStats:
    read_bytes: float
    written_bytes: float
    io_time_seconds: float


# node_exporter's default --collector.diskstats.device-exclude: RAM disks, loop devices, floppies and
# partitions (their I/O is already counted on the whole disk).
DEFAULT_DISK_EXCLUDE = r"^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$"


def parse_diskstats(text: str, exclude: re.Pattern[str] | None = None) -> dict[str, DiskStats]:
    """``/proc/diskstats`` per device (fields as in the kernel's Documentation/admin-guide/iostats)."""
    out: dict[str, DiskStats] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) < 14:
            continue
        name = f[2]
        if exclude is not None and exclude.search(name):
            continue
        try:
            out[name] = DiskStats(
                read_bytes=int(f[5]) * SECTOR_BYTES,
                written_bytes=int(f[9]) * SECTOR_BYTES,
                io_time_seconds=int(f[12]) / 1000.0,
            )
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class NetDev:
    receive_bytes: float
    receive_errors: float
    receive_drop: float
    transmit_bytes: float
    transmit_errors: float
    transmit_drop: float


def parse_net_dev(text: str, exclude: re.Pattern[str] | None = None) -> dict[str, NetDev]:
    """``/proc/net/dev`` per interface (8 receive then 8 transmit columns after ``name:``)."""
    out: dict[str, NetDev] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep or "|" in line:
            continue
        name = name.strip()
        if exclude is not None and exclude.search(name):
            continue
        f = rest.split()
        if len(f) < 16:
            continue
        try:
            out[name] = NetDev(
                receive_bytes=float(f[0]),
                receive_errors=float(f[2]),
                receive_drop=float(f[3]),
                transmit_bytes=float(f[8]),
                transmit_errors=float(f[10]),
                transmit_drop=float(f[11]),
            )
        except ValueError:
            continue
    return out


def _unescape_mount(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo`` octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """``/proc/self/mountinfo``: ``(mount point, file system type)`` in mount order."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 7 or "-" not in f[6:]:
            continue
        sep = f.index("-", 6)
        if sep + 1 >= len(f):
            continue
        out.append((_unescape_mount(f[4]), f[sep + 1]))
    return out


def mountpoint_of(path: str, mounts: list[tuple[str, str]]) -> str | None:
    """The mount point holding an absolute, resolved ``path``: the longest matching mount, last mounted wins."""
    best: str | None = None
    for mp, _ in mounts:
        inside = path == mp or mp == "/" or path.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best)):
            best = mp
    return best


# InfiniBand port counters (Documentation/ABI/stable/sysfs-class-infiniband). The data counters are
# in units of 4 octets (one per lane of a 4x link, as the IBTA defines PortXmitData/PortRcvData).
IB_DATA_COUNTERS = {"port_rcv_data": "receive", "port_xmit_data": "transmit"}
IB_ERROR_COUNTERS: tuple[str, ...] = (
    "symbol_error",
    "port_rcv_errors",
    "port_rcv_remote_physical_errors",
    "port_rcv_switch_relay_errors",
    "port_rcv_constraint_errors",
    "port_xmit_discards",
    "port_xmit_constraint_errors",
    "link_downed",
    "link_error_recovery",
    "local_link_integrity_errors",
    "excessive_buffer_overrun_errors",
    "VL15_dropped",
)


@dataclass(frozen=True)
class IbPort:
    receive_bytes: float | None
    transmit_bytes: float | None
    errors: dict[str, float]  # counter name -> count
    state_id: int | None = None  # 4 = ACTIVE (IBTA PortState)
    rate_bytes_per_second: float | None = None


def parse_ib_state(text: str | None) -> int | None:
    """``ports/N/state``, e.g. ``4: ACTIVE``."""
    if not text:
        return None
    head = text.split(":", 1)[0].strip()
    return int(head) if head.isdigit() else None


def parse_ib_rate(text: str | None) -> float | None:
    """``ports/N/rate``, e.g. ``400 Gb/sec (4X NDR)``, in bytes per second.

    A link that trained at a lower rate than its peers (200 instead of 400 Gb/s) is a classic cause
    of one slow rank, and shows here first.
    """
    if not text:
        return None
    m = re.match(r"\s*([0-9.]+)\s*Gb/sec", text)
    return float(m.group(1)) * 1e9 / 8 if m else None


def parse_ib_port(
    counters: dict[str, str],
    counters_ext: dict[str, str] | None = None,
    state: str | None = None,
    rate: str | None = None,
) -> IbPort:
    """One port's ``counters/`` (and ``counters_ext/``) files, given as name -> file text.

    ``counters_ext/port_*_data_64`` is preferred where present: the 32-bit ``counters/`` data
    counters of older HCAs saturate at 16 GiB and then stop, which reads as a link gone idle.
    """
    ext = counters_ext or {}

    def num(text: str | None) -> float | None:
        if text is None:
            return None
        s = text.strip()
        try:
            return float(int(s))
        except ValueError:
            return None

    data: dict[str, float | None] = {}
    for name, direction in IB_DATA_COUNTERS.items():
        words = num(ext.get(name + "_64"))
        if words is None:
            words = num(counters.get(name))
        data[direction] = None if words is None else words * 4
    errors = {}
    for name in IB_ERROR_COUNTERS:
        v = num(counters.get(name))
        if v is not None:
            errors[name] = v
    return IbPort(data["receive"], data["transmit"], errors, parse_ib_state(state), parse_ib_rate(rate))


class PidStat(NamedTuple):
    """Parsed for every rank every round: a named tuple builds three times faster than a frozen dataclass."""

    cpu_seconds: float  # utime + stime
    threads: int
    rss_bytes: float
    start_ticks: int  # since boot, in USER_HZ ticks


def parse_pid_stat(text: str, ticks_per_second: float, page_size: int) -> PidStat:
    """``/proc/<pid>/stat``. The command name may hold spaces and parentheses, so fields are
    counted from the *last* ``)``, as procps does."""
    end = text.rfind(")")
    if end < 0:
        raise ValueError("no ')' after the command name in /proc/<pid>/stat")
    f = text[end + 2 :].split()
    # f[0] is field 3 (state); field n of proc(5) is f[n - 3].
    if len(f) < 22:
        raise ValueError(f"expected at least 24 fields in /proc/<pid>/stat, got {len(f) + 2}")
    utime, stime = int(f[11]), int(f[12])
    return PidStat(
        cpu_seconds=(utime + stime) / ticks_per_second,
        threads=int(f[17]),
        rss_bytes=float(int(f[21]) * page_size),
        start_ticks=int(f[19]),
    )


def parse_btime(stat_text: str) -> float | None:
    """Boot time (Unix seconds) from ``/proc/stat``, to turn a pid's start ticks into wall time."""
    for line in stat_text.splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return None


# adjtimex(2) return values and status bits (include/uapi/linux/timex.h).
TIME_ERROR = 5
STA_NANO = 0x2000


def timex_values(state: int, offset: int, status: int, maxerror_us: int) -> dict[str, float]:
    """The figures node_exporter's timex collector derives from one ``adjtimex`` read.

    ``offset`` is in nanoseconds when the kernel sets ``STA_NANO``, microseconds otherwise; the clock
    counts as synchronised whenever the kernel's state is not ``TIME_ERROR``.
    """
    divisor = 1e9 if status & STA_NANO else 1e6
    return {
        "offset_seconds": offset / divisor,
        "sync_status": 0.0 if state == TIME_ERROR else 1.0,
        "maxerror_seconds": maxerror_us / 1e6,
    }
