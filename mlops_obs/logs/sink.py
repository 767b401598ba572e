"""The write side of the logs: the event schema, the shipper's batch type, and the :class:`Sink`
protocol with its delivery contract.

This module is the ground floor of :mod:`mlops_obs.logs`: it imports none of its siblings. The store
(:class:`~mlops_obs.logs.store.StoreSink`) and OpenSearch
(:class:`~mlops_obs.logs.opensearch.OpenSearchSink`) implement :class:`Sink`; the shipper and the
alert intake hold whichever :func:`~mlops_obs.logs.backend.open_sink` gave them and never ask which.
The read side (replay, root-cause analysis) is :mod:`mlops_obs.logs.source`; the one place that
knows the backends and picks one is :mod:`mlops_obs.logs.backend`.

Event schema (one dict per event; every sink takes the same dicts, every source yields them)
-----------------------------------------------------------------------------------------
``_id``         str, required. The identity of the event: a sink ignores an ``_id`` it already
                holds, which is what makes re-sending after a crash harmless. The shipper derives
                it from (source fingerprint, byte offset), never from the content, so two identical
                lines are two events.
``@timestamp``  str, ISO-8601 UTC with microseconds and ``Z`` (``2026-01-02T03:04:05.000006Z``).
                Other forms (datetime, epoch seconds, ISO with offset) are normalised by
                :func:`format_timestamp`; the fixed format is what makes string order time order.
``kind``        one of :data:`KINDS`: ``"log"`` (a line from a file), ``"alert"`` (an Alertmanager
                notification), ``"launcher"`` (a workload launcher's record: ranks started, exited,
                stopped), ``"stack"`` (one stack dump of a rank).
``job``         str or None: the training job.
``rank``        int or None: the rank within the job.
``node``        str or None: host name.
``level``       str or None: one of :data:`LEVEL_RANK` (``debug|info|warning|error|critical``).
``message``     str: the log event / raw line / alert summary.
``seq``         int or None: the per-process sequence number the job-side logger adds (gaps mean loss).
``source``      str: where it came from (file path for logs, receiver name for alerts).
``offset``      int: byte offset of the line in its source (0 for alerts), the tie-breaker in order.
``fields``      dict: everything else of the original record (``run_id``, exception, flags such as
                ``invalid_utf8`` or ``split``, alert labels...).

Events are ordered by (``@timestamp``, ``source``, ``offset``).

The delivery contract
---------------------
:meth:`Sink.send` returns only once every event of the batch is durable in the sink or kept in the
dead-letter file (:class:`DeadLetters`) with its reason; transient failures are retried with
full-jitter backoff (:func:`backoff_delays`) for as long as it takes, because the caller either
holds its place in the source files (the shipper, whose checkpoint moves only after ``send``
returned) or bounds the wait itself by setting the ``stop`` event (the alert intake, which must
answer its webhook). A set ``stop`` makes ``send`` raise :class:`Stop`; nothing of that batch counts
as delivered, and re-sending it is harmless because every sink is idempotent on ``_id``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import orjson

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

KINDS = ("log", "alert", "launcher", "stack")
LEVEL_RANK = {"debug": 1, "info": 2, "warning": 3, "error": 4, "critical": 5}
"""The levels of the schema, least to most severe (the store keeps each chunk's highest as a number)."""
DEAD_LETTER_FILE = "dead-letter.ndjson"


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


# --- the shipper's batch ------------------------------------------------------------------------------


class ParsedEvents:
    """A batch of events as :class:`~mlops_obs.logs.events.LineParser` makes them, kept as columns
    with what the shipper knows of them, so the store takes it without building an event dict per
    line and taking it apart again, nor re-deriving per event what holds per file. Every sink
    accepts it; one that wants dicts calls :meth:`dicts`.

    ``runs`` holds ``(prefix, source, start, end)``: events ``start`` to ``end`` are lines of one
    file, in increasing ``offset`` order (so no ``_id`` twice), each with ``_id``
    ``f"{prefix}-{offset}"``, ``kind`` ``"log"`` unless ``kinds`` (event index -> kind, for the
    launcher's records and stack dumps) says otherwise, that ``source``, and the schema's types for every
    field the parser sets itself (``message`` str, ``level`` str or None, ``rank``/``seq`` int or
    None, ``offset`` int, ``fields`` dict). What comes from the record as written (``job``,
    ``node``) and the timestamps are still checked by the store, which takes its general path for a
    batch failing a check.
    """

    __slots__ = ("fields", "jobs", "kinds", "levels", "msgs", "nodes", "offs", "ranks", "runs", "seqs", "tss")

    def __init__(self) -> None:
        self.tss: list[Any] = []
        self.jobs: list[Any] = []
        self.ranks: list[Any] = []
        self.nodes: list[Any] = []
        self.levels: list[Any] = []
        self.msgs: list[Any] = []
        self.seqs: list[Any] = []
        self.offs: list[Any] = []
        self.fields: list[Any] = []
        self.runs: list[tuple[str, str, int, int]] = []
        self.kinds: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.offs)

    def append(self, ev: Mapping[str, Any]) -> None:
        """Add one event dict made by the parser (the line-at-a-time path)."""
        kind = ev.get("kind", "log")
        if kind != "log":
            self.kinds[len(self.offs)] = kind
        self.tss.append(ev["@timestamp"])
        self.jobs.append(ev["job"])
        self.ranks.append(ev["rank"])
        self.nodes.append(ev["node"])
        self.levels.append(ev["level"])
        self.msgs.append(ev["message"])
        self.seqs.append(ev["seq"])
        self.offs.append(ev["offset"])
        self.fields.append(ev["fields"])

    def dicts(self) -> list[dict[str, Any]]:
        """The events as the dicts of the event schema, in order.

        Thousands of small acyclic dicts: they are built with the cyclic garbage collector paused,
        which would otherwise walk them again and again for nothing (reference counting frees them).
        """
        if sum(b - a for _, _, a, b in self.runs) != len(self):
            raise ValueError(f"ParsedEvents: runs cover {sum(b - a for _, _, a, b in self.runs)} of {len(self)} events")
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            out: list[dict[str, Any]] = []
            for prefix, source, a, b in self.runs:
                for ts, job, rank, node, level, msg, seq, off, fields in zip(
                    self.tss[a:b], self.jobs[a:b], self.ranks[a:b], self.nodes[a:b], self.levels[a:b],
                    self.msgs[a:b], self.seqs[a:b], self.offs[a:b], self.fields[a:b], strict=True,
                ):  # fmt: skip
                    out.append({"_id": f"{prefix}-{off}", "@timestamp": ts, "kind": "log", "job": job, "rank": rank,
                                "node": node, "level": level, "message": msg, "seq": seq, "source": source,
                                "offset": off, "fields": fields})  # fmt: skip
            for i, kind in self.kinds.items():
                out[i]["kind"] = kind
            return out
        finally:
            if gc_was_on:
                gc.enable()


Events: TypeAlias = ParsedEvents | Sequence[Mapping[str, Any]]
"""What :meth:`Sink.send` takes: the shipper's column batch, or event dicts (the alert intake's)."""


# --- the protocol and its contract --------------------------------------------------------------------


class Stop(Exception):
    """``send`` was asked to stop before its batch was delivered; the batch stays undelivered.

    Raised ``from`` the last error the sink met, when there was one, so a caller that bounds the
    wait can say why (the alert intake answers with it)."""


class Sink(Protocol):
    """A destination of events (see the module docstring for the contract)."""

    def send(self, events: Events, stop: threading.Event) -> int:
        """Deliver ``events`` (durable or dead-lettered) and return how many were new, or
        ``len(events)`` where the sink cannot tell; raise :class:`Stop` once ``stop`` is set first."""
        ...

    def close(self) -> None: ...


@dataclass
class Stats:
    """The shipper's counters; sinks add their retries and dead letters. :meth:`snapshot` is the format
    of ``stats.json``, which the sidecar's ``shipper`` collector reads."""

    lines_read: int = 0
    events_shipped: int = 0
    retries: int = 0
    dead_letters: int = 0
    lines_split: int = 0
    last_success: float | None = None
    lag: dict[str, int] = field(default_factory=dict)
    sink_error: str | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "lines_read_total": self.lines_read,
            "events_shipped_total": self.events_shipped,
            "retries_total": self.retries,
            "dead_letters_total": self.dead_letters,
            "lines_split_total": self.lines_split,
            "last_success_timestamp_seconds": self.last_success,
            "lag_bytes": dict(self.lag),
            "sink_error": self.sink_error,
            "pid": os.getpid(),
            "written_at": time.time(),
        }


def backoff_delays(base: float = 0.05, cap: float = 5.0) -> Callable[[], float]:
    """Full-jitter exponential backoff (AWS architecture blog): spreads retries of many shippers."""
    attempt = [0]

    def nxt() -> float:
        d = random.uniform(0, min(cap, base * (2 ** attempt[0])))
        attempt[0] = min(attempt[0] + 1, 30)
        return d

    return nxt


def say(log: FilteringBoundLogger | None, level: str, msg: str, **kw: Any) -> None:
    """Log through ``log`` when there is one (sinks and the shipper run without one in tests)."""
    if log is not None:
        getattr(log, level)(msg, **kw)


# --- fault injection (tests only) ---------------------------------------------------------------------


class _Faults:
    """``MLOPS_OBS_SHIP_FAULT=phase:N[,phase:N]``: SIGKILL this process the N-th time it reaches
    ``phase`` (``read``: a batch is built; ``sent``: the sink applied the write but the shipper has not
    seen the answer; ``acked``: acknowledged, checkpoint not written; ``checkpoint``: the checkpoint's
    temp file written, not renamed). The fault tests kill the real shipper at each phase this way."""

    def __init__(self, spec: str | None) -> None:
        self.at: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        for part in (spec or "").split(","):
            if ":" in part:
                phase, n = part.split(":", 1)
                self.at[phase.strip()] = int(n)

    def hit(self, phase: str) -> None:
        if phase not in self.at:
            return
        self.seen[phase] = self.seen.get(phase, 0) + 1
        if self.seen[phase] >= self.at[phase]:
            os.kill(os.getpid(), signal.SIGKILL)


FAULTS = _Faults(os.environ.get("MLOPS_OBS_SHIP_FAULT"))


# --- dead letters -------------------------------------------------------------------------------------


class DeadLetters:
    """The dead-letter file: events a sink rejected for good, one JSON line each with the reason and
    status, appended and fsynced before their batch counts as delivered.

    Ids already in the file are not written again, so a batch re-sent after a crash is not
    dead-lettered twice; a line torn by a crash mid-append is skipped on load and closed off before
    the next append.
    """

    def __init__(self, path: Path, log: FilteringBoundLogger | None = None) -> None:
        self.path = path
        self.log = log
        self._ids = self._load_ids()

    def _load_ids(self) -> set[str]:
        ids: set[str] = set()
        try:
            with open(self.path, "rb") as f:
                for raw in f:
                    try:
                        ids.add(str(orjson.loads(raw)["event"]["_id"]))
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        continue  # a line torn by a crash; its batch was re-sent and is written again
        except FileNotFoundError:
            pass
        return ids

    def add(self, dead: Sequence[tuple[Mapping[str, Any], str, int]]) -> list[tuple[Mapping[str, Any], str, int]]:
        """Append the ``(event, reason, status)`` records not yet in the file; returns those written.
        A failing write (disk full) is retried every second: the batch must not count as delivered."""
        dead = [d for d in dead if d[0].get("_id") not in self._ids]
        if not dead:
            return dead
        data = b"".join(
            orjson.dumps({"reason": r, "status": st, "at": time.time(), "event": ev}, default=str) + b"\n"
            for ev, r, st in dead
        )
        try:
            with open(self.path, "rb") as f:  # a torn last line (crash mid-append) is closed off
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        except OSError:
            pass
        while True:
            try:
                with open(self.path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                break
            except OSError as e:
                say(self.log, "error", "cannot write dead-letter file; retrying", path=str(self.path), error=e.strerror)
                time.sleep(1.0)
        self._ids.update(str(ev.get("_id")) for ev, _, _ in dead)
        return dead
