"""A process's CPU time per thread from ``/proc/<pid>/task/*/schedstat``, for the benchmarks that
compare processes at a fraction of a percent of a core: schedstat counts nanoseconds, where
``/proc/<pid>/stat``'s clock ticks (10 ms) are too coarse at these levels."""

from __future__ import annotations

import os


def thread_cpu(pid: int) -> dict[int, tuple[int, int]]:
    """Per live thread of ``pid``: (CPU nanoseconds, times it was run). A thread that ended between
    the listing and the read is left out (its time is then lost to both ends of a window alike)."""
    out: dict[int, tuple[int, int]] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                ns, _wait, runs = f.read().split()[:3]
            out[int(task)] = (int(ns), int(runs))
        except (OSError, ValueError):
            pass
    return out


def thread_major_faults(pid: int) -> dict[int, int]:
    """Per live thread of ``pid``: its major page faults (``/proc/<pid>/task/*/stat``), the pages it
    had to wait for the disk for. Code a process runs every few seconds and nothing else on the machine
    runs (a C extension's pages) is what a kernel reclaiming cold file pages (DAMON's ``pageout``
    scheme on the reference VM) evicts, and each run then reads it back: the count tells that cost
    from the code's own."""
    out: dict[int, int] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat", "rb") as f:
                tail = f.read().rpartition(b")")[2].split()
            out[int(task)] = int(tail[9])
        except (OSError, ValueError, IndexError):
            pass
    return out


def process_cpu_ns(pid: int) -> int:
    """CPU nanoseconds of every live thread of ``pid``."""
    return sum(ns for ns, _ in thread_cpu(pid).values())
