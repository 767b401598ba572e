"""How a rank's end is seen: finished, or failed by an exception, a signal or a non-zero exit status.

A crash must never read as a clean finish (that muted every stall alert), so the monitors of a process
learn how it ends from hooks installed once per process, each chained to what the job had before:

* ``sys.excepthook``: an uncaught exception fails the rank (``exception``, the type's qualified name;
  ``KeyboardInterrupt`` is ``signal SIGINT``), then the job's own hook prints the traceback as usual;
* ``SIGTERM``, ``SIGINT``, ``SIGHUP``: the job's handler (or Python's default for SIGINT) still runs, and
  the rank ends ``failed`` (``signal``) however the process then exits. Where the signal's action was the
  default one (terminate), the final snapshot is written and the process is terminated by the same
  signal, as it would have been. Python runs handlers in the main thread between bytecodes, and a rank
  blocked in a collective (C++) may not return to Python for minutes: so a watcher thread, woken by
  ``signal.set_wakeup_fd``, does that at once (a job's own wakeup fd, e.g. asyncio's, is left alone, and
  then only the main thread's handler acts). An ignored signal stays ignored;
* ``sys.exit(n)``: ``n`` is noted, and at interpreter exit a non-zero status fails the rank
  (``exit_code``), zero or none finishes it. ``raise SystemExit(n)`` at top level bypasses
  ``sys.exit`` and is not seen (inside ``with TrainingMonitor(...)`` it is);
* ``atexit``: every monitor still open is closed with the status noted.

What none of these can see (SIGKILL, the OOM killer, ``os._exit``, a segfault) leaves a snapshot saying
``running`` whose process is gone: the sidecar reports that rank ``failed`` (``vanished``).

Nothing here may slow or kill the job: the hooks do nothing on the training thread's hot path, every
step of theirs is guarded, and a forked child (DataLoader workers) drops the parent's monitors and its
wakeup fd, so a worker's signal is never taken for the rank's. Installing signal handlers needs the main
thread; a monitor built elsewhere gets the other hooks only.

Signal dispositions, ``sys.excepthook`` and ``sys.exit`` belong to the process, so their state is one
object, :data:`HOOKS`, for the whole process.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys
import threading
import weakref
from types import FrameType, TracebackType
from typing import Any, NoReturn, Protocol

from mlops_obs.rankdir import FAILED, failure_detail

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Ending(Protocol):
    """What the hooks need of a monitor: whose it is, and how to record the end."""

    pid: int

    def _end(self, state: str, reason: str = "", detail: str = "") -> None: ...

    def close(self, error: BaseException | None = None) -> None: ...


def exception_detail(exc: BaseException | type[BaseException]) -> str:
    """The exception type's qualified name (``RuntimeError``, ``torch.OutOfMemoryError``), as a detail."""
    t = exc if isinstance(exc, type) else type(exc)
    module = getattr(t, "__module__", "") or ""
    name = getattr(t, "__qualname__", t.__name__)
    return failure_detail(name if module == "builtins" else f"{module}.{name}")


def exit_status(code: object) -> int:
    """The exit status ``sys.exit(code)`` gives: 0 for none, the integer, 1 for anything else."""
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    return 1


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class ProcessHooks:
    """The hooks of one process, installed on the first :meth:`register`, and what they have seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._monitors: weakref.WeakSet[Any] = weakref.WeakSet()
        self._installed = False
        self.exit_status: int | None = None  # from the last sys.exit() call
        self.pending_signal: str | None = None  # a signal the job's own handler took: the rank fails by it
        self._previous: dict[int, Any] = {}  # signal -> the disposition it had before ours
        self._wakeup: tuple[int, int] | None = None  # (read, write) ends of the watcher's pipe
        self._fork_mask: set[int | signal.Signals] | None = None  # the signal mask before a fork blocked ours
        self._libc: Any = None

    def register(self, m: Ending) -> None:
        """Have ``m`` told how this process ends; installs the process's hooks on first use."""
        with self._lock:
            self._monitors.add(m)
            if self._installed:
                return
            self._installed = True
        for step in (self._install_excepthook, self._install_exit, self._install_signals):
            try:
                step()
            except Exception:  # a hook we cannot install is a hook we do without
                pass
        atexit.register(self._at_exit)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(before=self._before_fork, after_in_parent=self._after_fork_in_parent,
                                after_in_child=self._after_fork_in_child)  # fmt: skip

    def failure_of(self, exc: BaseException | None) -> tuple[str, str] | None:
        """``(reason, detail)`` for a rank ended by ``exc``; ``None`` for a clean end (no exception, or
        ``SystemExit`` with status 0 or none). A signal the job's own handler took fails it either way."""
        if self.pending_signal is not None:  # the signal came first; what it raised is its consequence
            return "signal", self.pending_signal
        if exc is None:
            return None
        if isinstance(exc, SystemExit):
            status = exit_status(exc.code)
            return None if status == 0 else ("exit_code", str(status))
        if isinstance(exc, KeyboardInterrupt):
            return "signal", "SIGINT"
        return "exception", exception_detail(exc)

    def _live(self) -> list[Ending]:
        pid = os.getpid()
        return [m for m in list(self._monitors) if m.pid == pid]

    def ended_by_signal(self, name: str) -> None:
        """Fail every open monitor of this process by the signal ``name`` (final snapshots written).

        For a job that ends itself on a signal from a thread of its own, before the main thread's
        handler (which these hooks chain behind) could run: the reference workload's signal watcher
        stops a rank blocked in a collective this way, and without this its rank would read as
        vanished instead of failed by the signal.
        """
        self._fail_all("signal", name)

    def _fail_all(self, reason: str, detail: str) -> None:
        for m in self._live():
            try:
                m._end(FAILED, reason, detail)
            except Exception:
                pass

    # --- the hooks ----------------------------------------------------------------------------------

    def _install_excepthook(self) -> None:
        previous = sys.excepthook

        def excepthook(et: type[BaseException], ev: BaseException, tb: TracebackType | None) -> None:
            try:
                failure = self.failure_of(ev)
                if failure is not None:
                    self._fail_all(*failure)
            except Exception:
                pass
            previous(et, ev, tb)

        sys.excepthook = excepthook

    def _install_exit(self) -> None:
        real_exit = sys.exit

        def exit(status: Any = None) -> NoReturn:
            self.exit_status = exit_status(status)
            real_exit(status)

        exit.__doc__ = real_exit.__doc__
        sys.exit = exit

    def _at_exit(self) -> None:
        failure = None
        if self.pending_signal is not None:
            failure = ("signal", self.pending_signal)
        elif self.exit_status:
            failure = ("exit_code", str(self.exit_status))
        for m in self._live():
            try:
                if failure is not None:
                    m._end(FAILED, *failure)
                m.close()
            except Exception:
                pass

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        immediate: set[int] = set()
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if previous in (signal.SIG_IGN, None):  # ignored (nohup), or set from C: leave it
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._on_signal)
            if previous == signal.SIG_DFL:
                immediate.add(sig)
        if immediate:
            self._start_watcher(immediate)

    def _on_signal(self, signum: int, frame: FrameType | None) -> Any:
        """The Python-level handler (main thread): note the signal, then what the job had."""
        name = signal_name(signum)
        previous = self._previous.get(signum, signal.SIG_DFL)
        if previous == signal.SIG_DFL:
            self._die(signum, name)
            return None
        if self.pending_signal is None:
            self.pending_signal = name
        if callable(previous):
            return previous(signum, frame)
        return None

    def _die(self, signum: int, name: str) -> None:
        """Fail every monitor (final snapshots written), then end by ``signum``'s default action."""
        self._fail_all("signal", name)
        self._reset_to_default(signum)
        os.kill(os.getpid(), signum)

    def _reset_to_default(self, signum: int) -> None:
        """``SIG_DFL`` for ``signum`` from any thread (``signal.signal`` only works in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signum, signal.SIG_DFL)
            return
        if self._libc is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.signal.restype = ctypes.c_void_p
            libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
            self._libc = libc
        self._libc.signal(signum, None)  # SIG_DFL is the null handler

    def _start_watcher(self, immediate: set[int]) -> None:
        """A thread that acts on the signals whose default action ends the process, as they arrive."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            old = None
        if old != -1:  # the job's (asyncio's) wakeup fd: give it back, the main thread's handler will do
            if old is not None:
                signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return
        self._wakeup = (r, w)
        threading.Thread(target=self._watch, args=(r, immediate), name="mlops-obs-signals", daemon=True).start()

    def _watch(self, fd: int, immediate: set[int]) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except InterruptedError:
                continue
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in immediate and signal.getsignal(signum) == self._on_signal:
                    try:
                        self._die(signum, signal_name(signum))
                    except Exception:
                        pass

    def _before_fork(self) -> None:
        """Hold our signals back across a fork: one reaching the child before it dropped our handler
        would be lost (the child's interpreter clears signals caught during the fork) or, through the
        inherited wakeup fd, be taken for the parent's."""
        if self._previous:
            try:
                self._fork_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(self._previous))
            except (OSError, ValueError):
                self._fork_mask = None

    def _after_fork_in_parent(self) -> None:
        mask, self._fork_mask = self._fork_mask, None
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _after_fork_in_child(self) -> None:
        """A forked child (a DataLoader worker) is not the rank: it forgets the monitors, gets the job's
        own signal handlers back (a signal held back during the fork then acts as it would have), and
        stops writing into the parent's watcher pipe. A monitor made in the child installs afresh."""
        self._monitors = weakref.WeakSet()
        self._installed = False
        self.exit_status = self.pending_signal = None
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            try:
                signal.set_wakeup_fd(-1)
            except (ValueError, OSError):
                pass
            for fd in wakeup:
                try:
                    os.close(fd)
                except OSError:
                    pass
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            try:
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, handler)
            except (OSError, ValueError):
                pass
        mask, self._fork_mask = self._fork_mask, None
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


HOOKS = ProcessHooks()
