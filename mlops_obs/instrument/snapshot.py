"""The hand-off between a training rank and the sidecar: one small JSON snapshot file per (job, rank).

Why snapshots and not prometheus_client's multiprocess mode: multiprocess mode writes an mmap'd file
per process and metric kind, takes a lock per update (0.96 us per ``inc`` here against 0.32 us), and
the library never removes a dead process's files, so restarting ranks make scrapes grow to seconds
(client_python#204, #367). Here the rank keeps plain Python numbers in memory (the hot path makes no
system call and takes no cross-process lock); a background thread writes the whole state once per
flush interval with write-to-temp + ``os.replace``, so a reader sees either the old or the new file,
never a torn one. The file name is the (job, rank) identity, so a restarted rank overwrites its
predecessor's file instead of adding one: the directory holds at most one file per rank, and the
sidecar removes files that stopped being updated for longer than its retention.

Counters restart from zero when a rank restarts, exactly like a restarted process's own ``/metrics``;
Prometheus' ``rate()`` and ``increase()`` handle the reset. ``pid`` and ``start_time`` say which
incarnation wrote the file.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

SCHEMA_VERSION = 1
SUFFIX = ".rank.json"

# Step-duration histogram buckets (seconds): from sub-millisecond CPU toys to minute-long LLM steps.
STEP_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Checkpoint-save buckets (seconds): from an in-memory toy to a multi-terabyte sharded save.
CHECKPOINT_BUCKETS: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def median_sorted(xs: list[float]) -> float:
    """The median of a sorted, non-empty list: how a rank's recent step times become one figure, on
    the rank's side (``recent_step_median``) and, for older snapshots, on the sidecar's."""
    n = len(xs)
    mid = n // 2
    return xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2.0


def file_name(job: str, rank: int) -> str:
    return f"{_UNSAFE.sub('_', job)}.{rank}{SUFFIX}"


def write(directory: Path, job: str, rank: int, data: dict[str, Any]) -> None:
    """Atomically replace this rank's snapshot."""
    final = directory / file_name(job, rank)
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY))
    os.replace(tmp, final)


def remove_leftovers(directory: Path, job: str, rank: int) -> int:
    """Delete temp files that earlier incarnations of this (job, rank) left when killed mid-write.

    Only one incarnation of a rank runs at a time, so at start-up every temp file of this rank's name
    belongs to a dead writer; removing them here keeps a rank that restarts hundreds of times at one
    file, without the sidecar having to know which processes are alive (it may not share their PID
    namespace). Returns how many were removed.
    """
    prefix = f".{file_name(job, rank)}."
    mine = f"{prefix}{os.getpid()}.tmp"
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and entry.name != mine:
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def read(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """One snapshot, or ``None`` when the file vanished or is not ours (never raises on bad input)."""
    try:
        # An unbuffered plain open: the sidecar reads every rank's file every round, and pathlib's
        # read_bytes (a buffered reader behind a Path) costs more than the read itself.
        with open(path, "rb", buffering=0) as f:
            data = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("v") != SCHEMA_VERSION:
        return None
    return data


# How old a file's mtime must be, when it is read, for its (inode, mtime, size) to identify its content
# from then on. File times come from the kernel's coarse clock (one tick, 1-10 ms): two rewrites within
# one tick get the same mtime, a freed inode is reused at once, and the two files can have the same size.
# Once the clock has moved well past the mtime, no later rewrite can carry that mtime again.
STAMP_SETTLE_NS = 100_000_000


class ScanCache:
    """Parsed snapshots per directory, keyed by file name and (inode, mtime_ns, size).

    A rank replaces its file with ``os.replace``, so an unchanged (inode, mtime, size) is the very same
    content, provided the file was read after its mtime had settled (``STAMP_SETTLE_NS``): a file
    rewritten moments before it was read is read again next time. The sidecar re-reads the directory
    every sampling round while a rank rewrites its file only once per flush interval, and several
    collectors scan the same files in the same second. The cached snapshots are shared between callers:
    read them, never modify them.
    """

    def __init__(self, max_directories: int = 64) -> None:
        self._dirs: dict[str, dict[str, tuple[tuple[int, int, int], dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._max = max_directories
        self._scan_locks: dict[str, threading.Lock] = {}

    def scanning(self, directory: str) -> threading.Lock:
        """Held for a whole scan of ``directory``: collectors that wake together then parse a changed
        file once (the second waits and finds it cached) instead of both parsing it at the same time."""
        with self._lock:
            lock = self._scan_locks.get(directory)
            if lock is None:
                if len(self._scan_locks) >= self._max:
                    self._scan_locks.clear()
                lock = self._scan_locks[directory] = threading.Lock()
            return lock

    def get(self, directory: str) -> dict[str, tuple[tuple[int, int, int], dict[str, Any]]]:
        with self._lock:
            return self._dirs.get(directory, {})

    def put(self, directory: str, files: dict[str, tuple[tuple[int, int, int], dict[str, Any]]]) -> None:
        with self._lock:
            if len(self._dirs) >= self._max and directory not in self._dirs:
                self._dirs.clear()
            self._dirs[directory] = files


def scan(
    directory: str | os.PathLike[str],
    retention: float | None = None,
    now: float | None = None,
    cache: ScanCache | None = None,
) -> Iterator[dict[str, Any]]:
    """All live snapshots; files not updated within ``retention`` seconds are deleted (dead ranks).

    With a ``cache``, a file is parsed again only when its (inode, mtime, size) changed.
    """
    key_dir = os.fspath(directory)
    if cache is None:
        yield from _scan(key_dir, retention, time.time() if now is None else now, None)
        return
    with cache.scanning(key_dir):
        out = _scan(key_dir, retention, time.time() if now is None else now, cache)
    yield from out


def _scan(key_dir: str, retention: float | None, now: float, cache: ScanCache | None) -> list[dict[str, Any]]:
    try:
        entries = list(os.scandir(key_dir))
    except OSError:
        return []
    old = cache.get(key_dir) if cache is not None else {}
    fresh: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
    settled_before = time.time_ns() - STAMP_SETTLE_NS
    out: list[dict[str, Any]] = []
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            # A temp file older than a minute belongs to a writer that died mid-write.
            if name.endswith(".tmp"):
                try:
                    if now - entry.stat().st_mtime > 60:
                        os.unlink(entry.path)
                except OSError:
                    pass
            continue
        if not name.endswith(SUFFIX):
            continue
        try:
            st = entry.stat()
        except OSError:
            continue
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        hit = old.get(name)
        data = hit[1] if hit is not None and hit[0] == stamp else read(entry.path)
        if data is None:
            continue
        if st.st_mtime_ns > settled_before:
            stamp = (-1, 0, 0)  # too recent to vouch for the content: matches nothing, read again next time
        if retention is not None and now - float(data.get("updated", 0)) > retention:
            try:
                os.unlink(entry.path)
            except OSError:
                pass
            continue
        fresh[name] = (stamp, data)
        out.append(data)
    if cache is not None:
        cache.put(key_dir, fresh)
    return out
