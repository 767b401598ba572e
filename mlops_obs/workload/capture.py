"""A rank's stdout and stderr through pipes into one file, in the CRI container log format.

The kubelet's runtimes (containerd, CRI-O) write a container's output under ``/var/log/pods`` as::

    2026-01-02T03:04:05.123456789Z stderr F Traceback (most recent call last):

time (RFC 3339, UTC, nanoseconds), stream, tag and text, one record a line: ``F`` ends a line, ``P``
is a piece of a longer one that the following records continue. Writing the workload's output the
same way gives every line of a traceback, NCCL's prints and torch's ``[rankN]:`` blocks the time it
was written, and lets one parser read our files and real pod logs alike.

What this copies from containerd's ``redirectLogs``: a line is split into ``P`` records of
:data:`MAX_LINE` bytes (the kubelet's 16 KiB default) and ends with an ``F`` record of the rest; a
trailing ``\\r`` is dropped; a stream that ends without a newline leaves its last piece as ``P``.
What it adds: a piece of a line that stays incomplete for :data:`PARTIAL_FLUSH_SECONDS` (a progress
bar, a prompt, a rank that hung mid-line) is written as ``P`` then, so it is on disk whatever happens
to the launcher; the rest of the line follows as usual.

The rank must never wait for us: one thread a pipe only reads and appends (no parsing beyond the
newline split, one write per read), each pipe is enlarged to :data:`PIPE_BYTES` where the kernel allows,
and a write that fails (a full disk) drops that output, counted, instead of ever stopping the read:
a pipe nobody reads blocks the rank at its next print. Both threads of a rank append whole records
with one ``write`` each on an ``O_APPEND`` descriptor, so the two streams interleave by record, as
the kubelet's file does. Threads end at end of file, so whatever a rank wrote before it died is in
the file (the pipe outlives its writer until drained).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import select
import threading
import time
from pathlib import Path

MAX_LINE = 16 * 1024
"""Bytes of text in one record, as the kubelet's ``containerLogMaxLineSize`` default."""
READ_BYTES = 256 * 1024
PIPE_BYTES = 1 << 20
"""Pipe capacity asked for (Linux's default ``pipe-max-size`` for an unprivileged process)."""
PARTIAL_FLUSH_SECONDS = 1.0

STREAMS = (b"stdout", b"stderr")


class _Clock:
    """``YYYY-mm-ddTHH:MM:SS.`` cached per second; the nanoseconds appended per call."""

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = b""

    def stamp(self, ns: int) -> bytes:
        sec, frac = divmod(ns, 1_000_000_000)
        if sec != self._sec:
            self._prefix = _dt.datetime.fromtimestamp(sec, tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.").encode()
            self._sec = sec
        return b"%s%09dZ" % (self._prefix, frac)


def cri_records(ts: bytes, stream: bytes, lines: list[bytes], last_partial: bytes = b"") -> bytes:
    """CRI records for complete ``lines`` (no newline) and, when given, a trailing partial piece."""
    out: list[bytes] = []
    head_f = b"%s %s F " % (ts, stream)
    head_p = b"%s %s P " % (ts, stream)
    for line in lines:
        if line[-1:] == b"\r":
            line = line[:-1]
        while len(line) > MAX_LINE:
            out.append(head_p + line[:MAX_LINE] + b"\n")
            line = line[MAX_LINE:]
        out.append(head_f + line + b"\n")
    if last_partial:
        while last_partial:
            out.append(head_p + last_partial[:MAX_LINE] + b"\n")
            last_partial = last_partial[MAX_LINE:]
    return b"".join(out)


class OutputFile:
    """One rank's log file, appended to by its stream threads; write failures are counted, not raised."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.lost_bytes = 0
        self.error: str | None = None
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.fd, view)
                except OSError as e:
                    self.lost_bytes += len(view)
                    self.error = e.strerror or str(e)
                    return
                view = view[n:]

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class StreamReader(threading.Thread):
    """Reads one pipe to end of file, appending CRI records to ``out``."""

    def __init__(self, fd: int, stream: bytes, out: OutputFile, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.fd = fd
        self.stream = stream
        self.out = out
        self.clock = _Clock()
        self.read_bytes = 0
        enlarge_pipe(fd)

    def run(self) -> None:
        fd, stream, out, clock = self.fd, self.stream, self.out, self.clock
        pending = b""
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            while True:
                if pending and not poller.poll(PARTIAL_FLUSH_SECONDS * 1000):
                    out.write(cri_records(clock.stamp(time.time_ns()), stream, [], pending))
                    pending = b""
                    continue
                try:
                    chunk = os.read(fd, READ_BYTES)
                except OSError:
                    break
                if not chunk:
                    break
                self.read_bytes += len(chunk)
                ts = clock.stamp(time.time_ns())
                if b"\n" not in chunk:
                    pending += chunk
                    if len(pending) > MAX_LINE:
                        cut = len(pending) - len(pending) % MAX_LINE
                        if cut == len(pending):
                            cut -= MAX_LINE  # keep the last full piece: its line may end exactly there
                        out.write(cri_records(ts, stream, [], pending[:cut]))
                        pending = pending[cut:]
                    continue
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                extra = b""
                if len(pending) > MAX_LINE:
                    cut = len(pending) - len(pending) % MAX_LINE
                    if cut == len(pending):
                        cut -= MAX_LINE
                    extra, pending = pending[:cut], pending[cut:]
                out.write(cri_records(ts, stream, lines, extra))
            if pending:
                out.write(cri_records(clock.stamp(time.time_ns()), stream, [], pending))
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


def enlarge_pipe(fd: int, size: int = PIPE_BYTES) -> None:
    """Ask for a larger pipe buffer, so a burst of output never waits for the reader; best effort."""
    setsz = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsz is None:
        return
    try:
        fcntl.fcntl(fd, setsz, size)
    except OSError:
        pass


class RankOutput:
    """A rank's two pipes (read ends) copied into ``file`` by one thread each."""

    def __init__(self, file: OutputFile, stdout_fd: int, stderr_fd: int, label: str) -> None:
        self.file = file
        self.readers = [
            StreamReader(stdout_fd, b"stdout", self.file, f"{label}-stdout"),
            StreamReader(stderr_fd, b"stderr", self.file, f"{label}-stderr"),
        ]
        for r in self.readers:
            r.start()

    def join(self, timeout: float) -> bool:
        """Wait until both pipes reached end of file (at most ``timeout`` s); whether they did."""
        deadline = time.monotonic() + timeout
        for r in self.readers:
            r.join(max(0.0, deadline - time.monotonic()))
        done = not any(r.is_alive() for r in self.readers)
        if done:
            self.file.close()
        return done
