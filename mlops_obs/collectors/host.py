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
import ctypes.util
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from mlops_obs.collectors import Collector, register
from mlops_obs.collectors import host_parse as hp
from mlops_obs.config import Setting, list_parser, parse_bool, parse_path, parse_str
from mlops_obs.exporter.exposition import family
from mlops_obs.exporter.exposition import labels as label_set

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


_libc: Any = None


def read_timex() -> dict[str, float] | None:
    """Read-only ``adjtimex(2)`` (modes 0 needs no privilege), as node_exporter's timex collector does."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        tx = _Timex()
        state = int(_libc.adjtimex(ctypes.byref(tx)))
    except (OSError, AttributeError):
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


_new_tuple = tuple.__new__
_NO_LABELS = label_set({})

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


def _sample(name: str, labels: dict[str, str], value: float) -> Any:
    return _new_tuple(Sample, (name, labels, value, None, None, None))


def _one(name: str, doc: str, typ: str, value: float) -> Metric:
    """A family of one unlabelled series: what ``CounterMetricFamily``/``GaugeMetricFamily(value=...)`` hold."""
    return family(name, doc, typ, [_sample(name + "_total" if typ == "counter" else name, _NO_LABELS, value)])


def families(r: HostReading, per_cpu: bool = False) -> list[Metric]:
    """The host families, built as the ``Counter``/``GaugeMetricFamily`` + ``add_metric`` calls would
    (same names, label sets, values, order), straight into ``Metric``/``Sample`` with interned label
    sets: ``add_metric`` zips a fresh dict and runs a namedtuple's Python ``__new__`` per sample."""
    out: list[Metric] = []
    if r.cpu is not None and r.cpu.total:
        out.append(family("mlops_node_cpu_seconds", "Seconds all CPUs spent in each mode.", "counter",
                          [_sample("mlops_node_cpu_seconds_total", label_set({"mode": mode}), secs)
                           for mode, secs in r.cpu.total.items()]))  # fmt: skip
        out.append(_one("mlops_node_cpus", "Online logical CPUs.", "gauge", len(r.cpu.per_cpu)))
        if per_cpu:
            core: list[Any] = []
            for idx, modes in sorted(r.cpu.per_cpu.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
                for mode, secs in modes.items():
                    core.append(_sample("mlops_node_cpu_core_seconds_total", label_set({"cpu": idx, "mode": mode}),
                                        secs))  # fmt: skip
            out.append(family("mlops_node_cpu_core_seconds", "Seconds each CPU spent in each mode.", "counter", core))
    if r.load is not None:
        out.append(family("mlops_node_load", "Load average.", "gauge",
                          [_sample("mlops_node_load", label_set({"window": window}), value)
                           for window, value in zip(("1m", "5m", "15m"), r.load)]))  # fmt: skip

    mem = r.meminfo
    for key, name, doc in (
        ("MemTotal", "mlops_node_memory_total_bytes", "Physical memory."),
        ("MemAvailable", "mlops_node_memory_available_bytes", "Memory available for new work without swapping."),
        ("SwapTotal", "mlops_node_swap_total_bytes", "Swap space."),
    ):
        if key in mem:
            out.append(_one(name, doc, "gauge", mem[key]))
    if "SwapTotal" in mem and "SwapFree" in mem:
        out.append(_one("mlops_node_swap_used_bytes", "Swap in use.", "gauge", mem["SwapTotal"] - mem["SwapFree"]))

    for (resource, kind), (suffix, doc) in _PSI_DOCS.items():
        total = r.pressure.get(resource, {}).get(kind)
        if total is not None:
            out.append(_one(f"mlops_node_pressure_{resource}_{suffix}_seconds", doc, "counter", total))

    if r.disks:
        rd: list[Any] = []
        wr: list[Any] = []
        busy: list[Any] = []
        for dev, d in sorted(r.disks.items()):
            lb = label_set({"device": dev})
            rd.append(_sample("mlops_node_disk_read_bytes_total", lb, d.read_bytes))
            wr.append(_sample("mlops_node_disk_written_bytes_total", lb, d.written_bytes))
            busy.append(_sample("mlops_node_disk_io_time_seconds_total", lb, d.io_time_seconds))
        out += [
            family("mlops_node_disk_read_bytes", "Bytes read from the device.", "counter", rd),
            family("mlops_node_disk_written_bytes", "Bytes written to the device.", "counter", wr),
            family("mlops_node_disk_io_time_seconds", "Seconds the device had I/O in flight.", "counter", busy),
        ]

    if r.filesystems:
        size: list[Any] = []
        avail: list[Any] = []
        for fs in r.filesystems:
            lb = label_set({"path": fs.path, "mountpoint": fs.mountpoint})
            size.append(_sample("mlops_node_filesystem_size_bytes", lb, fs.size_bytes))
            avail.append(_sample("mlops_node_filesystem_avail_bytes", lb, fs.avail_bytes))
        out += [
            family("mlops_node_filesystem_size_bytes", "Size of the file system holding the path.", "gauge", size),
            family("mlops_node_filesystem_avail_bytes",
                   "Space available to unprivileged users on the file system holding the path.", "gauge", avail),
        ]  # fmt: skip

    if r.net:
        nets: dict[str, list[Any]] = {attr: [] for attr in _NETS}
        for dev, n in sorted(r.net.items()):
            lb = label_set({"device": dev})
            for attr, (name, _) in _NETS.items():
                nets[attr].append(_sample(name + "_total", lb, getattr(n, attr)))
        out += [family(name, doc, "counter", nets[attr]) for attr, (name, doc) in _NETS.items()]

    if r.ib:
        ib_rx: list[Any] = []
        ib_tx: list[Any] = []
        ib_err: list[Any] = []
        ib_state: list[Any] = []
        ib_rate: list[Any] = []
        for (dev, port), p in sorted(r.ib.items()):
            lb = label_set({"device": dev, "port": port})
            if p.state_id is not None:
                ib_state.append(_sample("mlops_node_infiniband_port_state_id", lb, float(p.state_id)))
            if p.rate_bytes_per_second is not None:
                ib_rate.append(_sample("mlops_node_infiniband_port_rate_bytes_per_second", lb,
                                       p.rate_bytes_per_second))  # fmt: skip
            if p.receive_bytes is not None:
                ib_rx.append(_sample("mlops_node_infiniband_port_receive_bytes_total", lb, p.receive_bytes))
            if p.transmit_bytes is not None:
                ib_tx.append(_sample("mlops_node_infiniband_port_transmit_bytes_total", lb, p.transmit_bytes))
            for kind, v in sorted(p.errors.items()):
                ib_err.append(_sample("mlops_node_infiniband_port_errors_total",
                                      label_set({"device": dev, "port": port, "type": kind}), v))  # fmt: skip
        out += [
            family("mlops_node_infiniband_port_receive_bytes", "Bytes received on the InfiniBand port.", "counter",
                   ib_rx),
            family("mlops_node_infiniband_port_transmit_bytes", "Bytes sent on the InfiniBand port.", "counter", ib_tx),
            family("mlops_node_infiniband_port_errors",
                   "InfiniBand port error counters, by counter name (symbol_error, link_downed, ...).", "counter",
                   ib_err),
            family("mlops_node_infiniband_port_state_id",
                   "InfiniBand port state (IBTA PortState: 4 is ACTIVE, 1 DOWN).", "gauge", ib_state),
            family("mlops_node_infiniband_port_rate_bytes_per_second", "Data rate the InfiniBand link trained at.",
                   "gauge", ib_rate),
        ]  # fmt: skip

    if r.timex is not None:
        out.append(_one("mlops_node_timex_offset_seconds",
                        "Clock offset the kernel's discipline is correcting (adjtimex).", "gauge",
                        r.timex["offset_seconds"]))  # fmt: skip
        out.append(_one("mlops_node_timex_sync_status",
                        "1 when the kernel considers the clock synchronised (adjtimex state is not TIME_ERROR).",
                        "gauge", r.timex["sync_status"]))  # fmt: skip
        out.append(_one("mlops_node_timex_maxerror_seconds",
                        "Maximum error bound of the clock reported by the kernel (adjtimex).", "gauge",
                        r.timex["maxerror_seconds"]))  # fmt: skip
    return out


@register
class HostCollector(Collector):
    name = "host"
    help = "CPU, load, memory, pressure (PSI), disks, file systems, network, InfiniBand and clock of this node."
    settings = HOST_SETTINGS

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.mount_cache = MountCache()
        self.files = ProcFiles()

    def sample(self) -> Iterable[Metric]:
        return families(
            read_host(self.config, self.mount_cache, self.files), per_cpu=bool(self.config.get("host.per-cpu"))
        )

    def close(self) -> None:
        self.files.close()
