"""Where the analysis reads a job's events: the embedded store (fast path), a logs
:class:`~mlops_obs.logs.source.Source` (OpenSearch), or any re-readable stream of events in the
store schema (a bundle, the store's own ``query()``).

What the verdict needs from a store is small and the same everywhere (see docs/rca.md, "What rca
asks of a store"):

1. per rank, how many events it has (the chunks' metadata: no decoding);
2. the job's error events, in time order (the severity index);
3. per rank, its last events, back to its last completed step (its last chunks);
4. alerts, launcher and stack events over the job's time range (the non-log kind index);
5. the events in a window around the incident, for the timeline.

:class:`ChunkStore` answers these from the store's SQL (schema version 2) directly, decoding only the
chunks they select, so a verdict over a 1-million-event job reads a few hundred kilobytes of chunk
data rather than all of it. :class:`EventStream` answers them from a full pass over any iterable, which
is what a bundle or an unknown store version gets. :class:`SourceFacts` answers them through a logs
``Source`` (``rank_facts`` and filtered ``events``; OpenSearch adds two aggregations of its own,
see there). All feed the same
:class:`~mlops_obs.rca.facts.FactsBuilder`, whose facts do not depend on which events beyond the needed
ones it was given, so the two paths give the same verdict (a test holds them to it).
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson

from mlops_obs.logs.sink import LEVEL_RANK
from mlops_obs.logs.source import EventQuery
from mlops_obs.logs.source import Source as LogSource
from mlops_obs.logs.store import DB_NAME, EventStore
from mlops_obs.rca.facts import RECENT_PROGRESS, FactsBuilder, JobFacts
from mlops_obs.rca.times import epoch, stamp

KIND_MARGIN_SECONDS = 900.0
"""How far before and after the job's own events alerts and launcher records are looked for: a disk
that was filling or a node alert that fired before the job's last line still explains it."""
CHUNK_SCHEMA = 2
"""The store schema whose SQL :class:`ChunkStore` reads; any other version takes the full pass."""
TAIL_CHUNKS = 8
"""Most chunks read back from a rank's end when looking for its last completed step."""


class SourceError(Exception):
    """The events cannot be read (no store there, a corrupt file, a newer schema); one line."""


class Source(Protocol):
    def facts(self, job: str, since: str | None, until: str | None) -> JobFacts: ...

    def window(self, job: str, nodes: set[str], lo: str, hi: str) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def relevant(ev: Mapping[str, Any], job: str, nodes: set[str]) -> bool:
    """An event of the job, or a job-less event (an alert, a kernel line) of one of its nodes."""
    j = ev.get("job")
    if j == job:
        return True
    if j not in (None, ""):
        return False
    node = ev.get("node")
    if not isinstance(node, str):
        return False
    return node in nodes or node.rpartition(":")[0] in nodes  # an alert's instance is host:port


def _in(ts: str, since: str | None, until: str | None) -> bool:
    return (since is None or ts >= since) and (until is None or ts < until)


class EventStream:
    """Facts and windows from a full pass over a re-readable stream of store-schema events."""

    def __init__(self, open_events: Callable[[], Iterable[Mapping[str, Any]]], name: str = "events") -> None:
        self._open = open_events
        self.name = name

    def _events(self) -> Iterator[Mapping[str, Any]]:
        try:
            yield from self._open()
        except (OSError, ValueError, sqlite3.Error) as e:
            raise SourceError(f"{self.name}: {e}") from None

    def facts(self, job: str, since: str | None, until: str | None) -> JobFacts:
        b = FactsBuilder(job)
        others: list[Mapping[str, Any]] = []
        for ev in self._events():
            ts = ev.get("@timestamp")
            if not isinstance(ts, str):
                continue
            if ev.get("job") == job:
                if _in(ts, since, until):
                    b.add(ev)
            elif ev.get("job") in (None, "") and ev.get("node"):
                others.append(ev)  # node-level: relevant once the job's nodes are known
        f = b.facts
        lo, hi = _kind_range(f, since, until)
        nodes = f.nodes
        for ev in others:
            if relevant(ev, job, nodes) and lo <= ev["@timestamp"] < hi:
                b.add(ev)
        return f

    def window(self, job: str, nodes: set[str], lo: str, hi: str) -> list[dict[str, Any]]:
        out = [dict(ev) for ev in self._events() if lo <= str(ev.get("@timestamp")) < hi and relevant(ev, job, nodes)]
        out.sort(key=_order)
        return out

    def close(self) -> None:
        pass


def _order(ev: Mapping[str, Any]) -> tuple[str, str, int]:
    off = ev.get("offset")
    return str(ev.get("@timestamp")), str(ev.get("source") or ""), off if type(off) is int else 0


def _kind_range(f: JobFacts, since: str | None, until: str | None) -> tuple[str, str]:
    lo = stamp(epoch(f.first) - KIND_MARGIN_SECONDS) if f.first else (since or "0000")
    hi = stamp(epoch(f.last) + KIND_MARGIN_SECONDS) if f.last else (until or "9999")
    if since is not None and since > lo:
        lo = since
    if until is not None and until < hi:
        hi = until
    return lo, hi


_COLS = "id, kind, job, rank, node, source, prefix, ts_min, ts_max, data"


class ChunkStore:
    """The embedded store's chunks, read-only, through the questions listed in the module docstring."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        path = self.directory / DB_NAME
        if not path.is_file():
            raise SourceError(f"{self.directory}: no event store there (no {DB_NAME})")
        try:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
            self.db.execute("PRAGMA busy_timeout=30000")
            version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
            if version != CHUNK_SCHEMA:
                raise SourceError(f"{self.directory}: store schema version {version}, not {CHUNK_SCHEMA}")
            self.db.execute("SELECT 1 FROM chunks LIMIT 1").fetchall()
        except sqlite3.Error as e:
            raise SourceError(f"{self.directory}: cannot read the store: {e}") from None
        self.chunks_decoded = 0
        self.events_decoded = 0

    def close(self) -> None:
        self.db.close()

    # --- decoding --------------------------------------------------------------------------------------

    def _decode(self, row: tuple[Any, ...]) -> list[dict[str, Any]]:
        _, kind, job, rank, node, source, prefix, _, _, data = row
        try:
            ids, tss, levels, msgs, seqs, offs, fields = orjson.loads(data)
        except (orjson.JSONDecodeError, ValueError, TypeError) as e:
            raise SourceError(f"{self.directory}: chunk {row[0]} is corrupt: {e}") from None
        if ids is None:
            head = prefix + "-"
            ids = [head + str(o) for o in offs]
        self.chunks_decoded += 1
        self.events_decoded += len(tss)
        return [
            {
                "_id": i,
                "@timestamp": t,
                "kind": kind,
                "job": job,
                "rank": rank,
                "node": node,
                "level": lv,
                "message": m,
                "seq": s,
                "source": source,
                "offset": o,
                "fields": fl,
            }
            for i, t, lv, m, s, o, fl in zip(ids, tss, levels, msgs, seqs, offs, fields)
        ]

    def _rows(self, sql: str, args: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
        try:
            yield from self.db.execute(sql, tuple(args))
        except sqlite3.Error as e:
            raise SourceError(f"{self.directory}: cannot read the store: {e}") from None

    def _scalar(self, sql: str, args: Iterable[Any]) -> list[tuple[Any, ...]]:
        return list(self._rows(sql, args))

    @staticmethod
    def _range(since: str | None, until: str | None) -> tuple[str, list[Any]]:
        sql, args = "", []
        if since is not None:
            sql += " AND ts_max >= ?"
            args.append(since)
        if until is not None:
            sql += " AND ts_min < ?"
            args.append(until)
        return sql, args

    # --- the questions -----------------------------------------------------------------------------------

    def rank_counts(self, job: str, since: str | None, until: str | None) -> dict[int | None, int]:
        """(1) Events per rank, from the chunks' metadata (exact without a time range, else per chunk)."""
        rng, args = self._range(since, until)
        rows = self._scalar(
            f"SELECT rank, sum(n) FROM chunks WHERE job = ? AND kind = 'log'{rng} GROUP BY rank", [job, *args]
        )
        return {r: int(n) for r, n in rows}

    def errors(self, job: str, since: str | None, until: str | None) -> Iterator[dict[str, Any]]:
        """(2) The job's chunks holding errors, by time (the partial severity index), decoded."""
        rng, args = self._range(since, until)
        floor = LEVEL_RANK["error"]
        for row in self._rows(
            f"SELECT {_COLS} FROM chunks WHERE severity >= 3 AND severity >= ? AND job = ?{rng} ORDER BY ts_min",
            [floor, job, *args],
        ):
            yield from self._decode(row)

    def tail(self, job: str, rank: int, since: str | None, until: str | None) -> Iterator[dict[str, Any]]:
        """(3) A rank's chunks from its end back to the chunk holding its last completed step."""
        rng, args = self._range(since, until)
        ids = self._scalar(
            f"SELECT id, ts_min, ts_max FROM chunks WHERE job = ? AND rank = ? AND kind = 'log'{rng}"
            " ORDER BY ts_max DESC",
            [job, rank, *args],
        )
        progress: str | None = None
        for n, (cid, _, ts_max) in enumerate(ids):
            if progress is not None and ts_max < progress:
                break  # no event in this or an older chunk can be a later completed step
            if n >= TAIL_CHUNKS and progress is None:
                break
            for row in self._rows(f"SELECT {_COLS} FROM chunks WHERE id = ?", [cid]):
                for ev in self._decode(row):
                    yield ev
                    fl = ev["fields"]
                    if (
                        type(fl) is dict
                        and type(fl.get("step")) is int
                        and ev["level"] in (None, "debug", "info")
                        and not fl.get("raw")
                        and (progress is None or ev["@timestamp"] > progress)
                    ):
                        progress = ev["@timestamp"]

    def other_kinds(self, lo: str, hi: str) -> Iterator[dict[str, Any]]:
        """(4) Alerts, launcher and stack events in ``[lo, hi)`` (the partial index on kind)."""
        for row in self._rows(
            f"SELECT {_COLS} FROM chunks WHERE kind != 'log' AND ts_max >= ? AND ts_min < ? ORDER BY ts_min", [lo, hi]
        ):
            yield from self._decode(row)

    def node_errors(self, nodes: set[str], lo: str, hi: str) -> Iterator[dict[str, Any]]:
        """Job-less error lines of the job's nodes (a kernel log shipped from the node)."""
        if not nodes:
            return
        marks = ",".join("?" * len(nodes))
        for row in self._rows(
            f"SELECT {_COLS} FROM chunks WHERE severity >= 3 AND severity >= ? AND job IS NULL"
            f" AND node IN ({marks}) AND ts_max >= ? AND ts_min < ? ORDER BY ts_min",
            [LEVEL_RANK["error"], *sorted(nodes), lo, hi],
        ):
            yield from self._decode(row)

    def window(self, job: str, nodes: set[str], lo: str, hi: str) -> list[dict[str, Any]]:
        """(5) The job's events (and its nodes' alerts and job-less lines) in ``[lo, hi)``, in order."""
        out: list[dict[str, Any]] = []
        for row in self._rows(
            f"SELECT {_COLS} FROM chunks WHERE ts_max >= ? AND ts_min < ? AND (job = ? OR job IS NULL)", [lo, hi, job]
        ):
            if row[2] is None and not (row[4] in nodes or str(row[4]).rpartition(":")[0] in nodes):
                continue
            out.extend(ev for ev in self._decode(row) if lo <= ev["@timestamp"] < hi)
        out.sort(key=_order)
        return out

    def span(self, job: str, since: str | None, until: str | None) -> tuple[str, str] | None:
        """The job's first and last event times as the chunks' metadata bound them (no decoding)."""
        rng, args = self._range(since, until)
        first, last = self._scalar(f"SELECT min(ts_min), max(ts_max) FROM chunks WHERE job = ?{rng}", [job, *args])[0]
        if first is None:
            return None
        return max(first, since or first), min(last, until or last)

    def events(self, job: str, since: str | None, until: str | None) -> Iterator[dict[str, Any]]:
        """Every event of the job in ``[since, until)``, with its nodes' job-less alerts, warnings and errors
        around it (:data:`KIND_MARGIN_SECONDS`), in (``@timestamp``, ``source``, ``offset``) order, one
        chunk decoded at a time: chunks come in ``ts_min`` order, and an event is handed on once no chunk
        still to come can hold an earlier one. What is held is the chunks overlapping in time (a few per
        rank), not the job."""
        span = self.span(job, since, until)
        if span is None:
            return
        rng, args = self._range(since, until)
        nodes = {n for (n,) in self._scalar(f"SELECT DISTINCT node FROM chunks WHERE job = ?{rng}", [job, *args]) if n}
        lo = max(stamp(epoch(span[0]) - KIND_MARGIN_SECONDS), since or "")
        hi = min(stamp(epoch(span[1]) + KIND_MARGIN_SECONDS), until or "9999")
        rows = self._rows(
            f"SELECT {_COLS} FROM chunks WHERE job = ?{rng} UNION ALL SELECT {_COLS} FROM chunks"
            " WHERE (job IS NULL OR job = '') AND (kind = 'alert' OR severity >= 3) AND ts_max >= ? AND ts_min < ?"
            " ORDER BY ts_min",
            [job, *args, lo, hi],
        )
        held: list[tuple[tuple[str, str, int], int, dict[str, Any]]] = []
        n = 0
        for row in rows:
            while held and held[0][0][0] < row[7]:
                yield heapq.heappop(held)[2]
            mine = row[2] == job
            for ev in self._decode(row):
                ts = ev["@timestamp"]
                notable = ev["kind"] == "alert" or LEVEL_RANK.get(ev["level"], 0) >= LEVEL_RANK["warning"]
                if not (_in(ts, since, until) if mine else lo <= ts < hi and notable and relevant(ev, job, nodes)):
                    continue
                n += 1
                heapq.heappush(held, (_order(ev), n, ev))
        while held:
            yield heapq.heappop(held)[2]

    def facts(self, job: str, since: str | None, until: str | None) -> JobFacts:
        b = FactsBuilder(job)
        b.count_events = False
        counts = self.rank_counts(job, since, until)
        for r, n in counts.items():
            if r is not None:
                b.facts.rank(r).n_events = n
        b.facts.n_events = sum(counts.values())
        for ev in self.errors(job, since, until):
            if _in(ev["@timestamp"], since, until):
                b.add(ev)
        for r in sorted(x for x in counts if x is not None):
            for ev in self.tail(job, r, since, until):
                if _in(ev["@timestamp"], since, until):
                    b.add(ev)
        f = b.facts
        lo, hi = _kind_range(f, since, until)
        nodes = f.nodes
        for ev in self.other_kinds(lo, hi):
            if relevant(ev, job, nodes):
                b.add(ev)
        for ev in self.node_errors(nodes, lo, hi):
            b.add(ev)
        return f


class SourceFacts:
    """The five questions through a logs :class:`~mlops_obs.logs.source.Source`, never reading a
    job's events in full:

    1. counts per rank: ``rank_facts`` (OpenSearch: one aggregation);
    2. the job's errors: ``events`` at ``min_level="error"``;
    3. per rank, its last :data:`~mlops_obs.rca.facts.RECENT_PROGRESS` progress events and whatever
       it logged after the last: with a source offering ``recent_steps`` and ``after``
       (OpenSearch: one ``top_hits`` aggregation, one paged search), else every event of the rank,
       streamed;
    4. alerts, launcher and stack events, and job-less errors of the job's nodes, over the job's time
       range with :data:`KIND_MARGIN_SECONDS`: ``events`` per kind and per node;
    5. the window: ``events`` over it.

    Every answer streams (the source pages it); memory stays what the facts keep.
    """

    def __init__(self, source: LogSource, name: str) -> None:
        self.source = source
        self.name = name

    def _events(self, q: EventQuery) -> Iterator[dict[str, Any]]:
        try:
            yield from self.source.events(q)
        except SourceError:
            raise
        except Exception as e:  # a server's or a store's failure: one line
            raise SourceError(f"{self.name}: {type(e).__name__}: {e}") from None

    def facts(self, job: str, since: str | None, until: str | None) -> JobFacts:
        b = FactsBuilder(job)
        b.count_events = False
        try:
            ranks = self.source.rank_facts(job, since=since, until=until)
        except Exception as e:
            raise SourceError(f"{self.name}: {type(e).__name__}: {e}") from None
        for rf in ranks:
            if rf.rank is not None:
                b.facts.rank(rf.rank).n_events = rf.events
        b.facts.n_events = sum(rf.events for rf in ranks)
        for ev in self._events(EventQuery(job=job, min_level="error", since=since, until=until)):
            b.add(ev)
        for ev in self._tails(job, [rf for rf in ranks if rf.rank is not None], since, until):
            b.add(ev)
        f = b.facts
        lo_, hi_ = _kind_range(f, since, until)
        lo, hi = (None if lo_ == "0000" else lo_), (None if hi_ == "9999" else hi_)  # no events: no bound
        for kind in ("alert", "launcher", "stack"):
            for ev in self._events(EventQuery(kind=kind, since=lo, until=hi)):
                if relevant(ev, job, f.nodes):
                    b.add(ev)
        for node in sorted(f.nodes):
            for ev in self._events(EventQuery(node=node, min_level="error", since=lo, until=hi)):
                if ev.get("job") in (None, ""):
                    b.add(ev)
        return f

    def _tails(self, job: str, ranks: list[Any], since: str | None, until: str | None) -> Iterator[dict[str, Any]]:
        recent = getattr(self.source, "recent_steps", None)
        after = getattr(self.source, "after", None)
        if recent is not None and after is not None:
            try:
                steps = recent(job, RECENT_PROGRESS, since=since, until=until)
            except Exception as e:
                raise SourceError(f"{self.name}: {type(e).__name__}: {e}") from None
            starts: dict[int, str | None] = {}
            for rf in ranks:
                got = steps.get(rf.rank) or []
                yield from got
                start = got[0]["@timestamp"] if got else since
                starts[rf.rank] = start if since is None or (start is not None and start > since) else since
            try:
                yield from after(job, starts, until=until)
            except Exception as e:
                raise SourceError(f"{self.name}: {type(e).__name__}: {e}") from None
            return
        for rf in ranks:  # no way to ask for a rank's last steps: its whole log, streamed
            yield from self._events(EventQuery(job=job, ranks=(rf.rank,), kind="log", since=since, until=until))

    def window(self, job: str, nodes: set[str], lo: str, hi: str) -> list[dict[str, Any]]:
        return [ev for ev in self._events(EventQuery(since=lo, until=hi)) if relevant(ev, job, nodes)]

    def _extent(self, job: str, since: str | None, until: str | None) -> tuple[str, str, set[str]] | None:
        """The job's first and last event times and its nodes, over every kind: its log events from
        ``rank_facts`` (aggregations), its few alert, launcher and stack events read whole."""
        try:
            ranks = self.source.rank_facts(job, since=since, until=until)
        except Exception as e:
            raise SourceError(f"{self.name}: {type(e).__name__}: {e}") from None
        times = [t for rf in ranks for t in (rf.first_time, rf.last_time)]
        nodes = {n for rf in ranks for n in rf.nodes}
        for kind in ("alert", "launcher", "stack"):
            for ev in self._events(EventQuery(job=job, kind=kind, since=since, until=until)):
                times.append(str(ev["@timestamp"]))
                if isinstance(ev.get("node"), str) and ev["node"]:
                    nodes.add(ev["node"])
        return (min(times), max(times), nodes) if times else None

    def span(self, job: str, since: str | None, until: str | None) -> tuple[str, str] | None:
        """The job's first and last event times (None when it has none), as :meth:`ChunkStore.span`."""
        got = self._extent(job, since, until)
        return None if got is None else (got[0], got[1])

    def events(self, job: str, since: str | None, until: str | None) -> Iterator[dict[str, Any]]:
        """What :meth:`ChunkStore.events` yields, through the source: the job's events in ``[since, until)``
        merged in order with the job-less alerts (relevant to its nodes) and the job-less warnings and
        errors of its nodes within :data:`KIND_MARGIN_SECONDS` of them. Every part is a sorted stream
        the source pages; the merge holds one event of each."""
        got = self._extent(job, since, until)
        if got is None:
            return
        first, last, nodes = got
        lo = max(stamp(epoch(first) - KIND_MARGIN_SECONDS), since or "")
        hi = min(stamp(epoch(last) + KIND_MARGIN_SECONDS), until or "9999")

        def jobless(ev: Mapping[str, Any]) -> bool:
            return ev.get("job") in (None, "") and relevant(ev, job, nodes)

        streams: list[Iterable[dict[str, Any]]] = [
            self._events(EventQuery(job=job, since=since, until=until)),
            (ev for ev in self._events(EventQuery(kind="alert", since=lo, until=hi)) if jobless(ev)),
        ]
        streams += [
            (ev for ev in self._events(EventQuery(node=node, min_level="warning", since=lo, until=hi))
             if ev.get("kind", "log") != "alert" and jobless(ev))
            for node in sorted(nodes)
        ]  # fmt: skip
        yield from heapq.merge(*streams, key=_order)

    def close(self) -> None:
        self.source.close()


def open_store(directory: Path | str) -> Source:
    """The fast path where the store's schema is the one :class:`ChunkStore` reads; else a full pass
    through :meth:`EventStore.query`, which reads (and migrates) whatever version it knows."""
    try:
        return ChunkStore(directory)
    except SourceError as e:
        if "schema version" not in str(e):
            raise
    path = Path(directory)

    def read() -> Iterable[Mapping[str, Any]]:
        with EventStore(path) as s:
            return s.query()

    return EventStream(read, str(path))
