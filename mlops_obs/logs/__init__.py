"""Structured logging: job-side structlog set-up, redaction, and (later) the shipper and its sinks."""

from mlops_obs.logs.config import configure, get_logger

__all__ = ["configure", "get_logger"]
