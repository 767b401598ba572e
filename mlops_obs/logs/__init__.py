"""Structured logs: job-side structlog set-up with redaction (:mod:`.config`, :mod:`.redact`); the
sink layer every destination implements (:mod:`.sink`: event schema, ``Sink``) and the read side
replay and root-cause analysis use (:mod:`.source`: ``Source``); the one place that picks a backend
(:mod:`.backend`: ``open_sink``, ``open_source``); the embedded event store (:mod:`.store`) and
OpenSearch (:mod:`.opensearch`); the checkpointed shipper (:mod:`.shipper` over :mod:`.follow`,
:mod:`.batch` and :mod:`.events`); the alert intake (:mod:`.alerts`). The commands are
``mlops_obs.commands.ship`` and ``.alert_sink``. Only the light job-side pieces are imported here, so
a training process pays nothing for the shipper."""

from mlops_obs.logs.config import configure, get_logger

__all__ = ["configure", "get_logger"]
