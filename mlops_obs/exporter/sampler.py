"""Background sampling at the cadence the sidecar is scraped, so that a scrape never waits on NVML,
psutil or the file system, and nothing is read that no scrape will serve.

Each collector runs on its own daemon thread and leaves behind its latest result already rendered to
exposition text. A scrape only concatenates those bytes and adds the per-collector
``mlops_scrape_collector_*`` series; when nothing changed since the last scrape it returns the very
same bytes object (and the server its gzip).

**Cadence from demand.** The sampler learns the scrape interval from the scrapes themselves (the
median gap between the last arrivals, :class:`ScrapeClock`) and runs a round just ahead of the next
expected scrape (by :meth:`Sampler.lead`: twice the slowest collector's last round, at least
:data:`LEAD_MIN`), never more often than ``interval`` (``--sampler.interval``). A scrape that finds a
collector's data older than :meth:`Sampler.budget` (an HA pair's second Prometheus, a first scrape, a
round that ran late) asks for a round and waits for it, for at most the collector deadline and a quarter
of the scrape interval (:meth:`Sampler.scrape_wait`: Prometheus' scrape timeout is at most its interval),
then serves what it has; a round already in flight is waited for rather than doubled. While nothing
scrapes (no scrape for :data:`IDLE_AFTER` expected intervals) the collector threads sleep without a
timeout: the only wake-up is the housekeeping timer (:data:`HOUSEKEEPING_INTERVAL`: stale rank files,
the watchdog, the published cadence). ``on_cadence`` receives the learned interval, so the ranks' flushes can
follow it (:mod:`mlops_obs.rankdir.cadence`).

**Deadlines.** A collector whose round has been running for longer than ``deadline`` (NVML can hang
on a GPU that fell off the bus, ``statvfs`` on a dead NFS mount) is abandoned: its success goes to 0,
its series are dropped from scrapes, and it is not started again until the hung call returns, at
which point it recovers by itself. Since every collector has its own thread, a hang never delays the
others nor the HTTP server: Python cannot kill a thread stuck in C, but it can stop waiting for it.

A thread that dies instead (an exception escaping a round, from the sampler's own code or a logger;
a ``BaseException`` such as ``SystemExit`` raised inside a collector) is its collector's failure: its
success goes to 0 at once, ``mlops_scrape_collector_restarts_total`` counts it, and the thread's loop
starts again (with a round) after a pause that doubles with each death in a row (from the interval up
to :data:`RESTART_BACKOFF_MAX`). A scrape also checks that each thread is alive, so success can never
stay at 1 behind a thread that is gone.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlops_obs.collectors import Collector, CollectorUnavailable
from mlops_obs.metrics import Renderer, format_value

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# The longest pause before a dead sampling thread's loop starts again (the pause doubles per death in a row).
RESTART_BACKOFF_MAX = 300.0
SELF = "exporter-self"  # the housekeeping thread: stale rank files, the watchdog, the published cadence
# How often the housekeeping thread wakes, scraped or not; the one periodic wake-up of an idle sidecar.
HOUSEKEEPING_INTERVAL = 60.0
# Rounds start at least this long before the expected scrape (more when rounds take longer).
LEAD_MIN = 0.1
# The longest a collector's round waits for another collector's round to end (see ``Sampler._baton``).
BATON_WAIT_MAX = 0.25
# Scrape arrivals kept to learn the interval from (the median of their gaps).
SCRAPE_HISTORY = 9
# Prefetching stops once this many expected scrapes have not come: an idle sidecar does not sample.
IDLE_AFTER = 3
MAX_SCRAPE_INTERVAL = 3600.0
# How long a scrape waits for a round while the scrape interval is not known yet (a first scrape).
SCRAPE_WAIT_UNKNOWN = 0.25
# The published cadence is rewritten when the expected scrapes move by more than this (well inside the
# ranks' flush margin), not for every few milliseconds of a scrape's jitter.
PUBLISH_TOLERANCE = 0.1


class ScrapeClock:
    """When scrapes arrive, and so when the next one is expected.

    The interval is the median gap between the last :data:`SCRAPE_HISTORY` arrivals, at least
    ``floor``: robust to one stray ``curl`` and to a scrape that came late. Not thread-safe on its own
    (the sampler holds its lock around it)."""

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self.arrivals: deque[float] = deque(maxlen=SCRAPE_HISTORY)
        self.interval: float | None = None

    def arrive(self, now: float) -> None:
        a = self.arrivals
        a.append(now)
        if len(a) >= 2:
            gaps = [b - x for x, b in zip(a, list(a)[1:])]
            self.interval = min(max(statistics.median(gaps), self.floor), MAX_SCRAPE_INTERVAL)

    @property
    def last(self) -> float | None:
        return self.arrivals[-1] if self.arrivals else None

    def next_expected(self, after: float) -> float | None:
        """The first expected scrape later than ``after``; ``None`` while none is expected (fewer than two
        scrapes so far, or :data:`IDLE_AFTER` expected ones missed)."""
        last, interval = self.last, self.interval
        if last is None or interval is None:
            return None
        k = max(1, math.floor((after - last) / interval) + 1)
        return last + k * interval if k <= IDLE_AFTER else None


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
    started_at: float = -math.inf  # when the last round (finished or running) started
    finished_at: float | None = None
    wanted: bool = False  # a scrape found the data stale and waits for a round
    aimed: float | None = None  # the expected scrape the last scheduled round ran ahead of (monotonic)
    backoff_until: float = 0.0  # its thread is dead and starts again then: no scrape waits for it
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
    """Runs ``collectors`` off the scrape path, at the cadence :meth:`scrape` is called (see the module).

    ``housekeeping``: callables run every :data:`HOUSEKEEPING_INTERVAL` on the housekeeping thread,
    scraped or not (the rank directory's stale-file deletion). ``on_cadence(interval, next_scrape,
    lead)`` is called (with Unix times) when the learned scrape interval or phase moves, when scrapes
    stop (``None``), and at each housekeeping tick; it runs on a scrape's or the housekeeping thread
    and what it raises is logged once per message, never served."""

    def __init__(
        self,
        collectors: list[Collector],
        interval: float,
        deadline: float,
        log: FilteringBoundLogger,
        static: bytes = b"",
        *,
        housekeeping: Iterable[Callable[[], object]] = (),
        on_cadence: Callable[[float | None, float | None, float], None] | None = None,
    ) -> None:
        self.static = static  # constant series (build info) appended to every scrape
        self.collectors = collectors
        self.clock = ScrapeClock(interval)
        self.interval = interval
        self.deadline = deadline
        self.log = log
        self.housekeeping = list(housekeeping)
        self.on_cadence = on_cadence
        self.states = {c.name: CollectorState() for c in collectors}
        self._stop = threading.Event()
        self._started = False
        self._threads: dict[str, threading.Thread] = {}
        self._self_deaths = 0
        self._reported: dict[str, str | None] = {}
        # Bumped whenever any rendered part changes; the scrape cache is valid for one generation.
        self.generation = 0
        self._gen_lock = threading.Lock()
        self._self_text = render_self(*self_usage())
        self._self_at = time.monotonic()
        self._cache: tuple[int, bytes] | None = None
        self._parts: tuple[bytes, tuple[bytes, ...]] | None = None
        # One condition for the schedule: the collector threads wait on it for their next round, a
        # scrape waits on it for the rounds it asked for, and every round's end notifies it.
        self._cond = threading.Condition()
        self._published: tuple[float | None, float | None] = (None, None)
        self._published_at = -math.inf
        self._hung_reported: set[str] = set()
        self._housekeeping_errors: dict[int, str] = {}
        self._scrapes_waiting = 0  # scrapes waiting for rounds: a round's end wakes threads only for them
        # Held through a round: the collectors' rounds, due at the same moment, run one after another
        # instead of interleaving. Interleaved, every syscall one of them makes hands the GIL to
        # another (a futex wake and a context switch each), and each thread resumes on caches the
        # others evicted; in turn, each round runs on its own warm code. A round waits for it at most
        # ``baton_wait()``, so a collector that hangs (NVML, a dead NFS mount) delays the others by
        # that much, once per round, and never stops them. Not for a collector's first round.
        self._baton = threading.Lock()

    @property
    def interval(self) -> float:
        """``--sampler.interval``: the most often a collector samples (a reload may change it)."""
        return self.clock.floor

    @interval.setter
    def interval(self, value: float) -> None:
        self.clock.floor = value

    def _bump(self) -> None:
        with self._gen_lock:
            self.generation += 1

    def start(self) -> None:
        loops: list[tuple[str, Callable[[], None]]] = [
            (c.name, functools.partial(self._loop, c)) for c in self.collectors
        ]
        self._started = True
        for name, loop in [*loops, (SELF, self._self_loop)]:
            t = threading.Thread(target=self._supervise, args=(name, loop), name=f"sample-{name}", daemon=True)
            t.start()
            self._threads[name] = t

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
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
        with self._cond:
            state.running_since = state.started_at = t0
            state.wanted = False
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
        with self._cond:
            state.running_since = None
            if self._scrapes_waiting:  # else nobody to tell: no wake-up of the other collectors' threads
                self._cond.notify_all()
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

    # --- the schedule -----------------------------------------------------------------------------

    def lead(self) -> float:
        """How long before an expected scrape its round starts: twice the last rounds' durations added up
        (they run one after another), at least :data:`LEAD_MIN`, at most half the scrape interval."""
        total = sum(s.duration for s in self.states.values())
        lead = LEAD_MIN + 2.0 * min(total, self.deadline)
        interval = self.clock.interval
        return min(lead, interval / 2.0) if interval is not None else lead

    def budget(self) -> float:
        """The oldest a round may have started for a scrape to serve it without asking for a new one."""
        return max(float(self.interval), 2.0 * self.lead())

    def scrape_wait(self) -> float:
        """How long a scrape waits for the rounds it asked for before it serves the data it has: the
        deadline, but at most a quarter of the learned scrape interval (:data:`SCRAPE_WAIT_UNKNOWN` before
        one is learned), so that a slow round on a busy node never makes Prometheus time the scrape out
        (its timeout is at most its interval)."""
        interval = self.clock.interval
        return min(float(self.deadline), interval / 4.0 if interval is not None else SCRAPE_WAIT_UNKNOWN)

    def _due(self, state: CollectorState, now: float) -> float | None:
        """When this collector's next round should start (monotonic), ``None`` when none is wanted; the
        caller holds ``_cond``. Never sooner than ``interval`` after its last round started."""
        return self._schedule(state, now)[0]

    def _schedule(self, state: CollectorState, now: float) -> tuple[float | None, float | None]:
        """(when the next round is due, the expected scrape it runs ahead of); see :meth:`_due`.

        The next expected scrape is the first one after the one the last round ran ahead of
        (``aimed``): after a round the lead is recomputed from its duration, and a lead that shrank
        would otherwise put that same scrape still ahead of the round's start plus the lead, and the
        thread would wake (or, with a lead over ``interval``, run a second round) for it again."""
        earliest = state.started_at + float(self.interval)
        if state.wanted:
            return max(now, earliest), None
        lead = self.lead()
        after = state.started_at + lead
        if state.aimed is not None and state.aimed > after:
            after = state.aimed
        expected = self.clock.next_expected(after)
        if expected is None:
            return None, None
        return max(expected - lead, earliest), expected

    def _wait_next_round(self, state: CollectorState) -> bool:
        """Sleep until this collector's next round is due (a scrape is expected, or one asked); True when
        stopping. With no scrape expected it waits with no timeout: an idle sidecar does not wake."""
        with self._cond:
            while not self._stop.is_set():
                now = time.monotonic()
                due, expected = self._schedule(state, now)
                if due is not None and due <= now:
                    state.aimed = expected
                    return False
                self._cond.wait(None if due is None else due - now)
        return True

    def baton_wait(self) -> float:
        """How long a round waits for the round of another collector to end before it runs anyway."""
        return min(BATON_WAIT_MAX, float(self.deadline) / 4.0)

    def _loop(self, c: Collector) -> None:
        state = self.states[c.name]
        baton = self._baton
        while not self._stop.is_set():
            # The first rounds run at once, side by side: the sidecar is ready, and a first scrape served,
            # as soon as the slowest collector (GPU start-up) has sampled, not after all of them in turn.
            held = baton.acquire(timeout=self.baton_wait()) if state.rounds else False
            try:
                self.sample_once(c)
            finally:
                if held:
                    baton.release()
            state.deaths_in_a_row = 0
            if self._wait_next_round(state):
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
            self._reported[name] = state.error
        else:
            self._self_deaths += 1
            deaths = self._self_deaths
        pause = min(RESTART_BACKOFF_MAX, float(self.interval) * 2.0 ** min(deaths - 1, 32))
        if state is not None:
            with self._cond:
                state.running_since = None
                state.wanted = False
                state.backoff_until = time.monotonic() + pause
                self._cond.notify_all()
            self._bump()
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
        """Housekeeping, scraped or not: the callables (stale rank files), the watchdog's log line, the
        published cadence (scrapes that stopped are published as such)."""
        while not self._stop.wait(HOUSEKEEPING_INTERVAL):
            for i, fn in enumerate(self.housekeeping):
                try:
                    fn()
                    self._housekeeping_errors.pop(i, None)
                except Exception as e:
                    msg = f"{type(e).__name__}: {e}"
                    if self._housekeeping_errors.get(i) != msg:
                        self._housekeeping_errors[i] = msg
                        self.log.error("housekeeping failed", error=msg)
            self._watch(self.abandoned())
            self._publish(time.monotonic(), force=True)
            self._self_deaths = 0

    def _watch(self, hung: list[str]) -> None:
        """Log each collector once as it is abandoned (from a scrape or the housekeeping thread)."""
        with self._cond:
            new = sorted(set(hung) - self._hung_reported)
            self._hung_reported = set(hung)
        for name in new:
            self.log.error(
                "collector abandoned: still running past its deadline; its series are dropped",
                collector=name,
                deadline=self.deadline,
            )

    def _publish(self, now: float, force: bool = False) -> None:
        """Hand the learned cadence to ``on_cadence`` when it moved (or ``force``): Unix times."""
        if self.on_cadence is None:
            return
        with self._cond:
            lead = self.lead()
            expected = self.clock.next_expected(now)
            interval = self.clock.interval if expected is not None else None
            old_interval, old_next = self._published
            moved = (interval is None) != (old_interval is None)
            if interval is not None and expected is not None and old_interval is not None and old_next is not None:
                # The published grid is old_next + k * old_interval: still right within the tolerance?
                k = round((expected - old_next) / old_interval)
                moved = (
                    abs(old_next + k * old_interval - expected) > PUBLISH_TOLERANCE
                    or abs(interval - old_interval) > 0.01 * interval
                )
            if not (moved or force or now - self._published_at > HOUSEKEEPING_INTERVAL):
                return
            self._published = (interval, expected)
            self._published_at = now
        offset = time.time() - now
        try:
            self.on_cadence(interval, None if expected is None else expected + offset, lead)
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            if self._housekeeping_errors.get(-1) != msg:
                self._housekeeping_errors[-1] = msg
                self.log.warning("could not publish the sampling cadence", error=msg)
        else:
            self._housekeeping_errors.pop(-1, None)

    def _refresh(self, now: float) -> None:
        """A scrape arrived: learn from it, and wait (at most the deadline) for a round of every collector
        whose data is older than the budget (asking for one), or whose round is in flight."""
        if not self._started or self._stop.is_set():
            return
        with self._cond:
            before = self.clock.interval
            self.clock.arrive(now)
            after = self.clock.interval
            budget = self.budget()
            waiting: dict[str, int] = {}
            dead = set(self.dead())
            for name, s in self.states.items():
                if s.backoff_until > now or name in dead:
                    continue
                if s.running_since is not None:
                    if now - s.running_since <= self.deadline:
                        waiting[name] = s.rounds
                elif now - s.started_at > budget:
                    s.wanted = True
                    waiting[name] = s.rounds
            if waiting or before is None or after is None or abs(after - before) > 0.01 * before:
                self._cond.notify_all()  # a round asked for, or a schedule that moved
            until = now + self.scrape_wait()
            self._scrapes_waiting += 1
            try:
                while waiting and not self._stop.is_set():
                    waiting = {n: r for n, r in waiting.items() if self.states[n].rounds == r}
                    left = until - time.monotonic()
                    if not waiting or left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self._scrapes_waiting -= 1
        self._publish(now)

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
        """The exposition body, fresh within :meth:`budget` (a round is asked for and waited for, at most
        the deadline, when it is not); the same bytes object as last time when nothing changed."""
        self._refresh(time.monotonic())
        now = time.monotonic()
        if now - self._self_at >= self.interval:
            self._self_text = render_self(*self_usage())
            self._self_at = now
            self._bump()
        gen = self.generation
        hung = self.abandoned(now)
        if hung or self._hung_reported:
            self._watch(hung)
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
