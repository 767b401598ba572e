"""The embedded event store: SQLite (WAL mode) in a directory, the default sink of ``mlops-obs ship``.

Why SQLite: it is in the standard library, crash-safe (a committed transaction survives ``kill -9``
and, with ``synchronous=FULL``, power loss), lets one writer and many readers work at once (the
shipper writes while replay reads and the alert sink appends), and its B-tree indexes answer the
queries replay needs without a server.

Event schema (one dict per event; the OpenSearch sink takes the same dicts)
--------------------------------------------------------------------------
``_id``         str, required. The identity of the event; :meth:`EventStore.put` ignores an ``_id``
                it already holds, which is what makes re-sending after a crash harmless. The shipper
                derives it from (source fingerprint, byte offset), never from the content, so two
                identical lines are two events.
``@timestamp``  str, ISO-8601 UTC with microseconds and ``Z`` (``2026-01-02T03:04:05.000006Z``).
                Other forms (datetime, epoch seconds, ISO with offset) are normalised on ``put``;
                the fixed format is what makes string order equal time order.
``kind``        ``"log"`` (a line from a file) or ``"alert"`` (an Alertmanager notification).
``job``         str or None: the training job.
``rank``        int or None: the rank within the job.
``node``        str or None: host name.
``level``       str or None: ``debug|info|warning|error|critical``.
``message``     str: the log event / raw line / alert summary.
``seq``         int or None: the per-process sequence number the job-side logger adds (gaps mean loss).
``source``      str: where it came from (file path for logs, receiver name for alerts).
``offset``      int: byte offset of the line in its source (0 for alerts), the tie-breaker in order.
``fields``      dict: everything else of the original record (``run_id``, exception, flags such as
                ``invalid_utf8`` or ``split``, alert labels...).

:meth:`EventStore.query` returns events in (``@timestamp``, ``source``, ``offset``) order.

Indexes (chosen for replay/RCA, and few, because each one costs every insert): (``@timestamp``,
``source``, ``offset``) for time ranges and the order; (``job``, ``rank``, ``@timestamp``) for one
rank's story; partial indexes on ``level`` for warnings and worse and on ``kind`` for alerts (rare
rows, so they cost little to maintain); a trigram full-text index on ``message`` that is brought up
to date when a text query runs, not on every write. Writers from several processes are fine (WAL,
``busy_timeout``); each :meth:`EventStore.put` is one transaction.
"""

from __future__ import annotations

import datetime as _dt
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

DB_NAME = "events.sqlite3"
KINDS = ("log", "alert")
_COLUMNS = ("_id", "@timestamp", "kind", "job", "rank", "node", "level", "message", "seq", "source", "offset")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id      TEXT NOT NULL UNIQUE,
    ts      TEXT NOT NULL,
    kind    TEXT NOT NULL,
    job     TEXT,
    rank    INTEGER,
    node    TEXT,
    level   TEXT,
    message TEXT NOT NULL,
    seq     INTEGER,
    source  TEXT NOT NULL,
    off     INTEGER NOT NULL,
    fields  BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts, source, off);
CREATE INDEX IF NOT EXISTS events_job ON events (job, rank, ts);
CREATE INDEX IF NOT EXISTS events_notable ON events (level, ts) WHERE level NOT IN ('debug', 'info');
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, ts) WHERE kind != 'log';
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class EventError(ValueError):
    """An event that cannot be stored; the message names the event and the field."""


def format_timestamp(value: Any) -> str:
    """Normalise a timestamp to ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC) or raise ``ValueError``."""
    if isinstance(value, _dt.datetime):
        dt = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        dt = _dt.datetime.fromtimestamp(float(value), tz=_dt.UTC)
    elif isinstance(value, str):
        s = value.strip()
        if len(s) == 27 and s[-1] == "Z" and s[10] == "T" and s[19] == ".":
            return s  # already canonical: the hot path of the shipper
        if s.endswith(("Z", "z")):
            s = s[:-1] + "+00:00"
        dt = _dt.datetime.fromisoformat(s)
    else:
        raise ValueError(f"not a timestamp: {value!r}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_dt.UTC)
    return dt.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _opt_int(v: Any, name: str, eid: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            return int(v)
        except (TypeError, ValueError):
            raise EventError(f"event {eid!r}: {name} must be an integer or null, got {v!r}") from None
    return v


def _row(ev: Mapping[str, Any]) -> tuple[Any, ...]:
    """Validate one event into a table row (hot path: plain ``type() is`` checks first)."""
    eid = ev.get("_id")
    if type(eid) is not str or not eid:
        raise EventError(f"event without a string _id: {str(dict(ev))[:200]}")
    ts = ev.get("@timestamp")
    if not (type(ts) is str and len(ts) == 27 and ts[26] == "Z" and ts[10] == "T"):
        try:
            ts = format_timestamp(ts)
        except (ValueError, OverflowError, OSError) as e:
            raise EventError(f"event {eid!r}: bad @timestamp: {e}") from None
    kind = ev.get("kind", "log")
    if kind != "log" and kind not in KINDS:
        raise EventError(f"event {eid!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    fields = ev.get("fields")
    if fields is None:
        fields = {}
    elif type(fields) is not dict and not isinstance(fields, Mapping):
        raise EventError(f"event {eid!r}: fields must be a mapping")
    get = ev.get
    job, node, level, rank, seq, off = get("job"), get("node"), get("level"), get("rank"), get("seq"), get("offset")
    if job is not None and type(job) is not str:
        job = str(job)
    if node is not None and type(node) is not str:
        node = str(node)
    if level is not None and type(level) is not str:
        level = str(level)
    if rank is not None and type(rank) is not int:
        rank = _opt_int(rank, "rank", eid)
    if seq is not None and type(seq) is not int:
        seq = _opt_int(seq, "seq", eid)
    if type(off) is not int:
        off = _opt_int(off, "offset", eid) or 0
    msg = get("message", "")
    src = get("source", "")
    return (eid, ts, kind, job, rank, node, level, msg if type(msg) is str else str(msg), seq,
            src if type(src) is str else str(src), off, orjson.dumps(fields, default=str))  # fmt: skip


class EventStore:
    """One SQLite database in ``directory``; safe to share between threads and processes."""

    def __init__(self, directory: Path | str, *, synchronous: str = "FULL") -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create store directory {str(self.directory)!r}: {e.strerror}") from None
        self.path = self.directory / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before put() returns, so the shipper's checkpoint never runs ahead.
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous.upper() == 'FULL' else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(_SCHEMA)
        self._fts_ready = False

    # --- writing -----------------------------------------------------------------------------------

    def put(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Store events in one transaction; an ``_id`` already present is ignored. Returns how many were new.

        All or nothing: a malformed event raises :class:`EventError` before anything is written.
        """
        rows = [_row(ev) for ev in events]
        if not rows:
            return 0
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO events (id, ts, kind, job, rank, node, level, message, seq, source, off,"
                    " fields) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    # --- reading -----------------------------------------------------------------------------------

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM events").fetchone()[0])

    def query(
        self,
        *,
        job: str | None = None,
        rank: int | None = None,
        level: str | Sequence[str] | None = None,
        kind: str | None = None,
        since: Any = None,
        until: Any = None,
        text: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Events matching every given filter, in (``@timestamp``, ``source``, ``offset``) order.

        ``since`` is inclusive, ``until`` exclusive (any form :func:`format_timestamp` takes);
        ``level`` may be a list; ``text`` is a case-insensitive substring of the message, answered by
        a trigram full-text index that is brought up to date on demand (so writes stay fast).
        """
        where: list[str] = []
        args: list[Any] = []
        if job is not None:
            where.append("job = ?")
            args.append(job)
        if rank is not None:
            where.append("rank = ?")
            args.append(int(rank))
        if level is not None:
            levels = [level] if isinstance(level, str) else list(level)
            where.append(f"level IN ({','.join('?' * len(levels))})")
            args.extend(levels)
            if not set(levels) & {"debug", "info"}:
                # the exact term of the partial index, so SQLite may use it (its implication test is literal)
                where.append("level NOT IN ('debug', 'info')")
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
            if kind != "log":
                where.append("kind != 'log'")
        if since is not None:
            where.append("ts >= ?")
            args.append(format_timestamp(since))
        if until is not None:
            where.append("ts < ?")
            args.append(format_timestamp(until))
        with self._lock:
            if text:
                if len(text) >= 3:
                    self._update_fts()
                    where.append("rowid IN (SELECT rowid FROM events_fts WHERE events_fts MATCH ?)")
                    args.append('"' + text.replace('"', '""') + '"')
                else:
                    where.append("instr(lower(message), ?) > 0")
                    args.append(text.lower())
            sql = "SELECT id, ts, kind, job, rank, node, level, message, seq, source, off, fields FROM events"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY ts, source, off"
            if limit is not None:
                sql += " LIMIT ?"
                args.append(int(limit))
            rows = self._db.execute(sql, args).fetchall()
        out = []
        for r in rows:
            ev = dict(zip(_COLUMNS, r[:11]))
            ev["fields"] = orjson.loads(r[11])
            out.append(ev)
        return out

    def _update_fts(self) -> None:
        """Index messages written since the last text query (the lock is held)."""
        if not self._fts_ready:
            self._db.execute(
                "CREATE VIRTUAL TABLE IF NOT EXISTS events_fts USING fts5("
                "message, content='events', content_rowid='rowid', tokenize='trigram')"
            )
            self._fts_ready = True
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'fts_upto'").fetchone()
            upto = int(row[0]) if row else 0
            top = self._db.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()[0]
            if top > upto:
                self._db.execute(
                    "INSERT INTO events_fts (rowid, message) SELECT rowid, message FROM events"
                    " WHERE rowid > ? AND rowid <= ?",
                    (upto, top),
                )
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('fts_upto', ?)", (top,))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
