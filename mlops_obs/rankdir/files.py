"""Snapshot files: their names, the rank's atomic write, and the sidecar's guarded read.

The file name is the (job, rank) identity, so a restarted rank overwrites its predecessor's file
instead of adding one: the directory holds at most one file per rank. A rank writes the whole
snapshot to a temp file and renames it over the old one (``os.replace``), so a reader sees either
the old or the new file, never a torn one.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
from pathlib import Path
from typing import Any

import orjson

from mlops_obs.rankdir import validate
from mlops_obs.rankdir.schema import Snapshot, parse

SUFFIX = ".rank.json"
# A snapshot is a few KB; anything much larger is not one of ours, and is not read into memory.
MAX_BYTES = 1 << 20
# Opening never follows a symbolic link and never waits (a FIFO planted under a snapshot's name would
# otherwise block the sampler thread in open(2) until a writer appeared).
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_writes = itertools.count()


def file_name(job: str, rank: int) -> str:
    """The snapshot's file name: the job with anything but ``[A-Za-z0-9_.-]`` made ``_``, and never a dot
    file (the sidecar's listing skips those: temp files, the cadence file), so a job named ``.`` or
    ``.hidden`` is still seen. Names may collide; the snapshot itself carries the real job name."""
    safe = _UNSAFE.sub("_", job)
    if not safe or safe[0] == ".":
        safe = "_" + safe[1:]
    return f"{safe}.{rank}{SUFFIX}"


def write(directory: Path, job: str, rank: int, data: Snapshot) -> None:
    """Atomically replace this rank's snapshot.

    The temp file is this write's own (pid and a per-process counter in its name): a monitor's flush
    thread, an explicit ``flush()`` or ``close()`` and a final snapshot written from a signal handler
    (which interrupts its own thread, possibly mid-write) may overlap, and two writers truncating and
    writing one temp file would rename a mix of both into place, a file that is not JSON, which the
    sidecar would skip until the rank writes again.
    """
    final = directory / file_name(job, rank)
    tmp = directory / f".{final.name}.{os.getpid()}-{next(_writes)}.tmp"
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
    mine = f"{prefix}{os.getpid()}-"  # this process's writers (another monitor of the same rank may be writing)
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and not entry.name.startswith(mine):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


class Unreadable(Exception):
    """Why a file in the rank directory was not read: ``reason`` is one of :data:`validate.REASONS`
    (a bounded label value), the message says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_bytes(path: str | os.PathLike[str], max_bytes: int = MAX_BYTES) -> bytes:
    """The content of a regular file of at most ``max_bytes``, opened without following a link or waiting.

    Raises :class:`Unreadable` for a special file, a link, an oversized file, or an I/O error.
    """
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as e:
        # O_NOFOLLOW on a symbolic link: ELOOP. A FIFO opened O_NONBLOCK succeeds and is refused below.
        reason = validate.NOT_REGULAR_FILE if e.errno == errno.ELOOP else validate.UNREADABLE
        raise Unreadable(reason, e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(validate.NOT_REGULAR_FILE, "not a regular file")
        if st.st_size > max_bytes:
            raise Unreadable(validate.TOO_LARGE, f"larger than {max_bytes} bytes")
        # One read for the whole file, plus one byte to notice a file that grew since fstat.
        data = os.read(fd, st.st_size + 1)
        if len(data) <= st.st_size:
            return data
        parts, n = [data], len(data)
        while n <= max_bytes:
            more = os.read(fd, max_bytes + 1 - n)
            if not more:
                return b"".join(parts)
            parts.append(more)
            n += len(more)
        raise Unreadable(validate.TOO_LARGE, f"larger than {max_bytes} bytes")
    except OSError as e:
        raise Unreadable(validate.UNREADABLE, e.strerror or str(e)) from None
    finally:
        os.close(fd)


def load(data: bytes) -> validate.Checked:
    """A file's bytes as a checked current-version snapshot, or the reason they are not one."""
    try:
        doc: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return validate.Checked(None, validate.NOT_JSON)
    snap = parse(doc)
    if snap is None:
        return validate.Checked(None, validate.UNKNOWN_VERSION)
    return validate.check(snap)


def read(path: str | os.PathLike[str]) -> Snapshot | None:
    """One checked snapshot, or ``None`` when the file vanished or is not one (never raises on bad input)."""
    try:
        return load(read_bytes(path)).snapshot
    except Unreadable:
        return None
