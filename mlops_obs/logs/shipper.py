"""The checkpointed shipper: tail log files, send events to a sink, advance only on acknowledgement.

Why it is shaped this way (the failures of Fluent Bit, Vector and Filebeat in the field notes):

* The source files are the write-ahead log. The shipper holds at most one batch in memory; while the
  sink is down it retries that batch (jittered backoff) and reads nothing more, so memory stays
  bounded and nothing is lost when it is killed: it restarts from the checkpoint.
* The checkpoint is, per file, the highest offset whose every line the sink acknowledged (the whole
  batch is acknowledged, or dead-lettered with a reason, before the checkpoint moves). It is written
  atomically: temp file, fsync, rename, fsync of the directory.
* A file is identified by a content fingerprint, the hash of its first line (at most 1 KiB), with
  (device, inode) only as a tie-breaker: inodes are reused, and a renamed file must keep its state.
  Every event's ``_id`` is (file id, byte offset), never the content, so re-sending after a crash is
  idempotent in the sink and two identical lines are two events.
* Rotation: rename+create (the old inode keeps its id under its new name; an open descriptor drains
  a deleted or unmatched one), copytruncate (the copy carries the old first line, so it inherits the
  checkpoint; the truncated original becomes a new file), truncation in place (size below the
  offset, or a changed first line), delete+recreate (a new first line, a new id).
* A line without its newline is waited for, never shipped half. CRLF is stripped, empty lines are
  skipped, invalid UTF-8 is kept (flagged), and a line over ``max_line_bytes`` is shipped as parts
  flagged ``split`` so a 10 MB line never blocks the file.

Fault injection for the tests: ``MLOPS_OBS_SHIP_FAULT=phase:N[,phase:N]`` makes the process SIGKILL
itself the N-th time it reaches ``phase`` (``read``: a batch is built; ``sent``: the sink applied
the write but the shipper has not seen the answer; ``acked``: acknowledged, checkpoint not written;
``checkpoint``: temp file written, not renamed). Tests also kill it from outside at random moments.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as _dt
import errno
import fnmatch
import gc
import glob
import hashlib
import itertools
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from mlops_obs.config import node_name
from mlops_obs.logs.events import LineParser
from mlops_obs.logs.store import ParsedEvents

HEAD_MAX = 1024
STATE_FILE = "checkpoint.json"
STATS_FILE = "stats.json"
DEAD_LETTER_FILE = "dead-letter.ndjson"


class Stop(Exception):
    """The shipper was asked to stop while a batch was in flight (it stays un-checkpointed)."""


class Sink(Protocol):
    def send(self, events: list[dict[str, Any]], stop: threading.Event) -> None:
        """Return once every event is durable in the sink or dead-lettered; raise :class:`Stop` on stop."""

    def close(self) -> None: ...


# --- fault injection (tests only) ---------------------------------------------------------------------


class _Faults:
    def __init__(self, spec: str | None) -> None:
        self.at: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        for part in (spec or "").split(","):
            if ":" in part:
                phase, n = part.split(":", 1)
                self.at[phase.strip()] = int(n)

    def hit(self, phase: str) -> None:
        if phase not in self.at:
            return
        self.seen[phase] = self.seen.get(phase, 0) + 1
        if self.seen[phase] >= self.at[phase]:
            os.kill(os.getpid(), signal.SIGKILL)


FAULTS = _Faults(os.environ.get("MLOPS_OBS_SHIP_FAULT"))


# --- statistics (read by the sidecar's shipper collector) ---------------------------------------------


@dataclass
class Stats:
    lines_read: int = 0
    events_shipped: int = 0
    retries: int = 0
    dead_letters: int = 0
    lines_split: int = 0
    last_success: float | None = None
    lag: dict[str, int] = field(default_factory=dict)
    sink_error: str | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "lines_read_total": self.lines_read,
            "events_shipped_total": self.events_shipped,
            "retries_total": self.retries,
            "dead_letters_total": self.dead_letters,
            "lines_split_total": self.lines_split,
            "last_success_timestamp_seconds": self.last_success,
            "lag_bytes": dict(self.lag),
            "sink_error": self.sink_error,
            "pid": os.getpid(),
            "written_at": time.time(),
        }


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """temp, (fsync), rename, (fsync dir): a reader sees the old or the new file, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # follows a symlink, which is how the tests point it at /dev/full
        f.write(data)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    if path.name == STATE_FILE:
        FAULTS.hit("checkpoint")
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- one tracked file ---------------------------------------------------------------------------------


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
    last_ts: str = ""  # timestamp for raw lines at ``offset`` (see LineParser)
    part: int = 0  # index of the next part when ``offset`` is inside a split long line
    seen: float = 0.0

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
        self.eof = False
        self.missing_scans = 0
        self.flush_partial = False

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


# --- the shipper --------------------------------------------------------------------------------------


@dataclass
class ShipperOptions:
    sources: Sequence[str]
    state_dir: Path
    batch_events: int = 5000
    batch_bytes: int = 4 << 20
    max_line_bytes: int = 1 << 20
    read_chunk: int = 256 << 10
    keep_buffer: int = 64 << 10
    scan_interval: float = 1.0
    poll_interval: float = 0.1
    redact: bool = True
    exclude: Sequence[str] = ()
    forget_after: float = 24 * 3600.0
    copy_grace: float = 30.0


class Shipper:
    def __init__(self, options: ShipperOptions, sink: Sink, log: Any = None) -> None:
        self.opts = options
        self.sink = sink
        self.log = log
        self.stats = Stats()
        self.node = node_name()
        self.stop_event = threading.Event()
        self.state_dir = Path(options.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.states: dict[str, FileState] = {}
        self.open: dict[str, TrackedFile] = {}  # by fid
        self._last_scan = 0.0
        self._last_stats = 0.0
        self._checkpoint_error: str | None = None
        self._deferred: dict[tuple[int, int], float] = {}
        self._unreadable: set[str] = set()
        self._load_state()

    # --- state ---

    def _load_state(self) -> None:
        path = self.state_dir / STATE_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        try:
            data = orjson.loads(raw)
            for rec in data.get("files", []):
                st = FileState(**rec)
                self.states[st.fid] = st
        except (orjson.JSONDecodeError, TypeError, AttributeError) as e:
            raise ValueError(f"checkpoint {path} is unreadable ({e}); move it away to re-ship from the start") from None
        stats = data.get("stats") or {}
        self.stats.lines_read = int(stats.get("lines_read_total", 0))
        self.stats.events_shipped = int(stats.get("events_shipped_total", 0))
        self.stats.retries = int(stats.get("retries_total", 0))
        self.stats.dead_letters = int(stats.get("dead_letters_total", 0))
        self.stats.lines_split = int(stats.get("lines_split_total", 0))

    def _checkpoint(self) -> None:
        """Persist the checkpoint; on failure (disk full) keep retrying, never moving on without it.

        Moving on would be safe for delivery (the sink is idempotent) but would let the checkpoint
        fall arbitrarily behind; stopping here keeps "bytes behind" honest and bounded.
        """
        s = self.stats
        data = orjson.dumps(
            {
                "version": 1,
                "files": [st.to_json() for st in self.states.values()],
                "stats": {
                    "lines_read_total": s.lines_read,
                    "events_shipped_total": s.events_shipped,
                    "retries_total": s.retries,
                    "dead_letters_total": s.dead_letters,
                    "lines_split_total": s.lines_split,
                },
            }
        )
        delay = 0.05
        while True:
            try:
                write_atomic(self.state_dir / STATE_FILE, data)
                if self._checkpoint_error:
                    self._say("info", "checkpoint writable again", state_dir=str(self.state_dir))
                    self._checkpoint_error = None
                return
            except OSError as e:
                why = os.strerror(e.errno) if e.errno else str(e)
                if self._checkpoint_error != why:
                    self._checkpoint_error = why
                    self._say(
                        "error",
                        "cannot write checkpoint; holding until it can",
                        state_dir=str(self.state_dir),
                        error=why,
                        disk_full=e.errno == errno.ENOSPC,
                    )
                self._write_stats(force=True)
                if self.stop_event.wait(delay):
                    raise Stop() from None
                delay = min(delay * 2, 2.0)

    def _write_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < 1.0:
            return
        self._last_stats = now
        lag = {}
        for tf in self.open.values():
            try:
                size = os.fstat(tf.fd).st_size
            except OSError:
                continue
            lag[tf.state.path] = max(0, size - tf.state.offset)
        self.stats.lag = lag
        self.stats.sink_error = self._checkpoint_error
        with contextlib.suppress(OSError):
            write_atomic(self.state_dir / STATS_FILE, orjson.dumps(self.stats.snapshot()), durable=False)

    def _say(self, level: str, msg: str, **kw: Any) -> None:
        if self.log is not None:
            getattr(self.log, level)(msg, **kw)

    # --- discovery ---

    def _paths(self) -> list[str]:
        out: set[str] = set()
        for pattern in self.opts.sources:
            for p in glob.glob(os.path.expanduser(pattern), recursive=True):
                if os.path.isfile(p):
                    out.add(os.path.abspath(p))
        state_dir = str(self.state_dir.resolve())
        excluded = {p for p in out if p.startswith(state_dir + os.sep)}
        for pattern in self.opts.exclude:  # fnmatch: "*" also crosses "/", so "dir/*" excludes a tree
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
            except OSError:
                size, head = -1, None
            if size < tf.read_pos or head is None or _hash(head) != tf.state.head_hash:
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
                if tf.read_pos - tf.buf_start < len(tf.buf):
                    tf.flush_partial = True
                else:
                    tf.close()
                    del self.open[fid]
        # 4. Forget states of files gone for long (bounded state).
        for fid, fs in list(self.states.items()):
            if fid not in self.open and now - fs.seen > self.opts.forget_after:
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
                    return time.monotonic() - first < self.opts.copy_grace
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
        for cand in candidates:
            if st.st_size >= cand.offset:
                state = cand
                break
        new = state is None
        if state is None:
            fid = _hash(head + b"\0" + path.encode())[:20]
            while fid in self.states:  # the same path recreated with the same first line
                fid = _hash(fid.encode() + b"+")[:20]
            state = FileState(fid=fid, path=path, dev=st.st_dev, ino=st.st_ino, head_hash=hh, head_len=len(head),
                              last_ts=now_iso())  # fmt: skip
            self.states[fid] = state
        state.path, state.dev, state.ino, state.seen = path, st.st_dev, st.st_ino, now
        parser = LineParser(path, state.fid, state.last_ts, redact=self.opts.redact, node=self.node)
        self.open[state.fid] = TrackedFile(state, fd, parser)
        seen.add(state.fid)
        self._say("info", "following file", path=path, fid=state.fid, offset=state.offset, new=new)
        return True

    # --- reading ---

    def _fill(self, tf: TrackedFile) -> bool:
        """Read more bytes into the buffer; False at end of file or when the file was replaced.

        The first line is checked after every read: if the file was truncated (and maybe regrown
        past our offset) the bytes just read belong to different content and are discarded; the
        next scan treats the file as new. Without this, the tail of a new line would ship under the
        old id and its lines twice.
        """
        try:
            data = os.pread(tf.fd, self.opts.read_chunk, tf.buf_start + len(tf.buf))
            head = os.pread(tf.fd, tf.state.head_len, 0) if data else b""
        except OSError as e:  # EIO on a failing disk, a vanished network mount: retry on later rounds
            self._say("error", "cannot read log file", path=tf.state.path, error=e.strerror)
            tf.eof = True
            return False
        if not data:
            tf.eof = True
            return False
        if _hash(head) != tf.state.head_hash:
            tf.eof = True
            self._last_scan = 0.0  # rescan now
            return False
        tf.eof = False
        tf.buf += data
        return True

    def _read_batch(self) -> tuple[ParsedEvents, dict[str, tuple[int, str, int]]]:
        """Up to one batch of events across open files, round-robin; and each file's new read position.

        The events come as :class:`ParsedEvents` with one run per file, which spares the store
        re-deriving per event what is true of every line of a file (see there)."""
        events = ParsedEvents()
        nbytes = 0
        moved: dict[str, tuple[int, str, int]] = {}
        limit = self.opts.max_line_bytes
        files = list(self.open.values())
        per_file = max(1, self.opts.batch_events // max(1, len(files)))
        for tf in files:
            got = 0
            parser = tf.parser
            first = len(events)
            while got < per_file and len(events) < self.opts.batch_events and nbytes < self.opts.batch_bytes:
                # position of the next unconsumed byte in buf
                start = tf.read_pos - tf.buf_start
                if not tf.part:
                    n = self._read_block(tf, events, got, per_file, nbytes)
                    if n is not None:  # whole lines were taken at once
                        got, nbytes = n
                        continue
                nl = tf.buf.find(b"\n", start)
                if (nl if nl >= 0 else len(tf.buf)) - start > limit:  # a long line: ship a part, keep going
                    part = tf.buf[start : start + limit]
                    ev = parser.parse(part, tf.read_pos, {"split": {"part": tf.part, "last": False}})
                    tf.part += 1
                    self.stats.lines_split += tf.part == 1
                    tf.read_pos += limit
                    events.append(ev)
                    nbytes += limit
                    got += 1
                    self._compact(tf)
                    continue
                if nl < 0:
                    pending = len(tf.buf) - start
                    if not self._fill(tf):
                        if tf.flush_partial and pending > 0:
                            tail = tf.buf[start:]
                            events.append(parser.parse(tail, tf.read_pos, {"partial": True}))
                            self.stats.lines_read += 1
                            tf.read_pos += len(tail)
                            tf.flush_partial = False
                            got += 1
                        break
                    continue
                line = tf.buf[start:nl]
                end = tf.read_pos + (nl - start) + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                self.stats.lines_read += 1
                if tf.part:
                    events.append(parser.parse(line, tf.read_pos, {"split": {"part": tf.part, "last": True}}))
                    tf.part = 0
                    got += 1
                elif line:
                    events.append(parser.parse(line, tf.read_pos))
                    got += 1
                nbytes += len(line)
                tf.read_pos = end
                if start > (1 << 20):
                    self._compact(tf)
            if len(events) > first:
                events.runs.append((parser.fid, parser.source, first, len(events)))
            if tf.read_pos != tf.state.offset:
                moved[tf.state.fid] = (tf.read_pos, parser.last_ts, tf.part)
        return events, moved

    def _read_block(
        self, tf: TrackedFile, events: ParsedEvents, got: int, per_file: int, nbytes: int
    ) -> tuple[int, int] | None:
        """The common case of :meth:`_read_batch`, for a run of complete lines: one C-level split
        instead of a ``find`` and a slice per line, and JSON lines parsed without the dispatch of
        :meth:`LineParser.parse`. Same lines, offsets, limits and counters as the line-by-line path;
        returns the new (``got``, ``nbytes``), or None when it took nothing (no complete line in
        reach, or the next line is over ``max_line_bytes``: the line-by-line path handles those).
        """
        buf = tf.buf
        start = tf.read_pos - tf.buf_start
        limit = self.opts.max_line_bytes
        last = buf.rfind(b"\n", start, start + (1 << 20))
        if last < 0:
            return None
        taken = self._read_json_run(tf, buf, start, last, events, got, per_file, nbytes)
        if taken is not None:
            return taken
        batch_events, batch_bytes = self.opts.batch_events, self.opts.batch_bytes
        parser = tf.parser
        structured, raw, loads, decode_error = parser._structured, parser._raw, orjson.loads, orjson.JSONDecodeError
        append = events.append
        pos = tf.read_pos
        nlines = 0
        for line in buf[start:last].split(b"\n"):
            ln = len(line)
            if ln > limit or got >= per_file or len(events) >= batch_events or nbytes >= batch_bytes:
                break
            end = pos + ln + 1
            if line[-1:] == b"\r":
                line = line[:-1]
                ln -= 1
            nlines += 1
            if ln:
                rec: Any = None
                if line[:1] == b"{":
                    try:
                        rec = loads(line)
                    except decode_error:
                        rec = None
                append(structured(rec, pos) if type(rec) is dict else raw(line, pos, None))
                got += 1
            nbytes += ln
            pos = end
        if not nlines:
            return None
        self.stats.lines_read += nlines
        tf.read_pos = pos
        if tf.read_pos - tf.buf_start > (1 << 20):
            self._compact(tf)
        return got, nbytes

    def _read_json_run(
        self,
        tf: TrackedFile,
        buf: bytes,
        start: int,
        last: int,
        events: ParsedEvents,
        got: int,
        per_file: int,
        nbytes: int,
    ) -> tuple[int, int] | None:
        """:meth:`_read_block` for the commonest run of lines of all, JSON objects without CR, empty
        or over-long lines (what the job-side logger writes): how many lines the batch limits admit
        is worked out from the line lengths at once (C-level ``map``/``accumulate``/``bisect``), and
        :meth:`LineParser.json_lines` parses and maps them. It stops before the first line of any
        other kind (returning None when that is the first), and the line-at-a-time loop of
        :meth:`_read_block` takes it from there.
        """
        room = min(per_file - got, self.opts.batch_events - len(events))
        if room <= 0:
            return None
        end = last
        cr = buf.find(b"\r", start, last)
        if cr >= 0:  # only the lines before the one holding it
            end = buf.rfind(b"\n", start, cr)
            if end < 0:
                return None
        block = buf[start:end]
        lines = block.split(b"\n", room)[:room]
        lens = list(map(len, lines))
        k = len(lines)
        if (b"\n\n" in block or not lens[0] or not lens[-1]) and 0 in lens:  # only the lines before it
            k = lens.index(0)
        limit = self.opts.max_line_bytes
        if max(lens) > limit:
            k = min(k, next(i for i, n in enumerate(lens) if n > limit))
        if not k:
            return None
        if k < len(lines):
            del lines[k:], lens[k:]
        size = sum(lens)
        if nbytes + size - lens[-1] >= self.opts.batch_bytes:  # the byte limit stops it early
            m = bisect.bisect_left(list(itertools.accumulate(lens)), self.opts.batch_bytes - nbytes) + 1
            del lines[m:], lens[m:]
            size = sum(lens)
        pos = tf.read_pos
        m = tf.parser.json_lines(lines, itertools.accumulate(map((1).__add__, lens[:-1]), initial=pos), events)
        if not m:
            return None
        if m < len(lines):
            size = sum(lens[:m])
        self.stats.lines_read += m
        tf.read_pos = pos + size + m
        if tf.read_pos - tf.buf_start > (1 << 20):
            self._compact(tf)
        return got + m, nbytes + size

    @staticmethod
    def _compact(tf: TrackedFile) -> None:
        drop = tf.read_pos - tf.buf_start
        if drop > 0:
            tf.buf = tf.buf[drop:]
            tf.buf_start = tf.read_pos

    # --- the loop ---

    def step(self) -> int:
        """Read one batch, ship it, checkpoint; returns how many events were shipped (0: idle)."""
        now = time.monotonic()
        dirty = False
        if now - self._last_scan >= self.opts.scan_interval or not self.open:
            self._last_scan = now
            if self.scan():  # new files' ids and first-seen times are durable before their first batch
                self._checkpoint()
        # A batch is thousands of small acyclic objects, freed by reference counting; left on while
        # they are built, the cyclic collector walks them again and again for nothing. So it is off
        # for the read, and for the send the batch is frozen (moved out of the collector's
        # generations) rather than the collector turned off: the send may wait and retry for long,
        # and garbage made meanwhile must still be collected. Not when someone else froze objects
        # (the unfreeze would move theirs too).
        gc_was_on = gc.isenabled()
        gc.disable()
        frozen = False
        try:
            parsed, moved = self._read_batch()
            # The store takes the batch as columns; any other sink gets the event dicts.
            events: list[dict[str, Any]] | ParsedEvents = parsed if isinstance(self.sink, StoreSink) else parsed.dicts()
            del parsed
            if gc_was_on and events and gc.get_freeze_count() == 0:
                gc.freeze()
                frozen = True
        finally:
            if gc_was_on:
                gc.enable()
        n = len(events)
        try:
            if events:
                FAULTS.hit("read")
                self.sink.send(events, self.stop_event)  # type: ignore[arg-type]  # ParsedEvents: StoreSink only
                FAULTS.hit("acked")
                self.stats.events_shipped += n
                self.stats.last_success = time.time()
        finally:
            del events
            if frozen:
                gc.unfreeze()
        for fid, (pos, last_ts, part) in moved.items():
            tf = self.open.get(fid)
            if tf is None:
                continue
            tf.state.offset, tf.state.last_ts, tf.state.part = pos, last_ts, part
            dirty = True
        for tf in self.open.values():
            self._compact(tf)
            if len(tf.buf) > self.opts.keep_buffer:
                # Bounded memory with many files: unread bytes go back to the page cache, not the heap.
                tf.buf, tf.buf_start = b"", tf.read_pos
        if dirty:
            self._checkpoint()
        self._write_stats()
        return n

    def all_read(self) -> bool:
        """Every open file was read to its end (a partial last line is left for later)."""
        return all(tf.eof for tf in self.open.values())

    def run(self, once: bool = False) -> None:
        """Follow the sources until stopped; with ``once``, until everything present now is shipped."""
        try:
            if once:
                while not self.stop_event.is_set():
                    if self.step() == 0 and self.all_read():
                        break
            else:
                while not self.stop_event.is_set():
                    if self.step() == 0:
                        self.stop_event.wait(self.opts.poll_interval)
        except Stop:
            pass
        finally:
            self._write_stats(force=True)

    def close(self) -> None:
        for tf in self.open.values():
            tf.close()
        self.open.clear()
        self.sink.close()


# --- sinks --------------------------------------------------------------------------------------------


def backoff_delays(base: float = 0.05, cap: float = 5.0) -> Callable[[], float]:
    """Full-jitter exponential backoff (AWS architecture blog): spreads retries of many shippers."""
    attempt = [0]

    def nxt() -> float:
        d = random.uniform(0, min(cap, base * (2 ** attempt[0])))
        attempt[0] = min(attempt[0] + 1, 30)
        return d

    return nxt


class StoreSink:
    """The embedded store as a sink: one transaction per batch; errors (disk full, locked) retried."""

    def __init__(self, directory: Path, stats: Stats | None = None, log: Any = None) -> None:
        from mlops_obs.logs.store import EventStore

        self.store = EventStore(directory)
        self.stats = stats
        self.log = log

    def send(self, events: list[dict[str, Any]] | ParsedEvents, stop: threading.Event) -> None:
        import sqlite3

        delay = backoff_delays()
        failing: str | None = None
        while True:
            try:
                self.store.put(events)
                FAULTS.hit("sent")
                if failing and self.log is not None:
                    self.log.info("store writable again")
                return
            except sqlite3.Error as e:
                if self.stats is not None:
                    self.stats.retries += 1
                if failing != str(e) and self.log is not None:
                    self.log.error("store write failed; retrying", error=str(e))
                failing = str(e)
                if stop.wait(delay()):
                    raise Stop() from None

    def close(self) -> None:
        self.store.close()
