"""The checkpointed shipper: follow log files, send their events to a sink, advance only on acknowledgement.

Why it is shaped this way (the failures of Fluent Bit, Vector and Filebeat in the field notes):

* The source files are the write-ahead log. The shipper holds at most one batch in memory; while the
  sink is down the sink retries that batch (jittered backoff) and the shipper reads nothing more, so
  memory stays bounded and nothing is lost when it is killed: it restarts from the checkpoint.
* The checkpoint is, per file, the highest offset whose every line the sink acknowledged (the whole
  batch is acknowledged, or dead-lettered with a reason, before the checkpoint moves). It is written
  atomically: temp file, fsync, rename, fsync of the directory.
* Every event's ``_id`` is (file id, byte offset), never the content, so re-sending after a crash is
  idempotent in the sink and two identical lines are two events.

The parts: :mod:`.follow` knows the files (fingerprints, rotation, their bytes), :mod:`.batch` turns
their bytes into a batch of events (:mod:`.events` parses each line), and this module runs the loop
(read a batch, send it, move the offsets, checkpoint) and keeps the statistics the sidecar reads.

Fault injection for the tests: ``MLOPS_OBS_SHIP_FAULT`` (see :data:`mlops_obs.logs.sink.FAULTS`);
the checkpoint's ``checkpoint`` phase is hit here, between its temp file and its rename. Tests also
kill the process from outside at random moments.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from mlops_obs.config import node_name
from mlops_obs.logs.batch import BatchReader
from mlops_obs.logs.follow import FileFollower, FileState
from mlops_obs.logs.sink import FAULTS, Sink, Stats, Stop, format_timestamp, say

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

STATE_FILE = "checkpoint.json"
STATS_FILE = "stats.json"
LOCK_FILE = "lock"
ONCE_CHECKPOINT_PATIENCE = 5.0
"""Seconds ``--once`` keeps retrying a checkpoint it cannot write before it gives up (exit 1): a run
meant to end must not hang on a read-only or full state directory."""
STATS_INTERVAL = 1.0


class StateDirError(ValueError):
    """The state directory cannot be used (held by another shipper, not writable); ``str()`` says why."""


class StateDirBusy(StateDirError):
    """Another shipper holds the state directory's lock."""


class CheckpointError(OSError):
    """``--once`` could not write its checkpoint; what was shipped is in the sink, but the next run
    would ship it again (harmless: ids are stable) and the run did not finish."""


def lock_state_dir(state_dir: Path) -> int:
    """An exclusive ``flock`` on ``state_dir/lock``, held until the returned descriptor is closed (or
    the process dies: the kernel drops the lock, so a killed shipper leaves nothing to clean up).

    Why: two shippers on one state directory would both read from the same checkpoint and overwrite
    each other's, each re-shipping or skipping what the other did. The second one refuses.
    """
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise StateDirError(f"cannot use state directory {str(state_dir)!r}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StateDirBusy(
            f"state directory {str(state_dir)!r} is in use by another shipper (pid {holder or 'unknown'}); "
            "run one shipper per state directory, or give this one its own --state"
        ) from None
    except OSError as e:
        os.close(fd)
        raise StateDirError(f"cannot lock state directory {str(state_dir)!r}: {e.strerror}") from None
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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


def record_failure(state_dir: Path, error: str) -> None:
    """Put ``error`` into ``stats.json`` (its counters kept) for a shipper that cannot start, so that a
    crash-looping shipper shows as failing to the sidecar and its alerts instead of as a frozen file.
    Best effort: a state directory that cannot be written has already been said."""
    path = state_dir / STATS_FILE
    try:
        snap = orjson.loads(path.read_bytes())
        if not isinstance(snap, dict):
            snap = {}
    except (OSError, orjson.JSONDecodeError):
        snap = {}
    snap.update(sink_error=error, pid=os.getpid(), written_at=time.time())
    with contextlib.suppress(OSError):
        write_atomic(path, orjson.dumps(snap), durable=False)


@dataclass
class ShipperOptions:
    """What to ship and how: ``mlops-obs ship`` sets the globs, directories, batch size, line limit,
    poll interval and redaction from its settings; the other knobs are for tests and benchmarks."""

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
    """Ships the files ``options.sources`` name to ``sink``, checkpointed in ``options.state_dir``;
    counts into ``stats`` (the sink's counters too, when it was given the same object)."""

    def __init__(
        self,
        options: ShipperOptions,
        sink: Sink,
        log: FilteringBoundLogger | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.opts = options
        self.sink = sink
        self.log = log
        self.stats = stats if stats is not None else Stats()
        self.node = node_name()
        self.stop_event = threading.Event()
        self.state_dir = Path(options.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_state_dir(self.state_dir)
        self.once = False
        self.files = FileFollower(
            options.sources,
            state_dir=self.state_dir,
            exclude=options.exclude,
            node=self.node,
            redact=options.redact,
            scan_interval=options.scan_interval,
            read_chunk=options.read_chunk,
            forget_after=options.forget_after,
            copy_grace=options.copy_grace,
            log=log,
        )
        self.reader = BatchReader(self.files, self.stats, batch_events=options.batch_events,
                                  batch_bytes=options.batch_bytes, max_line_bytes=options.max_line_bytes)  # fmt: skip
        self._last_stats = 0.0
        self._stats_lock = threading.Lock()
        self._checkpoint_error: str | None = None
        self._send_error: str | None = None  # a send retrying without an error of the sink's own in stats
        try:
            self._load_state()
        except BaseException:
            self.files.close()
            os.close(self._lock_fd)
            raise

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
                self.files.states[st.fid] = st
        except (orjson.JSONDecodeError, TypeError, AttributeError) as e:
            raise ValueError(f"checkpoint {path} is unreadable ({e}); move it away to re-ship from the start") from None
        stats = data.get("stats") or {}
        self.stats.lines_read = int(stats.get("lines_read_total", 0))
        self.stats.events_shipped = int(stats.get("events_shipped_total", 0))
        self.stats.retries = int(stats.get("retries_total", 0))
        self.stats.dead_letters = int(stats.get("dead_letters_total", 0))
        self.stats.lines_split = int(stats.get("lines_split_total", 0))
        last = stats.get("last_success_timestamp_seconds")
        if isinstance(last, int | float) and self.stats.last_success is None:
            self.stats.last_success = float(last)

    def _checkpoint(self) -> None:
        """Persist the checkpoint; on failure (disk full) keep retrying, never moving on without it.

        Moving on would be safe for delivery (the sink is idempotent) but would let the checkpoint
        fall arbitrarily behind; stopping here keeps "bytes behind" honest and bounded.
        """
        s = self.stats
        data = orjson.dumps(
            {
                "version": 1,
                "files": [st.to_json() for st in self.files.states.values()],
                "stats": {
                    "lines_read_total": s.lines_read,
                    "events_shipped_total": s.events_shipped,
                    "retries_total": s.retries,
                    "dead_letters_total": s.dead_letters,
                    "lines_split_total": s.lines_split,
                    "last_success_timestamp_seconds": s.last_success,
                },
            }
        )
        delay = 0.05
        give_up = time.monotonic() + ONCE_CHECKPOINT_PATIENCE
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
                if self.once and time.monotonic() >= give_up:
                    raise CheckpointError(
                        e.errno, f"cannot write the checkpoint in {str(self.state_dir)!r}: {why}"
                    ) from None
                if self.stop_event.wait(delay):
                    raise Stop() from None
                delay = min(delay * 2, 2.0)

    def _write_stats(self, force: bool = False, error: str | None = None) -> None:
        """``stats.json`` for the sidecar, at most once a :data:`STATS_INTERVAL` unless ``force``d.

        ``sink_error`` in it is what keeps the shipper from moving on: ``error`` (a fatal one, given
        on the way out), the checkpoint's, or the sink's while it retries.
        """
        with self._stats_lock:
            now = time.monotonic()
            if not force and now - self._last_stats < STATS_INTERVAL:
                return
            self._last_stats = now
            self.stats.lag = self.files.lag()
            snap = self.stats.snapshot()
            snap["sink_error"] = error or self._checkpoint_error or self.stats.sink_error or self._send_error
            with contextlib.suppress(OSError):
                write_atomic(self.state_dir / STATS_FILE, orjson.dumps(snap), durable=False)

    def _send(self, events: Any) -> None:
        """``sink.send`` with ``stats.json`` kept current while it blocks: a sink retries for as long
        as it takes, and a frozen stats file would hide exactly that from the alerts (the lag grows,
        the last success ages, the sink's error is named)."""
        done = threading.Event()
        retries, since = self.stats.retries, time.time()

        def beat() -> None:
            while not done.wait(STATS_INTERVAL):
                if self.stats.retries > retries:  # a sink that counts retries but names no error (OpenSearch)
                    n = self.stats.retries - retries
                    self._send_error = f"sink retrying: {n} retries of one batch since {format_timestamp(since)}"
                self._write_stats()

        beater = threading.Thread(target=beat, name="shipper-stats", daemon=True)
        beater.start()
        try:
            self.sink.send(events, self.stop_event)
        finally:
            done.set()
            beater.join()
        self._send_error = None

    def _say(self, level: str, msg: str, **kw: Any) -> None:
        say(self.log, level, msg, **kw)

    # --- the loop ---

    def step(self) -> int:
        """Read one batch, ship it, checkpoint; returns how many events were shipped (0: idle)."""
        dirty = False
        if self.files.scan_if_due():  # new files' ids and first-seen times are durable before their first batch
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
            events, moved = self.reader.read()
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
                self._send(events)
                FAULTS.hit("acked")
                self.stats.events_shipped += n
                self.stats.last_success = time.time()
        finally:
            del events
            if frozen:
                gc.unfreeze()
        opened = self.files.open
        for fid, (pos, last_ts, part) in moved.items():
            tf = opened.get(fid)
            if tf is None:
                continue
            tf.mark(pos)
            tf.state.last_ts, tf.state.part = last_ts, part
            dirty = True
        for tf in opened.values():
            tf.compact()
            if len(tf.buf) > self.opts.keep_buffer:
                # Bounded memory with many files: unread bytes go back to the page cache, not the heap.
                tf.buf, tf.buf_start = b"", tf.read_pos
        if dirty:
            self._checkpoint()
        self._write_stats()
        return n

    def run(self, once: bool = False) -> None:
        """Follow the sources until stopped; with ``once``, until everything present now is shipped.

        Errors that waiting does not mend (a damaged store, ``--once`` without a writable checkpoint)
        are raised, after ``stats.json`` says so."""
        self.reader.flush_at_eof = once
        self.once = once
        error: str | None = None
        try:
            if once:
                while not self.stop_event.is_set():
                    if self.step() == 0 and self.files.all_read():
                        break
            else:
                while not self.stop_event.is_set():
                    if self.step() == 0:
                        self.stop_event.wait(self.opts.poll_interval)
        except Stop:
            pass
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._write_stats(force=True, error=error)

    def close(self) -> None:
        self.files.close()
        self.sink.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
