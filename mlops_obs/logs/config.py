"""The one place structlog is configured, for our daemons (exporter, shipper) and for training jobs.

A pipeline of small processors: context vars, level, UTC ISO timestamp, a per-process sequence number
(so a gap in a rank's log is detectable), secret redaction (on by default: a secret in a file is
already leaked), structured tracebacks without locals (locals leak data and cost time), then a
renderer: JSON lines via orjson for files, logfmt for daemons, a console renderer only on a TTY.
Loggers are level-filtered and cached, as structlog's performance guide recommends, and stdlib
``logging`` records (torch, NCCL's Python side, ``warnings``) are routed into the same stream.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, BinaryIO, TextIO, cast

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

from mlops_obs.logs.redact import RedactSecrets

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}  # fmt: skip
FORMATS = ("json", "logfmt", "console", "auto")
_configured = False


class SequenceNumber:
    """Adds ``seq``: 1, 2, 3... per process, so the shipper and replay can see a missing line."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["seq"] = next(self._counter)
        return event_dict


class JobStamp:
    """Adds the bound context (job, rank, node, run_id), ``level``, ``ts`` and ``seq`` in one step.

    One fused processor with the timestamp and counter inlined, instead of four processors: on a
    training node every microsecond of logging is taken from the step, and each Python call costs
    about as much as the work it wraps. ``ts`` is formatted like :class:`UTCTimestamp`.
    """

    def __init__(self, context: Mapping[str, Any] | None = None) -> None:
        self._context = tuple(dict(context or {}).items())
        self._counter = itertools.count(1)
        self._sec = -1
        self._prefix = ""

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        for k, v in self._context:
            if k not in event_dict:
                event_dict[k] = v
        event_dict["level"] = "warning" if method == "warn" else method
        now = time.time()
        sec = int(now)
        if sec != self._sec:
            self._prefix = _dt.datetime.fromtimestamp(sec, tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._sec = sec
        event_dict["ts"] = f"{self._prefix}{int((now - sec) * 1_000_000):06d}Z"
        event_dict["seq"] = next(self._counter)
        return event_dict


class UTCTimestamp:
    """``ts`` as ``2026-01-02T03:04:05.000006Z``: always microseconds, so string order is time order.

    structlog's ISO stamper drops the fraction when it is zero; formatting the whole-second part once
    a second also makes this cheaper than ``datetime.isoformat`` per event.
    """

    def __init__(self, key: str = "ts") -> None:
        self._key = key
        self._sec = -1
        self._prefix = ""

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        sec = int(now)
        if sec != self._sec:
            self._prefix = _dt.datetime.fromtimestamp(sec, tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._sec = sec
        event_dict[self._key] = f"{self._prefix}{int((now - sec) * 1_000_000):06d}Z"
        return event_dict


def _render_json(logger: Any, method: str, event_dict: dict[str, Any]) -> bytes:
    """One JSON line; non-JSON values (paths, tensors) become their ``str``."""
    return orjson.dumps(event_dict, default=str)


class _StdlibToStructlog(logging.Handler):
    """Routes stdlib ``logging`` records (torch, libraries) into the structlog pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            method = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
                      logging.ERROR: "error", logging.CRITICAL: "critical"}.get(record.levelno, "info")  # fmt: skip
            log = structlog.get_logger().bind(logger=record.name)
            kw: dict[str, Any] = {}
            if record.exc_info and record.exc_info[0] is not None:
                kw["exc_info"] = record.exc_info
            getattr(log, method)(record.getMessage(), **kw)
        except Exception:  # a logging failure must never reach the training loop
            self.handleError(record)


def configure(
    level: str = "info",
    fmt: str = "logfmt",
    stream: IO[Any] | None = None,
    context: Mapping[str, Any] | None = None,
    *,
    redact: bool = True,
    capture_stdlib: bool = True,
) -> None:
    """Configure structlog for this process; ``context`` (job, rank, node, run_id) is bound to every event.

    ``fmt``: ``json`` (files, the shipper's input), ``logfmt`` (daemons), ``console`` (coloured, used
    only when ``stream`` is a TTY, else JSON) or ``auto`` (console on a TTY, JSON otherwise).
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = stream or sys.stderr
    if fmt in ("console", "auto"):
        fmt = "console" if _isatty(out) else "json"
    json_out = fmt == "json"
    # Context is bound once, here (not through contextvars, whose merge costs more than the rest of
    # the pipeline); per-logger context goes through ``get_logger().bind(...)``.
    processors: list[Any] = [JobStamp(context)]
    if redact:
        processors.append(RedactSecrets())
    if json_out:
        processors.append(structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)))
        processors.append(_render_json)
        factory: Any = structlog.BytesLoggerFactory(file=cast(BinaryIO, _binary(out)))
    elif fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer(timestamp_key="ts"))
        factory = structlog.PrintLoggerFactory(file=cast(TextIO, out))
    else:
        processors.append(structlog.processors.format_exc_info)
        processors.append(structlog.processors.LogfmtRenderer(key_order=["ts", "level", "event"]))
        factory = structlog.PrintLoggerFactory(file=cast(TextIO, out))
    structlog.reset_defaults()
    min_level = _LEVELS.get(level, logging.INFO)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    global _configured
    _configured = True
    if capture_stdlib:
        root = logging.getLogger()
        for h in list(root.handlers):
            if isinstance(h, _StdlibToStructlog):
                root.removeHandler(h)
        root.addHandler(_StdlibToStructlog())
        root.setLevel(min_level)
        logging.captureWarnings(True)
        _reroute_private_library_loggers()


# Libraries that give their loggers a stderr handler of their own and stop propagation (torch's
# ``torch._logging`` does this for ``torch`` and ``torch.distributed`` once torch is imported), so their
# records would bypass the root handler and reach the job's stream only as unstructured stderr text.
_REROUTED_PREFIXES = ("torch",)


def _reroute_private_library_loggers() -> None:
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger) or lg.propagate:
            continue
        if name.split(".", 1)[0] in _REROUTED_PREFIXES:
            for h in list(lg.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    lg.removeHandler(h)
            lg.propagate = True


def _isatty(stream: IO[Any]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _binary(stream: IO[Any]) -> IO[bytes]:
    return getattr(stream, "buffer", stream)  # type: ignore[no-any-return]


def get_logger(**initial: Any) -> Any:
    """A logger for this process. After :func:`configure` it is a concrete bound logger (no lazy
    proxy in front of every call, as structlog's performance guide advises); before, the lazy proxy,
    so a module-level logger still follows the configuration made later."""
    if _configured:
        return structlog.get_logger().bind(**initial)
    return structlog.get_logger(**initial)
