"""Structured logs: job-side structlog set-up with redaction (:mod:`.config`, :mod:`.redact`); the
sink layer every destination implements (:mod:`.sink`: event schema, ``Sink``) and the read side
replay and root-cause analysis use (:mod:`.source`: ``Source``); the one place that picks a backend
(:mod:`.backend`: ``open_sink``, ``open_source``); the embedded event store (:mod:`.store`) and
OpenSearch (:mod:`.opensearch`); the checkpointed shipper (:mod:`.shipper` over :mod:`.follow`,
:mod:`.batch` and :mod:`.events`); the alert intake (:mod:`.alerts`). The commands are
``mlops_obs.commands.ship`` and ``.alert_sink``. Only the light job-side pieces are offered here, and
only imported when first used (PEP 562), so a training process pays nothing for the shipper and a
reader of the store (``replay``, whose first line is due in 0.3 s) nothing for structlog."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlops_obs.logs.config import configure, get_logger

__all__ = ["configure", "get_logger"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mlops_obs.logs import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
