"""The read side of the logs: the :class:`Source` protocol that replay and root-cause analysis read
events through, the filter they pass (:class:`EventQuery`), the per-rank facts analysis starts from
(:class:`RankFacts`). :func:`mlops_obs.logs.backend.open_source` opens one.

What a source promises
----------------------
* :meth:`Source.events` yields the matching events (the schema of :mod:`mlops_obs.logs.sink`) in
  (``@timestamp``, ``source``, ``offset``) order: one timeline across ranks, the launcher and alerts.
* :meth:`Source.follow` yields the same, then the events stored after it started, as they arrive
  (each arrival in that order; an event stored late with an early timestamp comes when it arrives,
  as with ``tail -f``), until its ``stop`` event is set.
* :meth:`Source.rank_facts` answers, per rank of a job, what a verdict starts from (first error,
  last step, last sign of life, nodes, event count) without the caller reading every event: a
  backend answers it from its indexes (the store's chunk metadata and severity index; OpenSearch's
  aggregations).

Backends
--------
* The embedded store: :class:`~mlops_obs.logs.store.StoreSource`. Its ``events`` is
  :meth:`~mlops_obs.logs.store.EventStore.iter_query`, a streaming k-way merge of the selected chunks:
  memory bounded by the chunks open at one moment, never the whole result.
* OpenSearch: :class:`~mlops_obs.logs.opensearch.OpenSearchSource`: ``events`` sorted by
  ``@timestamp``, ``source``, ``offset`` (and ``event_id``, unique), pages past the first through a
  point in time with ``search_after``, the filters of :class:`EventQuery` as a ``bool`` ``filter``;
  ``follow`` as repeated searches from a look-back before the newest time seen; ``rank_facts`` as
  one ``terms`` aggregation on ``rank`` with ``top_hits``, on the typed top-level fields of its
  index template.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlops_obs.logs.sink import KINDS, LEVEL_RANK, format_timestamp


@dataclass(frozen=True)
class EventQuery:
    """Which events to read; every given filter must hold, an absent one (None, empty) selects all.

    ``since`` is inclusive and ``until`` exclusive, in any form :func:`format_timestamp` takes (they
    are stored canonical; relative times such as ``15m`` are the command line's to resolve);
    ``min_level`` keeps events at that level or worse (events without a level never match it);
    ``text`` is a case-insensitive substring of the message; ``limit`` caps how many events
    :meth:`Source.events` yields (for :meth:`Source.follow`: of the events present at the start).
    """

    job: str | None = None
    ranks: tuple[int, ...] = ()
    node: str | None = None
    kind: str | None = None
    since: str | None = None
    until: str | None = None
    min_level: str | None = None
    text: str | None = None
    limit: int | None = None
    levels: frozenset[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            set_(self, "ranks", tuple(sorted({int(r) for r in self.ranks})))
            for name in ("since", "until"):
                value = getattr(self, name)
                if value is not None:
                    set_(self, name, format_timestamp(value))
        except (TypeError, ValueError, OverflowError, OSError) as e:
            raise ValueError(f"event query: {e}") from None
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"event query: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        levels = None
        if self.min_level is not None:
            floor = LEVEL_RANK.get(self.min_level)
            if floor is None:
                raise ValueError(f"event query: level must be one of {', '.join(LEVEL_RANK)}, got {self.min_level!r}")
            levels = frozenset(lv for lv, r in LEVEL_RANK.items() if r >= floor)
        set_(self, "levels", levels)
        if self.limit is not None and (isinstance(self.limit, bool) or int(self.limit) < 0):
            raise ValueError(f"event query: limit must be a non-negative integer, got {self.limit!r}")

    def matches(self, ev: Mapping[str, Any]) -> bool:
        """Whether one event passes every filter (``limit`` aside): the definition every backend's
        own filtering must agree with."""
        ts = ev.get("@timestamp")
        return (
            (self.job is None or ev.get("job") == self.job)
            and (not self.ranks or ev.get("rank") in self.ranks)
            and (self.node is None or ev.get("node") == self.node)
            and (self.kind is None or ev.get("kind", "log") == self.kind)
            and (self.since is None or (isinstance(ts, str) and ts >= self.since))
            and (self.until is None or (isinstance(ts, str) and ts < self.until))
            and (self.levels is None or ev.get("level") in self.levels)
            and (self.text is None or self.text.lower() in str(ev.get("message", "")).lower())
        )


@dataclass(frozen=True)
class RankFacts:
    """What is known of one rank of a job from its log events (``kind="log"``) in a time range.

    ``rank`` is None for the job's events that name no rank. ``last_time`` is the rank's last sign of
    life; ``first_error`` the earliest event at level ``error`` or worse (the whole event);
    ``last_step`` the ``fields.step`` of the latest event that carries an integer one, at
    ``last_step_time``.
    """

    job: str
    rank: int | None
    nodes: tuple[str, ...]
    events: int
    first_time: str
    last_time: str
    first_error: dict[str, Any] | None
    last_step: int | None
    last_step_time: str | None


class Source(Protocol):
    """Where replay and root-cause analysis read events from (see the module docstring)."""

    def events(self, query: EventQuery) -> Iterator[dict[str, Any]]:
        """The matching events in (``@timestamp``, ``source``, ``offset``) order."""
        ...

    def follow(self, query: EventQuery, stop: threading.Event, poll_interval: float = 0.25) -> Iterator[dict[str, Any]]:
        """:meth:`events`, then the matching events stored later, polled every ``poll_interval``
        seconds, until ``stop`` is set."""
        ...

    def rank_facts(self, job: str, *, since: str | None = None, until: str | None = None) -> list[RankFacts]:
        """One :class:`RankFacts` per rank of ``job`` with log events in [``since``, ``until``), by
        rank (the rank-less entry last)."""
        ...

    def close(self) -> None: ...
