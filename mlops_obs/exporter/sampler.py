"""Background sampling, so that a scrape never waits on NVML, psutil or the file system.

Each collector runs on its own daemon thread every ``interval`` seconds and leaves behind its latest
result already rendered to exposition text. A scrape only concatenates those bytes and adds the
per-collector ``mlops_scrape_collector_*`` series; when nothing changed since the last scrape it
returns the very same bytes object (and the server its gzip), so back-to-back scrapes cost almost
nothing. A collector whose round has been running for longer than ``deadline`` (NVML can hang on a
GPU that fell off the bus, ``statvfs`` on a dead NFS mount) is abandoned: its success goes to 0, its
series are dropped from scrapes, and it is not started again until the hung call returns, at which
point it recovers by itself. Since every collector has its own thread, a hang never delays the
others nor the HTTP server: Python cannot kill a thread stuck in C, but it can stop waiting for it.

A thread that dies instead (an exception escaping a round, from the sampler's own code or a logger;
a ``BaseException`` such as ``SystemExit`` raised inside a collector) is its collector's failure: its
success goes to 0 at once, ``mlops_scrape_collector_restarts_total`` counts it, and the thread's loop
starts again after a pause that doubles with each death in a row (from the interval up to
:data:`RESTART_BACKOFF_MAX`). A scrape also checks that each thread is alive, so success can never
stay at 1 behind a thread that is gone.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlops_obs.collectors import Collector, CollectorUnavailable
from mlops_obs.metrics import Renderer, format_value

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# The longest pause before a dead sampling thread's loop starts again (the pause doubles per death in a row).
RESTART_BACKOFF_MAX = 300.0
SELF = "exporter-self"  # the thread of the exporter's own metrics and the abandoned-collector watchdog


@dataclass
class CollectorState:
    # The collector's own renderer: its caches are used by its sampling thread alone.
    renderer: Renderer = field(default_factory=Renderer)
    text: bytes = b""
    success: bool = False
    duration: float = 0.0
    rounds: int = 0
    cpu_seconds: float = 0.0  # thread CPU time of all rounds so far: which collector the sidecar's CPU goes to
    running_since: float | None = None
    finished_at: float | None = None
    error: str | None = None
    restarts: int = 0  # times its thread died and was started again
    deaths_in_a_row: int = 0  # reset by a round that completes; sets the pause before the next start


def self_usage() -> tuple[float, float | None]:
    """This process's CPU seconds (all threads, user + system) and resident bytes (``None`` off Linux)."""
    t = os.times()
    rss: float | None = None
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = float(int(f.read().split()[1]) * _PAGE_SIZE)
    except (OSError, IndexError, ValueError):
        pass
    return t.user + t.system, rss


def render_self(cpu: float, rss: float | None) -> bytes:
    out = (
        "# HELP mlops_exporter_cpu_seconds_total CPU seconds (user + system) the exporter process used.\n"
        "# TYPE mlops_exporter_cpu_seconds_total counter\n"
        f"mlops_exporter_cpu_seconds_total {format_value(cpu)}\n"
    )
    if rss is not None:
        out += (
            "# HELP mlops_exporter_resident_memory_bytes Resident memory of the exporter process.\n"
            "# TYPE mlops_exporter_resident_memory_bytes gauge\n"
            f"mlops_exporter_resident_memory_bytes {format_value(rss)}\n"
        )
    return out.encode()


class Sampler:
    def __init__(
        self,
        collectors: list[Collector],
        interval: float,
        deadline: float,
        log: FilteringBoundLogger,
        static: bytes = b"",
    ) -> None:
        self.static = static  # constant series (build info) appended to every scrape
        self.collectors = collectors
        self.interval = interval
        self.deadline = deadline
        self.log = log
        self.states = {c.name: CollectorState() for c in collectors}
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._self_deaths = 0
        self._reported: dict[str, str | None] = {}
        # Bumped whenever any rendered part changes; the scrape cache is valid for one generation.
        self.generation = 0
        self._gen_lock = threading.Lock()
        self._self_text = render_self(*self_usage())
        self._cache: tuple[int, bytes] | None = None
        self._parts: tuple[bytes, tuple[bytes, ...]] | None = None
        self._epoch = time.monotonic()

    def _bump(self) -> None:
        with self._gen_lock:
            self.generation += 1

    def start(self) -> None:
        self._epoch = time.monotonic()
        loops: list[tuple[str, Callable[[], None]]] = [
            (c.name, functools.partial(self._loop, c)) for c in self.collectors
        ]
        for name, loop in [*loops, (SELF, self._self_loop)]:
            t = threading.Thread(target=self._supervise, args=(name, loop), name=f"sample-{name}", daemon=True)
            t.start()
            self._threads[name] = t

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads.values():
            t.join(timeout=self.deadline)
        for c in self.collectors:
            try:
                c.close()
            except Exception:
                pass

    def sample_once(self, c: Collector) -> None:
        state = self.states[c.name]
        t0 = time.monotonic()
        state.running_since = t0
        cpu0 = time.thread_time()
        error: str | None = None
        text = b""
        unavailable = False
        try:
            text = state.renderer.render(c.sample())
        except CollectorUnavailable as e:
            error, unavailable = str(e), True
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        if text == state.text:
            # The very same bytes object as last round when nothing changed: the server keeps the
            # compressed form of each collector's text by identity, so it is not compressed again.
            text = state.text
        t1 = time.monotonic()
        state.cpu_seconds += time.thread_time() - cpu0
        state.text = text if error is None else b""
        state.success = error is None
        state.error = error
        state.duration = t1 - t0
        state.finished_at = t1
        state.rounds += 1
        state.running_since = None
        self._bump()
        self._report(c.name, error, unavailable, hung_for=state.duration if state.duration > self.deadline else None)

    def _report(self, name: str, error: str | None, unavailable: bool, hung_for: float | None = None) -> None:
        """Log a collector's failure when it starts or changes, and its recovery: never every round."""
        if hung_for is not None:
            self.log.warning("collector returned after its deadline", collector=name, seconds=round(hung_for, 3))
        if self._reported.get(name, None) == error:
            return
        self._reported[name] = error
        if error is None:
            self.log.info("collector recovered", collector=name)
        elif unavailable:
            self.log.warning("collector unavailable on this machine", collector=name, reason=error)
        else:
            self.log.error("collector failed", collector=name, error=error)

    def _wait_next_round(self) -> bool:
        """Sleep until the next multiple of the interval since start; True when stopping.

        Every loop wakes on the same grid, so the process wakes once a second rather than once per
        thread at scattered times, and a round that overran skips to the next slot instead of
        running back to back.
        """
        now = time.monotonic()
        next_round = self._epoch + (int((now - self._epoch) / self.interval) + 1) * self.interval
        return self._stop.wait(next_round - now)

    def _loop(self, c: Collector) -> None:
        state = self.states[c.name]
        while not self._stop.is_set():
            self.sample_once(c)
            state.deaths_in_a_row = 0
            if self._wait_next_round():
                return

    def _supervise(self, name: str, loop: Callable[[], None]) -> None:
        """Run ``loop`` (which returns only when the sampler stops); when it dies, report it and run it
        again after a backoff. Nothing escapes: this is the thread's last line of defence."""
        while not self._stop.is_set():
            try:
                loop()
                return
            except BaseException as e:  # whatever kills the loop must not kill the thread
                pause = self._died(name, e)
            if self._stop.wait(pause):
                return

    def _died(self, name: str, e: BaseException) -> float:
        """Mark the collector failed and counted; the pause before its loop runs again."""
        state = self.states.get(name)
        if state is not None:
            state.restarts += 1
            state.deaths_in_a_row += 1
            deaths = state.deaths_in_a_row
            state.success = False
            state.text = b""
            state.error = f"sampler thread died: {type(e).__name__}: {e}"
            state.running_since = None
            self._reported[name] = state.error
            self._bump()
        else:
            self._self_deaths += 1
            deaths = self._self_deaths
        pause = min(RESTART_BACKOFF_MAX, float(self.interval) * 2.0 ** min(deaths - 1, 32))
        try:
            self.log.error(
                "sampler thread died; starting it again",
                collector=name,
                error=f"{type(e).__name__}: {e}",
                restart_in=round(pause, 3),
            )
        except BaseException:  # a logger that fails must not stop the restart
            pass
        return pause

    def _self_loop(self) -> None:
        """The exporter's own CPU and RSS, and a watchdog that says when a collector is abandoned."""
        hung_reported: set[str] = set()
        while not self._wait_next_round():
            self._self_text = render_self(*self_usage())
            self._bump()
            hung = set(self.abandoned())
            for name in sorted(hung - hung_reported):
                self.log.error(
                    "collector abandoned: still running past its deadline; its series are dropped",
                    collector=name,
                    deadline=self.deadline,
                )
            hung_reported = hung
            self._self_deaths = 0

    @property
    def ready(self) -> bool:
        """Ready once every collector finished (or was abandoned in) its first round."""
        now = time.monotonic()
        for s in self.states.values():
            hung = s.running_since is not None and now - s.running_since > self.deadline
            if s.rounds == 0 and not hung:
                return False
        return True

    def abandoned(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        return [
            n for n, s in self.states.items() if s.running_since is not None and now - s.running_since > self.deadline
        ]

    def dead(self) -> list[str]:
        """Collectors whose thread is gone while the sampler runs: only if even its supervisor died."""
        if self._stop.is_set():
            return []
        return [name for name, t in self._threads.items() if name != SELF and not t.is_alive()]

    def scrape(self) -> bytes:
        """The exposition body; the same bytes object as last time when nothing changed."""
        gen = self.generation
        now = time.monotonic()
        hung = self.abandoned(now)
        dead = self.dead()
        cached = self._cache
        if cached is not None and cached[0] == gen and not hung and not dead:
            return cached[1]
        parts: list[bytes] = []
        success_lines = [
            b"# HELP mlops_scrape_collector_success Whether the collector's last sample succeeded in time.\n",
            b"# TYPE mlops_scrape_collector_success gauge\n",
        ]
        duration_lines = [
            b"# HELP mlops_scrape_collector_duration_seconds Duration of the collector's last sample "
            b"(of the running one, once past its deadline).\n",
            b"# TYPE mlops_scrape_collector_duration_seconds gauge\n",
        ]
        cpu_lines = [
            b"# HELP mlops_scrape_collector_cpu_seconds_total CPU seconds the collector's sampling rounds used "
            b"(its thread's CPU time, rendering included).\n",
            b"# TYPE mlops_scrape_collector_cpu_seconds_total counter\n",
        ]
        restart_lines = [
            b"# HELP mlops_scrape_collector_restarts_total Times the collector's sampling thread died and was "
            b"started again.\n",
            b"# TYPE mlops_scrape_collector_restarts_total counter\n",
        ]
        for name, s in self.states.items():
            running = s.running_since
            abandoned = name in hung
            ok = s.success and not abandoned and name not in dead
            duration = now - running if abandoned and running is not None else s.duration
            if ok:
                parts.append(s.text)
            success_lines.append(f'mlops_scrape_collector_success{{collector="{name}"}} {int(ok)}\n'.encode())
            duration_lines.append(
                f'mlops_scrape_collector_duration_seconds{{collector="{name}"}} {duration:.6f}\n'.encode()
            )
            cpu_lines.append(
                f'mlops_scrape_collector_cpu_seconds_total{{collector="{name}"}} {s.cpu_seconds:.6f}\n'.encode()
            )
            restart_lines.append(f'mlops_scrape_collector_restarts_total{{collector="{name}"}} {s.restarts}\n'.encode())
        tail = b"".join((*success_lines, *duration_lines, *cpu_lines, *restart_lines, self._self_text, self.static))
        parts.append(tail)
        body = b"".join(parts)  # one copy of ~200 KB, not a join and then a concatenation
        self._parts = (body, tuple(parts))
        if not hung and not dead:
            self._cache = (gen, body)
        return body

    def parts(self, body: bytes) -> tuple[bytes, ...] | None:
        """The pieces ``body`` (the last :meth:`scrape`'s) was joined from: each collector's text, then
        the per-scrape lines. The server compresses a piece once, not the whole body every scrape."""
        last = self._parts
        return last[1] if last is not None and last[0] is body else None
