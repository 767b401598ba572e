"""Where the logs' events are kept, and the one place that picks: :class:`Backend` (the embedded store
or OpenSearch, from the settings the log commands share), :func:`open_sink` (the write side,
:class:`~mlops_obs.logs.sink.Sink`) and :func:`open_source` (the read side,
:class:`~mlops_obs.logs.source.Source`).

It stands above the protocols and their implementations, so they never import it: a new backend is a
class in its own module implementing the protocols, a field of :class:`Backend` and a branch in each
function here; ``ship``, ``alert-sink`` and the readers get it without a change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops_obs.config import ConfigError
from mlops_obs.logs.opensearch import OpenSearchSettings, OpenSearchSink, OpenSearchSource, settings_from_config
from mlops_obs.logs.sink import Sink, Stats
from mlops_obs.logs.source import Source
from mlops_obs.logs.store import StoreSink, StoreSource

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


@dataclass(frozen=True)
class Backend:
    """Where events are kept: the embedded store in the directory ``store``, or OpenSearch (exactly one).
    :func:`open_sink` writes to it, :func:`open_source` reads it."""

    store: Path | None = None
    opensearch: OpenSearchSettings | None = None

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], *, default_store: Path | None = None, default_state: Path | None = None
    ) -> Backend:
        """The choice from the settings the log commands share: ``--store DIR`` or ``--opensearch URL``
        with its ``opensearch.*`` settings (and ``--state DIR``, else ``default_state``: the directory
        of the dead-letter file, for writing). Neither gives ``default_store``, or a
        :class:`~mlops_obs.config.ConfigError` when there is none; an unreadable password file is a
        ``ValueError``."""
        store, url = cfg.get("store"), cfg.get("opensearch")
        if store is not None and url is not None:
            raise ConfigError("store", "give --store or --opensearch, not both")
        if url is None:
            path = store if store is not None else default_store
            if path is None:
                raise ConfigError("store", "give --store DIR or --opensearch URL (where events are kept)")
            return cls(store=Path(path))
        state = cfg.get("state") or default_state
        return cls(opensearch=settings_from_config(cfg, Path(state) if state is not None else None))

    def __str__(self) -> str:
        return self.opensearch.url if self.opensearch is not None else str(self.store)


def open_sink(backend: Backend, *, log: FilteringBoundLogger | None = None, stats: Stats | None = None) -> Sink:
    """The sink writing to ``backend``, counting its retries and dead letters into ``stats``.

    Raises :class:`~mlops_obs.config.ConfigError` for OpenSearch without a state directory (its
    dead-letter file must go somewhere) and ``OSError`` when a directory cannot be made."""
    if backend.opensearch is not None:
        if backend.opensearch.state_dir is None:
            raise ConfigError("state", "--opensearch needs --state DIR for the dead-letter file")
        Path(backend.opensearch.state_dir).mkdir(parents=True, exist_ok=True)
        return OpenSearchSink(backend.opensearch, log=log, stats=stats)
    assert backend.store is not None
    return StoreSink(backend.store, log=log, stats=stats)


def open_source(backend: Backend) -> Source:
    """A :class:`Source` over the backend ``backend`` names.

    Raises ``FileNotFoundError`` when the store directory holds no store (a reader never creates
    one: a mistyped path must not read as "nothing happened"). OpenSearch is read through
    :class:`~mlops_obs.logs.opensearch.OpenSearchSource` (a point in time paged with
    ``search_after``; aggregations for ``rank_facts``); it needs no state directory.
    """
    if backend.opensearch is not None:
        return OpenSearchSource(backend.opensearch)
    assert backend.store is not None
    return StoreSource(backend.store)
