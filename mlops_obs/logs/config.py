"""The one place structlog is configured, for our daemons (exporter, shipper) and for training jobs.

A pipeline of small processors: the bound context, level, UTC ISO timestamp and a per-process
sequence number (so a gap in a rank's log is detectable), tracebacks rendered without locals (locals
leak data and cost time), then secret redaction over everything, the rendered traceback included (on
by default: a secret in a file is already leaked), then a renderer: JSON lines via orjson for files,
logfmt for daemons, a console renderer only on a TTY. Loggers are level-filtered and cached, as
structlog's performance guide recommends, and stdlib ``logging`` records (torch, NCCL's Python side,
``warnings``) are routed into the same stream.

structlog's private attributes are read in one place, :func:`_fast_bound_logger` (the bound logger's
context, wrapped logger and processors); ``tests/test_logs_config.py`` fails if structlog renames them.
"""

from __future__ import annotations

import datetime as _dt
import io
import itertools
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, BinaryIO, TextIO, cast

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from mlops_obs.logs.redact import (
    LEAVE,
    SCAN_VALUE,
    RedactSecrets,
    _maybe_secret,
    _redact_checked,
    plain_value,
    redact_value,
)

Logger = FilteringBoundLogger
"""The type of our loggers (:func:`get_logger`): structlog's level-filtering bound logger protocol."""

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}  # fmt: skip
FORMATS = ("json", "logfmt", "console", "auto")
_configured = False


class JobStamp:
    """Adds the bound context (job, rank, node, run_id), ``level``, ``ts`` and ``seq`` in one step.

    One fused processor with the timestamp and counter inlined, instead of four processors: on a
    training node every microsecond of logging is taken from the step, and each Python call costs
    about as much as the work it wraps. ``ts`` is ``2026-01-02T03:04:05.000006Z``: always
    microseconds, so string order is time order (structlog's ISO stamper drops a zero fraction), and
    the whole-second part is formatted once a second.
    """

    def __init__(self, context: Mapping[str, Any] | None = None) -> None:
        self._context = tuple(dict(context or {}).items())
        self._counter = itertools.count(1)
        self._sec = -1
        self._prefix = ""
        self._prefix_b = b""

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        for k, v in self._context:
            if k not in event_dict:
                event_dict[k] = v
        event_dict["level"] = "warning" if method == "warn" else method
        us = time.time_ns() // 1000  # integer microseconds: no float rounding, cheaper to format
        sec = us // 1_000_000
        if sec != self._sec:
            self._prefix = _dt.datetime.fromtimestamp(sec, tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._prefix_b = self._prefix.encode()
            self._sec = sec
        event_dict["ts"] = f"{self._prefix}{us - sec * 1_000_000:06d}Z"
        event_dict["seq"] = next(self._counter)
        return event_dict


def _render_json(event_dict: EventDict) -> bytes:
    """One JSON line; non-JSON values (paths, tensors) become their ``str``. What orjson refuses
    (a non-string key, a cycle, more than 254 levels, an integer over 64 bits) is rendered from a
    plain copy instead of raising into the caller's training loop."""
    try:
        return orjson.dumps(event_dict, default=str)
    except (orjson.JSONEncodeError, RecursionError):
        return orjson.dumps(plain_value(event_dict), default=str)


_SIMPLE_TYPES = (str, int, float, bool, type(None))
_os_write = os.write


class JsonLines(JobStamp):
    """The whole JSON-file pipeline in one processor: stamp, tracebacks, redaction, orjson; returns bytes.

    Why fused: at ~5 us per event, each extra Python call and dict pass is a visible share of the
    budget. The common event (no ``exc_info``, no key that the stamp would overwrite) takes a fast
    path that redacts and renders only the caller's keys and appends the bound context, ``level``,
    ``ts`` and ``seq`` as bytes: the context is redacted and serialised once, here, instead of per
    event. The output is byte-for-byte what the separate processors produce (same keys, same order:
    the caller's keys, then the context, ``level``, ``ts``, ``seq``). Anything else (an exception, a
    key colliding with the context or the stamp, a non-JSON context value, a value orjson refuses)
    goes through the separate processors, in order (stamp, tracebacks, redaction, rendering),
    sharing the same counter.
    """

    def __init__(self, context: Mapping[str, Any] | None = None, *, redact: bool = True) -> None:
        super().__init__(context)
        self._redactor = RedactSecrets() if redact else None
        self._exc = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        ctx: EventDict = dict(self._context)
        self._reserved = frozenset(ctx) | {"level", "ts", "seq", "exc_info"}
        self._fast = all(type(v) in _SIMPLE_TYPES for v in ctx.values())
        if self._redactor is not None:
            ctx = self._redactor(None, "info", ctx)
        try:
            self._ctx = orjson.dumps(ctx, default=str)[1:-1].decode() if ctx else ""
        except orjson.JSONEncodeError:  # e.g. an int over 64 bits: the slow path renders a plain copy
            self._ctx, self._fast = "", False
        self._heads: dict[str, tuple[bytes, bytes]] = {}
        self._actions = self._redactor.actions if self._redactor is not None else {}

    def _head(self, method: str) -> tuple[bytes, bytes]:
        """``,<context>,"level":"<level>","ts":"`` (and without the comma, after an empty dict)."""
        level = orjson.dumps("warning" if method == "warn" else method).decode()
        mid = f'{self._ctx},"level":{level},"ts":"' if self._ctx else f'"level":{level},"ts":"'
        heads = self._heads[method] = (("," + mid).encode(), mid.encode())
        return heads

    def _slow(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> bytes:
        event_dict = JobStamp.__call__(self, logger, method, event_dict)
        event_dict = self._exc(logger, method, event_dict)
        if self._redactor is not None:
            event_dict = self._redactor(logger, method, event_dict)
        return _render_json(event_dict)

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> bytes:  # type: ignore[override]
        if not self._fast or not self._reserved.isdisjoint(event_dict):
            return self._slow(logger, method, event_dict)
        if self._redactor is not None:
            # redact_event's loop, inlined (a call is a visible share of the event), with the same
            # cached key_action decisions; a key naming or holding a secret (rare) takes the slow path.
            actions = self._actions
            for k, v in event_dict.items():
                t = type(v)
                if t is float:
                    continue
                try:
                    action = actions[k]
                except KeyError:
                    action = self._redactor.action(k)
                if action == SCAN_VALUE:
                    if t is str:
                        if len(v) >= 8 and _maybe_secret(v):
                            event_dict[k] = _redact_checked(v)
                    elif t is not int and v is not None and t is not bool:
                        event_dict[k] = redact_value(v, actions)
                elif action != LEAVE:
                    return self._slow(logger, method, event_dict)
        try:
            body = orjson.dumps(event_dict, default=str)
        except (orjson.JSONEncodeError, RecursionError):
            return self._slow(logger, method, event_dict)
        heads = self._heads.get(method) or self._head(method)
        us = time.time_ns() // 1000
        sec = us // 1_000_000
        if sec != self._sec:
            self._prefix = _dt.datetime.fromtimestamp(sec, tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._prefix_b = self._prefix.encode()
            self._sec = sec
        # one bytes %-format: cheaper than an f-string, an encode and a concatenation
        return b'%s%s%s%06dZ","seq":%d}' % (
            body[:-1],
            heads[len(body) == 2],
            self._prefix_b,
            us - sec * 1_000_000,
            next(self._counter),
        )


class FdLogger:
    """Writes each line with one ``os.write`` on the file's descriptor: no buffer, no flush call.

    Every line still reaches the kernel before the logging call returns, so a ``kill -9`` right after
    it loses nothing (the page cache outlives the process; no fsync, as before). A single write of
    a whole line on a regular file is not interleaved with other threads' lines, so no lock either.
    Used only for regular files opened in binary mode (the job's ``*.jsonl``); anything else keeps
    structlog's ``BytesLogger``.
    """

    def __init__(self, file: IO[bytes]) -> None:
        file.flush()  # whatever the caller wrote before stays before our lines
        self._file = file
        self._fd = file.fileno()

    def msg(self, message: bytes) -> None:
        if self._file.closed:
            raise ValueError("I/O operation on closed file.")
        data = message + b"\n"
        n = os.write(self._fd, data)
        if n != len(data):
            self._finish(data[n:])

    def _finish(self, rest: bytes) -> None:
        """After a short write (a signal, a nearly full disk): write the rest of the line."""
        while rest:
            rest = rest[os.write(self._fd, rest) :]

    log = debug = info = warn = warning = error = err = critical = fatal = exception = failure = msg


def _fd_logger_factory(stream: IO[bytes]) -> Callable[..., Any]:
    """``FdLogger`` for a regular file with a descriptor, else structlog's ``BytesLogger``."""
    try:
        regular = isinstance(stream, io.BufferedWriter | io.FileIO) and stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, io.UnsupportedOperation):
        regular = False
    if not regular:
        return structlog.BytesLoggerFactory(file=cast(BinaryIO, stream))
    logger = FdLogger(stream)
    return lambda *args: logger


def _fast_bound_logger(min_level: int) -> type[Any]:
    """structlog's level-filtering bound logger, with each enabled level method done in one call.

    The one adapter over structlog's internals: the methods read the bound logger's private
    ``_context``, ``_logger`` and ``_processors`` (what structlog's own methods read), and
    ``tests/test_logs_config.py`` checks that structlog still has them.

    structlog's own method goes through four Python calls (the method, ``_maybe_interpolate``,
    ``_proxy_to_logger``, ``_process_event``) and re-packs the keywords twice; for a ~5 us event
    that is a third of the cost. This subclass builds the event dict the same way (bound context,
    then the keywords, then ``event``), runs the same configured processors, honours ``DropEvent``
    and calls the same method of the wrapped logger; everything else (``bind``, ``exception``,
    ``log``, the async methods) is structlog's.
    """
    base = structlog.make_filtering_bound_logger(min_level)

    def make(name: str) -> Any:
        def meth(self: Any, event: Any, *args: Any, **kw: Any) -> Any:
            if args:
                event = event % (args[0] if len(args) == 1 and isinstance(args[0], Mapping) and args[0] else args)
            ctx = self._context
            ed: Any = {**ctx, **kw} if ctx else kw  # same keys and order as structlog's copy() + update()
            if event is not None:
                ed["event"] = event
            logger = self._logger
            try:
                for proc in self._processors:
                    ed = proc(logger, name, ed)
            except structlog.DropEvent:
                return None
            if type(ed) is bytes and type(logger) is FdLogger:  # FdLogger.msg, inlined
                if logger._file.closed:
                    raise ValueError("I/O operation on closed file.")
                data = ed + b"\n"
                n = _os_write(logger._fd, data)
                if n != len(data):
                    logger._finish(data[n:])
                return None
            if isinstance(ed, str | bytes | bytearray):
                return getattr(logger, name)(ed)
            if isinstance(ed, tuple):
                return getattr(logger, name)(*ed[0], **ed[1])
            if isinstance(ed, dict):
                return getattr(logger, name)(**ed)
            raise ValueError("Last processor didn't return an appropriate value.")

        meth.__name__ = name
        return meth

    ns: dict[str, Any] = {}
    for level, name in ((logging.DEBUG, "debug"), (logging.INFO, "info"), (logging.WARNING, "warning"),
                        (logging.ERROR, "error"), (logging.CRITICAL, "critical")):  # fmt: skip
        if level >= min_level:
            ns[name] = make(name)
    for alias, name in (("warn", "warning"), ("fatal", "critical"), ("msg", "info")):
        if name in ns:
            ns[alias] = ns[name]
    return type(f"Fast{base.__name__}", (base,), ns)


def logfmt_keys(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Make every key a logfmt key, so that the logfmt renderer never raises on one: structlog's
    refuses a key with whitespace or control characters (``ValueError``) and cannot read a non-string
    one, and an ``=`` or a quote in a key would make the line ambiguous. Such characters become ``_``;
    a key that needs nothing costs one scan."""
    if all(type(k) is str and k and _LOGFMT_KEY_OK.issuperset(k) for k in event_dict):  # ASCII: the usual case
        return event_dict
    return {_logfmt_key(k): v for k, v in event_dict.items()}


_LOGFMT_KEY_OK = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"=", '"'}


def _logfmt_key(key: Any) -> str:
    text = key if isinstance(key, str) else str(key)
    return "".join(c if c in _LOGFMT_KEY_OK or (c > "\x7f" and c.isprintable() and not c.isspace()) else "_"
                   for c in text) or "_"  # fmt: skip


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

    def handleError(self, record: logging.LogRecord) -> None:
        """A record that cannot be formatted (``%`` with the wrong arguments, an argument whose
        ``str`` raises) is one redacted error event naming its logger and the failure. The stdlib's own
        ``handleError`` would print the record's template and raw arguments to stderr, past redaction."""
        error = sys.exc_info()[1]
        try:
            structlog.get_logger().bind(logger=record.name).error(
                "log record could not be formatted",
                template=str(record.msg),
                arguments=len(record.args) if isinstance(record.args, tuple) else 1 if record.args else 0,
                error=type(error).__name__ if error is not None else None,
            )
        except Exception:  # not even that: a fixed line, nothing from the record but its logger
            try:
                sys.stderr.write(f"mlops-obs: a log record from {record.name!r} could not be logged\n")
            except Exception:
                pass


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
    # the pipeline); per-logger context goes through ``get_logger().bind(...)``. Tracebacks are
    # rendered to text before redaction runs: an exception's message is scanned like any value.
    factory: Callable[..., Any]
    if json_out:
        # stamp, tracebacks, redaction, orjson: fused, see JsonLines.
        processors: list[Processor] = [JsonLines(context, redact=redact)]
        factory = _fd_logger_factory(_binary(out))
    else:
        processors = [JobStamp(context), structlog.processors.format_exc_info]
        if redact:
            processors.append(RedactSecrets())
        if fmt == "console":
            processors.append(structlog.dev.ConsoleRenderer(timestamp_key="ts"))
        else:
            processors += [logfmt_keys, structlog.processors.LogfmtRenderer(key_order=["ts", "level", "event"])]
        factory = structlog.PrintLoggerFactory(file=cast(TextIO, out))
    structlog.reset_defaults()
    min_level = _LEVELS.get(level, logging.INFO)
    structlog.configure(
        processors=processors,
        wrapper_class=_fast_bound_logger(min_level) if json_out else structlog.make_filtering_bound_logger(min_level),
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


def unconfigure() -> None:
    """Undo :func:`configure`: structlog's defaults, no stdlib routing, warnings not captured (tests)."""
    global _configured
    structlog.reset_defaults()
    _configured = False
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _StdlibToStructlog):
            root.removeHandler(h)
    logging.captureWarnings(False)


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


def get_logger(**initial: Any) -> Logger:
    """A logger for this process. After :func:`configure` it is a concrete bound logger (no lazy
    proxy in front of every call, as structlog's performance guide advises); before, the lazy proxy,
    so a module-level logger still follows the configuration made later."""
    if _configured:
        return cast(Logger, structlog.get_logger().bind(**initial))
    return cast(Logger, structlog.get_logger(**initial))
