"""The training ranks' own CPU, memory, threads and open files, found through their snapshots.

The ranks already announce themselves (job, rank, pid, start time) in the snapshot files of
``--multiproc-dir``; reading ``/proc/<pid>`` from the sidecar costs the training process nothing,
unlike a ``process_*`` collector inside it. A pid whose process started after its snapshot's start
time is a reused pid, not our rank, and is skipped; a rank that exited has no ``/proc`` entry and
its series disappear with it, so cardinality follows the live ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, register
from mlops_obs.collectors import host_parse as hp
from mlops_obs.collectors.host import CLK_TCK, PAGE_SIZE, read_text
from mlops_obs.instrument import snapshot

LABELS = ["job", "rank", "pid"]
# A snapshot's start_time is taken when the rank's monitor starts, after the interpreter did; this
# slack only absorbs clock granularity (btime is whole seconds, start ticks 10 ms).
PID_REUSE_SLACK_S = 2.0


@dataclass(frozen=True)
class RankProcess:
    job: str
    rank: str
    pid: int
    cpu_seconds: float
    rss_bytes: float
    threads: int
    open_fds: int | None


def read_rank_processes(snaps: Iterable[dict[str, Any]], procfs: Path) -> list[RankProcess]:
    btime = hp.parse_btime(read_text(procfs / "stat") or "")
    out: list[RankProcess] = []
    seen: set[int] = set()
    for s in snaps:
        try:
            pid = int(s.get("pid") or 0)
        except (TypeError, ValueError):
            continue
        if pid <= 0 or pid in seen:
            continue
        text = read_text(procfs / str(pid) / "stat")
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
        try:
            fds: int | None = len(os.listdir(procfs / str(pid) / "fd"))
        except OSError:
            fds = None  # another user's process: /proc/<pid>/fd needs ptrace access
        seen.add(pid)
        out.append(
            RankProcess(
                str(s.get("job", "")), str(s.get("rank", "")), pid, st.cpu_seconds, st.rss_bytes, st.threads, fds
            )
        )
    return out


def families(procs: list[RankProcess]) -> list[Metric]:
    cpu = CounterMetricFamily(
        "mlops_process_cpu_seconds", "User and system CPU seconds of the training rank's process.", labels=LABELS
    )
    rss = GaugeMetricFamily(
        "mlops_process_resident_memory_bytes", "Resident memory of the training rank's process.", labels=LABELS
    )
    threads = GaugeMetricFamily("mlops_process_threads", "Threads of the training rank's process.", labels=LABELS)
    fds = GaugeMetricFamily(
        "mlops_process_open_fds", "Open file descriptors of the training rank's process.", labels=LABELS
    )
    for p in sorted(procs, key=lambda p: (p.job, p.rank, p.pid)):
        lv = [p.job, p.rank, str(p.pid)]
        cpu.add_metric(lv, p.cpu_seconds)
        rss.add_metric(lv, p.rss_bytes)
        threads.add_metric(lv, float(p.threads))
        if p.open_fds is not None:
            fds.add_metric(lv, float(p.open_fds))
    return [cpu, rss, threads, fds]


@register
class ProcessCollector(Collector):
    name = "process"
    help = "CPU, RSS, threads and open files of the training ranks found in --multiproc-dir."

    def sample(self) -> Iterable[Metric]:
        directory = self.config.get("multiproc-dir")
        if not directory:
            return []
        # No retention here: deleting stale snapshots is the training collector's job.
        snaps = list(snapshot.scan(Path(directory), retention=None))
        return families(read_rank_processes(snaps, Path(self.config.get("path.procfs") or "/proc")))
