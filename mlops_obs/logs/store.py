"""The embedded event store: SQLite (WAL mode) in a directory, the default sink of ``mlops-obs ship``.

Why SQLite: it is in the standard library, crash-safe (a committed transaction survives ``kill -9``
and, with ``synchronous=FULL``, power loss), lets one writer and many readers work at once (the
shipper writes while replay reads and the alert sink appends), and its B-tree indexes answer the
queries replay needs without a server.

It stores the events of the schema in :mod:`mlops_obs.logs.sink` and implements both sides of the
logs' protocols: :class:`StoreSink` (the shipper's and the alert intake's :class:`~.sink.Sink`) and
:class:`StoreSource` (replay's and root-cause analysis' :class:`~.source.Source`).
:meth:`EventStore.iter_query` yields events in (``@timestamp``, ``source``, ``offset``) order, merged
from the chunks as it goes; :meth:`EventStore.apply_retention` trims the store (``--store.retention``).

Storage (schema version 2, Loki-style chunks)
---------------------------------------------
One SQLite row per event cannot go faster than ~10 µs of CPU per event here: the ``sqlite3``
module's per-row binding alone is ~4 µs, and every index on the row adds 2-3 µs. So events are
stored in *chunks*: one row per group of events of one *stream* (``kind``, ``job``, ``rank``,
``node``, ``source``, id prefix) in one :meth:`EventStore.put`, at most :data:`CHUNK_EVENTS` events.
The row carries what selects it: the stream columns, the time range (``ts_min``, ``ts_max``), the
highest level in it (``severity``, debug 1 ... critical 5, other levels 0), the event count ``n``,
and the id range (``prefix``, ``off_min``, ``off_max``). An ``_id`` of the form ``P-N`` (``N``
decimal, at most 18 digits) splits into prefix ``P`` and number ``N`` (the shipper's ids are
``<file id>-<offset>``); any other id is its own prefix with ``N = 0``.

``data`` is one orjson array of the chunk's columns ``[_ids, @timestamps, levels, messages, seqs,
offsets, fields]``, events in arrival order. Columns rather than one array per event: orjson
writes them ~40% faster and reads them ~35% faster here. ``_ids`` is ``null`` when every id is
``f"{prefix}-{offset}"`` (the shipper's, checked on ``put``), as the offsets already say it; that
is a fifth of a shipped line's bytes.

Indexes are per chunk, so they cost per chunk, not per event: (``ts_min``) for time ranges,
(``job``, ``rank``, ``ts_min``) for one rank's story, (``prefix``, ``off_max``) for idempotence
(``off_max`` rather than ``off_min``: the probe ``off_max >= lo AND off_min <= hi`` then scans only
chunks that end at or after the new range, none at all for appends, instead of every older chunk
of the file), and partial ones on ``kind`` for alerts and on ``severity`` for chunks holding
warnings or worse.

Idempotence on ``_id`` stays exact: inside the write transaction, each incoming group looks up the
stored chunks of its prefix whose id range overlaps its own (one index probe; normal ingest never
overlaps, so that is all it costs); only when there are some are they decoded and the incoming
events whose ``_id`` is already stored dropped (membership by id, no assumption of contiguity).
Of the same ``_id`` twice in one ``put``, the first is kept.

A query selects candidate chunks by the indexed columns, decodes them as its merge reaches them (see
:func:`_merge_chunks`) and filters each event in Python. Text search is a scan of the decoded
messages: the v1 schema's trigram full-text index cost more at ingest than everything else together,
and replay's text queries are narrowed by job, rank or time first (Loki does the same: labels select
chunks, a line filter scans them).

Writers from several processes are fine (WAL, ``busy_timeout``, ``BEGIN IMMEDIATE``); each
:meth:`EventStore.put` is one transaction. Chunk ids grow with every commit, which is what
:meth:`EventStore.position` hands out and a follower reads past. A version 1 store (one row per event, table ``events``)
is migrated on open, in one transaction.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from mlops_obs.config import ConfigError, Setting, parse_duration
from mlops_obs.logs.sink import (
    FAULTS,
    KINDS,
    LEVEL_RANK,
    Events,
    ParsedEvents,
    Stats,
    Stop,
    backoff_delays,
    format_timestamp,
    say,
)
from mlops_obs.logs.source import EventQuery, RankFacts

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

DB_NAME = "events.sqlite3"
SCHEMA_VERSION = 2
CHUNK_EVENTS = 1000
"""Most events in one chunk: bigger chunks cost less per event to write, smaller ones less to decode
for a narrow query; at 1000 the per-chunk cost of a write is ~1% of the events' own."""

_MAX_DIGITS = 18  # an id number must fit SQLite's 64-bit INTEGER

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id       INTEGER PRIMARY KEY,
    kind     TEXT NOT NULL,
    job      TEXT,
    rank     INTEGER,
    node     TEXT,
    source   TEXT NOT NULL,
    prefix   TEXT NOT NULL,
    off_min  INTEGER NOT NULL,
    off_max  INTEGER NOT NULL,
    ts_min   TEXT NOT NULL,
    ts_max   TEXT NOT NULL,
    severity INTEGER NOT NULL,
    n        INTEGER NOT NULL,
    data     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_ts ON chunks (ts_min);
CREATE INDEX IF NOT EXISTS chunks_job ON chunks (job, rank, ts_min);
CREATE INDEX IF NOT EXISTS chunks_ids ON chunks (prefix, off_max);
CREATE INDEX IF NOT EXISTS chunks_kind ON chunks (kind, ts_min) WHERE kind != 'log';
CREATE INDEX IF NOT EXISTS chunks_notable ON chunks (severity, ts_min) WHERE severity >= 3;
"""

_INSERT = (
    "INSERT INTO chunks (kind, job, rank, node, source, prefix, off_min, off_max, ts_min, ts_max, severity, n, data)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
# Version 1 columns, in the order _row and the migration use.
_V1_COLUMNS = "id, ts, kind, job, rank, node, level, message, seq, source, off, fields"

_KEYS = ("_id", "@timestamp", "kind", "job", "rank", "node", "level", "message", "seq", "source", "offset", "fields")
_GETTERS = tuple(operator.itemgetter(k) for k in _KEYS)
_NONE = type(None)
_INT = {int}
_STR = {str}
_OPT_INT = {int, _NONE}
_DICT = {dict}
_KINDS = set(KINDS)


class EventError(ValueError):
    """An event that cannot be stored; the message names the event and the field."""


def _opt_int(v: Any, name: str, eid: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            return int(v)
        except (TypeError, ValueError):
            raise EventError(f"event {eid!r}: {name} must be an integer or null, got {v!r}") from None
    return v


def _row(ev: Any) -> tuple[Any, ...]:
    """Validate and normalise one event into the 12 values of :data:`_GET` (the slow, general path:
    missing keys, other types, other timestamp forms)."""
    if not isinstance(ev, Mapping):
        raise EventError(f"event is not a mapping: {str(ev)[:200]}")
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
    if kind not in KINDS:
        raise EventError(f"event {eid!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    fields = ev.get("fields")
    if fields is None:
        fields = {}
    elif type(fields) is not dict:
        if not isinstance(fields, Mapping):
            raise EventError(f"event {eid!r}: fields must be a mapping")
        fields = dict(fields)
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
            src if type(src) is str else str(src), off, fields)  # fmt: skip


def _fast_columns(events: Sequence[Any]) -> list[list[Any]] | None:
    """The 12 columns of a batch whose every event already has the canonical shape (what the shipper
    sends), checked a column at a time in C (``map``, ``set``, ``join``) rather than by a Python loop
    per event; None when any event needs :func:`_row`. Types of ``job``, ``node`` and ``source`` are
    checked per stream run by :class:`_Batch`."""
    try:
        cols = [list(map(g, events)) for g in _GETTERS]
        ids, tss, kinds, _, ranks, _, levels, msgs, seqs, _, offs, fields = cols
        n = len(ids)
        joined = "".join(tss)  # TypeError unless every one is a str
        "".join(msgs)
        if not (
            set(map(len, tss)) == {27}
            and joined[26::27] == "Z" * n
            and joined[10::27] == "T" * n
            and set(kinds) <= _KINDS
            and set(map(type, offs)) == _INT
            and set(map(type, fields)) == _DICT
            and set(map(type, ranks)) <= _OPT_INT
            and set(map(type, seqs)) <= _OPT_INT
            and all(lv is None or type(lv) is str for lv in set(levels))
            and set(map(type, ids)) == _STR
            and "" not in ids
        ):
            return None
    except (KeyError, TypeError):  # a missing key, an unhashable or wrong-typed value, not a mapping
        return None
    return cols


def _split_run(ids: list[str], offs: list[int]) -> tuple[str, list[int]] | None:
    """(prefix, numbers) of a run of ids that all read ``P-<offset>`` with one ``P``, the event's own
    ``offset`` in canonical decimal (the shipper's ids): checked with a few C-level string operations
    over the joined run, and the offsets are the numbers. None when the run is not like that."""
    p = ids[0].rpartition("-")[0]
    if not p or min(offs) < 0 or max(offs) >= 10**_MAX_DIGITS:
        return None
    # With no newline in P, equal strings mean n ids without newlines, each exactly P-<offset>.
    if "\n" in p or "\n".join(ids) != p + "-" + ("\n" + p + "-").join(map(str, offs)):
        return None
    return p, offs


def _split_ids(ids: Sequence[str]) -> tuple[list[str], list[int]]:
    """(prefix, number) of every id: ``P-N`` with ``N`` decimal (at most 18 digits), else (id, 0)."""
    out_p: list[str] = []
    out_n: list[int] = []
    for eid in ids:
        p, _, num = eid.rpartition("-")
        if p and num and num.isascii() and num.isdigit() and len(num) <= _MAX_DIGITS:
            out_p.append(p)
            out_n.append(int(num))
        else:
            out_p.append(eid)
            out_n.append(0)
    return out_p, out_n


def _stream_runs(cols: list[list[Any]]) -> list[tuple[tuple[Any, ...], int, int]]:
    """Maximal runs of one (kind, job, rank, node, source): runs of one source first (no tuple per
    event), split further only where another stream column is not constant in it."""
    _, _, kinds, jobs, ranks, nodes, _, _, _, srcs, _, _ = cols
    out: list[tuple[tuple[Any, ...], int, int]] = []
    pos = 0
    for src, run in itertools.groupby(srcs):
        a, b = pos, pos + len(list(run))
        pos = b
        if len(set(kinds[a:b])) == len(set(jobs[a:b])) == len(set(ranks[a:b])) == len(set(nodes[a:b])) == 1:
            out.append(((kinds[a], jobs[a], ranks[a], nodes[a], src), a, b))
            continue
        at = a
        for key, sub in itertools.groupby(zip(kinds[a:b], jobs[a:b], ranks[a:b], nodes[a:b], srcs[a:b], strict=True)):
            m = len(list(sub))
            out.append((key, at, at + m))
            at += m
    return out


def _dumps(prefix: str, cols: list[Any]) -> bytes:
    try:
        return orjson.dumps(cols, default=str)
    except orjson.JSONEncodeError:
        for i, eid in enumerate(_chunk_ids(prefix, cols)):  # name the culprit
            try:
                orjson.dumps([c[i] for c in cols if c is not None], default=str)
            except orjson.JSONEncodeError as e:
                raise EventError(f"event {eid!r}: cannot be encoded: {e}") from None
        raise


_Key = tuple[Any, ...]


def _canonical_ts(tss: list[Any]) -> bool:
    """Every timestamp a str in the canonical form (27 characters, ``T`` at 10, ``Z`` at 26), in C."""
    try:
        joined = "".join(tss)
    except TypeError:
        return False
    n = len(tss)
    return set(map(len, tss)) == {27} and joined[26::27] == "Z" * n and joined[10::27] == "T" * n


class _Batch:
    """One put's events as validated columns, grouped by stream, before anything touches the database.

    ``cols`` are the 12 columns of :data:`_KEYS` (``_id``, ``kind`` and ``source`` may be None for a
    :class:`ParsedEvents` batch: they are known per run); ``groups`` maps a stream key (kind, job,
    rank, node, source, prefix) to its runs ``(a, b)`` (slices of the columns; a batch is whole runs
    of lines per file, so runs are long and few); ``nums`` holds every event's id number; ``derived``
    the groups whose every ``_id`` is ``f"{prefix}-{offset}"`` (stored without the ids column).
    """

    def __init__(self, events: Sequence[Any] | ParsedEvents) -> None:
        self.cols: list[Any] = []
        self.groups: dict[_Key, list[tuple[int, int]]] = {}
        self.nums: list[int] = []
        self.derived: set[_Key] = set()
        if isinstance(events, ParsedEvents):
            if self._parsed(events):
                return
            events = events.dicts()
        cols = _fast_columns(events)
        if cols is None or not self._group(cols):
            cols = [list(c) for c in zip(*[_row(ev) for ev in events], strict=True)]
            self._group(cols)

    def _parsed(self, events: ParsedEvents) -> bool:
        """Columns and groups of the shipper's batch from its runs; False (nothing kept) when a check fails."""
        tss, jobs, ranks, nodes, levels = events.tss, events.jobs, events.ranks, events.nodes, events.levels
        msgs, seqs, offs, fields = events.msgs, events.seqs, events.offs, events.fields
        if events.kinds or not _canonical_ts(tss) or sum(b - a for _, _, a, b in events.runs) != len(events):
            return False  # launcher records and stack dumps (rare) take the general path, which stores kinds
        groups: dict[_Key, list[tuple[int, int]]] = {}
        for prefix, source, a, b in events.runs:
            n = b - a
            if not all(map(operator.lt, offs[a : b - 1], offs[a + 1 : b])):  # cheap, and no _id twice
                return False
            if jobs[a:b].count(jobs[a]) == n and ranks[a:b].count(ranks[a]) == n and nodes[a:b].count(nodes[a]) == n:
                subs: Any = [((jobs[a], ranks[a], nodes[a]), a, b)]
            else:
                subs, at = [], a
                for key, sub in itertools.groupby(zip(jobs[a:b], ranks[a:b], nodes[a:b], strict=True)):
                    m = len(list(sub))
                    subs.append((key, at, at + m))
                    at += m
            for (job, rank, node), x, y in subs:
                if not ((job is None or type(job) is str) and (node is None or type(node) is str)):
                    return False
                groups.setdefault(("log", job, rank, node, source, prefix), []).append((x, y))
        self.cols = [None, tss, None, jobs, ranks, nodes, levels, msgs, seqs, None, offs, fields]
        self.groups = groups
        self.nums = offs
        self.derived = set(groups)
        return True

    def _group(self, cols: list[list[Any]]) -> bool:
        """Group validated columns by stream; False when a stream column has a type :func:`_row` fixes."""
        ids = cols[0]
        if len(set(ids)) != len(ids):  # duplicates within the call: the first one wins
            seen: set[str] = set()
            keep = [i for i, x in enumerate(ids) if not (x in seen or seen.add(x))]  # type: ignore[func-returns-value]
            cols = [[c[i] for i in keep] for c in cols]
            ids = cols[0]
        self.cols = cols
        self.groups = {}
        self.nums = []
        self.derived = set()
        not_derived: set[_Key] = set()
        offs = cols[10]
        try:
            runs = _stream_runs(cols)
        except TypeError:  # an unhashable job or node: _row makes it a string
            return False
        for (kind, job, rank, node, src), a, b in runs:
            if not (type(src) is str and (job is None or type(job) is str) and (node is None or type(node) is str)):
                return False
            split = _split_run(ids[a:b], offs[a:b])
            if split is not None:
                key = (kind, job, rank, node, src, split[0])
                self.groups.setdefault(key, []).append((a, b))
                self.derived.add(key)
                self.nums.extend(split[1])
            else:
                prefixes, nums = _split_ids(ids[a:b])
                self.nums.extend(nums)
                at = a
                for prefix, sub in itertools.groupby(prefixes):
                    m = len(list(sub))
                    key = (kind, job, rank, node, src, prefix)
                    self.groups.setdefault(key, []).append((at, at + m))
                    not_derived.add(key)
                    at += m
        self.derived -= not_derived
        return True

    def ids(self, key: _Key, runs: list[tuple[int, int]]) -> list[str]:
        """The ``_id`` of every event of one group."""
        if key in self.derived:
            head = key[5] + "-"
            return [head + str(o) for a, b in runs for o in self.cols[10][a:b]]
        return [x for a, b in runs for x in self.cols[0][a:b]]

    def columns(
        self, key: _Key, runs: list[tuple[int, int]], skip: set[str] | None
    ) -> tuple[list[list[Any] | None], list[int]]:
        """The stored columns ``[ids, tss, levels, messages, seqs, offsets, fields]`` and the id numbers
        of one group, minus ``skip`` (ids already stored); ``ids`` is None for a derived group."""
        c = self.cols
        picked = (c[1], c[6], c[7], c[8], c[10], c[11])
        if len(runs) == 1:
            a, b = runs[0]
            out: list[list[Any] | None] = [col[a:b] for col in picked]
            nums = self.nums[a:b]
        else:
            out = [[x for a, b in runs for x in col[a:b]] for col in picked]
            nums = [x for a, b in runs for x in self.nums[a:b]]
        ids = None if key in self.derived else self.ids(key, runs)
        if skip:
            every = self.ids(key, runs) if ids is None else ids
            kept = [i for i, eid in enumerate(every) if eid not in skip]
            out = [[col[i] for i in kept] for col in out]  # type: ignore[index]
            nums = [nums[i] for i in kept]
            if ids is not None:
                ids = [ids[i] for i in kept]
        return [ids, *out], nums


def _chunk_ids(prefix: str, data: list[Any]) -> list[str]:
    """The ``_id`` of every event of a decoded chunk (derived from the offsets when not stored)."""
    if data[0] is not None:
        return data[0]  # type: ignore[no-any-return]
    head = prefix + "-"
    return [head + str(o) for o in data[5]]


class StoreDamaged(ValueError):
    """The store's database file is damaged (SQLite says corrupt, or not a database); ``str()`` is the
    one line the user sees, naming ``mlops-obs store salvage``. Not retried: writing more into a
    damaged file risks what is still readable, and waiting does not mend it."""

    def __init__(self, directory: Path, why: str) -> None:
        super().__init__(
            f"store {str(directory)!r} is damaged ({why}); `mlops-obs store salvage {directory} NEW_DIR` copies every "
            "readable chunk into a new store"
        )


def is_damage(e: sqlite3.Error) -> bool:
    """Whether an SQLite error says the file itself is bad (corrupt, not a database) rather than busy or full."""
    return (getattr(e, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class EventStore:
    """One SQLite database in ``directory``; safe to share between threads and processes.

    With ``check``, opening runs SQLite's ``quick_check`` (every page and record readable, O(size):
    about a second a GB here) and raises :class:`StoreDamaged` when it fails. Writers open with it
    (the shipper and the alert sink, once a process), so that garbage in the file stops them with a
    clear line before they write into it and move their checkpoints.
    """

    def __init__(self, directory: Path | str, *, synchronous: str = "FULL", check: bool = False) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create store directory {str(self.directory)!r}: {e.strerror}") from None
        self.path = self.directory / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before put() returns, so the shipper's checkpoint never runs ahead.
            self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous.upper() == 'FULL' else 'NORMAL'}")
            self._db.execute("PRAGMA busy_timeout=30000")
            if check:
                self.quick_check()
            self._open_schema()
        except sqlite3.DatabaseError as e:
            self._db.close()
            if is_damage(e):
                raise StoreDamaged(self.directory, str(e)) from None
            raise

    def quick_check(self) -> None:
        """SQLite's ``PRAGMA quick_check``; :class:`StoreDamaged` naming the first problem found."""
        try:
            rows = self._db.execute("PRAGMA quick_check(3)").fetchall()
        except sqlite3.DatabaseError as e:
            if is_damage(e):
                raise StoreDamaged(self.directory, str(e)) from None
            raise
        if rows != [("ok",)]:
            raise StoreDamaged(self.directory, "; ".join(" ".join(str(r[0]).split()) for r in rows))

    def _open_schema(self) -> None:
        """Create the schema or migrate a version 1 store, in one transaction (another process may be
        opening the same store at the same moment: the version is read again inside the write lock)."""
        if int(self._db.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
            return  # the common case takes no write lock, so readers never wait for a writer here
        with self._transaction():
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version == SCHEMA_VERSION:
                return
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"store {str(self.path)!r} has schema version {version}; this mlops-obs reads {SCHEMA_VERSION}"
                )
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            has_v1 = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone()
            if has_v1:
                self._migrate_v1()
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _migrate_v1(self) -> None:
        """Move every v1 row (one per event) into chunks, in rowid (arrival) order; the lock and the
        transaction are held by the caller, so a crash leaves the v1 store as it was."""
        cur = self._db.execute(f"SELECT {_V1_COLUMNS} FROM events ORDER BY rowid")
        while True:
            rows = cur.fetchmany(10 * CHUNK_EVENTS)
            if not rows:
                break
            events = [
                {"_id": r[0], "@timestamp": r[1], "kind": r[2], "job": r[3], "rank": r[4], "node": r[5],
                 "level": r[6], "message": r[7], "seq": r[8], "source": r[9], "offset": r[10],
                 "fields": orjson.loads(r[11]) if r[11] else {}}
                for r in rows
            ]  # fmt: skip
            self._write(_Batch(events))
        for table in ("events_fts", "events", "meta"):
            self._db.execute(f"DROP TABLE IF EXISTS {table}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    # --- writing -----------------------------------------------------------------------------------

    def put(self, events: Sequence[Mapping[str, Any]] | ParsedEvents) -> int:
        """Store events in one transaction; an ``_id`` already present is ignored, and of duplicates
        within ``events`` the first is kept. Returns how many were new.

        All or nothing: a malformed event raises :class:`EventError` before anything is written.
        """
        if not events:
            return 0
        batch = _Batch(events)
        with self._transaction():
            return self._write(batch)

    def _write(self, batch: _Batch) -> int:
        """Insert a batch's chunks (inside the caller's transaction); returns how many events were new."""
        db = self._db
        groups = batch.groups
        nums = batch.nums
        # Probe every group before inserting any, so a group never meets chunks of this same call.
        skips: dict[tuple[Any, ...], set[str]] = {}
        for key, runs in groups.items():
            lo = min(min(nums[a:b]) for a, b in runs)
            hi = max(max(nums[a:b]) for a, b in runs)
            stored = db.execute(
                "SELECT prefix, data FROM chunks WHERE prefix = ? AND off_max >= ? AND off_min <= ?", (key[5], lo, hi)
            ).fetchall()
            if stored:
                mine = set(batch.ids(key, runs))
                have = {eid for prefix, data in stored for eid in _chunk_ids(prefix, orjson.loads(data))} & mine
                if have:
                    skips[key] = have
        out: list[tuple[Any, ...]] = []
        new = 0
        for key, runs in groups.items():
            kind, job, rank, node, source, prefix = key
            cols, gnums = batch.columns(key, runs, skips.get(key))
            for s in range(0, len(gnums), CHUNK_EVENTS):
                part = (
                    [None if col is None else col[s : s + CHUNK_EVENTS] for col in cols]
                    if len(gnums) > CHUNK_EVENTS
                    else cols
                )
                pnums = gnums[s : s + CHUNK_EVENTS]
                if not pnums:
                    continue
                tss: list[str] = part[1]  # type: ignore[assignment]
                severity = max(LEVEL_RANK.get(lv, 0) for lv in set(part[2]))  # type: ignore[arg-type]
                out.append((kind, job, rank, node, source, prefix, min(pnums), max(pnums), min(tss), max(tss),
                            severity, len(pnums), _dumps(prefix, part)))  # fmt: skip
                new += len(pnums)
        if out:
            db.executemany(_INSERT, out)
        return new

    # --- reading -----------------------------------------------------------------------------------

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT coalesce(sum(n), 0) FROM chunks").fetchone()[0])

    def position(self) -> int:
        """The store's write position: the id of the last chunk committed (0 while empty). Events
        stored later land in chunks past it, so ``query(stored_after=p)`` reads only what came since."""
        with self._lock:
            return int(self._db.execute("SELECT coalesce(max(id), 0) FROM chunks").fetchone()[0])

    def query(self, **filters: Any) -> list[dict[str, Any]]:
        """:meth:`iter_query` as a list (the whole result in memory: for small results and tests)."""
        return list(self.iter_query(**filters))

    def iter_query(
        self,
        *,
        job: str | None = None,
        rank: int | Sequence[int] | None = None,
        node: str | None = None,
        level: str | Collection[str] | None = None,
        kind: str | None = None,
        since: Any = None,
        until: Any = None,
        text: str | None = None,
        limit: int | None = None,
        stored_after: int | None = None,
        stored_upto: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Events matching every given filter, in (``@timestamp``, ``source``, ``offset``) order, as
        they are merged: never the whole result in memory (see :func:`_merge_chunks`).

        ``rank`` may be a list (any of them); ``since`` is inclusive, ``until`` exclusive (any form
        :func:`format_timestamp` takes); ``level`` may be a list; ``text`` is a case-insensitive
        substring of the message (a scan of the decoded chunks the other filters select; see the
        module docstring for why no text index); ``stored_after`` and ``stored_upto`` are positions
        (:meth:`position`) bounding when the events were stored, which is how a follower reads only
        what is new. The iterator reads through its own read-only connection inside one read
        transaction (one consistent snapshot, while writers go on), closed when it ends or is
        dropped.
        """
        where: list[str] = []
        args: list[Any] = []
        if job is not None:
            where.append("job = ?")
            args.append(job)
        if rank is not None:
            ranks = [int(rank)] if isinstance(rank, int) else sorted({int(r) for r in rank})
            if not ranks:
                return iter(())
            where.append("rank = ?" if len(ranks) == 1 else f"rank IN ({','.join('?' * len(ranks))})")
            args.extend(ranks)
        if node is not None:
            where.append("node = ?")
            args.append(node)
        levels: set[str] | None = None
        if level is not None:
            levels = {level} if isinstance(level, str) else set(level)
            if levels and levels <= LEVEL_RANK.keys():
                floor = min(LEVEL_RANK[lv] for lv in levels)
                where.append("severity >= ?")
                args.append(floor)
                if floor >= 3:
                    where.append("severity >= 3")  # the partial index's own term (its implication test is literal)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
            if kind != "log":
                where.append("kind != 'log'")
        lo, hi = _time_range(since, until, where, args)
        if stored_after is not None:
            where.append("id > ?")
            args.append(int(stored_after))
        if stored_upto is not None:
            where.append("id <= ?")
            args.append(int(stored_upto))
        want = int(limit) if limit is not None else None
        if want is not None and want <= 0:
            return iter(())
        sql = f"SELECT id, {_META} FROM chunks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts_min"
        needle = text.lower() if text else None

        def keep(e: tuple[Any, ...]) -> bool:  # on _merge_chunks' tuples
            ts = e[0]
            return (
                (lo is None or ts >= lo)
                and (hi is None or ts < hi)
                and (levels is None or e[4] in levels)
                and (needle is None or needle in e[5].lower())
            )

        plain = lo is None and hi is None and levels is None and needle is None
        events = _merge_chunks(self.path, sql, args, None if plain else keep)
        return itertools.islice(events, want) if want is not None else events

    def rank_facts(self, job: str, *, since: Any = None, until: Any = None) -> list[RankFacts]:
        """:class:`~mlops_obs.logs.source.RankFacts` of every rank of ``job`` with log events in
        [``since``, ``until``), by rank (the rank-less entry last).

        Worked out from the chunks' columns: counts, times and nodes from their metadata (a chunk
        is decoded only where it straddles the time range); the first error from the chunks the
        severity index marks, in time order, until no later chunk can hold an earlier one; the last
        step from each rank's chunks backwards in time until one holds a step.
        """
        where, args = ["job = ?", "kind = 'log'"], [job]
        lo, hi = _time_range(since, until, where, args)
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, severity, n, {_META} FROM chunks WHERE {' AND '.join(where)}", args
            ).fetchall()

        def inside(ts: str) -> bool:
            return (lo is None or ts >= lo) and (hi is None or ts < hi)

        def events(row: tuple[Any, ...]) -> list[tuple[Any, ...]]:
            with self._lock:
                prefix, data = self._db.execute("SELECT prefix, data FROM chunks WHERE id = ?", (row[0],)).fetchone()
            return [e for e in _decode(prefix, data) if inside(e[1])]

        # rank -> [nodes, events, first, last]
        acc: dict[int | None, list[Any]] = {}
        for row in rows:
            _, _, n, _, _, rank, node, _, _, ts_min, ts_max = row
            if inside(ts_min) and inside(ts_max):
                count, first, last = n, ts_min, ts_max
            else:
                tss = [e[1] for e in events(row)]
                if not tss:
                    continue
                count, first, last = len(tss), min(tss), max(tss)
            a = acc.setdefault(rank, [set(), 0, first, last])
            if node is not None:
                a[0].add(node)
            a[1] += count
            a[2], a[3] = min(a[2], first), max(a[3], last)
        first_error: dict[int | None, tuple[Any, ...]] = {}
        for row in sorted((r for r in rows if r[1] >= LEVEL_RANK["error"]), key=lambda r: r[9]):
            rank, best = row[5], first_error.get(row[5])
            if best is not None and row[9] > best[1]:
                continue
            for e in events(row):
                if LEVEL_RANK.get(e[2], 0) >= LEVEL_RANK["error"]:
                    cand = (row[7], e[1], e, row[3:])
                    if best is None or _order_key(cand) < _order_key(best):
                        best = first_error[rank] = cand
        last_step: dict[int | None, tuple[str, int]] = {}
        for row in sorted(rows, key=lambda r: r[10], reverse=True):
            rank, got = row[5], last_step.get(row[5])
            if got is not None and row[10] < got[0]:
                continue
            for e in events(row):
                step = e[6].get("step") if type(e[6]) is dict else None
                if type(step) is int and (got is None or e[1] > got[0]):
                    got = last_step[rank] = (e[1], step)
        return [
            RankFacts(job=job, rank=rank, nodes=tuple(sorted(a[0])), events=a[1], first_time=a[2], last_time=a[3],
                      first_error=_event(first_error[rank][3], first_error[rank][2]) if rank in first_error else None,
                      last_step=last_step[rank][1] if rank in last_step else None,
                      last_step_time=last_step[rank][0] if rank in last_step else None)
            for rank, a in sorted(acc.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        ]  # fmt: skip

    # --- retention ---------------------------------------------------------------------------------

    def apply_retention(self, max_age: float, *, now: float | None = None, batch: int = 200) -> tuple[int, int]:
        """Delete the chunks whose every event is older than ``max_age`` seconds before ``now`` and
        give their space back to the file system; returns (events deleted, bytes the files shrank).

        Whole chunks go (one whose newest event is inside the window stays, so a little more than
        ``max_age`` is kept), ``batch`` chunks a transaction, so the shipper and the alert sink wait
        for one short write at most. Space: SQLite only marks the pages of deleted rows free; they
        go back to the file system with *incremental vacuum* (``auto_vacuum=INCREMENTAL``, then
        ``PRAGMA incremental_vacuum`` after each pass), which moves only pages near the end of the
        file and truncates it: work in proportion to what was deleted. A full ``VACUUM`` on every
        pass would rewrite the whole store (work and temporary disk in proportion to what is kept,
        writers blocked meanwhile); it runs once, on the first pass over a store made without
        incremental vacuum, because that setting only takes effect through a rebuild.
        """
        cutoff = format_timestamp((time.time() if now is None else now) - float(max_age))
        size0 = self._file_bytes()
        deleted = 0
        while True:
            with self._transaction():
                rows = self._db.execute(
                    "SELECT id, n FROM chunks WHERE ts_min < ? AND ts_max < ? LIMIT ?", (cutoff, cutoff, batch)
                ).fetchall()
                if rows:
                    self._db.executemany("DELETE FROM chunks WHERE id = ?", [(r[0],) for r in rows])
            deleted += sum(r[1] for r in rows)
            if len(rows) < batch:
                break
        with self._lock:
            if int(self._db.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                self._db.execute("VACUUM")
            self._db.execute("PRAGMA incremental_vacuum").fetchall()
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # the shrink reaches the file
        return deleted, max(0, size0 - self._file_bytes())

    def _file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += (self.directory / (DB_NAME + suffix)).stat().st_size
            except OSError:
                pass
        return total

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _time_range(since: Any, until: Any, where: list[str], args: list[Any]) -> tuple[str | None, str | None]:
    """``since`` and ``until`` made canonical, and the terms selecting the chunks that may hold events
    in [``since``, ``until``) added to ``where`` and ``args``."""
    lo = format_timestamp(since) if since is not None else None
    hi = format_timestamp(until) if until is not None else None
    if lo is not None:
        where.append("ts_max >= ?")
        args.append(lo)
    if hi is not None:
        where.append("ts_min < ?")
        args.append(hi)
    return lo, hi


_META = "kind, job, rank, node, source, prefix, ts_min, ts_max"
"""The chunk columns an event takes its stream fields from (see :func:`_event`)."""


def _merge_chunks(
    path: Path, sql: str, args: Sequence[Any], keep: Callable[[tuple[Any, ...]], bool] | None
) -> Iterator[dict[str, Any]]:
    """The events of the chunks ``sql`` selects (``id`` and :data:`_META`, in ``ts_min`` order), merged
    into (``@timestamp``, ``source``, ``offset``) order: a k-way merge of the chunk streams with a
    watermark, so only the chunks open at one moment are in memory.

    Why it is correct: chunks come by ``ts_min``, so once the next chunk starts at ``w`` no chunk not
    yet read holds an event before ``w``; every held event before ``w`` can go out, in order.
    Events are held as tuples ``(ts, source, offset, _id, level, message, seq, fields, meta)``:
    ``_id`` is unique in the store, so a comparison never reaches ``fields``; a dict is made for an
    event only as it is yielded. They go out in batches of at least :data:`MERGE_BATCH` and a
    quarter of the events held (or at the end): each chunk's events are a sorted run, so one
    ``list.sort`` of a batch is a merge of runs in C, where sorting at every chunk (a 64-rank job's
    chunks all overlap) would sort the held events again for each. Memory: one batch and the events
    of the chunks overlapping the watermark, whatever the store's size; SQLite streams the chunk
    metadata in ``ts_min`` order.

    ``keep`` (on those tuples) drops events the chunk selection could not (time bounds, levels, text).
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0, isolation_level=None,
                         check_same_thread=False)  # fmt: skip
    try:
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("BEGIN")  # one snapshot for the metadata and every chunk read after it
        fetch = db.cursor()
        held: list[tuple[Any, ...]] = []
        held_min: str | None = None
        added = 0
        batch = MERGE_BATCH_FIRST
        repeat = itertools.repeat
        for cid, *meta in db.execute(sql, args):
            w = meta[6]
            if added >= batch and added * 4 >= len(held) and held_min is not None and held_min < w:
                held.sort()
                i = bisect.bisect_left(held, (w,))
                out = held[:i]
                del held[:i]
                held_min = held[0][0] if held else None
                added, batch = 0, MERGE_BATCH
                yield from _as_events(out)
                del out
            got = fetch.execute("SELECT data FROM chunks WHERE id = ?", (cid,)).fetchone()
            if got is None:
                continue
            cols = orjson.loads(got[0])
            m = tuple(meta)
            # repeat() is endless and the columns are of one length: strict would only fail on repeat.
            items = zip(cols[1], repeat(m[4]), cols[5], _chunk_ids(m[5], cols), cols[2], cols[3], cols[4], cols[6],
                        repeat(m), strict=False)  # fmt: skip
            new = list(items) if keep is None else [it for it in items if keep(it)]
            if new:
                first = min(cols[1]) if keep is None else min(it[0] for it in new)
                held += new
                added += len(new)
                if held_min is None or first < held_min:
                    held_min = first
        held.sort()
        yield from _as_events(held)
    finally:
        db.close()


MERGE_BATCH = 2048
"""Events a streaming merge adds before it sorts and hands out what the watermark allows."""
MERGE_BATCH_FIRST = 256
"""The first batch is small: the first lines of a query come at once."""


def _as_events(items: list[tuple[Any, ...]]) -> Iterator[dict[str, Any]]:
    """The schema's dicts of :func:`_merge_chunks`' tuples."""
    for t, src, off, eid, lv, msg, seq, fl, m in items:
        yield {"_id": eid, "@timestamp": t, "kind": m[0], "job": m[1], "rank": m[2], "node": m[3], "level": lv,
               "message": msg, "seq": seq, "source": src, "offset": off, "fields": fl}  # fmt: skip


def _decode(prefix: str, data: bytes) -> Iterator[tuple[Any, ...]]:
    """A chunk's events as ``(_id, @timestamp, level, message, seq, offset, fields)`` tuples."""
    cols = orjson.loads(data)
    cols[0] = _chunk_ids(prefix, cols)
    return zip(*cols, strict=True)


def _event(meta: Sequence[Any], e: Sequence[Any]) -> dict[str, Any]:
    """The schema's dict for event ``e`` of :func:`_decode` in the chunk whose :data:`_META` is ``meta``."""
    return {"_id": e[0], "@timestamp": e[1], "kind": meta[0], "job": meta[1], "rank": meta[2], "node": meta[3],
            "level": e[2], "message": e[3], "seq": e[4], "source": meta[4], "offset": e[5], "fields": e[6]}  # fmt: skip


def _order_key(f: tuple[Any, ...]) -> tuple[str, str, int]:
    """(``@timestamp``, ``source``, ``offset``) of a ``(source, timestamp, event, ...)`` candidate."""
    return f[1], f[0], f[2][5]


class _Transaction:
    """``BEGIN IMMEDIATE`` under the connection's thread lock; rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                try:
                    self._db.execute("COMMIT")
                except BaseException:  # disk full, I/O error: leave no half-open transaction behind
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            elif self._db.in_transaction:
                self._db.execute("ROLLBACK")
        finally:
            self._lock.release()


class StoreSink:
    """The store as a :class:`~mlops_obs.logs.sink.Sink`: one transaction a batch (so a column batch
    from the shipper goes straight to :meth:`EventStore.put`); SQLite errors (disk full, a lock held
    past the busy timeout) are retried with backoff until ``stop``, said once each and kept in
    ``stats.sink_error`` while they last. A damaged file is checked for on opening and raises
    :class:`StoreDamaged` at once, on opening or on a write, rather than being retried."""

    def __init__(
        self, directory: Path | str, *, log: FilteringBoundLogger | None = None, stats: Stats | None = None
    ) -> None:
        self.store = EventStore(directory, check=True)
        self.log = log
        self.stats = stats

    def send(self, events: Events, stop: threading.Event) -> int:
        delay = backoff_delays()
        failing: str | None = None
        while True:
            try:
                new = self.store.put(events)
                FAULTS.hit("sent")
                if failing:
                    say(self.log, "info", "store writable again")
                if self.stats is not None:
                    self.stats.sink_error = None
                return new
            except sqlite3.Error as e:
                if is_damage(e):
                    raise StoreDamaged(self.store.directory, str(e)) from None
                if self.stats is not None:
                    self.stats.retries += 1
                    self.stats.sink_error = f"store: {e}"
                if failing != str(e):
                    say(self.log, "error", "store write failed; retrying", error=str(e))
                failing = str(e)
                if stop.wait(delay()):
                    raise Stop() from e

    def close(self) -> None:
        self.store.close()


# --- checking and salvaging a damaged store ----------------------------------------------------------

_CHUNK_COLUMNS = "id, kind, job, rank, node, source, prefix, off_min, off_max, ts_min, ts_max, severity, n, data"
_SALVAGE_BATCH = 256


def _open_read_only(directory: Path) -> sqlite3.Connection:
    path = directory / DB_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no event store in {str(directory)!r} ({DB_NAME} is missing)")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0, isolation_level=None)


def check_store(directory: Path | str) -> list[str]:
    """SQLite's ``integrity_check`` of a store, read-only: ``[]`` when it is whole, else the problems
    (at most 20) SQLite names."""
    db = _open_read_only(Path(directory))
    try:
        rows = db.execute("PRAGMA integrity_check(20)").fetchall()
    except sqlite3.DatabaseError as e:
        return [str(e)]
    finally:
        db.close()
    return [] if rows == [("ok",)] else [str(r[0]) for r in rows]


def _chunk_ok(row: tuple[Any, ...]) -> bool:
    """A chunk row whose columns have the schema's types and whose data decodes to its ``n`` events."""
    try:
        if not (isinstance(row[1], str) and row[1] in _KINDS and isinstance(row[5], str) and isinstance(row[6], str)):
            return False
        cols = orjson.loads(row[13])
        n = row[12]
        return (
            isinstance(cols, list)
            and len(cols) == 7
            and all(c is None or (isinstance(c, list) and len(c) == n) for c in cols)
            and cols[1] is not None
        )
    except (orjson.JSONDecodeError, TypeError):
        return False


def _readable_chunks(db: sqlite3.Connection) -> Iterator[tuple[tuple[Any, ...] | None, int]]:
    """``(row, id)`` for every chunk id that reads, ``(None, id)`` for one that does not, in id order.

    Rows are read by ranges of the table's own b-tree (never an index); a range that raises is read
    again one id at a time, so a damaged page costs the chunks on it, not the ones after it.
    """
    try:
        last = int(db.execute("SELECT coalesce(max(id), 0) FROM chunks").fetchone()[0])
    except sqlite3.DatabaseError:
        last = -1  # unknown: read ranges until one comes back empty
    pos = 0
    while last < 0 or pos < last:
        try:
            rows = db.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE id > ? ORDER BY id LIMIT ?", (pos, _SALVAGE_BATCH)
            ).fetchall()
        except sqlite3.DatabaseError:
            rows = None
        if rows:
            for row in rows:
                yield row, int(row[0])
            pos = int(rows[-1][0])
            continue
        if rows is not None and last < 0:
            return
        found = False
        for i in range(pos + 1, pos + _SALVAGE_BATCH + 1):  # a range that failed, or ended early
            try:
                one = db.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE id = ?", (i,)).fetchone()
            except sqlite3.DatabaseError:
                yield None, i
                continue
            if one is not None:
                found = True
                yield one, i
        pos += _SALVAGE_BATCH
        if last < 0 and not found:
            return  # no end to aim for, and nothing readable here: the rest is out of reach


def salvage_store(source: Path | str, target: Path | str) -> tuple[int, int, int]:
    """Copy every readable, well-formed chunk of the store in ``source`` into a new store in ``target``
    (which must not hold events yet); returns (chunks copied, events copied, chunks lost). ``source``
    is opened read-only and never written. Chunk ids may differ in ``target``; the events do not."""
    src = _open_read_only(Path(source))
    out = EventStore(target)
    try:
        if out.count():
            raise ValueError(f"{str(target)!r} already holds events; salvage into a new directory")
        copied = events = lost = 0
        pending: list[tuple[Any, ...]] = []

        def flush() -> None:
            with out._transaction():
                out._db.executemany(_INSERT, pending)
            pending.clear()

        for row, _ in _readable_chunks(src):
            if row is None or not _chunk_ok(row):
                lost += 1
                continue
            pending.append(row[1:])
            copied += 1
            events += int(row[12])
            if len(pending) >= _SALVAGE_BATCH:
                flush()
        if pending:
            flush()
        return copied, events, lost
    finally:
        src.close()
        out.close()


class StoreSource:
    """The store as a :class:`~mlops_obs.logs.source.Source`. ``events`` is :meth:`EventStore.iter_query`
    (a streaming merge of the chunks); ``follow`` reads past the store's :meth:`~EventStore.position`;
    ``rank_facts`` is :meth:`EventStore.rank_facts`."""

    def __init__(self, directory: Path | str) -> None:
        if not (Path(directory) / DB_NAME).is_file():
            raise FileNotFoundError(f"no event store in {str(directory)!r} ({DB_NAME} is missing)")
        self.store = EventStore(directory)

    def _query(self, q: EventQuery, **kw: Any) -> Iterator[dict[str, Any]]:
        return self.store.iter_query(job=q.job, rank=q.ranks or None, node=q.node, kind=q.kind, level=q.levels,
                                     since=q.since, until=q.until, text=q.text, **kw)  # fmt: skip

    def events(self, query: EventQuery) -> Iterator[dict[str, Any]]:
        return self._query(query, limit=query.limit)

    def follow(self, query: EventQuery, stop: threading.Event, poll_interval: float = 0.25) -> Iterator[dict[str, Any]]:
        pos = self.store.position()
        yield from self._query(query, limit=query.limit, stored_upto=pos)
        while not stop.wait(poll_interval):
            now = self.store.position()
            if now > pos:
                yield from self._query(query, stored_after=pos, stored_upto=now)
                pos = now

    def rank_facts(self, job: str, *, since: str | None = None, until: str | None = None) -> list[RankFacts]:
        return self.store.rank_facts(job, since=since, until=until)

    def close(self) -> None:
        self.store.close()


def _parse_retention(v: Any) -> float | None:
    """A duration as the other settings take it, or in days or weeks (``30d``, ``2w``) as retentions are."""
    if v is None or v == "":
        return None
    s = str(v).strip()
    if s[-1:] in ("d", "w") and s[:-1].replace(".", "", 1).isdigit():
        d = float(s[:-1]) * (86400.0 if s[-1] == "d" else 7 * 86400.0)
    else:
        d = parse_duration(v)
    if d < 60:
        raise ValueError(f"must be at least 1m (or empty for no retention), got {v!r}")
    return d


STORE_RETENTION_SETTING = Setting(
    "store.retention", _parse_retention, None,
    "Delete the embedded store's events older than this (whole chunks) and give the space back to the file "
    "system; checked at start and every tenth of it (between 1m and 1h). Default: keep everything.",
    metavar="DURATION",
)  # fmt: skip


def retention_from_config(
    cfg: Mapping[str, Any], store_dir: Path | None, log: FilteringBoundLogger | None = None
) -> RetentionLoop | None:
    """The :class:`RetentionLoop` ``--store.retention`` asks for (not started), or None; a
    :class:`~mlops_obs.config.ConfigError` when the events go to OpenSearch (its ISM policy,
    ``--opensearch.retention``, deletes old indices there)."""
    max_age = cfg.get("store.retention")
    if max_age is None:
        return None
    if store_dir is None:
        raise ConfigError("store.retention", "applies to the embedded store; OpenSearch uses --opensearch.retention")
    return RetentionLoop(store_dir, max_age, log=log)


class RetentionLoop:
    """``--store.retention``: :meth:`EventStore.apply_retention` at start and then every ``interval``
    seconds (a tenth of the retention, between a minute and an hour), in a daemon thread with its own
    connection, until :meth:`stop`. A failed pass (the store busy past the timeout, a full disk for
    the one-time ``VACUUM``) is logged and tried again at the next."""

    def __init__(
        self, directory: Path | str, max_age: float, *, interval: float | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:  # fmt: skip
        self.directory = Path(directory)
        self.max_age = float(max_age)
        self.interval = interval if interval is not None else min(3600.0, max(60.0, self.max_age / 10))
        self.log = log
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-retention", daemon=True)

    def start(self) -> RetentionLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.run_pass()
            if self._stop.wait(self.interval):
                return

    def run_pass(self) -> None:
        """One pass, now, in the caller's thread (``ship --once`` runs one after shipping)."""
        try:
            with EventStore(self.directory) as store:
                events, freed = store.apply_retention(self.max_age)
            if events or freed:
                say(self.log, "info", "store retention", events_deleted=events, bytes_freed=freed)
        except (sqlite3.Error, OSError) as e:
            say(self.log, "error", "store retention failed; retrying later", error=str(e))
        self.passes += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
