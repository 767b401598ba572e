"""The training ranks' own CPU, memory, threads and open files, found through their snapshots.

The ranks already announce themselves (job, rank, pid, start time) in the snapshot files of
``--multiproc-dir``; reading ``/proc/<pid>`` from the sidecar costs the training process nothing,
unlike a ``process_*`` collector inside it. A pid whose process started after its snapshot's start
time is a reused pid, not our rank, and is skipped; a rank that exited has no ``/proc`` entry and
its series disappear with it, so cardinality follows the live ranks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from mlops_obs.collectors import Collector, register
from mlops_obs.collectors import host_parse as hp
from mlops_obs.collectors.host import CLK_TCK, PAGE_SIZE, ProcFiles, read_text
from mlops_obs.collectors.training import cached_scan
from mlops_obs.exporter.exposition import Labels, family
from mlops_obs.exporter.exposition import labels as label_set

LABELS = ["job", "rank", "pid"]
# A snapshot's start_time is taken when the rank's monitor starts, after the interpreter did; this
# slack only absorbs clock granularity (btime is whole seconds, start ticks 10 ms).
PID_REUSE_SLACK_S = 2.0


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


# Boot time per procfs root: it cannot change while the machine is up, so /proc/stat (one line per
# CPU and interrupt: kilobytes on a big node) is read once instead of every round.
_btime: dict[str, float | None] = {}


def _boot_time(procfs: str) -> float | None:
    if procfs not in _btime:
        bt = hp.parse_btime(read_text(Path(procfs, "stat")) or "")
        if bt is None:
            return None  # not cached: a fixture or a procfs that appears later gets another chance
        _btime[procfs] = bt
    return _btime[procfs]


PROC_SUPER_MAGIC = 0x9FA0
# procfs root -> whether it is a real procfs, where stat(2) of /proc/<pid>/fd reports the open fd count.
_procfs_roots: dict[str, bool] = {}


def _is_procfs(root: str) -> bool:
    """Whether ``root`` is a procfs mount (statfs's f_type), so a directory's size means what procfs
    says it does; a fixture tree (a plain directory) is not, and is always listed."""
    got = _procfs_roots.get(root)
    if got is None:
        got = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            buf = ctypes.create_string_buffer(256)  # struct statfs: f_type (a long) comes first
            if libc.statfs(os.fsencode(root), buf) == 0:
                got = ctypes.c_long.from_buffer(buf).value == PROC_SUPER_MAGIC
        except (OSError, AttributeError):
            pass
        _procfs_roots[root] = got
    return got


def count_fds(fd_dir: str, procfs: bool) -> int | None:
    """Open descriptors of a process, ``None`` where ``/proc/<pid>/fd`` may not be read.

    On procfs since Linux 6.2 the directory's size is that count: one ``stat`` instead of opening,
    reading and closing the directory (listing a rank's descriptors was most of this collector's
    round). The access check keeps the answer the same as listing: another user's process stays
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
    snaps: Iterable[dict[str, Any]], procfs: Path, files: ProcFiles | None = None
) -> list[RankProcess]:
    """``files`` keeps each rank's ``/proc/<pid>/stat`` open between rounds (the collector's own).

    A kept descriptor belongs to the process it was opened for: once that process exits, reads fail
    (and the descriptor is closed) even if the pid is reused, so it can never report another process.
    """
    # Plain string paths: pathlib's joins cost more than the reads of these tiny files.
    root = os.fspath(procfs)
    read = files.read if files is not None else read_text
    used: list[str] = []
    btime = _boot_time(root)
    procfs_real = _is_procfs(root)
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
        snap_start = s.get("start_time")
        started = None if btime is None else btime + st.start_ticks / CLK_TCK
        if started is not None and isinstance(snap_start, int | float) and started > snap_start + PID_REUSE_SLACK_S:
            continue
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


_new_tuple = tuple.__new__


# (job, rank, pid) -> the rank's interned label set, shared by its four series round after round.
_rank_sets: dict[tuple[str, str, int], Labels] = {}


def families(procs: list[RankProcess]) -> list[Metric]:
    """The four families, built as plain ``Metric`` objects: the same samples ``*MetricFamily.add_metric``
    makes (one label set per rank, shared by its four series), without its per-sample zip and dict."""
    cpu = family("mlops_process_cpu_seconds", "User and system CPU seconds of the training rank's process.",
                 "counter", [])  # fmt: skip
    rss = family("mlops_process_resident_memory_bytes", "Resident memory of the training rank's process.", "gauge", [])
    threads = family("mlops_process_threads", "Threads of the training rank's process.", "gauge", [])
    fds = family("mlops_process_open_fds", "Open file descriptors of the training rank's process.", "gauge", [])
    for p in sorted(procs, key=lambda p: (p.job, p.rank, p.pid)):
        key = (p.job, p.rank, p.pid)
        labels = _rank_sets.get(key)
        if labels is None:
            if len(_rank_sets) >= 10_000:
                _rank_sets.clear()
            labels = _rank_sets[key] = label_set({"job": p.job, "rank": p.rank, "pid": str(p.pid)})
        cpu.samples.append(
            _new_tuple(Sample, ("mlops_process_cpu_seconds_total", labels, p.cpu_seconds, None, None, None))
        )
        rss.samples.append(
            _new_tuple(Sample, ("mlops_process_resident_memory_bytes", labels, p.rss_bytes, None, None, None))
        )
        threads.samples.append(
            _new_tuple(Sample, ("mlops_process_threads", labels, float(p.threads), None, None, None))
        )
        if p.open_fds is not None:
            fds.samples.append(
                _new_tuple(Sample, ("mlops_process_open_fds", labels, float(p.open_fds), None, None, None))
            )
    return [cpu, rss, threads, fds]


@register
class ProcessCollector(Collector):
    name = "process"
    help = "CPU, RSS, threads and open files of the training ranks found in --multiproc-dir."

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.files = ProcFiles()

    def sample(self) -> Iterable[Metric]:
        directory = self.config.get("multiproc-dir")
        if not directory:
            return []
        # No retention here: deleting stale snapshots is the training collector's job.
        snaps = list(cached_scan(directory, retention=None))
        return families(read_rank_processes(snaps, Path(self.config.get("path.procfs") or "/proc"), self.files))

    def close(self) -> None:
        self.files.close()
