"""The training ranks' own CPU, memory, threads and open files, found through their snapshots.

The ranks already announce themselves (job, rank, pid, start time) in the snapshot files of
``--multiproc-dir``; reading ``/proc/<pid>`` from the sidecar costs the training process nothing,
unlike a ``process_*`` collector inside it. A rank that exited has no ``/proc`` entry and its series
disappear with it, so cardinality follows the live ranks.

A snapshot's ``pid`` is a claim, made by whoever wrote the file (every pod on the node can, in the
DaemonSet layout): the process under that pid is taken for the rank only when it started when the
snapshot says the rank's process started (:func:`same_process`). That turns away a reused pid, and
a file claiming ``pid: 1`` (or the sidecar's own pid, or another tenant's) to have that process's
CPU and memory published as a rank's.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, register
from mlops_obs.collectors import host_parse as hp
from mlops_obs.collectors.host import CLK_TCK, LIBC, PAGE_SIZE, ProcFiles, read_text
from mlops_obs.metrics import FamilyBuilder, sample
from mlops_obs.rankdir import RankDirectory, Snapshot

LABELS = ["job", "rank", "pid"]
# The SDK records its process's start time as psutil computes it: /proc/stat's boot time plus the
# start ticks of /proc/<pid>/stat, the very figures read here. The tolerance absorbs the boot time's
# whole seconds and the 10 ms ticks, nothing more: another process started within it is rare, and one
# started that close to a rank is most often its own launcher or sibling.
PID_START_TOLERANCE_S = 2.0


def same_process(recorded: Any, started: float | None) -> bool:
    """Whether the process that ``/proc`` says started at ``started`` (Unix time) is the one a snapshot
    recorded as starting at ``recorded``. Unknown on either side is not the same: an unverifiable pid
    is not published."""
    if started is None or isinstance(recorded, bool) or not isinstance(recorded, int | float):
        return False
    return abs(started - recorded) <= PID_START_TOLERANCE_S


class RankProcess(NamedTuple):
    """One rank's figures for a round (a named tuple: built for every rank every second, and a frozen
    dataclass's ``__init__`` costs three times as much)."""

    job: str
    rank: str
    pid: int
    cpu_seconds: float
    rss_bytes: float
    threads: int
    open_fds: int | None


def boot_time(procfs: str) -> float | None:
    """Boot time (Unix seconds) from ``<procfs>/stat``, to turn a pid's start ticks into wall time."""
    return hp.parse_btime(read_text(f"{procfs}/stat") or "")


PROC_SUPER_MAGIC = 0x9FA0


def is_procfs(root: str) -> bool:
    """Whether ``root`` is a procfs mount (statfs's f_type), so a directory's size means what procfs
    says it does; a fixture tree (a plain directory) is not, and is always listed."""
    if LIBC is None:
        return False
    try:
        buf = ctypes.create_string_buffer(256)  # struct statfs: f_type (a long) comes first
        if LIBC.statfs(os.fsencode(root), buf) == 0:
            return bool(ctypes.c_long.from_buffer(buf).value == PROC_SUPER_MAGIC)
    except AttributeError:
        pass
    return False


def count_fds(fd_dir: str, procfs: bool) -> int | None:
    """Open descriptors of a process, ``None`` where ``/proc/<pid>/fd`` may not be read.

    On procfs since Linux 6.2 the directory's size is that count: one ``stat`` instead of opening,
    reading and closing the directory (listing a rank's descriptors would cost more than the rest
    of this collector's round). The access check keeps the answer the same as listing: another user's process stays
    ``None`` although the kernel would report its size. Older kernels report 0: listed then.
    """
    try:
        if procfs and _access(fd_dir, os.R_OK, effective_ids=True):
            n = os.stat(fd_dir).st_size
            if n > 0:
                return n
        return len(os.listdir(fd_dir))
    except OSError:
        return None  # another user's process (/proc/<pid>/fd needs ptrace access), or it exited


_access = os.access if os.access in os.supports_effective_ids else (lambda path, mode, effective_ids: True)


def read_rank_processes(
    snaps: Iterable[Snapshot],
    procfs: Path,
    files: ProcFiles | None = None,
    btime: float | None = None,
    procfs_real: bool = False,
) -> list[RankProcess]:
    """The ranks' figures from ``procfs``; ``btime`` (its boot time) dates each process, which must be
    the one its snapshot recorded (:func:`same_process`; without ``btime`` none is), and
    ``procfs_real`` lets open descriptors be counted with one ``stat`` (see :func:`count_fds`).

    ``files`` keeps each rank's ``/proc/<pid>/stat`` open between rounds (the collector's own). A kept
    descriptor belongs to the process it was opened for: once that process exits, reads fail (and the
    descriptor is closed) even if the pid is reused, so it can never report another process.
    """
    # Plain string paths: pathlib's joins cost more than the reads of these tiny files.
    root = os.fspath(procfs)
    read = files.read if files is not None else read_text
    used: list[str] = []
    out: list[RankProcess] = []
    seen: set[int] = set()
    for s in snaps:
        try:
            pid = int(s.get("pid") or 0)
        except (TypeError, ValueError):
            continue
        if pid <= 0 or pid in seen:
            continue
        base = f"{root}/{pid}"
        used.append(base + "/stat")
        text = read(base + "/stat")
        if text is None:
            continue  # the rank exited
        try:
            st = hp.parse_pid_stat(text, CLK_TCK, PAGE_SIZE)
        except ValueError:
            continue
        if not same_process(s.get("start_time"), None if btime is None else btime + st.start_ticks / CLK_TCK):
            continue  # a reused pid, or a pid claimed for a process that is not the rank
        fds = count_fds(base + "/fd", procfs_real)
        seen.add(pid)
        out.append(
            RankProcess(
                str(s.get("job", "")), str(s.get("rank", "")), pid, st.cpu_seconds, st.rss_bytes, st.threads, fds
            )
        )
    if files is not None:
        files.retain(used)
    return out


FAMILIES: dict[str, tuple[str, str]] = {
    "mlops_process_cpu_seconds": ("counter", "User and system CPU seconds of the training rank's process."),
    "mlops_process_resident_memory_bytes": ("gauge", "Resident memory of the training rank's process."),
    "mlops_process_threads": ("gauge", "Threads of the training rank's process."),
    "mlops_process_open_fds": ("gauge", "Open file descriptors of the training rank's process."),
}


def families(procs: list[RankProcess], out: FamilyBuilder | None = None) -> list[Metric]:
    """The four families, one label set per rank shared by its four series (``out``: the collector's
    builder, whose interned label sets last across rounds)."""
    out = out or FamilyBuilder(FAMILIES)
    fams = out.round(*FAMILIES)
    cpu, rss, threads, fds = (fams.samples(name) for name in FAMILIES)
    intern = out.labels.get
    for p in sorted(procs, key=lambda p: (p.job, p.rank, p.pid)):
        labels = intern({"job": p.job, "rank": p.rank, "pid": str(p.pid)})
        cpu.append(sample("mlops_process_cpu_seconds_total", labels, p.cpu_seconds))
        rss.append(sample("mlops_process_resident_memory_bytes", labels, p.rss_bytes))
        threads.append(sample("mlops_process_threads", labels, float(p.threads)))
        if p.open_fds is not None:
            fds.append(sample("mlops_process_open_fds", labels, float(p.open_fds)))
    return fams.metrics()


@register
class ProcessCollector(Collector):
    name = "process"
    help = "CPU, RSS, threads and open files of the training ranks found in --multiproc-dir."

    def __init__(self, config: Mapping[str, Any], ranks: RankDirectory | None = None) -> None:
        super().__init__(config, ranks)
        self.files = ProcFiles()
        self.out = FamilyBuilder(FAMILIES)
        # procfs root -> (boot time, whether it is a real procfs): neither changes while the machine is
        # up, and /proc/stat (a line per CPU and interrupt: kilobytes on a big node) is costly to
        # read every round. A boot time not found is looked for again (a procfs mounted later).
        self._roots: dict[str, tuple[float | None, bool]] = {}

    def _root(self, root: str) -> tuple[float | None, bool]:
        got = self._roots.get(root)
        if got is None or got[0] is None:
            if len(self._roots) >= 64:
                self._roots.clear()
            got = self._roots[root] = (boot_time(root), got[1] if got is not None else is_procfs(root))
        return got

    def sample(self) -> Iterable[Metric]:
        if self.ranks.path is None:
            return []
        procfs = os.fspath(self.config.get("path.procfs") or "/proc")
        btime, real = self._root(procfs)
        snaps = self.ranks.snapshots()
        self.ranks.raise_problem()
        procs = read_rank_processes(snaps, Path(procfs), self.files, btime, real)
        return families(procs, self.out)

    def close(self) -> None:
        self.files.close()
