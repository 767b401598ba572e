"""``replay --source GLOB``: events straight from log files, for when nothing was shipped.

Each file goes through the shipper's own parser (:class:`~mlops_obs.logs.events.LineParser`: CRI and
Docker envelopes, JSON records, multi-line tracebacks and ``[rankN]:`` blocks, ``ts_source``), line by
line as :mod:`mlops_obs.logs.batch` feeds it (CR stripped, empty lines skipped, over-long lines in
parts flagged ``split``, a last line without its newline flagged ``partial``), with the file id the
follower would give it, so an event has the ``_id`` it would have in a store. Lines without a time of
their own are timed by the earlier lines' or the file's modification time, as a backlog is.

Files are merged by time with ``heapq.merge``. A file is mostly in time order but not always (a line
timed by its neighbour, two processes' lines through one pipe), so each file's events pass a small
re-ordering buffer of :data:`REORDER` events first: order is exact within that reach, and memory is
bounded by it whatever the files' size.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import os
from collections.abc import Iterator, Sequence
from typing import Any

from mlops_obs.logs.events import LineParser
from mlops_obs.logs.sink import format_timestamp
from mlops_obs.logs.source import EventQuery
from mlops_obs.replay.timeline import merge, order_key

REORDER = 4096
"""Events of one file held to put them in time order before the merge."""
MAX_LINE_BYTES = 1 << 20
"""Longer lines are read in parts of this size, as ``ship``'s default ``--ship.max-line-bytes``."""
HEAD_MAX = 1024
READ_CHUNK = 1 << 20


def paths(patterns: Sequence[str]) -> list[str]:
    """The regular files the globs name, each once, sorted."""
    out: set[str] = set()
    for pattern in patterns:
        for p in glob.glob(os.path.expanduser(pattern), recursive=True):
            if os.path.isfile(p):
                out.add(p)
    return sorted(out)


def file_id(path: str, head: bytes) -> str:
    """The id the shipper's follower gives a new file (the hash of its first line and its path)."""
    return hashlib.sha1(head + b"\0" + path.encode()).hexdigest()[:20]


def _lines(f: Any) -> Iterator[tuple[bytes, int, dict[str, Any] | None]]:
    """(line, offset, extra) of a binary file as the shipper's reader cuts it."""
    buf = b""
    pos = 0  # offset of buf[0]
    part = 0
    while True:
        data = f.read(READ_CHUNK)
        if not data:
            break
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            end = nl if nl >= 0 else len(buf)
            if end - start > MAX_LINE_BYTES:
                yield buf[start : start + MAX_LINE_BYTES], pos + start, {"split": {"part": part, "last": False}}
                part += 1
                start += MAX_LINE_BYTES
                continue
            if nl < 0:
                break
            line = buf[start:nl]
            if line.endswith(b"\r"):
                line = line[:-1]
            if part:
                yield line, pos + start, {"split": {"part": part, "last": True}}
                part = 0
            elif line:
                yield line, pos + start, None
            start = nl + 1
        pos += start
        buf = buf[start:]
    if buf:
        yield buf, pos, {"partial": True}


def file_events(path: str, *, node: str | None = None, redact: bool = True) -> Iterator[dict[str, Any]]:
    """Every event of one file, in the file's order, as the shipper would store them."""
    with open(path, "rb") as f:
        head = f.read(HEAD_MAX)
        nl = head.find(b"\n")
        head = head[: nl + 1] if nl >= 0 else head
        mtime = format_timestamp(os.fstat(f.fileno()).st_mtime)
        f.seek(0)
        parser = LineParser(path, file_id(path, head), "", redact=redact, node=node)
        parser.note_read(0, "", False, mtime)
        for line, offset, extra in _lines(f):
            yield from parser.feed(line, offset, extra)
        yield from parser.flush()


def reordered(events: Iterator[dict[str, Any]], reach: int = REORDER) -> Iterator[dict[str, Any]]:
    """``events`` in timeline order where they are out of order by at most ``reach`` places."""
    held: list[tuple[tuple[str, str, int], int, dict[str, Any]]] = []
    for n, ev in enumerate(events):
        item = (order_key(ev), n, ev)
        if len(held) < reach:
            heapq.heappush(held, item)
        else:
            yield heapq.heappushpop(held, item)[2]
    while held:
        yield heapq.heappop(held)[2]


def file_timeline(patterns: Sequence[str], query: EventQuery, *, node: str | None = None) -> Iterator[dict[str, Any]]:
    """The events of the files ``patterns`` name that ``query`` selects, in timeline order."""
    streams = [(ev for ev in reordered(file_events(p, node=node)) if query.matches(ev)) for p in paths(patterns)]
    events = merge(*streams)
    if query.limit is not None:
        return (ev for _, ev in zip(range(query.limit), events, strict=False))
    return events
