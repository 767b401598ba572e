"""Structured logs: job-side structlog set-up with redaction (:mod:`.config`, :mod:`.redact`), the
checkpointed shipper (:mod:`.shipper`, ``mlops-obs ship``), the embedded event store (:mod:`.store`)
and the OpenSearch sink (:mod:`.opensearch`). Only the light job-side pieces are imported here, so
a training process pays nothing for the shipper."""

from mlops_obs.logs.config import configure, get_logger

__all__ = ["configure", "get_logger"]
