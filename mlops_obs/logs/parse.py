"""What one line of a log file is, and which lines belong together: pure functions over text, no I/O.

:mod:`mlops_obs.logs.events` maps what these find to the event schema; this module knows the formats.

Formats, told apart per line (files mix them: a pod log holds CRI records whose text is JSON):

``cri``     the CRI container log format the kubelet's runtimes write under ``/var/log/pods`` (and the
            workload's launcher writes): ``<RFC 3339 time> <stdout|stderr> <F|P> <text>``; ``P`` is a
            piece of a line that the following records of the same stream continue, up to an ``F``.
``docker``  Docker's json-file driver: ``{"log": "text\\n", "stream": "stderr", "time": "..."}``; a
            ``log`` without its newline is a piece of a longer line, like ``P``.
``json``    a JSON object: our job-side logger's records, or another logger's.
``raw``     anything else (NCCL's prints, a traceback written straight to a file, torn lines).

Times: every event gets one, and ``ts_source`` says where it came from, so that a reader knows which
times order events (:data:`TRUSTED_TS_SOURCES`) and which only bound them:

``record``     the JSON record's own time (``ts``, ``@timestamp``, ``time``...)
``cri``        the CRI prefix (when the runtime read the line from the pipe)
``docker``     Docker's ``time``
``line``       an RFC 3339 time with a zone at the start of a raw line
``followed``   none of those; the shipper read the line within a poll of its being written (it had
               read the file to its end before, and this is new)
``neighbour``  none of those, read from a backlog: the time of the last line before it that had one
               (a lower bound)
``mtime``      none of those and no earlier line with a time: the file's modification time when the
               shipper read it (an upper bound)

A record's time that does not parse is kept as a string (``ts_invalid``) and the event is timed as a
line without one; the ship time is never used.

Normalisation (:mod:`mlops_obs.logs.events`): a record decoded from a line is made storable whatever
it holds, with :func:`mlops_obs.logs.redact.plain_value` (nesting past its ``MAX_DEPTH`` kept as JSON
text, integers past 64 bits as strings) or :func:`~mlops_obs.logs.redact.redact_record` (the same, and
redacted) for other programs' records. One hostile line costs only itself.

Multi-line events (:class:`Block`): a Python traceback (``Traceback (most recent call last):``
through the ``XxxError: message`` line, chained ones included), torch's ``[rankN]:``-prefixed
blocks, NCCL ``WARN`` blocks (a ``WARN`` line and the same process's lines after it), and
faulthandler's dumps (``Fatal Python error`` or ``Thread 0x...`` and the frames) each become one
event, with the level of its worst line and the rank its prefix names.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

STACK_REQUEST_EVENT = "stack dump requested"
"""A stack file's line asking for a dump (the workload's launcher writes it just before ``SIGUSR1``)."""
STACK_TRAILER_EVENT = "stack dump"
"""A stack file's line ending a dump (the rank writes it after faulthandler's text)."""

TS_SOURCES = ("record", "cri", "docker", "line", "followed", "neighbour", "mtime")
TRUSTED_TS_SOURCES = frozenset(("record", "cri", "docker", "line"))
"""Times taken from the line itself: they order events (``mlops_obs.rca.facts`` trusts these)."""


MAX_BLOCK_LINES = 2000
MAX_BLOCK_CHARS = 1 << 20
"""A multi-line event is cut after this many lines or characters (and the rest starts a new one)."""
BLOCK_GAP_SECONDS = 2.0
"""Lines further apart than this (where their times are known) are not one event, whatever their prefix:
torch prefixes every line a rank prints with ``[rankN]:``, and two warnings a minute apart are two."""

# --- times --------------------------------------------------------------------------------------------

_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:[.,](\d+))?(?:([Zz])|([+-])(\d\d):?(\d\d))")
_LINE_TIME = re.compile(r"^\[?(" + _RFC3339.pattern + r")\]?(?=[\s\]|,;]|$)")


def canonical_time(value: Any) -> str | None:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC) for an RFC 3339 / ISO 8601 string with a zone, any number
    of fraction digits (nanoseconds are truncated), or epoch seconds; None for anything else."""
    if type(value) is str:
        if len(value) == 27 and value[26] == "Z" and value[10] == "T" and value[19] == ".":
            return value  # already canonical: our records, the hot path
        m = _RFC3339.fullmatch(value.strip())
        if not m:
            return None
        y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
        us = int((frac or "0")[:6].ljust(6, "0"))
        try:
            dt = _dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), us, tzinfo=_dt.UTC)
        except ValueError:
            return None
        if not z:
            off = _dt.timedelta(hours=int(oh), minutes=int(om))
            dt = dt - off if sign == "+" else dt + off
        if not 1 <= dt.year <= 9999:
            return None
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            dt = _dt.datetime.fromtimestamp(float(value), tz=_dt.UTC)
        except (ValueError, OverflowError, OSError):
            return None
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return None


def line_time(text: str) -> str | None:
    """The time an RFC 3339 stamp with a zone opens ``text`` with (``2026-01-02T03:04:05.1Z ...``,
    ``[2026-01-02 03:04:05,123+00:00] ...``), else None. Stamps without a zone are local times of an
    unknown zone: not used."""
    m = _LINE_TIME.match(text)
    return canonical_time(m.group(1)) if m else None


# --- one line -----------------------------------------------------------------------------------------

_CRI = re.compile(
    rb"(\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:[Zz]|[+-]\d\d:\d\d)) (stdout|stderr) ([FP])(?::\S*)?(?: |$)"
)


@dataclass(slots=True)
class Line:
    """A line as read: its format, the time and stream its envelope gives, and what it holds."""

    fmt: str  # cri | docker | json | raw
    payload: bytes  # the text the line carries (CRI/Docker: without the envelope)
    ts: str | None = None  # canonical time from the envelope (CRI, Docker), when it parses
    stream: str | None = None  # stdout | stderr (CRI, Docker)
    partial: bool = False  # a piece of a longer line (CRI ``P``, Docker ``log`` without newline)
    record: dict[str, Any] | None = None  # the JSON object the line (or its payload) is
    envelope_ts_invalid: str | None = None  # a Docker ``time`` that does not parse
    invalid_utf8: bool = False  # a JSON record read with U+FFFD for its invalid bytes


def read_line(raw: bytes) -> Line:
    """Tell the format of one line (no newline) and take its envelope off."""
    if raw[:1] == b"{":
        rec = _loads(raw)
        if rec is not None:
            log = rec.get("log")
            if type(log) is str and "stream" in rec and "time" in rec and len(rec) <= 4:
                ts = canonical_time(rec["time"])
                text = log[:-1] if log.endswith("\n") else log
                if text.endswith("\r"):
                    text = text[:-1]
                payload = text.encode("utf-8", "surrogatepass")
                line = Line("docker", payload, ts, str(rec["stream"]), not log.endswith("\n"))
                if ts is None:
                    line.envelope_ts_invalid = str(rec["time"])[:200]
                if not line.partial:
                    line.record = _loads(payload) if payload[:1] == b"{" else None
                return line
            return Line("json", raw, record=rec)
        rec = _loads_invalid_utf8(raw)
        if rec is not None:
            return Line("json", raw, record=rec, invalid_utf8=True)
    if raw[:1].isdigit():
        m = _CRI.match(raw)
        if m:
            payload = raw[m.end() :]
            line = Line("cri", payload, canonical_time(m.group(1).decode()), m.group(2).decode(), m.group(3) == b"P")
            if not line.partial and payload[:1] == b"{":
                line.record = _loads(payload)
            return line
    return Line("raw", raw)


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        rec = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return rec if type(rec) is dict else None


def _loads_invalid_utf8(data: bytes) -> dict[str, Any] | None:
    """A JSON object whose only fault is invalid UTF-8 (a logger that wrote raw bytes), read with
    U+FFFD in their place; None for anything else. Only on the error path."""
    if data[-1:] != b"}":
        return None
    try:
        data.decode("utf-8")
        return None  # valid UTF-8: not why it failed
    except UnicodeDecodeError:
        return _loads(data.decode("utf-8", "replace").encode())


def decode(data: bytes) -> tuple[str, bool]:
    """Text of ``data``; invalid UTF-8 kept visible as ``\\xNN`` (and says so)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "backslashreplace"), True


# --- multi-line events ----------------------------------------------------------------------------------

_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):\s*$")
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit|Warning|Failure)\b")
_CHAIN = re.compile(r"^(?:During handling of the above exception|The above exception was the direct cause)")
_RANK_PREFIX = re.compile(r"^\[(?:rank|Rank )(\d+)\]:\s?")
_NCCL = re.compile(r"^(?P<who>\S+:\d+:\d+) \[\d+\] NCCL (?P<sev>WARN|INFO|ERROR|TRACE)\b")
_FAULT_START = re.compile(
    r"^(?:Fatal Python error: |(?:Current thread|Thread) 0x[0-9a-fA-F]+ \(most recent call first\):)"
)
_FAULT_CONT = re.compile(
    r"^(?:\s+File \".*\", line \d+|\s+<no Python frame>|(?:Current thread|Thread) 0x[0-9a-fA-F]+ |"
    r"Python runtime state:|Extension modules: |Stack \(most recent call first\):|\s*$)"
)
# A private key printed as text (a misconfigured client, a debug dump): its armour lines and body
# become one event, so that redaction sees the whole key (and masks it), not a base64 line at a time.
_PEM_START = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----")
_PEM_BODY = re.compile(r"^\s*(?:[A-Za-z0-9+/=]+|[A-Za-z][\w-]*: .*)\s*$")  # base64, or a Proc-Type header
_LEVEL_WORDS = re.compile(
    r"\b(?:(?P<critical>CRITICAL|FATAL|Fatal|PANIC)|(?P<error>ERROR|Error|Exception|Traceback|Segmentation fault)"
    r"|(?P<warning>WARNING|WARN|Warning))\b"
)
_GLOG = re.compile(r"^\[?(?P<sev>[EWFI])\d{4} \d\d:\d\d:\d\d")
_SEVERITY = {"debug": 1, "info": 2, "warning": 3, "error": 4, "critical": 5}


def rank_prefix(text: str) -> int | None:
    """The rank torch's ``[rankN]:`` prefix names, if the line has one."""
    m = _RANK_PREFIX.match(text)
    return int(m.group(1)) if m else None


def line_level(text: str) -> str:
    """The level a raw line's words suggest (``info`` when they suggest none)."""
    body = _RANK_PREFIX.sub("", text, count=1)
    g = _GLOG.match(body)
    if g:
        return {"E": "error", "W": "warning", "F": "critical", "I": "info"}[g.group("sev")]
    if _TRACEBACK.match(body) or _EXC_LINE.match(body):
        return "error"
    n = _NCCL.match(body)
    if n:
        return {"WARN": "warning", "ERROR": "error"}.get(n.group("sev"), "info")
    m = _LEVEL_WORDS.search(body)
    return str(m.lastgroup) if m else "info"


def worse(a: str, b: str) -> str:
    return a if _SEVERITY.get(a, 0) >= _SEVERITY.get(b, 0) else b


@dataclass
class Block:
    """A multi-line event being assembled from consecutive lines of one stream."""

    kind: str  # traceback | rank | nccl | faulthandler | pem
    lines: list[str]
    key: str | None = None  # the rank (``rank``) or ``host:pid:tid`` (``nccl``) every line shares
    level: str = "info"
    rank: int | None = None
    stream: str | None = None
    ended: bool = False  # a traceback's exception line was seen (a chained one may still follow)
    chained: bool = False  # ... and then "During handling of the above exception" (another follows)
    chars: int = 0
    last_ts: str | None = None  # the envelope time of its last line, where lines have one

    @classmethod
    def start(cls, text: str, stream: str | None = None, ts: str | None = None) -> Block | None:
        """The block ``text`` opens, or None when it opens none."""
        r = _RANK_PREFIX.match(text)
        if r:
            b = cls("rank", [text], key=r.group(1), rank=int(r.group(1)), stream=stream)
        elif _TRACEBACK.match(text):
            b = cls("traceback", [text], stream=stream)
        elif _FAULT_START.match(text):
            b = cls("faulthandler", [text], stream=stream)
        elif (n := _NCCL.match(text)) and n.group("sev") in ("WARN", "ERROR"):
            b = cls("nccl", [text], key=n.group("who"), stream=stream)
        elif "-----BEGIN " in text and _PEM_START.search(text) and not _PEM_END.search(text):
            b = cls("pem", [text], stream=stream)
        else:
            return None
        b.level = line_level(text)
        b.chars = len(text)
        b.last_ts = ts
        return b

    def accepts(self, text: str, stream: str | None = None, ts: str | None = None) -> bool:
        """Whether ``text`` (of ``stream``, written at ``ts`` where known) continues this block."""
        if stream != self.stream or len(self.lines) >= MAX_BLOCK_LINES or self.chars >= MAX_BLOCK_CHARS:
            return False
        if (
            ts is not None
            and self.last_ts is not None
            and ts != self.last_ts
            and _gap(self.last_ts, ts) > BLOCK_GAP_SECONDS
        ):
            return False
        if self.kind == "rank":
            r = _RANK_PREFIX.match(text)
            return (r is not None and r.group(1) == self.key) or not text.strip()
        if self.kind == "nccl":
            n = _NCCL.match(text)
            return n is not None and n.group("who") == self.key
        if self.kind == "faulthandler":
            return bool(_FAULT_CONT.match(text))
        if self.kind == "pem":  # up to its END line; a line that is not key material ends it too
            return not self.ended and (bool(_PEM_END.search(text)) or bool(_PEM_BODY.match(text)))
        # traceback
        if not text.strip() or _CHAIN.match(text):
            return True
        if self.ended:
            return self.chained and bool(_TRACEBACK.match(text))
        return text[:1] in (" ", "\t") or bool(_EXC_LINE.match(text))

    def add(self, text: str, ts: str | None = None) -> None:
        self.lines.append(text)
        self.chars += len(text) + 1
        self.level = worse(self.level, line_level(text))
        if ts is not None:
            self.last_ts = ts
        if self.kind == "pem":
            self.ended = self.ended or bool(_PEM_END.search(text))
        elif self.kind == "traceback":
            if _CHAIN.match(text):
                self.chained = True
            elif _TRACEBACK.match(text):
                self.ended = self.chained = False
            elif _EXC_LINE.match(text) and not self.ended:
                self.ended = True

    def text(self) -> str:
        """The joined lines, trailing blank ones left out (they separate blocks; they say nothing)."""
        lines = self.lines
        n = len(lines)
        while n > 1 and not lines[n - 1].strip():
            n -= 1
        return "\n".join(lines[:n])

    @property
    def trailing_blanks(self) -> int:
        n = 0
        for line in reversed(self.lines):
            if line.strip():
                break
            n += 1
        return n


def _gap(a: str, b: str) -> float:
    """Seconds from canonical time ``a`` to ``b`` (either order); large when they do not parse."""
    try:
        return abs((_dt.datetime.fromisoformat(b[:26]) - _dt.datetime.fromisoformat(a[:26])).total_seconds())
    except ValueError:
        return float("inf")


def record_kind(rec: Mapping[str, Any]) -> str | None:
    """The event kind a JSON record claims for itself: ``launcher`` (the workload launcher's log); None
    for a log record. Stack events come from stack files, alerts from the alert intake: a record that
    says ``kind: alert`` keeps it as a field."""
    return "launcher" if rec.get("kind") == "launcher" else None
