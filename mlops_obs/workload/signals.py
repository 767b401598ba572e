"""What a rank leaves behind when it is signalled: its stacks on ``SIGUSR1``, one line when stopped.

A hung job's most useful evidence is where each rank is: the hung rank sits in its own code while its
peers wait inside the collective. A rank blocked in a C++ call (gloo, NCCL, a CUDA sync) never runs a
Python signal handler, so the stacks come from :mod:`faulthandler`, whose handler runs in C:

- ``SIGUSR1`` makes :func:`faulthandler.register` write every thread's Python stack to
  ``<log-dir>/<job>-rank<R>.stack`` (opened once, appended to). It chains to Python's own handler,
  which wakes a watcher thread through :func:`signal.set_wakeup_fd`; that thread appends one JSON line,
  the *trailer*: the time, the pid, and the state of PyTorch's flight recorder (each process group's
  last enqueued, started and completed collective, and the last few entries), which says which
  collective a rank is in; the launcher sets ``TORCH_FR_BUFFER_SIZE`` for it, and in torch 2.13 gloo
  records too (``docs/rca.md`` has what works where). The watcher runs Python while the main
  thread is blocked in C++ (such calls release the GIL).
- The launcher writes a JSON *request* line into the same file just before it signals (the time and the
  reason: a failed rank, a stall, a stop), so a dump is framed as: request, faulthandler's text,
  trailer. The shipper turns each dump into one ``kind="stack"`` event.
- ``SIGTERM`` and ``SIGINT`` (unless inherited ignored) log ``rank stopped by signal`` through the
  rank's logger and then end the process by that same signal, so its exit status is still "killed
  by SIGTERM". The watcher thread does it at once, even while the main thread is stuck, so a peer
  the launcher stops is never mistaken for the rank that hung; the main thread's handler does the
  same if the watcher cannot (someone replaced the wakeup fd).

The launcher's side, :func:`request_dumps`, signals only ranks that said they are ready
(:class:`~mlops_obs.workload.progress.Beat`): before that, ``SIGUSR1``'s default action would kill them.
"""

from __future__ import annotations

import atexit
import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from mlops_obs.logs.parse import STACK_REQUEST_EVENT, STACK_TRAILER_EVENT
from mlops_obs.workload.progress import Beat

DUMP_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FR_LAST_ENTRIES = 8
FR_BUFFER_SIZE = "2000"
"""``TORCH_FR_BUFFER_SIZE`` the launcher gives ranks (unless set): collectives the flight recorder keeps."""


def _now() -> str:
    ns = time.time_ns()
    sec, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac // 1000:06d}Z"


def stack_path(log_dir: Path, job: str, rank: int) -> Path:
    return log_dir / f"{job}-rank{rank}.stack"


def flight_recorder_state() -> dict[str, Any] | None:
    """The flight recorder's summary in this process, or None where torch.distributed is not running.

    ``pg_status`` per process group (``last_enqueued_collective``, ``last_started_collective``,
    ``last_completed_collective``: gloo never reports *started*, so it stays -1 there) and the last
    :data:`FR_LAST_ENTRIES` entries, compacted. Raises what torch raises; the caller records it.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    c10d = torch._C._distributed_c10d
    dump = getattr(c10d, "_dump_fr_trace_json", None) or getattr(c10d, "_dump_nccl_trace_json", None)
    if dump is None:
        return {"available": False, "why": f"torch {torch.__version__} has no flight recorder dump"}
    d = orjson.loads(dump(includeCollectives=True, onlyActive=False))
    entries = d.get("entries") or []
    keep = ("collective_seq_id", "p2p_seq_id", "profiling_name", "state", "input_sizes", "timeout_ms",
            "time_created_ns", "process_group")  # fmt: skip
    status = {str(pg): {k: _int(v) for k, v in st.items()} for pg, st in (d.get("pg_status") or {}).items()
              if isinstance(st, dict)}  # fmt: skip
    return {
        "backend": str(dist.get_backend()),
        "pg_status": status,
        "entries": len(entries),
        "last": [{k: e.get(k) for k in keep if k in e} for e in entries[-FR_LAST_ENTRIES:]],
    }


def _int(v: Any) -> Any:
    """The JSON dump writes the collective counters as strings ("35"); numbers compare as numbers."""
    return int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v


class RankSignals:
    """A rank's handlers for :data:`DUMP_SIGNAL` and :data:`STOP_SIGNALS` (install from the main thread)."""

    def __init__(self, stack_file: Path | None, rank: int, beat: Beat) -> None:
        self.rank = rank
        self.stack_path = stack_file
        self.beat = beat
        self._file: IO[bytes] | None = None
        self._on_stop: Callable[[str], None] | None = None
        self._stopping = threading.Lock()
        self._wake_r = -1

    def install(self) -> bool:
        """Install the handlers and start the watcher; False where a piece could not be (and why is
        printed to stderr: the rank trains on without it)."""
        ok = True
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) == signal.SIG_IGN:
                continue  # started in the background with SIGINT ignored: keep it so
            signal.signal(sig, self._main_thread_handler)
        signal.signal(DUMP_SIGNAL, self._main_thread_handler)  # Python's handler, which faulthandler chains to
        if self.stack_path is not None:
            try:
                self._file = open(self.stack_path, "ab", buffering=0)  # noqa: SIM115 - lives with the process
                faulthandler.register(DUMP_SIGNAL, file=self._file, all_threads=True, chain=True)
            except (OSError, RuntimeError, ValueError) as e:
                print(f"workload rank {self.rank}: no stack dumps: {e}", file=sys.stderr)
                ok = False
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError as e:  # not the main thread
            print(f"workload rank {self.rank}: no signal watcher: {e}", file=sys.stderr)
            os.close(r)
            os.close(w)
            return False
        self._wake_r = r
        threading.Thread(target=self._watch, name="mlops-obs-signals", daemon=True).start()
        atexit.register(self._exiting)
        self.beat.ready()
        return ok

    def _exiting(self) -> None:
        """At interpreter exit, before Python drops its signal handlers (``SIGUSR1``'s default action
        would then kill a rank that is merely slow to exit): ignore the dump signal, then tell the
        launcher not to send it."""
        try:
            if self._file is not None:
                faulthandler.unregister(DUMP_SIGNAL)
            signal.signal(DUMP_SIGNAL, signal.SIG_IGN)
        finally:
            self.beat.unready()

    def on_stop(self, callback: Callable[[str], None]) -> None:
        """``callback(signal name)`` logs the stop line (set once the rank's logger exists)."""
        self._on_stop = callback

    def _main_thread_handler(self, signum: int, frame: Any) -> None:
        if signum in STOP_SIGNALS:
            self._stop(signum)

    def _watch(self) -> None:
        while True:
            try:
                got = os.read(self._wake_r, 64)
            except InterruptedError:
                continue
            except OSError:
                return
            if not got:
                return
            for signum in got:
                if signum == DUMP_SIGNAL:
                    self._trailer()
                elif signum in STOP_SIGNALS:
                    self._stop(signum)

    def _trailer(self) -> None:
        """The line after a faulthandler dump: when, and the flight recorder's state."""
        if self._file is None:
            return
        rec: dict[str, Any] = {"ts": _now(), "event": STACK_TRAILER_EVENT, "rank": self.rank, "pid": os.getpid()}
        try:
            rec["flight_recorder"] = flight_recorder_state()
        except Exception as e:  # a dump must never hurt the rank
            rec["flight_recorder_error"] = f"{type(e).__name__}: {e}"
        try:
            self._file.write(orjson.dumps(rec, default=str) + b"\n")
        except (OSError, ValueError):
            pass

    def _stop(self, signum: int) -> None:
        if not self._stopping.acquire(blocking=False):
            return  # the other path is already at it
        name = signal.Signals(signum).name
        try:
            if self._on_stop is not None:
                self._on_stop(name)
            else:
                print(f"workload rank {self.rank}: stopped by {name}", file=sys.stderr, flush=True)
        except Exception:
            pass
        die_by(signum)


def die_by(signum: int) -> None:
    """End this process by ``signum`` with its default action (any thread may call it), so that the
    parent sees "killed by SIGTERM" as without our handler. Falls back to ``_exit(128 + signum)``."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal(ctypes.c_int(signum), ctypes.c_void_p(0))  # SIG_DFL
        os.kill(os.getpid(), signum)
        time.sleep(5)  # delivery is asynchronous; the process ends meanwhile
    finally:
        os._exit(128 + signum)


# --- the launcher's side -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DumpTarget:
    rank: int
    pid: int
    path: Path


def request_dumps(
    targets: Sequence[DumpTarget], reason: str, gone: Callable[[DumpTarget], bool], timeout: float = 3.0
) -> dict[int, bool]:
    """Write a request line into each target's stack file, signal it, and wait (at most ``timeout`` s
    in all) until its dump and trailer are there or it is ``gone``; per rank, whether they are."""
    sent: dict[int, tuple[DumpTarget, int]] = {}
    for t in targets:
        rec = {"ts": _now(), "event": STACK_REQUEST_EVENT, "reason": reason, "rank": t.rank, "pid": t.pid}
        try:
            fd = os.open(t.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, orjson.dumps(rec) + b"\n")
                start = os.fstat(fd).st_size
            finally:
                os.close(fd)
            os.kill(t.pid, DUMP_SIGNAL)
        except (ProcessLookupError, PermissionError):
            continue  # gone meanwhile
        except OSError:
            continue
        sent[t.rank] = (t, start)
    done = {t.rank: False for t in targets}
    deadline = time.monotonic() + timeout
    while True:
        waiting = False
        for rank, (t, start) in sent.items():
            if not done[rank]:
                done[rank] = _dump_complete(t.path, start)
                waiting = waiting or not (done[rank] or gone(t))
        if not waiting or time.monotonic() >= deadline:
            return done
        time.sleep(0.01)


def _dump_complete(path: Path, start: int) -> bool:
    """Whether a stack and a trailer line follow ``start`` in ``path``."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            tail = f.read(1 << 22)
    except OSError:
        return False
    return tail.endswith(b"\n") and b"\n{" in tail and not tail.startswith(b"{")


def read_dumps(path: Path) -> list[dict[str, Any]]:
    """The dumps of a stack file as dicts (``request``, ``stack`` text, ``trailer``), for tests and tools."""
    dumps: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    text: list[str] = []

    def close() -> None:
        nonlocal cur, text
        if cur is not None or text:
            d = cur or {}
            d["stack"] = "".join(text)
            dumps.append(d)
        cur, text = None, []

    for raw in path.read_bytes().decode("utf-8", "replace").splitlines(keepends=True):
        if raw.startswith("{"):
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                text.append(raw)
                continue
            if rec.get("event") == STACK_REQUEST_EVENT:
                close()
                cur = {"request": rec}
            elif rec.get("event") == STACK_TRAILER_EVENT:
                if cur is None:
                    cur = {}
                cur["trailer"] = rec
                close()
            continue
        text.append(raw)
    close()
    return dumps
