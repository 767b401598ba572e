"""``RankDirectory``: the ranks' snapshot directory as the sidecar reads it, one object per exporter."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from mlops_obs.rankdir.files import SUFFIX, Unreadable, decode, read_bytes
from mlops_obs.rankdir.schema import Snapshot

# How old a file's mtime must be, when it is read, for its (inode, mtime, size) to identify its content
# from then on. File times come from the kernel's coarse clock (one tick, 1-10 ms): two rewrites within
# one tick get the same mtime, a freed inode is reused at once, and the two files can have the same size.
# Once the clock has moved well past the mtime, no later rewrite can carry that mtime again.
STAMP_SETTLE_NS = 100_000_000
# A temp file older than this belongs to a writer that died mid-write (a rank writes in milliseconds).
TEMP_FILE_MAX_AGE = 60.0
DEFAULT_RETENTION = 900.0

_NO_STAMP = (-1, 0, 0)  # matches no file: read again next time

Stamp = tuple[int, int, int]


class RankDirectory:
    """Lists, reads and caches the snapshots in ``path``, and deletes those older than ``retention``.

    The exporter builds one and hands it to every collector that reads the ranks (training, process,
    gpu), so a changed file is parsed once per round whoever asks first, and stale files are deleted
    whichever of those collectors is enabled. A file is parsed again only when its (inode, mtime,
    size) changed: a rank replaces its file with ``os.replace``, so an unchanged stamp is the very same
    content, provided the file was read after its mtime had settled (``STAMP_SETTLE_NS``); the sidecar
    reads the directory every round while a rank rewrites its file once per flush interval.

    What is not a snapshot is skipped and counted in :attr:`skipped` (by reason): a link or special
    file under a snapshot's name, a file too large to be one, one that is not JSON of a known schema
    version (remembered by its stamp like a snapshot, so it is not read again until it changes). A file
    not updated within ``retention`` seconds is deleted whether it parses or not (by its ``updated``
    field, or its mtime when it does not parse). ``retention=None`` deletes nothing.

    Thread-safe: the collectors call :meth:`snapshots` from their own sampler threads. The snapshots
    returned are shared between callers: read them, never modify them.
    """

    def __init__(self, path: str | os.PathLike[str] | None, retention: float | None = DEFAULT_RETENTION) -> None:
        self._lock = threading.Lock()
        self._path: str | None = None
        self.retention = retention
        self._files: dict[str, tuple[Stamp, Snapshot | None]] = {}
        self.skipped: Counter[str] = Counter()
        self.configure(path, retention)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RankDirectory:
        """From the exporter's ``multiproc-dir`` and ``training.retention`` settings."""
        return cls(config.get("multiproc-dir"), config.get("training.retention", DEFAULT_RETENTION))

    @property
    def path(self) -> str | None:
        return self._path

    def configure(self, path: str | os.PathLike[str] | None, retention: float | None) -> None:
        """Point at another directory or retention (a configuration reload); the cache starts over."""
        new = os.fspath(path) if path else None
        with self._lock:
            if new != self._path:
                self._path = new
                self._files = {}
            self.retention = retention

    def snapshots(self, now: float | None = None) -> list[Snapshot]:
        """Every live snapshot, in directory order; ``now`` (Unix time) for tests."""
        if self._path is None:
            return []
        # Held for the whole scan: collectors that wake together then parse a changed file once (the
        # second waits and finds it cached) instead of both parsing it at the same time.
        with self._lock:
            if self._path is None:
                return []
            return self._scan(self._path, time.time() if now is None else now)

    def _scan(self, directory: str, now: float) -> list[Snapshot]:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return []
        retention = self.retention
        old = self._files
        fresh: dict[str, tuple[Stamp, Snapshot | None]] = {}
        settled_before = time.time_ns() - STAMP_SETTLE_NS
        out: list[Snapshot] = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                if name.endswith(".tmp"):
                    self._remove_if_older(entry, now, TEMP_FILE_MAX_AGE)
                continue
            if not name.endswith(SUFFIX):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                self.skipped["not a regular file"] += 1
                continue
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            hit = old.get(name)
            if hit is not None and hit[0] == stamp:
                data: Snapshot | None = hit[1]
            else:
                try:
                    data = decode(read_bytes(entry.path))
                except Unreadable as e:
                    self.skipped[str(e)] += 1
                    continue
                if data is None:
                    self.skipped["not a snapshot of a known schema version"] += 1
            if st.st_mtime_ns > settled_before:
                stamp = _NO_STAMP  # too recent to vouch for the content
            if data is None:
                if retention is not None and now - st.st_mtime > retention:
                    self._unlink(entry.path)
                else:
                    fresh[name] = (stamp, None)  # not parsed again (nor counted again) until it changes
                continue
            if retention is not None and now - _updated(data) > retention:
                self._unlink(entry.path)
                continue
            fresh[name] = (stamp, data)
            out.append(data)
        self._files = fresh
        return out

    def _remove_if_older(self, entry: os.DirEntry[str], now: float, age: float) -> None:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > age:
                os.unlink(entry.path)
        except OSError:
            pass

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass


def _updated(data: Snapshot) -> float:
    """When the rank wrote the snapshot; 0 (long ago) when the field is missing or not a number."""
    try:
        return float(data.get("updated", 0))
    except (TypeError, ValueError):
        return 0.0
