"""Background sampling, so that a scrape never waits on NVML, psutil or the file system.

Each collector runs on its own daemon thread every ``interval`` seconds and leaves behind its latest
result already rendered to exposition text. A scrape only concatenates those bytes and adds the
per-collector ``mlops_scrape_collector_*`` series. A collector whose round has been running for longer
than ``deadline`` (NVML can hang on a GPU that fell off the bus) is abandoned: its success goes to 0,
its series are dropped from scrapes, and it is not started again until the hung call returns. Since
every collector has its own thread, a hang never delays the others nor the HTTP server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric

from mlops_obs.collectors import Collector, CollectorUnavailable


class _Families:
    """Adapter so prometheus_client's serializer can render a list of families."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(families: Iterable[Metric]) -> bytes:
    return generate_latest(_Families(families))  # type: ignore[arg-type]


@dataclass
class CollectorState:
    text: bytes = b""
    success: bool = False
    duration: float = 0.0
    rounds: int = 0
    running_since: float | None = None
    finished_at: float | None = None
    error: str | None = None


class Sampler:
    def __init__(self, collectors: list[Collector], interval: float, deadline: float, log: Any) -> None:
        self.collectors = collectors
        self.interval = interval
        self.deadline = deadline
        self.log = log
        self.states = {c.name: CollectorState() for c in collectors}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reported: dict[str, str | None] = {}

    def start(self) -> None:
        for c in self.collectors:
            t = threading.Thread(target=self._loop, args=(c,), name=f"sample-{c.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
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
        error: str | None = None
        text = b""
        unavailable = False
        try:
            text = render(c.sample())
        except CollectorUnavailable as e:
            error, unavailable = str(e), True
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        t1 = time.monotonic()
        state.text = text if error is None else b""
        state.success = error is None
        state.error = error
        state.duration = t1 - t0
        state.finished_at = t1
        state.rounds += 1
        state.running_since = None
        self._report(c.name, error, unavailable)

    def _report(self, name: str, error: str | None, unavailable: bool) -> None:
        """Log a collector's failure when it starts or changes, and its recovery: never every round."""
        if self._reported.get(name, None) == error:
            return
        self._reported[name] = error
        if error is None:
            self.log.info("collector recovered", collector=name)
        elif unavailable:
            self.log.warning("collector unavailable on this machine", collector=name, reason=error)
        else:
            self.log.error("collector failed", collector=name, error=error)

    def _loop(self, c: Collector) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.sample_once(c)
            if self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0))):
                return

    @property
    def ready(self) -> bool:
        """Ready once every collector finished (or was abandoned in) its first round."""
        now = time.monotonic()
        for s in self.states.values():
            hung = s.running_since is not None and now - s.running_since > self.deadline
            if s.rounds == 0 and not hung:
                return False
        return True

    def scrape(self) -> bytes:
        now = time.monotonic()
        parts: list[bytes] = []
        success_lines = [
            b"# HELP mlops_scrape_collector_success Whether the collector's last sample succeeded.\n",
            b"# TYPE mlops_scrape_collector_success gauge\n",
        ]
        duration_lines = [
            b"# HELP mlops_scrape_collector_duration_seconds Duration of the collector's last sample.\n",
            b"# TYPE mlops_scrape_collector_duration_seconds gauge\n",
        ]
        stale_after = max(3 * self.interval, self.deadline) + self.deadline
        for name, s in self.states.items():
            running = s.running_since
            abandoned = running is not None and now - running > self.deadline
            stale = s.finished_at is None or now - s.finished_at > stale_after
            ok = s.success and not abandoned and not (stale and s.rounds > 0 and running is not None)
            duration = now - running if abandoned and running is not None else s.duration
            if ok:
                parts.append(s.text)
            success_lines.append(f'mlops_scrape_collector_success{{collector="{name}"}} {int(ok)}\n'.encode())
            duration_lines.append(
                f'mlops_scrape_collector_duration_seconds{{collector="{name}"}} {duration:.6f}\n'.encode()
            )
        return b"".join(parts) + b"".join(success_lines) + b"".join(duration_lines)
