"""Reading one batch of events from the followed files: whole lines only (a line without its newline
is waited for), a line over ``max_line_bytes`` in parts flagged ``split``, at most ``batch_events``
events and about ``batch_bytes`` bytes, shared round-robin across files. It reads from the buffers
of :class:`~mlops_obs.logs.follow.TrackedFile` and moves only their read positions; the shipper
moves the checkpointed offsets once the sink acknowledged the batch.

CRLF is stripped, empty lines are skipped (their bytes still count as read), and a last line left
without its newline when its file is no longer followed is shipped flagged ``partial``. Lines the
parser holds for an event not complete yet (a traceback still being written) keep the checkpoint at
their first line; the parser ends that event when the file goes quiet for :data:`IDLE_FLUSH`
seconds, is no longer followed, or (``--once``) reaches its end.
"""

from __future__ import annotations

import bisect
import itertools
import time
from typing import Any

from mlops_obs.logs.follow import FileFollower, TrackedFile
from mlops_obs.logs.redact import MAX_DEPTH
from mlops_obs.logs.sink import ParsedEvents, Stats

IDLE_FLUSH = 1.0
"""Seconds a file stays without new bytes before the event its last lines began (a traceback whose
end cannot be known until another line comes) is shipped as complete."""


def _extend(events: ParsedEvents, new: list[dict[str, Any]]) -> int:
    for ev in new:
        events.append(ev)
    return len(new)


class BatchReader:
    """Batches from the open files of ``files``, counting lines read and split into ``stats``."""

    def __init__(
        self, files: FileFollower, stats: Stats, *, batch_events: int, batch_bytes: int, max_line_bytes: int
    ) -> None:
        self.files = files
        self.stats = stats
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.max_line_bytes = max_line_bytes
        self.flush_at_eof = False  # end pending multi-line events at end of file (``--once``)

    def read(self) -> tuple[ParsedEvents, dict[str, tuple[int, str, int]]]:
        """Up to one batch of events across open files, round-robin; and each file's new read position.

        The events come as :class:`ParsedEvents` with one run per file, which spares the store
        re-deriving per event what is true of every line of a file (see there)."""
        events = ParsedEvents()
        nbytes = 0
        moved: dict[str, tuple[int, str, int]] = {}
        limit = self.max_line_bytes
        files = list(self.files.open.values())
        per_file = max(1, self.batch_events // max(1, len(files)))
        for tf in files:
            got = 0
            parser = tf.parser
            first = len(events)
            while got < per_file and len(events) < self.batch_events and nbytes < self.batch_bytes:
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
                    got += _extend(events, parser.feed(part, tf.read_pos, {"split": {"part": tf.part, "last": False}}))
                    tf.part += 1
                    self.stats.lines_split += tf.part == 1
                    tf.read_pos += limit
                    nbytes += limit
                    tf.compact()
                    continue
                if nl < 0:
                    pending = len(tf.buf) - start
                    if not self.files.fill(tf):
                        if tf.flush_partial and pending > 0:
                            tail = tf.buf[start:]
                            got += _extend(events, parser.feed(tail, tf.read_pos, {"partial": True}))
                            self.stats.lines_read += 1
                            tf.read_pos += len(tail)
                        if parser.pending_offset is not None and (
                            self.flush_at_eof or tf.flush_partial or time.monotonic() - tf.last_data >= IDLE_FLUSH
                        ):  # the file went quiet: whatever it holds is complete
                            got += _extend(events, parser.flush())
                        tf.flush_partial = False
                        break
                    continue
                line = tf.buf[start:nl]
                end = tf.read_pos + (nl - start) + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                self.stats.lines_read += 1
                if tf.part:
                    got += _extend(events, parser.feed(line, tf.read_pos, {"split": {"part": tf.part, "last": True}}))
                    tf.part = 0
                elif line:
                    got += _extend(events, parser.feed(line, tf.read_pos))
                nbytes += len(line)
                tf.read_pos = end
                if start > (1 << 20):
                    tf.compact()
            if len(events) > first:
                events.runs.append((parser.fid, parser.source, first, len(events)))
            # Lines held for an event not complete yet are not acknowledged: the checkpoint stays at
            # the first of them, so a restart reads the whole event again.
            held = parser.pending_offset
            pos, in_part = (tf.read_pos, tf.part) if held is None else (held, 0)
            if pos != tf.state.offset or parser.checkpoint_ts != tf.state.last_ts:
                moved[tf.state.fid] = (pos, parser.checkpoint_ts, in_part)
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
        limit = self.max_line_bytes
        last = buf.rfind(b"\n", start, start + (1 << 20))
        if last < 0:
            return None
        taken = self._read_json_run(tf, buf, start, last, events, got, per_file, nbytes)
        if taken is not None:
            return taken
        batch_events, batch_bytes = self.batch_events, self.batch_bytes
        feed = tf.parser.feed
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
                for ev in feed(line, pos):
                    append(ev)
                    got += 1
            nbytes += ln
            pos = end
        if not nlines:
            return None
        self.stats.lines_read += nlines
        tf.read_pos = pos
        if tf.read_pos - tf.buf_start > (1 << 20):
            tf.compact()
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
        room = min(per_file - got, self.batch_events - len(events))
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
        limit = self.max_line_bytes
        if max(lens) > limit:
            k = min(k, next(i for i, n in enumerate(lens) if n > limit))
        if not k:
            return None
        if k < len(lines):
            del lines[k:], lens[k:]
        size = sum(lens)
        if nbytes + size - lens[-1] >= self.batch_bytes:  # the byte limit stops it early
            m = bisect.bisect_left(list(itertools.accumulate(lens)), self.batch_bytes - nbytes) + 1
            del lines[m:], lens[m:]
            size = sum(lens)
        pos = tf.read_pos
        # A record nested MAX_DEPTH deep holds that many "{" and "[": counted over the block at once.
        nested = block.count(b"{") + block.count(b"[") - len(lines) >= MAX_DEPTH - 1
        offsets = itertools.accumulate(map((1).__add__, lens[:-1]), initial=pos)
        m = tf.parser.json_lines(lines, offsets, events, nested=nested)
        if not m:
            return None
        if m < len(lines):
            size = sum(lens[:m])
        self.stats.lines_read += m
        tf.read_pos = pos + size + m
        if tf.read_pos - tf.buf_start > (1 << 20):
            tf.compact()
        return got + m, nbytes + size
