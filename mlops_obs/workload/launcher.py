"""Launch the reference DDP job as N rank processes and supervise them, as torchrun's agent does.

Each rank is a separate ``python -m mlops_obs.workload.train`` process with the torchrun environment
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so the sidecar sees real, independent
processes. When one rank fails the others are stopped and the launcher returns that rank's code.

Stopping is the launcher's whole job once the ranks run, so it holds in every way a launcher ends:

- SIGINT, SIGTERM (what ``kill``, ``timeout``, systemd and Kubernetes send) and SIGHUP stop the ranks
  (SIGTERM, a grace period, then SIGKILL; a second signal skips the grace) and the launcher returns
  128 + the signal's number. The handlers are installed even where the signal was inherited ignored:
  a launcher started in the background by a script has SIGINT ignored, and an explicit ``kill -INT``
  must still stop it. SIGHUP inherited ignored is the exception: that is ``nohup``, whose point is
  that a hang-up leaves the job running.
- SIGUSR2 ends the run early and cleanly, for whoever waits for something while the job trains (a test
  waiting for its alert): the launcher writes a step count :data:`~.progress.FINISH_AHEAD` past the
  furthest rank into the heartbeat memory, every rank stops after that many steps as if it were
  ``--steps``, and the job ends finished with exit code 0.
- When the launcher dies without a chance to act (SIGKILL, the OOM killer), the kernel kills the
  ranks: each rank asks for ``PR_SET_PDEATHSIG`` at start-up (see :mod:`.train`). The kernel sends
  it when the *thread* that started the rank exits, so :func:`launch` starts and supervises the
  ranks on one thread.

Everything that can be checked before a rank starts is checked first and reported as one
:class:`~mlops_obs.config.ConfigError` line: the ``--inject`` faults against this run, ``--device
cuda`` against what torch sees, the log and hand-off directories.

What the launcher leaves in the log directory, besides each rank's own ``<job>-rank<R>.jsonl``:

- ``<job>-rank<R>.log``: the rank's stdout and stderr, read through pipes and written in the CRI
  container log format with the time of each line (:mod:`.capture`), as the kubelet writes a pod's;
- ``<job>-launcher.jsonl``: the launcher's own JSON log (``kind="launcher"``): each rank started
  (pid, node), exited (``exit_code``, or ``signal`` for a rank a signal killed), the launcher stopping
  the others and why, stalls, stack dumps. Its one-line messages to stderr stay as they are;
- ``<job>-rank<R>.stack``: stack dumps (:mod:`.signals`), asked for before the others are stopped
  after a rank failed, when no rank completed a step for longer than the job's cadence allows
  (:mod:`.progress`), and before stopping on a signal.

The launcher never restarts a rank: the first failure ends the run, as torchrun's default
``--max-restarts=0`` does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, cast

import orjson

from mlops_obs.children import free_port
from mlops_obs.config import ConfigError
from mlops_obs.workload.capture import OutputFile, RankOutput
from mlops_obs.workload.faults import Fault, FaultError, check_world, parse_fault
from mlops_obs.workload.progress import HEARTBEAT_FD_ENV, Heartbeats, StallWatch
from mlops_obs.workload.signals import FR_BUFFER_SIZE, DumpTarget, request_dumps, stack_path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FINISH_SIGNAL = signal.SIGUSR2  # finish early: every rank stops cleanly after the same step
GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL when stopping ranks
POLL_SECONDS = 0.05  # how often the supervisor looks at the ranks and at stop requests
STALL_AFTER = 60.0  # a stall is at least this long without a completed step...
STALL_FACTOR = 20.0  # ... and at least this many median step times
DRAIN_SECONDS = 10.0  # how long the launcher waits for the ranks' output pipes to close after they exit

# The environment variable naming the launcher's pid, for a rank to check it is still its parent.
LAUNCHER_PID_ENV = "MLOPS_OBS_LAUNCHER_PID"


class StopRequest:
    """The stop signals received, recorded by handlers for the supervisor to act on.

    The handler only appends the number. Python runs it in the main thread between two bytecodes,
    possibly inside ``Popen.poll`` holding its lock: raising there (what the default SIGINT handler
    does) can leave that lock taken and the next ``wait`` blocked for good, and taking a lock there
    (``threading.Event.set``) can deadlock against the interrupted code. Whoever waits polls
    :attr:`signum`, in the launcher's own loop or, in the demo, from the thread running the launcher.
    """

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.finish = False  # FINISH_SIGNAL received: end the run early, cleanly

    @property
    def signum(self) -> int | None:
        """The first stop signal received, if any."""
        return self.signals[0] if self.signals else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def _finish(self, signum: int, frame: FrameType | None) -> None:
        self.finish = True

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle :data:`STOP_SIGNALS` and :data:`FINISH_SIGNAL` while the block runs (main thread only);
        restore them after."""
        previous: dict[signal.Signals, Any] = {}
        try:
            for sig in STOP_SIGNALS:
                if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # started under nohup: a hang-up is meant to leave the job running
                previous[sig] = signal.signal(sig, self._handle)
            previous[FINISH_SIGNAL] = signal.signal(FINISH_SIGNAL, self._finish)
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def wait(self) -> int:
        """Block until a stop signal arrives; its number."""
        while self.signum is None:
            time.sleep(POLL_SECONDS)
        return self.signum


def rank_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What every rank needs from the launcher's config, passed as JSON through the environment."""
    return {
        "steps": cfg["steps"],
        "log_dir": str(cfg["log-dir"]),
        "multiproc_dir": str(cfg["multiproc-dir"]) if cfg.get("multiproc-dir") else None,
        "batch_size": cfg["batch-size"],
        "device": cfg["device"],
        "flush_interval": cfg["flush-interval"],
        "log_every": cfg["log-every"],
        "log_level": cfg["log.level"],
        "timeout": cfg["timeout"],
        "inject": [str(x) for x in cfg.get("inject") or []],
        "checkpoint_every": cfg.get("checkpoint-every", 0),
        "peak_flops": cfg.get("peak-flops", 0.0),
    }


def check_faults(cfg: Mapping[str, Any]) -> list[Fault]:
    """Validate ``--inject`` against this run before any rank starts (one-line :class:`ConfigError`)."""
    try:
        faults = [parse_fault(x) for x in cfg.get("inject") or []]
        check_world(faults, int(cfg["world-size"]))
    except FaultError as e:
        raise ConfigError("inject", str(e)) from None
    for f in faults:
        if f.kind == "oom" and not _cuda_selected(str(cfg.get("device", "auto"))):
            raise ConfigError("inject", f"{f}: a CUDA out-of-memory needs a GPU; this run trains on CPU")
        if f.kind in ("nan", "stall", "crash", "oom") and f.step >= int(cfg["steps"]):
            raise ConfigError("inject", f"{f}: step {f.step} is never reached with --steps={cfg['steps']}")
    return faults


def check_device(cfg: Mapping[str, Any]) -> None:
    """``--device cuda`` where torch sees no CUDA device is one line now, not N rank failures later."""
    if cfg.get("device") != "cuda":
        return
    import torch

    if torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is built without CUDA"
    else:
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver"
    raise ConfigError("device", f"cuda requested but {why}; use --device=cpu or auto")


def _cuda_selected(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return bool(torch.cuda.is_available())


def make_directory(key: str, path: Path) -> None:
    """Create a directory the run needs; a path that cannot be one is a :class:`ConfigError` on ``key``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(key, f"cannot create directory {str(path)!r}: a file of that name exists") from None
    except OSError as e:
        raise ConfigError(key, f"cannot create directory {str(path)!r}: {e.strerror or e}") from None


def launch(cfg: Mapping[str, Any], out: IO[str] = sys.stderr, stop: StopRequest | None = None) -> int:
    """Check the run, start the ranks and supervise them; the launcher's exit code.

    Raises :class:`ConfigError` for a run that cannot start. ``stop`` carries the stop signals the
    caller's handlers record (see :class:`StopRequest`); without it nothing but the ranks ends the run.
    """
    stop = stop or StopRequest()
    faults = check_faults(cfg)
    check_device(cfg)
    log_dir = Path(cfg["log-dir"])
    make_directory("log-dir", log_dir)
    if cfg.get("multiproc-dir"):
        make_directory("multiproc-dir", Path(cfg["multiproc-dir"]))
    for f in faults:
        print(f"workload: injecting {f}", file=out)
    if stop.signum is not None:  # asked to stop while the checks ran (importing torch takes seconds)
        return 128 + stop.signum
    job = Job(cfg, log_dir)
    try:
        job.start()
        rc = job.supervise(out, stop)
    except BaseException:
        job.kill()  # a half-started job is not left behind
        raise
    finally:
        job.close()
    return rc


class LauncherLog:
    """The launcher's own JSON log, ``<log-dir>/<job>-launcher.jsonl``: our JSON line format and
    redaction (:class:`~mlops_obs.logs.config.JsonLines`), every record with ``kind="launcher"``, the
    job, node and run id. A logger of its own, not the process's structlog configuration, because the
    demo runs the launcher inside a process that logs elsewhere. A failed write (a full disk) is
    counted and never stops the launcher."""

    def __init__(self, path: Path, context: Mapping[str, Any]) -> None:
        import structlog

        from mlops_obs.logs.config import FdLogger, JsonLines

        try:
            self._file: IO[bytes] | None = open(path, "ab")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise ConfigError("log-dir", f"cannot write {str(path)!r}: {e.strerror or e}") from None
        self._log = structlog.wrap_logger(
            FdLogger(self._file),
            processors=[cast(Any, JsonLines({"kind": "launcher", **context}))],
            wrapper_class=structlog.make_filtering_bound_logger(0),
        )
        self.errors = 0

    def _emit(self, level: str, event: str, kw: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            getattr(self._log, level)(event, **kw)
        except (OSError, ValueError):
            self.errors += 1

    def info(self, event: str, **kw: Any) -> None:
        self._emit("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit("error", event, kw)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class Rank:
    rank: int
    proc: subprocess.Popen[bytes]
    output: RankOutput
    started: float
    stop_sent: bool = False
    exit_logged: bool = False


def exit_fields(code: int) -> dict[str, Any]:
    """``exit_code`` for a process that exited, ``signal`` (its name) for one a signal killed."""
    if code >= 0:
        return {"exit_code": code}
    try:
        return {"signal": signal.Signals(-code).name}
    except ValueError:
        return {"signal": f"signal {-code}"}


class Job:
    """The ranks of one run, their output capture, heartbeats and the launcher's log."""

    def __init__(self, cfg: Mapping[str, Any], log_dir: Path) -> None:
        self.cfg = cfg
        self.name = str(cfg["job"])
        self.world = int(cfg["world-size"])
        self.log_dir = log_dir
        self.node = os.environ.get("MLOPS_OBS_NODE") or socket.gethostname()
        self.run_id = f"{self.name}-{int(time.time())}"
        self.ranks: list[Rank] = []
        self.log = LauncherLog(log_dir / f"{self.name}-launcher.jsonl",
                               {"job": self.name, "node": self.node, "run_id": self.run_id})  # fmt: skip
        try:
            self.heartbeats: Heartbeats | None = Heartbeats(self.world)
        except (AttributeError, OSError):  # no memfd (not Linux): no stall detection, no stack dumps
            self.heartbeats = None
        floor, factor = float(cfg.get("stall-after", STALL_AFTER)), float(cfg.get("stall-factor", STALL_FACTOR))
        self.stall = StallWatch(floor, factor, time.monotonic())

    def start(self) -> None:
        """Start one process a rank, its stdout and stderr copied into ``<job>-rank<R>.log`` (CRI format)."""
        port = free_port()
        opts = orjson.dumps(rank_options(self.cfg)).decode()
        self.log.info("launcher starting", world_size=self.world, pid=os.getpid(), log_dir=str(self.log_dir),
                      inject=[str(x) for x in self.cfg.get("inject") or []], steps=self.cfg.get("steps"))  # fmt: skip
        for rank in range(self.world):
            env = dict(os.environ)
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(self.world),
                LOCAL_WORLD_SIZE=str(self.world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                MLOPS_OBS_JOB=self.name,
                MLOPS_OBS_RUN_ID=self.run_id,
                MLOPS_OBS_NODE=self.node,
                MLOPS_OBS_WORKLOAD=opts,
                OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
            )
            env[LAUNCHER_PID_ENV] = str(os.getpid())
            # Each line reaches the pipe when written, so its time is when it was written, and a rank
            # killed mid-run loses nothing it printed.
            env.setdefault("PYTHONUNBUFFERED", "1")
            env.setdefault("TORCH_FR_BUFFER_SIZE", FR_BUFFER_SIZE)
            pass_fds: tuple[int, ...] = ()
            if self.heartbeats is not None:
                env[HEARTBEAT_FD_ENV] = str(self.heartbeats.fd)
                pass_fds = (self.heartbeats.fd,)
            path = self.log_dir / f"{self.name}-rank{rank}.log"
            try:
                file = OutputFile(path)
            except OSError as e:
                raise ConfigError("log-dir", f"cannot write {str(path)!r}: {e.strerror or e}") from None
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "mlops_obs.workload.train"],
                    env=env,
                    stdout=out_w,
                    stderr=err_w,
                    stdin=subprocess.DEVNULL,
                    pass_fds=pass_fds,
                )
            except BaseException:
                for fd in (out_r, err_r):
                    os.close(fd)
                file.close()
                raise
            finally:
                os.close(out_w)
                os.close(err_w)
            self.ranks.append(Rank(rank, proc, RankOutput(file, out_r, err_r, f"rank{rank}"), time.monotonic()))
            self.log.info("rank started", rank=rank, pid=proc.pid, output=str(path))

    # --- supervision ---------------------------------------------------------------------------------

    def supervise(self, out: IO[str], stop: StopRequest, grace: float = GRACE_SECONDS) -> int:
        """Wait for every rank; on the first failure, or a stop signal, dump stacks and stop the rest.

        Returns 0 when every rank succeeded, 128 + the signal's number after a stop signal (whatever the
        ranks did meanwhile: a Ctrl-C in a terminal reaches the ranks too, and the signal is the cause),
        else the first failed rank's exit code (1 for a rank killed by a signal).
        """
        failed: tuple[int, int] | None = None
        finishing = False
        while stop.signum is None:
            self.reap()
            codes = [r.proc.returncode for r in self.ranks]
            for r in self.ranks:
                code = r.proc.returncode
                if code not in (None, 0) and failed is None:
                    failed = (r.rank, code)
                    print(f"workload: rank {r.rank} exited with code {code}; stopping the other ranks", file=out)
            if failed or all(c is not None for c in codes):
                break
            if stop.finish and not finishing:
                finishing = True
                self.finish(out)
            self._watch_progress(out)
            time.sleep(POLL_SECONDS)
        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            print(f"workload: {name} received; stopping the ranks", file=out, flush=True)
            self.stop_ranks(f"{name} received", grace, stop, signal=name)
        elif failed:
            how = exit_fields(failed[1])
            what = f"code {how['exit_code']}" if "exit_code" in how else how["signal"]
            failed_how = {f"failed_{k}": v for k, v in how.items()}  # not an exit record of its own
            self.stop_ranks(f"rank {failed[0]} exited with {what}", grace, stop, failed_rank=failed[0], **failed_how)
        self.reap()
        if stop.signum is not None:
            rc = 128 + stop.signum
        elif failed:
            rc = failed[1] if failed[1] > 0 else 1
        else:
            rc = 0
        (self.log.info if rc == 0 else self.log.error)("launcher finished", exit_code=rc)
        return rc

    def finish(self, out: IO[str]) -> None:
        """Have every rank stop cleanly after the same step (:meth:`.progress.Heartbeats.finish`)."""
        if self.heartbeats is None:
            print("workload: asked to finish early, but the ranks cannot be told (no shared memory)", file=out)
            self.log.warning("finish request ignored", reason="no heartbeat memory")
            return
        steps = self.heartbeats.finish()
        print(f"workload: asked to finish early; every rank stops after {steps} steps", file=out, flush=True)
        self.log.info("finish requested", steps=steps)

    def reap(self) -> None:
        """Log every rank that exited since the last look."""
        for r in self.ranks:
            code = r.proc.poll()
            if code is None or r.exit_logged:
                continue
            r.exit_logged = True
            kw: dict[str, Any] = {"rank": r.rank, "pid": r.proc.pid, **exit_fields(code),
                                  "runtime_s": round(time.monotonic() - r.started, 3)}  # fmt: skip
            if code == 0:
                self.log.info("rank exited", **kw)
            elif r.stop_sent:
                self.log.warning("rank exited", stopped_by_launcher=True, **kw)
            else:
                self.log.error("rank exited", **kw)

    def _watch_progress(self, out: IO[str]) -> None:
        if self.heartbeats is None:
            return
        stall, ended = self.stall.observe(time.monotonic(), self.heartbeats.steps(), self.heartbeats.intervals())
        if ended is not None:
            self.log.info("progress resumed", stalled_s=round(ended, 3))
        if stall is None:
            return
        per = f"{stall.step_time:.3g} s a step" if stall.step_time is not None else "no step completed yet"
        print(f"workload: no rank completed a step for {stall.idle:.1f}s ({per}); dumping stacks", file=out, flush=True)
        self.log.warning("stall detected", idle_s=round(stall.idle, 3), threshold_s=round(stall.threshold, 3),
                         step_time_s=stall.step_time, steps=list(stall.steps))  # fmt: skip
        self.dump_stacks(f"stall: no rank completed a step for {stall.idle:.1f}s")

    def dump_stacks(self, reason: str) -> None:
        """Every running rank's stacks (and flight recorder state) into its ``.stack`` file."""
        if self.heartbeats is None:
            return
        targets = []
        for r in self.ranks:
            pid = self.heartbeats.ready(r.rank)
            if r.proc.poll() is None and pid == r.proc.pid:
                targets.append(DumpTarget(r.rank, pid, stack_path(self.log_dir, self.name, r.rank)))
        if not targets:
            return
        procs = {r.rank: r.proc for r in self.ranks}
        done = request_dumps(targets, reason, lambda t: procs[t.rank].poll() is not None)
        self.log.info("stack dumps", reason=reason, ranks=[t.rank for t in targets],
                      missing=[r for r, ok in done.items() if not ok])  # fmt: skip

    def stop_ranks(self, reason: str, grace: float, stop: StopRequest | None = None, **why: Any) -> None:
        """Dump the running ranks' stacks, then SIGTERM them, and SIGKILL those still up after ``grace``
        or at a further stop signal."""
        running = [r for r in self.ranks if r.proc.poll() is None]
        if not running:
            return
        seen = len(stop.signals) if stop else 0
        self.log.warning("stopping ranks", reason=reason, ranks=[r.rank for r in running], **why)
        self.dump_stacks(reason)
        for r in running:
            if r.proc.poll() is None:
                r.stop_sent = True
                r.proc.terminate()
        deadline = time.monotonic() + grace
        while any(r.proc.poll() is None for r in self.ranks):
            self.reap()
            if time.monotonic() >= deadline or (stop is not None and len(stop.signals) > seen):
                self.kill()
                return
            time.sleep(POLL_SECONDS)
        self.reap()

    def kill(self) -> None:
        """SIGKILL every rank still running and wait for them."""
        alive = [r for r in self.ranks if r.proc.poll() is None]
        if alive:
            self.log.warning("killing ranks", ranks=[r.rank for r in alive])
        for r in alive:
            r.stop_sent = True
            r.proc.kill()
        for r in self.ranks:
            r.proc.wait()
        self.reap()

    def close(self) -> None:
        """Drain every rank's output to end of file, report any lost, and close what the job holds."""
        deadline = time.monotonic() + DRAIN_SECONDS
        for r in self.ranks:
            if not r.output.join(max(0.0, deadline - time.monotonic())):
                # a process the rank started still holds the pipe: its reader goes on as a daemon thread
                self.log.warning("rank output still open", rank=r.rank, output=str(r.output.file.path))
            f = r.output.file
            if f.lost_bytes:
                self.log.error("rank output lost", rank=r.rank, lost_bytes=f.lost_bytes, error=f.error,
                               output=str(f.path))  # fmt: skip
        if self.heartbeats is not None:
            self.heartbeats.close()
            self.heartbeats = None
        self.log.close()
