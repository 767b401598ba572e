"""``mlops-obs replay``: every matching event of a job's ranks, its launcher and the alerts of its nodes
in one time order, from the embedded store, OpenSearch, an incident bundle (``--bundle``, from
``mlops-obs bundle``), or the log files themselves (``--source``): exactly one of them.

Filters come only from this command's flags: ``--job``, ``--rank`` and the rest are not settings, so a
``MLOPS_OBS_JOB`` or ``MLOPS_OBS_RANK`` in the environment (the launcher sets such variables for its
ranks) never narrows a replay without a word. Times are RFC 3339 or a duration ago (``15m``, as
``kubectl logs --since`` takes it); ``--around T`` shows ``--window`` either side of ``T``.

Exit codes: 0 the events were printed (none matching is not an error: a line on stderr says so), 2 a
usage error, 4 the events cannot be read (no store there, OpenSearch unreachable, a file or bundle
unreadable),
130 interrupted. Output: aligned, coloured text on a terminal, plain text when piped, ``--json`` one
stored event a line in the store's schema (see :mod:`mlops_obs.replay.render`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import gc
import itertools
import math
import os
import queue
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import orjson

from mlops_obs.config import COMMON_SETTINGS, ConfigError, Setting, parse_duration, parse_optional_path
from mlops_obs.logs.opensearch import OPENSEARCH_READ_SETTINGS, OPENSEARCH_URL_SETTING
from mlops_obs.logs.sink import KINDS, LEVEL_RANK

EXIT_OK, EXIT_USAGE, EXIT_FAILED = 0, 2, 4
DEFAULT_STORE = Path("mlops-obs-store")
DEFAULT_WINDOW = 120.0
FLUSH_EVERY = 256
FOLLOW_START_TIMEOUT = 30.0
"""Longest wait for a live follow's first poll before the backlog is read anyway."""
"""Events written to a pipe or file in one write (a terminal and ``--follow`` get each at once)."""

REPLAY_SETTINGS: tuple[Setting, ...] = (
    Setting("store", parse_optional_path, None, f"Embedded store directory to read (default ./{DEFAULT_STORE}).",
            metavar="DIR"),
    dataclasses.replace(OPENSEARCH_URL_SETTING, help="OpenSearch URL to read the events from instead of a store."),
    Setting("bundle", parse_optional_path, None, "Incident bundle (`mlops-obs bundle`) to read instead of a store.",
            metavar="FILE"),
    *OPENSEARCH_READ_SETTINGS,
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> list[Setting]:
    # Filters are plain flags, not settings: settings also come from MLOPS_OBS_* variables, and the
    # environment of a shell inside a job (MLOPS_OBS_JOB, MLOPS_OBS_RANK) must not filter a replay.
    a = parser.add_argument
    a("--job", help="Only this job's events (and the alerts of the nodes it ran on).")
    a("--rank", type=int, action="append", default=None, metavar="R", help="Only this rank. Repeatable.")
    a("--node", help="Only events of this node.")
    a("--kind", choices=KINDS, help="Only events of this kind.")
    a("--since", metavar="TIME", help="At or after: RFC 3339, or a duration ago (15m, 2h).")
    a("--until", metavar="TIME", help="Before: RFC 3339, or a duration ago.")
    a("--around", metavar="TIME", help="Within --window either side of this time (RFC 3339 or a duration ago).")
    a("--window", metavar="DURATION", help="Half-width of --around (default 2m).")
    a("--level", choices=tuple(LEVEL_RANK), help="Only events at this level or worse.")
    a("--grep", metavar="TEXT", help="Only events whose message holds TEXT (case-insensitive).")
    a("--limit", type=int, metavar="N", help="At most N events.")
    a("--follow", action="store_true", default=False, help="Keep printing new events as they are stored.")
    a("--json", action="store_true", default=False, help="One stored event a line, in the store's schema.")
    a("--source", action="append", default=None, metavar="GLOB",
      help="Read these log files directly through the shipper's parser (nothing shipped). Repeatable.")  # fmt: skip
    a("--prometheus", metavar="URL",
      help="Prometheus holding the sidecars' clock figures: events of two nodes closer than their "
           "clocks' bounds are marked '?' (order uncertain).")  # fmt: skip
    a("--color", choices=("auto", "always", "never"), default="auto",
      help="Colours: on a terminal unless NO_COLOR is set (auto), always, or never.")  # fmt: skip
    return list(COMMON_SETTINGS + REPLAY_SETTINGS)


def build_query(cfg: Mapping[str, Any], now: float | None = None) -> Any:
    """The :class:`~mlops_obs.logs.source.EventQuery` of the flags; :class:`ConfigError` for a bad one."""
    from mlops_obs.logs.source import EventQuery
    from mlops_obs.rca.times import epoch, parse_when, stamp

    def when(key: str) -> str | None:
        v = cfg.get(key)
        if v is None:
            return None
        try:
            return parse_when(v, now)
        except ValueError as e:
            raise ConfigError(key, str(e)) from None

    since, until = when("since"), when("until")
    around = when("around")
    if around is not None:
        if since is not None or until is not None:
            raise ConfigError("around", "give --around or --since/--until, not both")
        try:
            half = parse_duration(cfg.get("window") or DEFAULT_WINDOW)
        except ValueError as e:
            raise ConfigError("window", str(e)) from None
        t = epoch(around)
        since, until = stamp(t - half), stamp(t + half)
    elif cfg.get("window") is not None:
        raise ConfigError("window", "--window is the half-width of --around; give --around too")
    limit = cfg.get("limit")
    if limit is not None and limit < 0:
        raise ConfigError("limit", f"must be >= 0, got {limit}")
    try:
        return EventQuery(job=cfg.get("job"), ranks=tuple(cfg.get("rank") or ()), node=cfg.get("node"),
                          kind=cfg.get("kind"), since=since, until=until, min_level=cfg.get("level"),
                          text=cfg.get("grep") or None, limit=limit)  # fmt: skip
    except ValueError as e:
        raise ConfigError("query", str(e)) from None


def _color(cfg: Mapping[str, Any], out: IO[Any]) -> bool:
    mode = cfg.get("color") or "auto"
    if mode != "auto":
        return bool(mode == "always")
    return bool(out.isatty()) and not os.environ.get("NO_COLOR")


class Failed(Exception):
    """The events cannot be read (exit 4); ``str()`` is the line printed."""


def run(cfg: Mapping[str, Any]) -> int:
    query = build_query(cfg)
    _steady_heap()
    if sum(bool(cfg.get(k)) for k in ("source", "store", "opensearch", "bundle")) > 1:
        raise ConfigError("source", "give one of --store, --opensearch, --bundle or --source")
    if cfg.get("source") and cfg.get("follow"):
        raise ConfigError("follow", "--follow reads a store or OpenSearch; ship the files to follow them")
    if cfg.get("bundle") and cfg.get("follow"):
        raise ConfigError("follow", "--follow reads a store or OpenSearch; a bundle does not grow")
    try:
        n = _run(cfg, query, sys.stdout)
    except Failed as e:
        print(f"mlops-obs replay: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # `replay ... | head`: the reader has all it wants
        _quiet_stdout()
        return EXIT_OK
    if n == 0:
        print("mlops-obs replay: no events matched", file=sys.stderr)
    return EXIT_OK


def _steady_heap() -> None:
    """Keep glibc's heap from shrinking and growing back around every batch of events.

    Why: a replay frees what it made for one batch just before making the next; glibc gives the top
    of the heap back to the kernel whenever more than 128 KiB is free there and takes it again at
    the next batch, tens of thousands of ``brk`` calls and page faults that cost a third of
    ``--json``'s time over a large store. The same as ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_TOP_PAD_``
    in the environment; peak memory is unchanged. Elsewhere than glibc (no ``mallopt``): nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: give back only when 64 MiB are free at the top
    mallopt(-2, 16 << 20)  # M_TOP_PAD: grow the heap 16 MiB at a time


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush raises no second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _run(cfg: Mapping[str, Any], query: Any, out: IO[str]) -> int:
    from mlops_obs.replay.render import Renderer, json_line
    from mlops_obs.replay.timeline import job_scope, job_timeline

    live = bool(cfg.get("follow")) or out.isatty()
    renderer = None
    if not cfg.get("json"):
        content_filtered = query.min_level is not None or query.text is not None
        renderer = Renderer(color=_color(cfg, out), gaps=not content_filtered)
        if cfg.get("prometheus"):
            renderer.clock_bounds = clock_bounds(cfg["prometheus"], query)
    dump = json_line if cfg.get("source") else _dump_stored
    writer = _Writer(out)
    if renderer is not None and cfg.get("prometheus"):
        from mlops_obs.replay.render import clock_header

        writer.write((clock_header(renderer.clock_bounds) + "\n").encode())

    def show(events: Iterator[dict[str, Any]]) -> int:
        if renderer is None and not live:
            return writer.json_batches(events, dump)
        n = 0
        for ev in events:
            n += 1
            if renderer is None:
                writer.write(dump(ev))
            else:
                for line in renderer.feed(ev):
                    writer.write((line + "\n").encode())
            if live or n == 1:
                writer.flush()
        if renderer is not None:
            for line in renderer.end():
                writer.write((line + "\n").encode())
        writer.flush()
        return n

    if cfg.get("source"):
        from mlops_obs.replay import files  # the shipper's parser: only when reading files

        try:
            with _no_cycle_collection():
                return show(files.file_timeline(cfg["source"], query))
        except BrokenPipeError:
            raise
        except OSError as e:
            raise Failed(f"cannot read {e.filename or 'a log file'}: {e.strerror or e}") from None
    source = _open(cfg)
    try:
        if cfg.get("follow"):
            scope = job_scope(source, query)
            return show(_follow(source, query, scope, show_backlog=lambda: job_timeline(source, query)))
        with _no_cycle_collection():
            return show(job_timeline(source, query))
    except BrokenPipeError:
        raise
    except Exception as e:  # a store or server failing mid-read: one line, never a traceback
        from mlops_obs.rca.bundle import BundleError

        if isinstance(e, BundleError):  # its line names the bundle and what is wrong in it
            raise Failed(str(e)) from None
        raise Failed(f"cannot read the events from {_where(cfg)}: {type(e).__name__}: {e}") from None
    finally:
        source.close()


CLOCK_BOUND_EXPR = (
    "max by (node) ((abs(mlops_node_timex_offset_seconds) + mlops_node_timex_maxerror_seconds)"
    " * on (instance) group_left (node) mlops_exporter_node_info)"
)
"""Per node, how far its clock may be from true time: the kernel's estimated offset and maximum error
(adjtimex, exported by the sidecar's host collector), joined to the node name the logs use."""


def clock_bounds(url: str, query: Any) -> dict[str, float]:
    """Each node's clock bound (seconds) at the end of the replayed window (now when open-ended); a
    Prometheus that cannot answer costs only the marks: one line on stderr, no bounds."""
    import time

    from mlops_obs.rca.prometheus import Prometheus, PrometheusError
    from mlops_obs.rca.times import epoch

    at = epoch(query.until) if query.until else time.time()
    try:
        series = Prometheus(url).query(CLOCK_BOUND_EXPR, at)
    except PrometheusError as e:
        print(f"mlops-obs replay: warning: no clock bounds: {e}", file=sys.stderr)
        return {}
    return {s.labels["node"]: s.points[-1][1] for s in series
            if s.labels.get("node") and s.points and math.isfinite(s.points[-1][1])}  # fmt: skip


def _where(cfg: Mapping[str, Any]) -> str:
    return str(cfg.get("opensearch") or cfg.get("bundle") or cfg.get("store") or DEFAULT_STORE)


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """The cyclic garbage collector off while a finite replay streams.

    Why: a replay makes millions of short-lived events (dicts and the tuples the merge sorts them by)
    and no reference cycles; reference counting frees them all, while the collector, triggered every
    few hundred allocations, walks the merge's held events again and again for nothing (a third of
    the time of ``--json`` over a large store). ``--follow``, which runs for days, keeps it on."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


_dump_stored = functools.partial(orjson.dumps, option=orjson.OPT_APPEND_NEWLINE, default=str)
"""A stored event is already in the schema's shape and key order: written as it is (a C call)."""


def _open(cfg: Mapping[str, Any]) -> Any:
    from mlops_obs.logs.backend import Backend, open_source

    if cfg.get("bundle"):
        from mlops_obs.rca.bundle import BundleError
        from mlops_obs.replay.bundle import BundleSource

        try:
            return BundleSource(cfg["bundle"])
        except BundleError as e:  # missing, not a .tar.gz, not a bundle, a newer format
            raise Failed(str(e)) from None
    try:
        backend = Backend.from_config(cfg, default_store=DEFAULT_STORE)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # an unreadable password file
        raise Failed(str(e)) from None
    try:
        return open_source(backend)
    except ConfigError as e:
        raise Failed(e.why) from None
    except Exception as e:  # no store there, a store that cannot be opened
        raise Failed(f"{backend}: {e}") from None


class _Polling(threading.Event):
    """A follow's ``stop`` event that also tells when the follow first waits: a source takes its
    starting position before its first poll's wait, so from then on nothing new can be missed."""

    def __init__(self) -> None:
        super().__init__()
        self.polling = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.polling.set()
        return super().wait(timeout)


def _follow(source: Any, query: Any, scope: Any, show_backlog: Any) -> Iterator[dict[str, Any]]:
    """The replay's events present now (in timeline order), then each new one as it is stored.

    The live follow (of nothing present, ``limit=0``) starts first and the backlog is read once it
    polls, so no event is lost between the two; one both read (stored in that instant) is printed
    once, by its ``_id`` (the ids of the backlog's last events are kept for that, not all of them)."""
    from mlops_obs.replay.timeline import live_filter, wanted

    stop = _Polling()
    live: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=100_000)
    errors: list[BaseException] = []

    def pump() -> None:
        try:
            for ev in source.follow(live_filter(query, scope), stop):
                if wanted(ev, query, scope):
                    live.put(ev)
        except BaseException as e:  # reported in the main thread
            errors.append(e)
        finally:
            stop.polling.set()
            live.put(None)

    t = threading.Thread(target=pump, name="replay-follow", daemon=True)
    t.start()
    stop.polling.wait(FOLLOW_START_TIMEOUT)
    recent: dict[str, None] = {}
    try:
        for ev in show_backlog():
            recent[ev["_id"]] = None
            if len(recent) > 65536:
                del recent[next(iter(recent))]
            yield ev
        while True:
            ev = live.get()
            if ev is None:
                if errors:
                    raise errors[0]
                return
            if ev.get("_id") in recent:
                continue
            yield ev
    finally:
        stop.set()


class _Writer:
    """Bytes to stdout through its binary buffer (text for a stream without one, as in some tests)."""

    def __init__(self, out: IO[str]) -> None:
        self.buffer = out.buffer if hasattr(out, "buffer") else None
        self.out = out
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)
        if len(self.parts) >= FLUSH_EVERY:
            self.flush()

    def _put(self, data: bytes) -> None:
        if self.buffer is not None:
            self.buffer.write(data)
            self.buffer.flush()
        else:
            self.out.write(data.decode())
            self.out.flush()

    def flush(self) -> None:
        if self.parts:
            data = b"".join(self.parts)
            self.parts = []
            self._put(data)

    def json_batches(self, events: Iterator[dict[str, Any]], dump: Any) -> int:
        """``--json`` to a pipe or file, the hot path: events serialised a batch at a time in C
        (``map`` of orjson over the batch), the first batch small so the first lines come at once."""
        n = 0
        size = 64
        while True:
            batch = list(itertools.islice(events, size))
            if not batch:
                return n
            n += len(batch)
            self._put(b"".join(map(dump, batch)))
            size = FLUSH_EVERY
