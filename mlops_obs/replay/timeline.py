"""Which events a replay shows, in one order: (``@timestamp``, ``source``, ``offset``), the order every
:class:`~mlops_obs.logs.source.Source` yields.

A job's replay is more than the events labelled with the job: the likeliest root causes of a crash are
often the node's or the GPU's, and those alerts carry the node (the mixin's rules join
``mlops_exporter_node_info`` to put the host name the logs use in ``node``; without that series the
scrape ``instance``, ``host:port``, stands in) but no job, unless the GPU was attributed to one. So
:func:`job_timeline` merges the job's events with the job-less alerts of the nodes its ranks logged
from (their ``node``, from :meth:`~mlops_obs.logs.source.Source.rank_facts`), over the job's time range
widened by :data:`ALERT_MARGIN_SECONDS`. Everything is a merge of sorted streams (``heapq.merge``):
nothing is held beyond one event per stream.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import heapq
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from mlops_obs.logs.sink import format_timestamp
from mlops_obs.logs.source import EventQuery, Source

ALERT_MARGIN_SECONDS = 900.0
"""How far before the job's first and after its last event its nodes' alerts are shown: a disk filling
up or a GPU alert that fired before the job's last line still explains it."""


def order_key(ev: Mapping[str, Any]) -> tuple[str, str, int]:
    """(``@timestamp``, ``source``, ``offset``): the timeline's order."""
    off = ev.get("offset")
    return str(ev.get("@timestamp") or ""), str(ev.get("source") or ""), off if type(off) is int else 0


def merge(*streams: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One stream in timeline order from streams each in timeline order."""
    return heapq.merge(*streams, key=order_key)


def node_matches(node: Any, nodes: frozenset[str] | set[str]) -> bool:
    """An event's ``node`` is one of ``nodes``, or a scrape instance ``host:port`` of one."""
    return isinstance(node, str) and (node in nodes or node.rpartition(":")[0] in nodes)


def _shift(ts: str, seconds: float) -> str:
    dt = _dt.datetime.fromisoformat(ts[:26]).replace(tzinfo=_dt.UTC)
    return format_timestamp(dt + _dt.timedelta(seconds=seconds))


@dataclasses.dataclass(frozen=True)
class Scope:
    """Where a job's replay looks beyond its own events: its nodes, and the time range for their alerts."""

    nodes: frozenset[str]
    since: str | None
    until: str | None


def job_scope(source: Source, query: EventQuery) -> Scope | None:
    """The nodes the job of ``query`` (its selected ranks) logged from, and its time range widened by
    :data:`ALERT_MARGIN_SECONDS` within the query's; None when the query names no job, wants no
    alerts, or the job has no log events there."""
    if query.job is None or query.kind not in (None, "alert"):
        return None
    facts = [f for f in source.rank_facts(query.job, since=query.since, until=query.until)
             if not query.ranks or f.rank in query.ranks]  # fmt: skip
    nodes = {n for f in facts for n in f.nodes}
    if query.node is not None:
        nodes &= {query.node}
    if not nodes:
        return None
    lo = _shift(min(f.first_time for f in facts), -ALERT_MARGIN_SECONDS)
    hi = _shift(max(f.last_time for f in facts), ALERT_MARGIN_SECONDS)
    if query.since is not None and query.since > lo:
        lo = query.since
    if query.until is not None and query.until < hi:
        hi = query.until
    return Scope(frozenset(nodes), lo, hi)


def node_alert_query(query: EventQuery, scope: Scope) -> EventQuery:
    """The alerts over ``scope``'s time range that ``query``'s other filters (level, text) admit."""
    return EventQuery(kind="alert", since=scope.since, until=scope.until, min_level=query.min_level, text=query.text)


def is_node_alert(ev: Mapping[str, Any], job: str, scope: Scope) -> bool:
    """A job-less alert of one of the scope's nodes (an alert labelled with ``job`` is in the job's
    own events already; one labelled with another job is that job's GPU)."""
    return ev.get("kind") == "alert" and ev.get("job") in (None, "") and node_matches(ev.get("node"), scope.nodes)


def job_timeline(source: Source, query: EventQuery) -> Iterator[dict[str, Any]]:
    """The events ``query`` selects; for a job, merged with its nodes' alerts (see the module
    docstring), ``query.limit`` applying to the whole."""
    own = source.events(query)
    scope = job_scope(source, query)
    if scope is None:
        return own
    assert query.job is not None
    job = query.job
    alerts = (ev for ev in source.events(node_alert_query(query, scope)) if is_node_alert(ev, job, scope))
    both = merge(own, alerts)
    return itertools.islice(both, query.limit) if query.limit is not None else both


def live_filter(query: EventQuery, scope: Scope | None) -> EventQuery:
    """What to follow for new events: ``query`` itself, or for a job with node alerts in scope, the same
    filters without the job, ranks and node (the alerts carry none), narrowed by :func:`wanted`."""
    if scope is None:
        return dataclasses.replace(query, limit=0)
    return EventQuery(kind=query.kind, min_level=query.min_level, text=query.text, since=query.since,
                      until=query.until, limit=0)  # fmt: skip


def wanted(ev: Mapping[str, Any], query: EventQuery, scope: Scope | None) -> bool:
    """Whether a followed event belongs to the replay of ``query``."""
    return query.matches(ev) or (scope is not None and query.job is not None and is_node_alert(ev, query.job, scope)
                                 and (scope.since is None or str(ev.get("@timestamp")) >= scope.since))  # fmt: skip
