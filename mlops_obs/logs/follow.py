"""Following log files: which files to read, which file is which across renames, copies and restarts,
and their bytes, read past the last acknowledged offset. The shipper (:mod:`.shipper`) turns those
bytes into batches and moves each file's offset on once the sink acknowledged them.

Why it is shaped this way (the failures of Fluent Bit, Vector and Filebeat in the field notes):

* A file is identified by a content fingerprint, the hash of its first line (at most 1 KiB), with
  (device, inode) only as a tie-breaker: inodes are reused, and a renamed file must keep its state.
  The shipper derives every event's ``_id`` from (file id, byte offset), never the content.
* Its place in the file is checked by content too: the checkpoint keeps, with the offset, a hash of
  the :data:`TAIL_MAX` bytes before it, and an open file keeps those bytes. A file truncated in place
  and rewritten past the offset with the same first line (a banner, a CSV header) has other bytes
  there, so it is a new file read from its start; its lines are not skipped as if already shipped.
* Rotation: rename+create (the old inode keeps its id under its new name; an open descriptor drains
  a deleted or unmatched one), copytruncate (the copy carries the old first line and bytes, so it
  inherits the checkpoint; the truncated original becomes a new file), truncation in place (size
  below the offset, a changed first line, or other bytes before the offset), delete+recreate (a new
  first line, a new id).
* The first line and the bytes before the read position are checked again after every read, so
  bytes of replaced content never count as the old file's.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import glob
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops_obs.logs.events import LineParser
from mlops_obs.logs.sink import format_timestamp, say

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

HEAD_MAX = 1024
TAIL_MAX = 1024
"""Bytes before a file's offset whose hash the checkpoint keeps (and an open file keeps as bytes)."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- one tracked file -----------------------------------------------------------------------------


@dataclass
class FileState:
    """What survives a restart for one file (the checkpoint record)."""

    fid: str
    path: str
    dev: int
    ino: int
    head_hash: str
    head_len: int
    offset: int = 0  # every byte before this is acknowledged (or was an empty line)
    last_ts: str = ""  # the last time a line before ``offset`` carried (see LineParser)
    part: int = 0  # index of the next part when ``offset`` is inside a split long line
    seen: float = 0.0
    tail_hash: str = ""  # hash of the ``tail_len`` bytes before ``offset`` ("" in checkpoints that predate it)
    tail_len: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TrackedFile:
    """An open file being read: the state, a descriptor, and the bytes read past the last full line."""

    def __init__(self, state: FileState, fd: int, parser: LineParser) -> None:
        self.state = state
        self.fd = fd
        self.parser = parser
        self.read_pos = state.offset  # consumed into batches (>= state.offset)
        self.part = state.part
        self.buf = b""
        self.buf_start = state.offset
        self.tail = b""  # up to TAIL_MAX bytes just before buf_start, as read
        self.eof = False
        self.missing_scans = 0
        self.flush_partial = False
        self.last_data = time.monotonic()  # when a read last found new bytes (idle files end pending events)

    def compact(self) -> None:
        """Drop the buffered bytes before ``read_pos`` (they are in a batch already)."""
        drop = self.read_pos - self.buf_start
        if drop > 0:
            self.tail = (self.tail + self.buf[max(0, drop - TAIL_MAX) : drop])[-TAIL_MAX:]
            self.buf = self.buf[drop:]
            self.buf_start = self.read_pos

    def window_ok(self) -> bool:
        """Whether the file still holds, just before the end of what was read, the bytes read there."""
        end = self.buf_start + len(self.buf)
        known = (self.tail + self.buf[-TAIL_MAX:])[-TAIL_MAX:]
        if not known:
            return True
        return os.pread(self.fd, len(known), end - len(known)) == known

    def mark(self, offset: int) -> None:
        """Set the acknowledged ``offset`` and the hash of the bytes before it, from what was read
        (the file itself only when the bytes have left memory; the window check catches a file
        replaced meanwhile)."""
        start = max(0, offset - TAIL_MAX)
        bs = self.buf_start
        if bs - len(self.tail) <= start and offset <= bs + len(self.buf):
            if start >= bs:
                data = self.buf[start - bs : offset - bs]
            else:  # slices only: the buffer may hold megabytes
                data = self.tail[len(self.tail) - (bs - start) :] + self.buf[: max(0, offset - bs)]
                data = data[: offset - start]
        else:
            data = os.pread(self.fd, offset - start, start)
        self.state.offset = offset
        self.state.tail_hash, self.state.tail_len = _hash(data), len(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _head(fd: int) -> bytes | None:
    """The first line (with its newline) or the first HEAD_MAX bytes; None until one of them exists."""
    data = os.pread(fd, HEAD_MAX, 0)
    nl = data.find(b"\n")
    if nl >= 0:
        return data[: nl + 1]
    return data if len(data) >= HEAD_MAX else None


def _hash(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _tail_of(fd: int, state: FileState) -> bytes | None:
    """The bytes before ``state.offset`` in the file when their hash is the checkpoint's, else None
    (b"" for a checkpoint without a hash: nothing to check it by)."""
    if not state.tail_hash:
        return b""
    data = os.pread(fd, state.tail_len, state.offset - state.tail_len)
    return data if len(data) == state.tail_len and _hash(data) == state.tail_hash else None


class FileFollower:
    """The files under the ``sources`` globs (minus ``exclude`` and anything under ``state_dir``):
    their states (:class:`FileState`, by file id, what the checkpoint holds) and the open ones
    (:class:`TrackedFile`, by file id).

    ``scan`` validates the open files and picks up new ones; ``fill`` reads more bytes of one. States
    of files gone for ``forget_after`` seconds are dropped; a new file that starts like an open one
    is held back for up to ``copy_grace`` seconds (see :meth:`_is_copy_of_open_file`).
    """

    def __init__(
        self,
        sources: Sequence[str],
        *,
        state_dir: Path,
        exclude: Sequence[str] = (),
        node: str | None = None,
        redact: bool = True,
        scan_interval: float = 1.0,
        read_chunk: int = 256 << 10,
        forget_after: float = 24 * 3600.0,
        copy_grace: float = 30.0,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.sources = sources
        self.state_dir = state_dir
        self.exclude = exclude
        self.node = node
        self.redact = redact
        self.scan_interval = scan_interval
        self.read_chunk = read_chunk
        self.forget_after = forget_after
        self.copy_grace = copy_grace
        self.log = log
        self.states: dict[str, FileState] = {}
        self.open: dict[str, TrackedFile] = {}  # by fid
        self._last_scan = 0.0
        self._deferred: dict[tuple[int, int], float] = {}
        self._unreadable: set[str] = set()

    def _say(self, level: str, msg: str, **kw: Any) -> None:
        say(self.log, level, msg, **kw)

    def scan_if_due(self) -> bool:
        """:meth:`scan` when ``scan_interval`` has passed since the last one, when no file is open, or
        when a read found a file replaced; returns whether the states changed."""
        now = time.monotonic()
        if now - self._last_scan < self.scan_interval and self.open:
            return False
        self._last_scan = now
        return self.scan()

    # --- discovery ---

    def _paths(self) -> list[str]:
        out: set[str] = set()
        for pattern in self.sources:
            for p in glob.glob(os.path.expanduser(pattern), recursive=True):
                if os.path.isfile(p):
                    out.add(os.path.abspath(p))
        state_dir = str(self.state_dir.resolve())
        excluded = {p for p in out if p.startswith(state_dir + os.sep)}
        for pattern in self.exclude:  # fnmatch: "*" also crosses "/", so "dir/*" excludes a tree
            full = os.path.abspath(os.path.expanduser(pattern))
            excluded |= {p for p in out if fnmatch.fnmatch(p, full)}
        return sorted(out - excluded)

    def scan(self) -> bool:
        """Validate open files and pick up new ones; returns whether the checkpoint needs writing."""
        changed = False
        now = time.time()
        # 1. Open files whose content was replaced (truncated, or a new first line) are let go; their
        #    state stays, so a copy made by copytruncate (same first line) continues from it.
        for fid, tf in list(self.open.items()):
            try:
                size = os.fstat(tf.fd).st_size
                head = _head(tf.fd)
                same = size >= tf.buf_start + len(tf.buf) and tf.window_ok()
            except OSError:
                size, head, same = -1, None, False
            if size < tf.read_pos or head is None or _hash(head) != tf.state.head_hash or not same:
                self._say("info", "file truncated or replaced", path=tf.state.path, offset=tf.read_pos)
                tf.close()
                del self.open[fid]
                changed = True
        # 2. Paths: known inodes follow renames; others are matched by fingerprint or are new.
        by_inode = {(tf.state.dev, tf.state.ino): tf for tf in self.open.values()}
        seen: set[str] = set()
        found = []
        for path in self._paths():
            try:
                found.append((path, os.stat(path)))
            except OSError:
                continue
        # A path whose inode a saved state names goes first, so after a restart the original keeps
        # its state even when a copy of it (copytruncate, a backup) sorts earlier.
        state_inodes = {(fs.dev, fs.ino) for fs in self.states.values()}
        found.sort(key=lambda ps: (ps[1].st_dev, ps[1].st_ino) not in state_inodes)
        for path, st in found:
            known = by_inode.get((st.st_dev, st.st_ino))
            if known is not None:
                seen.add(known.state.fid)
                if known.state.path != path:
                    known.state.path = path
                    known.parser.source = path
                    changed = True
                known.state.seen = now
                continue
            changed |= self._adopt(path, seen, now)
        # 3. Files no longer under any glob: drained through their descriptor, then closed. A last
        #    line that never got its newline is shipped (flagged ``partial``) once the file is gone
        #    for a while: no writer will finish it, and dropping it would lose the last words.
        for fid, tf in list(self.open.items()):
            if fid in seen:
                tf.missing_scans = 0
                continue
            tf.missing_scans += 1
            if tf.eof and tf.missing_scans >= 5:
                if tf.read_pos - tf.buf_start < len(tf.buf) or tf.parser.pending_offset is not None:
                    tf.flush_partial = True
                else:
                    tf.close()
                    del self.open[fid]
        # 4. Forget states of files gone for long (bounded state).
        for fid, fs in list(self.states.items()):
            if fid not in self.open and now - fs.seen > self.forget_after:
                del self.states[fid]
                changed = True
        return changed

    def _is_copy_of_open_file(self, fd: int, st: os.stat_result, head_hash: str) -> bool:
        """A new file that starts like a file we are reading is most likely its copy (copytruncate
        between the copy and the truncate, or a backup): adopting it now as a new file would ship
        everything twice. It is held back until the original is truncated (then it inherits the
        state) or for ``copy_grace`` seconds (then it is a distinct file that merely starts alike).
        """
        key = (st.st_dev, st.st_ino)
        twins = [tf for tf in self.open.values() if tf.state.head_hash == head_hash]
        if not twins:
            self._deferred.pop(key, None)
            return False
        n = min(st.st_size, 64 << 10)
        mine = os.pread(fd, n, 0)
        for tf in twins:
            try:
                if os.pread(tf.fd, n, 0) == mine:
                    first = self._deferred.setdefault(key, time.monotonic())
                    return time.monotonic() - first < self.copy_grace
            except OSError:
                continue
        return False

    def _adopt(self, path: str, seen: set[str], now: float) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            if path not in self._unreadable:  # say it once, not every scan
                self._unreadable.add(path)
                self._say("error", "cannot open log file", path=path, error=e.strerror)
            return False
        self._unreadable.discard(path)
        try:
            st = os.fstat(fd)
            head = _head(fd)
        except OSError:
            os.close(fd)
            return False
        if head is None:  # no complete first line yet: nothing to ship, nothing to fingerprint
            os.close(fd)
            return False
        hh = _hash(head)
        if self._is_copy_of_open_file(fd, st, hh):
            os.close(fd)
            return False
        candidates = [s for s in self.states.values() if s.head_hash == hh and s.fid not in self.open]
        candidates.sort(key=lambda s: (s.dev, s.ino) != (st.st_dev, st.st_ino))
        state = None
        tail = b""
        for cand in candidates:
            if st.st_size >= cand.offset:
                try:
                    found = _tail_of(fd, cand)
                except OSError:
                    found = None
                if found is not None:
                    state, tail = cand, found
                    break
        new = state is None
        if state is None:
            fid = _hash(head + b"\0" + path.encode())[:20]
            while fid in self.states:  # the same path recreated with the same first line
                fid = _hash(fid.encode() + b"+")[:20]
            state = FileState(fid=fid, path=path, dev=st.st_dev, ino=st.st_ino, head_hash=hh, head_len=len(head))
            self.states[fid] = state
        state.path, state.dev, state.ino, state.seen = path, st.st_dev, st.st_ino, now
        parser = LineParser(path, state.fid, state.last_ts, redact=self.redact, node=self.node)
        tf = TrackedFile(state, fd, parser)
        tf.tail = tail
        self.open[state.fid] = tf
        seen.add(state.fid)
        self._say("info", "following file", path=path, fid=state.fid, offset=state.offset, new=new)
        return True

    # --- reading ---

    def fill(self, tf: TrackedFile) -> bool:
        """Read more bytes into the buffer; False at end of file or when the file was replaced.

        The first line is checked after every read: if the file was truncated (and maybe regrown
        past our offset) the bytes just read belong to different content and are discarded; the
        next scan treats the file as new. Without this, the tail of a new line would ship under the
        old id and its lines twice.
        """
        at = tf.buf_start + len(tf.buf)
        try:
            data = os.pread(tf.fd, self.read_chunk, at)
            head = os.pread(tf.fd, tf.state.head_len, 0) if data else b""
            same = tf.window_ok() if data else True
            mtime = os.fstat(tf.fd).st_mtime if data else 0.0
        except OSError as e:  # EIO on a failing disk, a vanished network mount: retry on later rounds
            self._say("error", "cannot read log file", path=tf.state.path, error=e.strerror)
            tf.eof = True
            return False
        if not data:
            tf.eof = True
            return False
        if _hash(head) != tf.state.head_hash or not same:
            tf.eof = True
            self._last_scan = 0.0  # rescan at the next scan_if_due
            return False
        # Bytes found after the file had been read to its end were written since the last look: the
        # parser may time the lines among them that carry no time of their own by this read.
        live = tf.eof
        tf.parser.note_read(at, now_iso() if live else "", live, format_timestamp(mtime))
        tf.eof = False
        tf.last_data = time.monotonic()
        tf.buf += data
        return True

    def lag(self) -> dict[str, int]:
        """Bytes written but not yet acknowledged, per open file's path."""
        lag = {}
        for tf in self.open.values():
            try:
                size = os.fstat(tf.fd).st_size
            except OSError:
                continue
            lag[tf.state.path] = max(0, size - tf.state.offset)
        return lag

    def all_read(self) -> bool:
        """Every open file was read to its end (a partial last line is left for later)."""
        return all(tf.eof for tf in self.open.values())

    def close(self) -> None:
        for tf in self.open.values():
            tf.close()
        self.open.clear()
