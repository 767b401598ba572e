"""``RankDirectory``: the ranks' snapshot directory as the sidecar reads it, one object per exporter."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any, NamedTuple

from mlops_obs.rankdir import validate
from mlops_obs.rankdir.files import SUFFIX, Unreadable, load, read_bytes
from mlops_obs.rankdir.schema import Snapshot

# How old a file's mtime must be, when it is read, for its stamp to identify its content from then on.
# File times come from the kernel's coarse clock (one tick, 1-10 ms): two rewrites within one tick get
# the same mtime, a freed inode is reused at once, and the two files can have the same size. Once the
# clock has moved well past the mtime, no later rewrite can carry that mtime again.
STAMP_SETTLE_NS = 100_000_000
# A temp file older than this belongs to a writer that died mid-write (a rank writes in milliseconds).
TEMP_FILE_MAX_AGE = 60.0
DEFAULT_RETENTION = 900.0
# Snapshots used from one directory: far more ranks than a node runs (each is a few dozen series); a
# directory flooded with valid files beyond it must not multiply the exporter's series without bound.
MAX_SNAPSHOTS = 1024

# (inode, mtime_ns, ctime_ns, size): ctime too, so a chmod that makes an unreadable file readable
# is noticed although it changes neither the content nor the mtime.
Stamp = tuple[int, int, int, int]


class Unlistable(RuntimeError):
    """The directory exists but cannot be listed (a regular file, no permission): one line naming it."""


class _Seen(NamedTuple):
    """What the last scan found in one file: its stamp, whether that stamp had settled (so that an
    equal stamp is the same content), and the checked snapshot or why there is none."""

    stamp: Stamp
    settled: bool
    snapshot: Snapshot | None
    reason: str | None
    dropped: Counter[str] | None


class RankDirectory:
    """Lists, reads, checks and caches the snapshots in ``path``, and deletes those older than ``retention``.

    The exporter builds one and hands it to every collector that reads the ranks (training, process,
    gpu), so a changed file is parsed once per round whoever asks first, and stale files are deleted
    whichever of those collectors is enabled. A file is parsed again only when its stamp (inode,
    mtime, ctime, size) changed: a rank replaces its file with ``os.replace``, so an unchanged stamp is
    the very same content, provided the file was read after its mtime had settled
    (``STAMP_SETTLE_NS``); the sidecar reads the directory every round while a rank rewrites its file
    once per flush interval.

    Every file is input (``docs/security.md``): what is not a good snapshot costs only itself and is
    counted in :attr:`errors` by one of :data:`validate.REASONS`, once per version of the file: a link
    or special file under a snapshot's name (never opened through), a file over ``MAX_BYTES`` (never
    read), one that is not JSON of a known schema version, one that fails :func:`validate.check`, the
    older of two files claiming one job/rank/node (the newer wins), and the least recently written
    beyond ``max_snapshots``. Entries capped out of a file that is used are counted in :attr:`dropped`.

    A file is stale when its mtime, or the ``updated`` time it claims, is more than ``retention``
    seconds old: it is deleted, whether it parses or not, before it is read (a directory of stale
    garbage costs a ``stat`` and an ``unlink`` a file, once). The older of the two times counts, so a
    file claiming to be from the future still goes once nobody rewrites it. ``retention=None``
    deletes nothing.

    :attr:`problem` says why the directory itself cannot be listed (a regular file, no permission):
    the collectors report it as their failure. A directory that does not exist yet is no problem: the
    ranks create it with their first snapshot.

    Thread-safe: the collectors call :meth:`snapshots` from their own sampler threads. The snapshots
    returned are shared between callers: read them, never modify them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        retention: float | None = DEFAULT_RETENTION,
        max_snapshots: int = MAX_SNAPSHOTS,
    ) -> None:
        self._lock = threading.Lock()
        self.max_snapshots = max_snapshots
        self._path: str | None = None
        self.retention = retention
        self._files: dict[str, _Seen] = {}
        self._losers: dict[str, tuple[Stamp, str]] = {}
        self.errors: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.problem: str | None = None
        # (monotonic time the last scan started, its result): handed out again to callers that accept a
        # listing that old (``max_age``).
        self._last: tuple[float, list[Snapshot]] | None = None
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
                self._losers = {}
                self.problem = None
            self._last = None
            self.retention = retention

    def raise_problem(self) -> None:
        """Raise :class:`Unlistable` when the last scan could not list the directory: a collector that
        reads the ranks calls it after :meth:`snapshots`, so the failure is its own."""
        problem = self.problem
        if problem is not None:
            raise Unlistable(problem)

    def snapshots(self, now: float | None = None, max_age: float = 0.0) -> list[Snapshot]:
        """Every live, checked snapshot, one per job/rank/node, in directory order; ``now`` (Unix time) for tests.

        ``max_age`` (seconds): the result of a scan that started at most that long ago is returned
        again instead of listing and ``stat``-ing every file once more. For callers that can use a
        listing that old: the GPU collector's pid index, which the training collector's scan of the
        same round has just made, and the housekeeping sweep of stale files, which a scan of any
        collector has done while the sidecar is scraped.
        """
        if self._path is None:
            return []
        # Held for the whole scan: collectors that wake together then parse a changed file once (the
        # second waits and finds it cached) instead of both parsing it at the same time.
        with self._lock:
            if self._path is None:
                return []
            started = time.monotonic()
            last = self._last
            if max_age > 0 and now is None and last is not None and started - last[0] <= max_age:
                return list(last[1])
            found = self._scan(self._path, time.time() if now is None else now)
            self._last = (started, found)
            return list(found)

    def _scan(self, directory: str, now: float) -> list[Snapshot]:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            self.problem = None
            return []
        except OSError as e:
            self.problem = f"--multiproc-dir {directory}: {e.strerror or e}"
            self._files = {}
            return []
        self.problem = None
        retention = self.retention
        old = self._files
        fresh: dict[str, _Seen] = {}
        settled_before = time.time_ns() - STAMP_SETTLE_NS
        found: list[tuple[str, Stamp, float, Snapshot]] = []
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
            if retention is not None and now - st.st_mtime > retention:
                self._unlink(entry.path)  # a link or FIFO too: unlink removes the name, never the target
                continue
            stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
            settled = st.st_mtime_ns <= settled_before
            hit = old.get(name)
            if hit is not None and hit.settled and hit.stamp == stamp:
                seen = hit
            elif not stat.S_ISREG(st.st_mode):  # never opened: opening a device can have effects
                seen = _Seen(stamp, settled, None, validate.NOT_REGULAR_FILE, None)
            else:
                seen = _read(entry.path, stamp, settled)
            if seen is not hit:
                # Counted once per version of a file, not again when an unsettled stamp is read again.
                same = hit if hit is not None and hit.stamp == stamp else None
                if seen.reason is not None and (same is None or same.reason != seen.reason):
                    self.errors[seen.reason] += 1
                if seen.dropped and (same is None or same.dropped != seen.dropped):
                    self.dropped.update(seen.dropped)
            fresh[name] = seen
            data = seen.snapshot
            if data is None:
                continue
            written = min(_updated(data), st.st_mtime)
            if retention is not None and now - written > retention:
                self._unlink(entry.path)
                del fresh[name]
                continue
            found.append((name, stamp, written, data))
        self._files = fresh
        return self._select(found)

    def _select(self, found: list[tuple[str, Stamp, float, Snapshot]]) -> list[Snapshot]:
        """The snapshots to use, in directory order: the newest alone where files share a job/rank/node
        (their series would be duplicates), and at most ``max_snapshots``, the most recently written
        (each is a rank's few dozen series). Each file left out is counted once per version."""
        newest: dict[tuple[str, str, str], tuple[float, str]] = {}
        for name, _, written, data in found:
            key = validate.identity(data)
            best = newest.get(key)
            if best is None or (written, name) > best:
                newest[key] = (written, name)
        if len(newest) == len(found) <= self.max_snapshots:
            self._losers = {}
            return [data for _, _, _, data in found]
        winners = {name for _, name in newest.values()}
        if len(winners) > self.max_snapshots:
            winners = {name for _, name in sorted(newest.values(), reverse=True)[: self.max_snapshots]}
        out: list[Snapshot] = []
        losers: dict[str, tuple[Stamp, str]] = {}
        for name, stamp, written, data in found:
            if name in winners:
                out.append(data)
                continue
            duplicate = newest[validate.identity(data)] != (written, name)
            lost = (stamp, validate.DUPLICATE_IDENTITY if duplicate else validate.TOO_MANY_FILES)
            losers[name] = lost
            if self._losers.get(name) != lost:
                self.errors[lost[1]] += 1
        self._losers = losers
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


def _read(path: str, stamp: Stamp, settled: bool) -> _Seen:
    try:
        checked = load(read_bytes(path))
    except Unreadable as e:
        return _Seen(stamp, settled, None, e.reason, None)
    return _Seen(stamp, settled, checked.snapshot, checked.reason, checked.dropped)


def _updated(data: Snapshot) -> float:
    """When the rank wrote the snapshot (checked: a number when present); 0, long ago, when missing."""
    return float(data.get("updated", 0.0))
