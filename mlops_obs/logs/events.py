"""Turning the lines of one log file into events of the schema (see :mod:`mlops_obs.logs.sink`).

:class:`LineParser` holds one file's parsing state and is fed its lines in order with their byte
offsets. What a line is (CRI, Docker, a JSON record, raw text), where its time comes from and which
lines make one event is :mod:`mlops_obs.logs.parse`; this module maps that to events:

- a JSON record maps field by field (``ts`` -> ``@timestamp``, ``event`` -> ``message``, ``kind``
  ``launcher`` or ``stack`` -> the event's kind), normalised so it is storable whatever it holds;
- text (raw lines, CRI and Docker payloads) keeps its words, redacted, with a level inferred from them
  and the rank torch's ``[rankN]:`` prefix names; CRI ``P`` pieces and Docker partial lines are
  joined; a traceback, a ``[rankN]:`` block, an NCCL ``WARN`` block or a faulthandler dump is one event;
- in a stack file (``<job>-rank<R>.stack``, the workload's) each dump is one ``kind="stack"`` event:
  the launcher's request line, faulthandler's text of every thread, the rank's trailer with the
  flight recorder's state.

Every event's ``_id`` is the file's id and the byte offset of its first line, never its content, so
identical lines stay two events and a re-read after a crash is the same event. A multi-line event is
*pending* until a line that does not continue it arrives, or :meth:`LineParser.flush` ends it (the file
went idle, or reached its end in a ``--once`` run): :attr:`LineParser.pending_offset` is where a
checkpoint must stay until then, so a restart re-reads the whole event.

Times (``fields.ts_source``, see :mod:`~mlops_obs.logs.parse`): a record's own time (``ts_source``
absent), else the line's (``record``, ``cri``, ``docker``, ``line``), else the time the follower first
read the line while tailing the file (``followed``), else the last time a line of the file carried
(``neighbour``), else the file's modification time (``mtime``). Never the time of shipping.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from mlops_obs.logs.parse import (
    STACK_REQUEST_EVENT,
    STACK_TRAILER_EVENT,
    Block,
    canonical_time,
    decode,
    line_level,
    line_time,
    rank_prefix,
    read_line,
    record_kind,
)
from mlops_obs.logs.redact import MAX_DEPTH, plain_value, redact_record, redact_text
from mlops_obs.logs.sink import ParsedEvents

_LEVEL_ALIASES = {"warn": "warning", "err": "error", "fatal": "critical", "crit": "critical", "trace": "debug",
                  "notice": "info", "information": "info"}  # fmt: skip
_KNOWN_LEVELS = frozenset(("debug", "info", "warning", "error", "critical"))
_TS_KEYS = ("ts", "@timestamp", "timestamp", "time", "asctime")
_MSG_KEYS = ("event", "message", "msg")
_LEVEL_KEYS = ("level", "levelname", "severity")
_PATH_JOB_RANK = re.compile(r"(?P<job>[^/]+?)-rank(?P<rank>\d+)(?:\.[^/]*)?$")
_STACK_PATH = re.compile(r"\.stack(?:\.[^/]*)?$")
_INT64 = 1 << 63
MAX_JOINED_BYTES = 1 << 20
"""A line joined from CRI/Docker pieces is shipped in parts of this size (flagged ``split``)."""
_INVALID_CHARS = 200


def normalize_level(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip().lower()
    return _LEVEL_ALIASES.get(s, s) or None


def job_rank_from_path(path: str) -> tuple[str | None, int | None]:
    """``<job>-rank<R>.jsonl`` / ``.log`` / ``.stack`` (the workload's names, rotated or not)."""
    m = _PATH_JOB_RANK.search(path)
    if not m:
        return None, None
    return m.group("job"), int(m.group("rank"))


def _int_or_none(value: Any) -> int | None:
    """An integer the store's integer columns take, from an int or a numeric string; else None."""
    if type(value) is int:
        return value if -_INT64 <= value < _INT64 else None
    if isinstance(value, str) and len(value) <= 20:
        try:
            n = int(value)
        except ValueError:
            return None
        return n if -_INT64 <= n < _INT64 else None
    return None


def _text_of(value: Any) -> str:
    return value if type(value) is str else orjson.dumps(plain_value(value)).decode()


@dataclass
class _Pending:
    """Lines held until their event is complete: CRI/Docker pieces, a block, or a stack dump."""

    offset: int
    ts: str
    ts_source: str
    fields: dict[str, Any] = field(default_factory=dict)
    pieces: list[bytes] = field(default_factory=list)  # CRI/Docker pieces of one line
    size: int = 0
    stream: str | None = None
    fmt: str = "raw"
    block: Block | None = None
    request: dict[str, Any] | None = None  # a stack dump's request record
    text: list[str] = field(default_factory=list)  # a stack dump's faulthandler lines


class LineParser:
    """One file's parsing state: its source, fingerprint id, job and rank, times, pending lines."""

    def __init__(self, source: str, fid: str, last_ts: str, *, redact: bool = True, node: str | None = None) -> None:
        self.source = source
        self.node = node
        self.fid = fid
        self.last_ts = last_ts  # the time the last line that carried one carried ("" when none yet)
        self.redact = redact
        self.job, self.rank = job_rank_from_path(source)
        self.stack_file = bool(_STACK_PATH.search(source))
        self.mtime = ""  # the file's modification time, as the follower last saw it
        self._live: list[tuple[int, str]] = []  # (offset, time): bytes from there on were read as written
        self._partial: _Pending | None = None
        self._block: _Pending | None = None
        self._dump: _Pending | None = None
        self._held_ts = last_ts  # ``last_ts`` as of the earliest pending line

    # --- what the follower tells and asks -----------------------------------------------------------

    def note_read(self, offset: int, now: str, live: bool, mtime: str) -> None:
        """Bytes from ``offset`` on were read at ``now``; ``live``: the file had been read to its end
        before, so they were written since the previous read (within a poll of ``now``)."""
        if mtime:
            self.mtime = mtime
        if live:
            if self._live and self._live[-1][0] >= offset:
                self._live = [x for x in self._live if x[0] < offset]
            self._live.append((offset, now))
        elif self._live and self._live[-1][1] != "":
            self._live.append((offset, ""))  # a backlog again (the reader fell behind)
        if len(self._live) > 4096:
            del self._live[:2048]

    @property
    def pending_offset(self) -> int | None:
        """The offset of the earliest line held for an incomplete event (the checkpoint stays there)."""
        offs = [p.offset for p in (self._partial, self._block, self._dump) if p is not None]
        return min(offs) if offs else None

    @property
    def checkpoint_ts(self) -> str:
        """``last_ts`` as it was at :attr:`pending_offset` (what a restart from there must start with)."""
        return self._held_ts if self.pending_offset is not None else self.last_ts

    def _followed(self, offset: int) -> str | None:
        live = self._live
        if not live:
            return None
        i = bisect.bisect_right(live, (offset, "\uffff")) - 1
        return live[i][1] or None if i >= 0 else None

    def _time(self, offset: int) -> tuple[str, str]:
        """(time, ts_source) for a line at ``offset`` that carries no time of its own."""
        t = self._followed(offset)
        if t:
            return t, "followed"
        if self.last_ts:
            return self.last_ts, "neighbour"
        return self.mtime or "1970-01-01T00:00:00.000000Z", "mtime"

    def _hold(self) -> None:
        if self.pending_offset is None:
            self._held_ts = self.last_ts

    # --- feeding lines ------------------------------------------------------------------------------

    def feed(self, line: bytes, offset: int, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The events complete once ``line`` (no newline; CR stripped) at ``offset`` is read: zero, one,
        or several (a pending event this line ends, then this line's own)."""
        if extra:  # a part of an over-long line, or a last line without its newline: shipped as it is
            out = self.flush()
            text, bad = decode(line)
            own = dict(extra)
            if bad:
                own["invalid_utf8"] = True
            ts = line_time(text)
            ts, src = (ts, "line") if ts else self._time(offset)
            out.append(self._text_event(text, offset, ts, src, own, line_level(text)))
            return out
        parsed = read_line(line)
        if self.stack_file:
            return self._stack_line(parsed.record, line, offset)
        if parsed.fmt == "json":
            out = self.flush()
            assert parsed.record is not None
            out.append(
                self._record(parsed.record, offset, line, extra={"invalid_utf8": True} if parsed.invalid_utf8 else None)
            )
            return out
        if parsed.fmt == "raw":
            out = self._end_partial() if self._partial is not None else []
            text, bad = decode(line)
            ts = line_time(text)
            fields: dict[str, Any] = {"invalid_utf8": True} if bad else {}
            return out + self._text(text, offset, ts, "line" if ts else None, None, fields)
        return self._enveloped(parsed, offset)

    def flush(self) -> list[dict[str, Any]]:
        """End whatever is pending (the file went idle or was read to its end): its events."""
        out: list[dict[str, Any]] = []
        if self._partial is not None:
            out += self._end_partial()
        if self._block is not None:
            out += self._end_block()
        if self._dump is not None:
            out += self._end_dump()
        return out

    def parse(self, line: bytes, offset: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The one event of a single line on its own (no joining with other lines): for tools and tests."""
        saved = (self._partial, self._block, self._dump)
        self._partial = self._block = self._dump = None
        try:
            got = self.feed(line, offset, extra) + self.flush()
        finally:
            self._partial, self._block, self._dump = saved
        return got[0] if got else self._text_event("", offset, *self._time(offset), {}, "info")

    # --- enveloped text: CRI and Docker ---------------------------------------------------------------

    def _enveloped(self, parsed: Any, offset: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        env_src = parsed.fmt  # cri | docker
        p = self._partial
        if p is not None and p.stream != parsed.stream:
            out += self._end_partial()
            p = None
        if parsed.partial:
            if p is None:
                if parsed.ts is None:
                    ts, src = self._time(offset)
                else:
                    ts, src = parsed.ts, env_src
                self._hold()
                p = self._partial = _Pending(offset, ts, src, stream=parsed.stream, fmt=parsed.fmt)
            p.pieces.append(parsed.payload)
            p.size += len(parsed.payload)
            if p.size >= MAX_JOINED_BYTES:
                out += self._end_partial(split=True)
            return out
        payload = parsed.payload
        record = parsed.record
        if p is not None:  # the last piece of a joined line: the line is timed by its first piece
            p.pieces.append(payload)
            payload = b"".join(p.pieces)
            self._partial = None
            offset, ts, src = p.offset, p.ts, p.ts_source
            record = None
            if payload[:1] == b"{":
                rl = read_line(payload)
                record = rl.record if rl.fmt == "json" else None
        elif parsed.ts is not None:
            ts, src = parsed.ts, env_src
        else:
            ts, src = self._time(offset)
        fields: dict[str, Any] = {"stream": parsed.stream}
        if parsed.envelope_ts_invalid is not None:
            fields["ts_invalid"] = parsed.envelope_ts_invalid
        if record is not None:
            out += self._end_block() if self._block is not None else []
            out.append(self._record(record, offset, payload, fallback=(ts, src), extra=fields))
            return out
        text, bad = decode(payload)
        if bad:
            fields["invalid_utf8"] = True
        return out + self._text(text, offset, ts, src, parsed.stream, fields)

    def _end_partial(self, split: bool = False) -> list[dict[str, Any]]:
        """Ship the pieces held as one line: a piece cut at the size cap (``split``), or a line whose
        ``F`` never came (the other stream interleaved, the file ended)."""
        p = self._partial
        assert p is not None
        self._partial = None
        text, bad = decode(b"".join(p.pieces))
        fields: dict[str, Any] = {"stream": p.stream, ("split" if split else "partial"): True}
        if bad:
            fields["invalid_utf8"] = True
        return [self._text_event(text, p.offset, p.ts, p.ts_source, fields, line_level(text))]

    # --- text and blocks ----------------------------------------------------------------------------

    def _text(
        self, text: str, offset: int, ts: str | None, src: str | None, stream: str | None, fields: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """A logical line of text: it continues the pending block, opens one, or is an event."""
        out: list[dict[str, Any]] = []
        b = self._block
        if b is not None:
            assert b.block is not None
            if b.block.accepts(text, stream, ts if src in ("cri", "docker", "line") else None):
                b.block.add(text, ts if src in ("cri", "docker", "line") else None)
                if fields.get("invalid_utf8"):
                    b.fields["invalid_utf8"] = True
                return out
            out += self._end_block()
        if ts is None or src is None:
            ts, src = self._time(offset)
        elif src in ("cri", "docker", "line"):
            self.last_ts = ts
        block = Block.start(text, stream, ts if src in ("cri", "docker", "line") else None)
        if block is not None:
            self._hold()
            self._block = _Pending(offset, ts, src, fields=fields, block=block, stream=stream)
            return out
        if not text.strip():
            return out  # a blank line says nothing (the shipper skips empty lines too)
        out.append(self._text_event(text, offset, ts, src, fields, line_level(text)))
        return out

    def _end_block(self) -> list[dict[str, Any]]:
        p = self._block
        assert p is not None and p.block is not None
        self._block = None
        b = p.block
        fields = dict(p.fields)
        fields["lines"] = len(b.lines) - b.trailing_blanks
        fields["block"] = b.kind
        return [self._text_event(b.text(), p.offset, p.ts, p.ts_source, fields, b.level, rank=b.rank)]

    def _text_event(
        self, text: str, offset: int, ts: str, src: str, fields: dict[str, Any], level: str, rank: int | None = None
    ) -> dict[str, Any]:
        if self.redact:
            text = redact_text(text)
        fields["raw"] = True
        fields["ts_source"] = src
        if rank is None:
            rank = rank_prefix(text)
        return {
            "_id": f"{self.fid}-{offset}",
            "@timestamp": ts,
            "kind": "log",
            "job": self.job,
            "rank": self.rank if rank is None else rank,
            "node": self.node,
            "level": level,
            "message": text,
            "seq": None,
            "source": self.source,
            "offset": offset,
            "fields": fields,
        }

    # --- JSON records -------------------------------------------------------------------------------

    def _record(
        self,
        rec: dict[str, Any],
        offset: int,
        line: bytes,
        fallback: tuple[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if line.count(b"{") + line.count(b"[") >= MAX_DEPTH:  # only then can it be too deep (a cheap bound)
            rec = plain_value(rec)
        pop = rec.pop
        ev = self._finish(rec, offset, pop("ts", None), pop("event", None), pop("level", None),
                          pop("rank", self.rank), pop("seq", None), fallback)  # fmt: skip
        if extra:
            for k, v in extra.items():
                ev["fields"].setdefault(k, v)
        return ev

    def json_lines(self, lines: list[bytes], offsets: Iterable[int], out: ParsedEvents, *, nested: bool = True) -> int:
        """Events for the leading run of ``lines`` that are JSON objects (at ``offsets``), added to
        ``out``; returns how many lines were taken (the first other line stops the run).

        The shipper's hot path: the per-file values are read once, each line is parsed and mapped
        while its record is still in the CPU cache, straight into the batch's columns, and a record
        in the job-side logger's own shape (canonical ``ts``, string ``event``, a known ``level``,
        integer or absent ``rank``, an integer ``seq``, no ``kind``: redacted when it was written) is
        mapped inline; any other record takes :meth:`_finish`, which redacts it as another program's
        record, so the events are those of :meth:`feed` either way. A stack file, or pending
        pieces of a CRI line, take the line-at-a-time path. ``nested=False`` is the caller's word that
        no line holds :data:`MAX_DEPTH` ``{`` and ``[`` (it counted them over the whole run at once).
        """
        if self.stack_file or self._partial is not None:
            return 0
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        job0, rank0, node0 = self.job, self.rank, self.node
        known = _KNOWN_LEVELS
        finish = self._finish
        add_ts, add_job, add_rank, add_node = out.tss.append, out.jobs.append, out.ranks.append, out.nodes.append
        add_level, add_msg, add_seq = out.levels.append, out.msgs.append, out.seqs.append
        add_off, add_fields = out.offs.append, out.fields.append
        last_ts = self.last_ts
        taken = 0
        count = bytes.count
        lim = _INT64  # orjson decodes integers up to 2**64 - 1 and down to -2**63: only the top is out of range
        held = self._block is not None
        for line, offset in zip(lines, offsets):
            if line[0] != 123:  # "{" (the caller passes no empty line)
                break
            try:
                rec = loads(line)
            except decode_error:
                break
            if type(rec) is not dict or ("log" in rec and "stream" in rec and "time" in rec and len(rec) <= 4):
                break  # not a record, or Docker's envelope
            if held:  # a block this record ends
                held = False
                for ev in self.flush():
                    out.append(ev)
            taken += 1
            if nested and count(line, b"{") + count(line, b"[") >= MAX_DEPTH:
                rec = plain_value(rec)
            pop = rec.pop
            ts, msg, level = pop("ts", None), pop("event", None), pop("level", None)
            rank, seq = pop("rank", rank0), pop("seq", None)
            if (
                type(ts) is str
                and len(ts) == 27
                and ts[26] == "Z"
                and type(msg) is str
                and type(level) is str
                and level in known
                and (rank is None or (type(rank) is int and rank < lim))
                and type(seq) is int
                and seq < lim
                and "kind" not in rec
            ):
                last_ts = ts
                add_ts(ts)
                add_job(pop("job", job0))
                add_rank(rank)
                add_node(pop("node", node0))
                add_level(level)
                add_msg(msg)
                add_seq(seq)
                add_off(offset)
                add_fields(rec)
            else:
                self.last_ts = last_ts
                out.append(finish(rec, offset, ts, msg, level, rank, seq))
                last_ts = self.last_ts
        self.last_ts = last_ts
        return taken

    def _finish(
        self,
        rec: dict[str, Any],
        offset: int,
        ts_raw: Any,
        msg: Any,
        level: Any,
        rank: Any,
        seq: Any,
        fallback: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """The event for ``rec`` once its main keys were popped (``None`` where absent). ``fallback``:
        the time its envelope gives (a record inside a CRI or Docker line). A record not in our
        logger's shape is another program's: redacted here, keys and values, as our logger would have."""
        if self.redact:
            rec = redact_record(rec)
            if msg is not None:
                msg = redact_text(_text_of(msg))
        pop = rec.pop
        if ts_raw is None:
            ts_raw = next((pop(k) for k in _TS_KEYS if k in rec), None)
        src = None  # the record's own time
        ts = canonical_time(ts_raw) if ts_raw is not None else None
        if ts is not None:
            self.last_ts = ts
            if fallback is not None:
                src = "record"
        else:
            if ts_raw is not None:
                rec["ts_invalid"] = _text_of(ts_raw)[:_INVALID_CHARS]
            ts, src = fallback if fallback is not None else self._time(offset)
        if src is not None:
            rec["ts_source"] = src
        kind = record_kind(rec)
        if kind is not None:
            del rec["kind"]
        else:
            kind = "log"
        if msg is None:
            msg = next((pop(k) for k in _MSG_KEYS if k in rec), "")
        if level is None:
            level = next((pop(k) for k in _LEVEL_KEYS if k in rec), None)
        if level is not None and (type(level) is not str or level not in _KNOWN_LEVELS):
            level = normalize_level(_text_of(level)[:_INVALID_CHARS])
        if rank is not None and not (type(rank) is int and -_INT64 <= rank < _INT64):
            n = _int_or_none(rank)
            if n is None:
                rec["rank_invalid"] = _text_of(rank)[:_INVALID_CHARS]
            rank = n
        if seq is not None and (type(seq) is not int or not -_INT64 <= seq < _INT64):
            rec["seq_invalid"] = _text_of(seq)[:_INVALID_CHARS]
            seq = None
        job, node = pop("job", self.job), pop("node", self.node)
        return {
            "_id": f"{self.fid}-{offset}",
            "@timestamp": ts,
            "kind": kind,
            "job": job if job is None or type(job) is str else _text_of(job),
            "rank": rank,
            "node": node if node is None or type(node) is str else _text_of(node),
            "level": level,
            "message": msg if type(msg) is str else _text_of(msg),
            "seq": seq,
            "source": self.source,
            "offset": offset,
            "fields": rec,
        }

    # --- stack files --------------------------------------------------------------------------------

    def _stack_line(self, rec: dict[str, Any] | None, line: bytes, offset: int) -> list[dict[str, Any]]:
        """A line of a stack file: a dump's request, its faulthandler text, its trailer, or a record."""
        event = rec.get("event") if rec is not None else None
        out: list[dict[str, Any]] = []
        if rec is not None and event == STACK_REQUEST_EVENT:
            out += self.flush()
            ts = canonical_time(rec.get("ts"))
            self._hold()
            self._dump = _Pending(offset, *(ts, "record") if ts else self._time(offset), request=rec)
            if ts:
                self.last_ts = ts
            return out
        if rec is not None and event == STACK_TRAILER_EVENT:
            if self._dump is None:
                self._hold()
                ts = canonical_time(rec.get("ts"))
                self._dump = _Pending(offset, *(ts, "record") if ts else self._time(offset))
            return out + self._end_dump(rec)
        if rec is not None:
            out += self.flush()
            out.append(self._record(rec, offset, line))
            return out
        text, _ = decode(line)
        if self._dump is None:
            if not text.strip():
                return out
            self._hold()
            self._dump = _Pending(offset, *self._time(offset))
        self._dump.text.append(text)
        self._dump.size += len(text) + 1
        if self._dump.size >= MAX_JOINED_BYTES:
            out += self._end_dump()
        return out

    def _end_dump(self, trailer: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        d = self._dump
        assert d is not None
        self._dump = None
        req = d.request or {}
        stack = "\n".join(d.text).strip("\n")
        threads = sum(1 for t in d.text if t.startswith(("Thread 0x", "Current thread 0x")))
        fields: dict[str, Any] = {"stack": redact_text(stack) if self.redact else stack, "threads": threads}
        if d.ts_source != "record":
            fields["ts_source"] = d.ts_source
        for key in ("reason", "pid"):
            if key in req:
                fields[key] = req[key]
        if trailer is not None:
            tts = canonical_time(trailer.get("ts"))
            if tts:
                fields["dumped_at"] = tts
                self.last_ts = tts
                if d.ts_source != "record":  # no request with a time: the trailer's dates the dump
                    d.ts, d.ts_source = tts, "record"
                    fields.pop("ts_source", None)
            for key, value in trailer.items():
                if key not in ("ts", "event", "rank"):
                    fields.setdefault(key, value)
        else:
            fields["incomplete"] = True
        rank = self.rank
        if rank is None:
            rank = _int_or_none(req.get("rank", (trailer or {}).get("rank")))
        reason = req.get("reason")
        return [{
            "_id": f"{self.fid}-{d.offset}",
            "@timestamp": d.ts,
            "kind": "stack",
            "job": self.job,
            "rank": rank,
            "node": self.node,
            "level": "info",
            "message": f"stack dump: {reason}" if isinstance(reason, str) and reason else "stack dump",
            "seq": None,
            "source": self.source,
            "offset": d.offset,
            "fields": plain_value(fields),
        }]  # fmt: skip
