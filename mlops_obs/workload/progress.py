"""Ranks' progress as the launcher sees it: heartbeats in shared memory, and stall detection over them.

Each rank has three 64-bit slots in one ``memfd`` the launcher creates and hands to every rank
(``pass_fds``; its number in ``MLOPS_OBS_HEARTBEAT_FD``): ``ready``, the rank's pid once its signal
handlers are installed (only then may the launcher send it ``SIGUSR1``, whose default action would kill
it); ``steps``, the number of steps it completed; ``interval``, the microseconds between its last two
completed steps. A step costs the rank a clock read, two stores into its own mapping and one load: no
system call, no file, nothing another process can block. The launcher reads every slot each time it
looks at the ranks.

One slot ahead of the ranks' goes the other way: ``finish``, written by the launcher when it is asked to
end the run early (``SIGUSR2``), is the number of steps after which every rank stops cleanly (0: train
the ``--steps`` asked for). Each rank reads it as it completes a step, so all of them stop after the
same one, with no collective of their own: DDP keeps the ranks within a step of each other, and the
launcher sets it :data:`FINISH_AHEAD` steps past the furthest rank.

:class:`StallWatch` decides from them when the job stopped progressing: no rank completed a step for
``max(floor, factor x median step interval)``, the median over the intervals the ranks reported
recently (the ranks time their own steps: the launcher's polls would miss a burst of fast steps).
Before a rank completed two steps there is no cadence, and start-up (importing torch, the
rendezvous) is slow, so the threshold is then ``max(floor, STARTUP_SECONDS)``. Each stall is reported
once; a completed step ends it.
"""

from __future__ import annotations

import mmap
import os
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

HEARTBEAT_FD_ENV = "MLOPS_OBS_HEARTBEAT_FD"
SLOTS = 3  # int64 values per rank: ready (pid), steps completed, microseconds between the last two
HEADER = 1  # int64 values before the ranks' slots: finish (steps after which every rank stops; 0: none)
# How far past the furthest rank a finish is set: the steps a rank may complete between the launcher's
# reading of the counts and its store (a preempted launcher), with room to spare.
FINISH_AHEAD = 25
STARTUP_SECONDS = 300.0
CADENCE_WINDOW = 64


class Heartbeats:
    """The launcher's side: creates the shared memory for ``world`` ranks and reads it."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.fd = os.memfd_create("mlops-obs-heartbeats", 0)  # inheritable only through pass_fds
        size = 8 * (HEADER + SLOTS * world)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size)
        self._view = memoryview(self._map).cast("q")

    def ready(self, rank: int) -> int:
        """The rank's pid once it can take ``SIGUSR1`` (its stack-dump handler is in place), else 0."""
        return int(self._view[HEADER + SLOTS * rank])

    def steps(self) -> list[int]:
        v = self._view
        return [int(v[HEADER + SLOTS * r + 1]) for r in range(self.world)]

    def intervals(self) -> list[float]:
        """Seconds between each rank's last two completed steps (0 before its second)."""
        v = self._view
        return [int(v[HEADER + SLOTS * r + 2]) / 1e6 for r in range(self.world)]

    def finish(self) -> int:
        """Have every rank stop cleanly :data:`FINISH_AHEAD` steps past the furthest one; that step count.
        A finish already set stays (the ranks may have read it)."""
        v = self._view
        if not v[0]:
            v[0] = max(self.steps()) + FINISH_AHEAD
        return int(v[0])

    def close(self) -> None:
        self._view.release()
        self._map.close()
        os.close(self.fd)


class Beat:
    """A rank's side: its slots in the launcher's shared memory and the finish slot (or nothing, without a
    launcher)."""

    def __init__(self, rank: int, fd: int | None) -> None:
        self._view: memoryview | None = None
        self._base = HEADER + SLOTS * rank
        self._last = 0.0
        if fd is None:
            return
        try:
            m = mmap.mmap(fd, 0)
            view = memoryview(m).cast("q")
            if len(view) >= self._base + SLOTS:
                self._view = view
        except (OSError, ValueError):
            pass
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    @classmethod
    def from_env(cls, rank: int) -> Beat:
        raw = os.environ.get(HEARTBEAT_FD_ENV, "")
        return cls(rank, int(raw) if raw.isdigit() else None)

    def ready(self) -> None:
        if self._view is not None:
            self._view[self._base] = os.getpid()

    def unready(self) -> None:
        if self._view is not None:
            self._view[self._base] = 0

    def step(self, completed: int) -> None:
        """``completed`` steps done (call it as each step completes)."""
        view = self._view
        if view is None:
            return
        now = time.perf_counter()
        if self._last:
            view[self._base + 2] = int((now - self._last) * 1e6)
        self._last = now
        view[self._base + 1] = completed

    def finish(self) -> int:
        """The steps after which the launcher asked every rank to stop (0: none asked)."""
        return int(self._view[0]) if self._view is not None else 0


@dataclass(frozen=True)
class Stall:
    idle: float  # seconds since the last completed step anywhere
    threshold: float
    steps: tuple[int, ...]  # completed steps per rank
    step_time: float | None  # median seconds a step, None before any rank completed two


class StallWatch:
    """Stall detection over the ranks' step counts, fed by the supervisor at each look."""

    def __init__(self, floor: float, factor: float, started: float) -> None:
        self.floor = floor
        self.factor = factor
        self.enabled = floor > 0
        self._last: tuple[int, ...] | None = None
        self._last_change = started
        self._steps: deque[float] = deque(maxlen=CADENCE_WINDOW)  # the ranks' step intervals, seconds
        self._reported = False

    @property
    def step_time(self) -> float | None:
        return statistics.median(self._steps) if self._steps else None

    def threshold(self) -> float:
        st = self.step_time
        if st is None:
            return max(self.floor, STARTUP_SECONDS)
        return max(self.floor, self.factor * st)

    def observe(
        self, now: float, steps: Sequence[int], intervals: Sequence[float]
    ) -> tuple[Stall | None, float | None]:
        """Feed the step counts and step intervals seen at ``now``: (a new stall to report, or None;
        the length of a stall that just ended, or None)."""
        cur = tuple(steps)
        ended = None
        since = now - self._last_change
        last = self._last or (0,) * len(cur)
        changed = [i for i, (a, b) in enumerate(zip(cur, last)) if a > b]
        # A lagging rank catching up is progress too (the job is not stuck).
        if changed:
            self._steps.extend(intervals[i] for i in changed if i < len(intervals) and intervals[i] > 0)
            if self._reported:
                ended = since
            self._last_change = now
            self._reported = False
        self._last = cur
        if not self.enabled or self._reported:
            return None, ended
        idle = now - self._last_change
        limit = self.threshold()
        if idle < limit:
            return None, ended
        self._reported = True
        return Stall(idle, limit, cur, self.step_time), ended
