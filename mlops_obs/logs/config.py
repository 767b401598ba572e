"""The one place structlog is configured, for our daemons (exporter, shipper) and for training jobs.

A pipeline of small processors: context vars, level, UTC ISO timestamp, a per-process sequence number
(so a gap in a rank's log is detectable), then a renderer: logfmt or JSON (orjson) for files and
daemons. Loggers are cached and level-filtered as structlog's performance guide recommends.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Mapping
from typing import IO, Any, BinaryIO, TextIO, cast

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


class SequenceNumber:
    """Adds ``seq``: 1, 2, 3... per process, so the shipper and replay can see a missing line."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["seq"] = next(self._counter)
        return event_dict


def _orjson_dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default or str)


def configure(
    level: str = "info",
    fmt: str = "logfmt",
    stream: IO[Any] | None = None,
    context: Mapping[str, Any] | None = None,
) -> None:
    """Configure structlog for this process; ``context`` (job, rank, node...) is bound to every event."""
    json_out = fmt == "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        SequenceNumber(),
        structlog.processors.dict_tracebacks if json_out else structlog.processors.format_exc_info,
    ]
    if json_out:
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_dumps))
        factory: Any = structlog.BytesLoggerFactory(file=cast(BinaryIO, _binary(stream or sys.stderr)))
    else:
        processors.append(structlog.processors.LogfmtRenderer(key_order=["ts", "level", "event"]))
        factory = structlog.PrintLoggerFactory(file=cast(TextIO, stream or sys.stderr))
    structlog.reset_defaults()
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**context)


def _binary(stream: IO[Any]) -> IO[bytes]:
    return getattr(stream, "buffer", stream)  # type: ignore[no-any-return]


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)
