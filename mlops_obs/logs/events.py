"""Turning one line of a log file into one event of the schema (see :mod:`mlops_obs.logs.sink`).

JSON lines from the job-side logger map field by field (``ts`` -> ``@timestamp``, ``event`` ->
``message``...). Anything else (NCCL's own prints, Python tracebacks on stderr, a torn or non-UTF-8
line) is kept as raw text with a level inferred from its words, because those lines are often the
only evidence of how a rank died. Nothing here depends on the content for identity: ``_id`` is the
file's fingerprint id and the byte offset, so identical lines stay two events.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

from mlops_obs.logs.redact import redact_text
from mlops_obs.logs.sink import ParsedEvents, format_timestamp

_LEVEL_ALIASES = {"warn": "warning", "err": "error", "fatal": "critical", "crit": "critical", "trace": "debug",
                  "notice": "info", "information": "info"}  # fmt: skip
_KNOWN_LEVELS = frozenset(("debug", "info", "warning", "error", "critical"))
_TS_KEYS = ("ts", "@timestamp", "timestamp", "time", "asctime")
_MSG_KEYS = ("event", "message", "msg")
_LEVEL_KEYS = ("level", "levelname", "severity")
_RAW_LEVEL = re.compile(
    r"\b(?:(?P<critical>CRITICAL|FATAL|Fatal|PANIC)|(?P<error>ERROR|Error|Exception|Traceback|Segmentation fault)"
    r"|(?P<warning>WARNING|WARN|Warning)|(?P<debug>DEBUG|TRACE))\b"
)
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")
_PATH_JOB_RANK = re.compile(r"(?P<job>[^/]+?)-rank(?P<rank>\d+)(?:\.[^/]*)?$")


def normalize_level(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip().lower()
    return _LEVEL_ALIASES.get(s, s) or None


def infer_level(text: str, in_traceback: bool) -> tuple[str, bool]:
    """Level of a raw line and whether a Python traceback continues after it."""
    if text.startswith("Traceback (most recent call last)"):
        return "error", True
    if in_traceback and (
        text[:1] in (" ", "\t")
        or _EXC_LINE.match(text)
        or text.startswith(("During handling", "The above exception"))
        or not text.strip()
    ):
        return "error", not bool(_EXC_LINE.match(text))
    if _EXC_LINE.match(text):
        return "error", False
    m = _RAW_LEVEL.search(text)
    if m:
        return str(m.lastgroup), False
    return "info", False


def job_rank_from_path(path: str) -> tuple[str | None, int | None]:
    """``<job>-rank<R>.jsonl`` / ``<job>-rank<R>.stderr.log`` (the workload's names, rotated or not)."""
    m = _PATH_JOB_RANK.search(path)
    if not m:
        return None, None
    return m.group("job"), int(m.group("rank"))


class LineParser:
    """Per-file parsing state: the source, its fingerprint id, the last timestamp, traceback context.

    Raw lines carry no timestamp of their own; they get the last structured timestamp seen in the
    same file (or the time the file was first seen). That is deterministic from the checkpoint, so a
    line re-read after a crash gets the same ``@timestamp`` and lands in the same daily index.
    """

    def __init__(self, source: str, fid: str, last_ts: str, *, redact: bool = True, node: str | None = None) -> None:
        self.source = source
        self.node = node
        self.fid = fid
        self.last_ts = last_ts
        self.redact = redact
        self.in_traceback = False
        self.job, self.rank = job_rank_from_path(source)

    def parse(self, line: bytes, offset: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """One event for ``line`` (no trailing newline; CR stripped by the caller) at ``offset``."""
        rec: Any = None
        if line[:1] == b"{" and not extra:
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                rec = None
        if isinstance(rec, dict):
            return self._structured(rec, offset)
        return self._raw(line, offset, extra)

    def _structured(self, rec: dict[str, Any], offset: int) -> dict[str, Any]:
        # The job-side logger's keys are tried first, directly: this runs for every line.
        pop = rec.pop
        return self._finish(rec, offset, pop("ts", None), pop("event", None), pop("level", None),
                            pop("rank", self.rank), pop("seq", None))  # fmt: skip

    def json_lines(self, lines: list[bytes], offsets: Iterable[int], out: ParsedEvents) -> int:
        """Events for the leading run of ``lines`` that are JSON objects (at ``offsets``), added to
        ``out``; returns how many lines were taken (the first other line stops the run).

        The shipper's hot path: the per-file values are read once, each line is parsed and mapped
        while its record is still in the CPU cache, straight into the batch's columns, and a record
        in the job-side logger's own shape (canonical ``ts``, string ``event``, a known ``level``,
        integer or absent ``rank`` and ``seq``) is mapped inline; any other record takes
        :meth:`_finish`, so the events are those of :meth:`parse` either way.
        """
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        job0, rank0, node0 = self.job, self.rank, self.node
        known = _KNOWN_LEVELS
        finish = self._finish
        add_ts, add_job, add_rank, add_node = out.tss.append, out.jobs.append, out.ranks.append, out.nodes.append
        add_level, add_msg, add_seq = out.levels.append, out.msgs.append, out.seqs.append
        add_off, add_fields = out.offs.append, out.fields.append
        last_ts = self.last_ts
        taken = 0
        for line, offset in zip(lines, offsets):
            if line[0] != 123:  # "{" (the caller passes no empty line)
                break
            try:
                rec = loads(line)
            except decode_error:
                break
            if type(rec) is not dict:
                break
            taken += 1
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
                and (rank is None or type(rank) is int)
                and (seq is None or type(seq) is int)
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
        if taken:
            self.in_traceback = False
        return taken

    def _finish(
        self, rec: dict[str, Any], offset: int, ts_raw: Any, msg: Any, level: Any, rank: Any, seq: Any
    ) -> dict[str, Any]:
        """The event for ``rec`` once its main keys were popped (``None`` where absent)."""
        pop = rec.pop
        if ts_raw is None:
            ts_raw = next((pop(k) for k in _TS_KEYS if k in rec), None)
        ts = self.last_ts
        if ts_raw is not None:
            if type(ts_raw) is str and len(ts_raw) == 27 and ts_raw[26] == "Z":
                ts = self.last_ts = ts_raw
            else:
                try:
                    ts = self.last_ts = format_timestamp(ts_raw)
                except (ValueError, OverflowError, OSError):
                    rec["ts_invalid"] = ts_raw
        if msg is None:
            msg = next((pop(k) for k in _MSG_KEYS if k in rec), "")
        if level is None:
            level = next((pop(k) for k in _LEVEL_KEYS if k in rec), None)
        if level is not None and (type(level) is not str or level not in _KNOWN_LEVELS):
            level = normalize_level(level)
        if rank is not None and type(rank) is not int:
            try:
                rank = int(rank)
            except (TypeError, ValueError):
                rec["rank_invalid"] = rank
                rank = None
        if seq is not None and type(seq) is not int:
            rec["seq_invalid"] = seq
            seq = None
        self.in_traceback = False
        return {
            "_id": f"{self.fid}-{offset}",
            "@timestamp": ts,
            "kind": "log",
            "job": pop("job", self.job),
            "rank": rank,
            "node": pop("node", self.node),
            "level": level,
            "message": msg if type(msg) is str else orjson.dumps(msg, default=str).decode(),
            "seq": seq,
            "source": self.source,
            "offset": offset,
            "fields": rec,
        }

    def _raw(self, line: bytes, offset: int, extra: dict[str, Any] | None) -> dict[str, Any]:
        fields: dict[str, Any] = dict(extra) if extra else {}
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", "backslashreplace")
            fields["invalid_utf8"] = True
        if self.redact:
            text = redact_text(text)
        fields["raw"] = True
        level, self.in_traceback = infer_level(text, self.in_traceback)
        return {
            "_id": f"{self.fid}-{offset}",
            "@timestamp": self.last_ts,
            "kind": "log",
            "job": self.job,
            "rank": self.rank,
            "node": self.node,
            "level": level,
            "message": text,
            "seq": None,
            "source": self.source,
            "offset": offset,
            "fields": fields,
        }
