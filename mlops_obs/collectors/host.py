"""Host collector: CPU, load, memory, pressure, disks, file systems, network, InfiniBand, clock.

Names carry the ``mlops_node_`` prefix so they never collide with a node_exporter scraped by the
same Prometheus, while keeping node_exporter's label vocabulary (``mode``, ``device``, ``mountpoint``)
so users can reuse their queries. Everything is read straight from ``/proc`` and ``/sys`` (under
``--path.procfs`` / ``--path.sysfs``, for a sidecar that mounts the host's) and parsed by the pure
functions in :mod:`host_parse`; a source this kernel or machine does not have (PSI before 4.20 or
with ``psi=0``, no InfiniBand HCA, no ``MemAvailable``) yields no series at all, never a zero that
would read as "healthy".

``statvfs`` on a hung NFS mount blocks in the kernel; the sampler's deadline is what keeps that from
reaching a scrape.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, register
from mlops_obs.collectors import host_parse as hp
from mlops_obs.config import Setting, list_parser, parse_bool, parse_path, parse_str
from mlops_obs.metrics import NO_LABELS, FamilyBuilder
from mlops_obs.rankdir import RankDirectory

CLK_TCK = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

DEFAULT_NET_EXCLUDE = r"^(veth|cali|lxc)"  # per-pod interfaces: unbounded, and counted on the pod anyway


def _regex(v: Any) -> re.Pattern[str] | None:
    s = parse_str(v)
    if not s:
        return None
    try:
        return re.compile(s)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None


HOST_SETTINGS: tuple[Setting, ...] = (
    Setting("path.procfs", parse_path, Path("/proc"), "procfs mount point (the host's, from a container).",
            metavar="DIR"),
    Setting("path.sysfs", parse_path, Path("/sys"), "sysfs mount point (the host's, from a container).",
            metavar="DIR"),
    Setting("host.per-cpu", parse_bool, False,
            "Also export mlops_node_cpu_core_seconds_total per CPU (one series per core and mode).", kind="bool"),
    Setting("host.filesystem-paths", list_parser(parse_path), [Path("/"), Path("/dev/shm")],
            "Paths whose file system size and free space to export: add the checkpoint and log directories. "
            "/dev/shm is there because a full one kills DataLoader workers with a bus error.",
            kind="list", metavar="PATH"),
    Setting("host.disk-device-exclude", _regex, re.compile(hp.DEFAULT_DISK_EXCLUDE),
            "Regular expression of block devices to leave out (default: partitions, loop, RAM disks).",
            metavar="REGEX"),
    Setting("host.network-device-exclude", _regex, re.compile(DEFAULT_NET_EXCLUDE),
            "Regular expression of network interfaces to leave out (default: per-pod veth/cali/lxc).",
            metavar="REGEX"),
)  # fmt: skip


# --- reading (I/O only) ------------------------------------------------------------------------------


def read_text(path: str | os.PathLike[str]) -> str | None:
    """A whole small file, or ``None`` when it is absent or unreadable (PSI disabled reads EOPNOTSUPP)."""
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


_CHUNK = 65536


def _pread_all(fd: int) -> bytes:
    data = os.pread(fd, _CHUNK, 0)
    if len(data) < _CHUNK:
        return data
    parts = [data]
    while len(data) == _CHUNK:  # /proc/stat on a big node, diskstats with many devices
        data = os.pread(fd, _CHUNK, sum(map(len, parts)))
        parts.append(data)
    return b"".join(parts)


class ProcFiles:
    """Kernel-generated files kept open and re-read with ``pread(2)`` from offset 0, every round.

    Why: procfs regenerates a file's content on each read from offset 0, so opening and closing it
    every second (a path walk and two more syscalls, for ~10 files a round on a VM where syscalls are
    slow) buys nothing. Only files that report size 0, as procfs's generated files do, are kept open:
    a regular file (a test fixture, a copied tree) may be replaced by a rename, which an open
    descriptor would never see. A read that fails closes the descriptor; the next round opens again.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read(self, path: str) -> str | None:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                generated = os.fstat(fd).st_size == 0
            except OSError:
                generated = False
            if not generated:
                try:
                    return _pread_all(fd).decode("utf-8", "replace")
                except OSError:
                    return None
                finally:
                    os.close(fd)
            self._fds[path] = fd
        try:
            return _pread_all(fd).decode("utf-8", "replace")
        except OSError:  # PSI disabled reads EOPNOTSUPP; a vanished device file; retried next round
            del self._fds[path]
            os.close(fd)
            return None

    def retain(self, paths: Iterable[str]) -> None:
        """Close the descriptors of every other path (per-process files of processes that are gone)."""
        keep = set(paths)
        for path in [p for p in self._fds if p not in keep]:
            os.close(self._fds.pop(path))

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


def read_dir_files(directory: str | os.PathLike[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    base = os.fspath(directory)
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        text = read_text(f"{base}/{name}")  # a plain string: pathlib's joins cost more than these reads
        if text is not None:
            out[name] = text
    return out


class _Timex(ctypes.Structure):
    # struct timex from include/uapi/linux/timex.h (the 64-bit layout: longs, plus 11 padding ints).
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


def _load_libc() -> ctypes.CDLL | None:
    """The C library's symbols, through the interpreter's own (``dlopen(NULL)``): no library search."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


# For adjtimex(2) and statfs(2), which the os module does not offer.
LIBC = _load_libc()


def read_timex() -> dict[str, float] | None:
    """Read-only ``adjtimex(2)`` (modes 0 needs no privilege), as node_exporter's timex collector does."""
    if LIBC is None:
        return None
    try:
        tx = _Timex()
        state = int(LIBC.adjtimex(ctypes.byref(tx)))
    except AttributeError:
        return None
    if state < 0:
        return None
    return hp.timex_values(state, int(tx.offset), int(tx.status), int(tx.maxerror))


@dataclass
class FsUsage:
    path: str
    mountpoint: str
    size_bytes: float
    avail_bytes: float


@dataclass
class HostReading:
    """Everything one round read, already parsed; ``None`` / empty means the source is absent."""

    cpu: hp.CpuTimes | None = None
    load: tuple[float, float, float] | None = None
    meminfo: dict[str, float] = field(default_factory=dict)
    pressure: dict[str, dict[str, float]] = field(default_factory=dict)
    disks: dict[str, hp.DiskStats] = field(default_factory=dict)
    filesystems: list[FsUsage] = field(default_factory=list)
    net: dict[str, hp.NetDev] = field(default_factory=dict)
    ib: dict[tuple[str, str], hp.IbPort] = field(default_factory=dict)
    timex: dict[str, float] | None = None


MOUNT_CACHE_SECONDS = 30.0


class MountCache:
    """Mount points and resolved paths, refreshed every ``MOUNT_CACHE_SECONDS``.

    mountinfo on a Kubernetes node lists hundreds of mounts and ``realpath`` costs an ``lstat`` per
    path component; both change rarely, while ``statvfs`` (the figures) is called every round.
    """

    def __init__(self, ttl: float = MOUNT_CACHE_SECONDS) -> None:
        self.ttl = ttl
        self._mounts: tuple[float, str, list[tuple[str, str]]] | None = None
        self._real: dict[str, tuple[float, str]] = {}

    def mounts(self, procfs: Path) -> list[tuple[str, str]]:
        now = time.monotonic()
        key = str(procfs)
        if self._mounts is None or self._mounts[1] != key or now - self._mounts[0] > self.ttl:
            self._mounts = (now, key, hp.parse_mountinfo(read_text(procfs / "self" / "mountinfo") or ""))
        return self._mounts[2]

    def realpath(self, path: str) -> str:
        now = time.monotonic()
        hit = self._real.get(path)
        if hit is None or now - hit[0] > self.ttl:
            if len(self._real) > 256:
                self._real.clear()
            hit = (now, os.path.realpath(path))
            self._real[path] = hit
        return hit[1]


def read_filesystems(paths: Iterable[Path], procfs: Path, cache: MountCache | None = None) -> list[FsUsage]:
    cache = cache or MountCache(ttl=0.0)
    mounts = cache.mounts(procfs)
    out: list[FsUsage] = []
    seen: set[str] = set()
    for p in paths:
        try:
            real = cache.realpath(str(p))
            st = os.statvfs(real)
        except OSError:
            continue  # a checkpoint directory not created yet: nothing to report, not a failure
        if real in seen:
            continue
        seen.add(real)
        mp = hp.mountpoint_of(real, mounts) or real
        out.append(FsUsage(str(p), mp, float(st.f_blocks * st.f_frsize), float(st.f_bavail * st.f_frsize)))
    return out


def read_infiniband(sysfs: Path) -> dict[tuple[str, str], hp.IbPort]:
    out: dict[tuple[str, str], hp.IbPort] = {}
    # Plain string paths, read every round: pathlib's joins cost more than the listing itself.
    root = f"{os.fspath(sysfs)}/class/infiniband"
    try:
        devices = sorted(os.listdir(root))
    except OSError:
        return out
    for dev in devices:
        try:
            ports = sorted(os.listdir(f"{root}/{dev}/ports"), key=lambda s: (len(s), s))
        except OSError:
            continue
        for port in ports:
            base = f"{root}/{dev}/ports/{port}"
            counters = read_dir_files(f"{base}/counters")
            ext = read_dir_files(f"{base}/counters_ext")
            if counters or ext:
                out[(dev, port)] = hp.parse_ib_port(
                    counters, ext, read_text(f"{base}/state"), read_text(f"{base}/rate")
                )
    return out


# The /proc/meminfo lines the families use.
MEMINFO_KEYS = ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")


def read_host(
    config: Mapping[str, Any], mount_cache: MountCache | None = None, files: ProcFiles | None = None
) -> HostReading:
    """One round of reads; ``files`` (the collector's, kept across rounds) saves re-opening procfs files."""
    procfs: Path = Path(config.get("path.procfs") or "/proc")
    sysfs: Path = Path(config.get("path.sysfs") or "/sys")
    read = files.read if files is not None else read_text
    proc = os.fspath(procfs)
    r = HostReading()
    stat = read(f"{proc}/stat")
    if stat is not None:
        r.cpu = hp.parse_stat(stat, CLK_TCK)
    load = read(f"{proc}/loadavg")
    if load is not None:
        try:
            r.load = hp.parse_loadavg(load)
        except ValueError:
            r.load = None  # a truncated read: skip the load for this round, keep the rest
    r.meminfo = hp.parse_meminfo_keys(read(f"{proc}/meminfo") or "", MEMINFO_KEYS)
    for resource in ("cpu", "memory", "io"):
        text = read(f"{proc}/pressure/{resource}")
        if text is not None:
            parsed = hp.parse_pressure(text)
            if parsed:
                r.pressure[resource] = parsed
    r.disks = hp.parse_diskstats(
        read(f"{proc}/diskstats") or "",
        config.get("host.disk-device-exclude", re.compile(hp.DEFAULT_DISK_EXCLUDE)),
    )
    r.filesystems = read_filesystems(config.get("host.filesystem-paths") or [], procfs, mount_cache)
    r.net = hp.parse_net_dev(
        read(f"{proc}/net/dev") or "",
        config.get("host.network-device-exclude", re.compile(DEFAULT_NET_EXCLUDE)),
    )
    r.ib = read_infiniband(sysfs)
    r.timex = read_timex()
    return r


# --- families (pure) -------------------------------------------------------------------------------------


_PSI_DOCS = {
    ("cpu", "some"): ("waiting", "Seconds some runnable task waited for a CPU (PSI)."),
    ("memory", "some"): ("waiting", "Seconds some task stalled on memory (reclaim, swap-in) (PSI)."),
    ("memory", "full"): ("stalled", "Seconds all non-idle tasks stalled on memory at once (PSI)."),
    ("io", "some"): ("waiting", "Seconds some task waited for I/O (PSI)."),
    ("io", "full"): ("stalled", "Seconds all non-idle tasks waited for I/O at once (PSI)."),
}
_NETS = {
    "receive_bytes": ("mlops_node_network_receive_bytes", "Bytes received."),
    "transmit_bytes": ("mlops_node_network_transmit_bytes", "Bytes sent."),
    "receive_errors": ("mlops_node_network_receive_errors", "Receive errors."),
    "transmit_errors": ("mlops_node_network_transmit_errors", "Transmit errors."),
    "receive_drop": ("mlops_node_network_receive_drop", "Inbound packets dropped."),
    "transmit_drop": ("mlops_node_network_transmit_drop", "Outbound packets dropped."),
}
_MEMORY = (
    ("MemTotal", "mlops_node_memory_total_bytes"),
    ("MemAvailable", "mlops_node_memory_available_bytes"),
    ("SwapTotal", "mlops_node_swap_total_bytes"),
)
_DISKS = ("mlops_node_disk_read_bytes", "mlops_node_disk_written_bytes", "mlops_node_disk_io_time_seconds")
_FILESYSTEMS = ("mlops_node_filesystem_size_bytes", "mlops_node_filesystem_avail_bytes")
_IB = (
    "mlops_node_infiniband_port_receive_bytes",
    "mlops_node_infiniband_port_transmit_bytes",
    "mlops_node_infiniband_port_errors",
    "mlops_node_infiniband_port_state_id",
    "mlops_node_infiniband_port_rate_bytes_per_second",
)

# Every family: name -> (type, help); counters without their _total suffix.
FAMILIES: dict[str, tuple[str, str]] = {
    "mlops_node_cpu_seconds": ("counter", "Seconds all CPUs spent in each mode."),
    "mlops_node_cpus": ("gauge", "Online logical CPUs."),
    "mlops_node_cpu_core_seconds": ("counter", "Seconds each CPU spent in each mode."),
    "mlops_node_load": ("gauge", "Load average."),
    "mlops_node_memory_total_bytes": ("gauge", "Physical memory."),
    "mlops_node_memory_available_bytes": ("gauge", "Memory available for new work without swapping."),
    "mlops_node_swap_total_bytes": ("gauge", "Swap space."),
    "mlops_node_swap_used_bytes": ("gauge", "Swap in use."),
    **{
        f"mlops_node_pressure_{resource}_{suffix}_seconds": ("counter", doc)
        for (resource, _), (suffix, doc) in _PSI_DOCS.items()
    },
    "mlops_node_disk_read_bytes": ("counter", "Bytes read from the device."),
    "mlops_node_disk_written_bytes": ("counter", "Bytes written to the device."),
    "mlops_node_disk_io_time_seconds": ("counter", "Seconds the device had I/O in flight."),
    "mlops_node_filesystem_size_bytes": ("gauge", "Size of the file system holding the path."),
    "mlops_node_filesystem_avail_bytes": (
        "gauge",
        "Space available to unprivileged users on the file system holding the path.",
    ),
    **{name: ("counter", doc) for name, doc in _NETS.values()},
    "mlops_node_infiniband_port_receive_bytes": ("counter", "Bytes received on the InfiniBand port."),
    "mlops_node_infiniband_port_transmit_bytes": ("counter", "Bytes sent on the InfiniBand port."),
    "mlops_node_infiniband_port_errors": (
        "counter",
        "InfiniBand port error counters, by counter name (symbol_error, link_downed, ...).",
    ),
    "mlops_node_infiniband_port_state_id": ("gauge", "InfiniBand port state (IBTA PortState: 4 is ACTIVE, 1 DOWN)."),
    "mlops_node_infiniband_port_rate_bytes_per_second": ("gauge", "Data rate the InfiniBand link trained at."),
    "mlops_node_timex_offset_seconds": ("gauge", "Clock offset the kernel's discipline is correcting (adjtimex)."),
    "mlops_node_timex_sync_status": (
        "gauge",
        "1 when the kernel considers the clock synchronised (adjtimex state is not TIME_ERROR).",
    ),
    "mlops_node_timex_maxerror_seconds": (
        "gauge",
        "Maximum error bound of the clock reported by the kernel (adjtimex).",
    ),
}


def families(r: HostReading, per_cpu: bool = False, out: FamilyBuilder | None = None) -> list[Metric]:
    """The host families, in a fixed order, present only where their source is (``out``: the
    collector's builder, whose interned label sets last across rounds). A source that is there
    reports all its families, even one that got no series this round (an IB port without error
    counters still has ``mlops_node_infiniband_port_errors``)."""
    out = out or FamilyBuilder(FAMILIES)
    fams = out.round()
    add, present, intern = fams.add, fams.present, out.labels.get
    if r.cpu is not None and r.cpu.total:
        for mode, secs in r.cpu.total.items():
            add("mlops_node_cpu_seconds", intern({"mode": mode}), secs)
        add("mlops_node_cpus", NO_LABELS, len(r.cpu.per_cpu))
        if per_cpu:
            present("mlops_node_cpu_core_seconds")
            for idx, modes in sorted(r.cpu.per_cpu.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
                for mode, secs in modes.items():
                    add("mlops_node_cpu_core_seconds", intern({"cpu": idx, "mode": mode}), secs)
    if r.load is not None:
        for window, value in zip(("1m", "5m", "15m"), r.load):
            add("mlops_node_load", intern({"window": window}), value)

    mem = r.meminfo
    for key, name in _MEMORY:
        if key in mem:
            add(name, NO_LABELS, mem[key])
    if "SwapTotal" in mem and "SwapFree" in mem:
        add("mlops_node_swap_used_bytes", NO_LABELS, mem["SwapTotal"] - mem["SwapFree"])

    for (resource, kind), (suffix, _) in _PSI_DOCS.items():
        total = r.pressure.get(resource, {}).get(kind)
        if total is not None:
            add(f"mlops_node_pressure_{resource}_{suffix}_seconds", NO_LABELS, total)

    if r.disks:
        present(*_DISKS)
        for dev, d in sorted(r.disks.items()):
            lb = intern({"device": dev})
            add("mlops_node_disk_read_bytes", lb, d.read_bytes)
            add("mlops_node_disk_written_bytes", lb, d.written_bytes)
            add("mlops_node_disk_io_time_seconds", lb, d.io_time_seconds)

    if r.filesystems:
        present(*_FILESYSTEMS)
        for fs in r.filesystems:
            lb = intern({"path": fs.path, "mountpoint": fs.mountpoint})
            add("mlops_node_filesystem_size_bytes", lb, fs.size_bytes)
            add("mlops_node_filesystem_avail_bytes", lb, fs.avail_bytes)

    if r.net:
        present(*(name for name, _ in _NETS.values()))
        for dev, n in sorted(r.net.items()):
            lb = intern({"device": dev})
            for attr, (name, _) in _NETS.items():
                add(name, lb, getattr(n, attr))

    if r.ib:
        present(*_IB)
        for (dev, port), p in sorted(r.ib.items()):
            lb = intern({"device": dev, "port": port})
            if p.state_id is not None:
                add("mlops_node_infiniband_port_state_id", lb, float(p.state_id))
            if p.rate_bytes_per_second is not None:
                add("mlops_node_infiniband_port_rate_bytes_per_second", lb, p.rate_bytes_per_second)
            if p.receive_bytes is not None:
                add("mlops_node_infiniband_port_receive_bytes", lb, p.receive_bytes)
            if p.transmit_bytes is not None:
                add("mlops_node_infiniband_port_transmit_bytes", lb, p.transmit_bytes)
            for kind, v in sorted(p.errors.items()):
                add("mlops_node_infiniband_port_errors", intern({"device": dev, "port": port, "type": kind}), v)

    if r.timex is not None:
        add("mlops_node_timex_offset_seconds", NO_LABELS, r.timex["offset_seconds"])
        add("mlops_node_timex_sync_status", NO_LABELS, r.timex["sync_status"])
        add("mlops_node_timex_maxerror_seconds", NO_LABELS, r.timex["maxerror_seconds"])
    return fams.metrics()


@register
class HostCollector(Collector):
    name = "host"
    help = "CPU, load, memory, pressure (PSI), disks, file systems, network, InfiniBand and clock of this node."
    settings = HOST_SETTINGS

    def __init__(self, config: Mapping[str, Any], ranks: RankDirectory | None = None) -> None:
        super().__init__(config, ranks)
        self.mount_cache = MountCache()
        self.files = ProcFiles()
        self.out = FamilyBuilder(FAMILIES)

    def sample(self) -> Iterable[Metric]:
        reading = read_host(self.config, self.mount_cache, self.files)
        return families(reading, per_cpu=bool(self.config.get("host.per-cpu")), out=self.out)

    def close(self) -> None:
        self.files.close()
