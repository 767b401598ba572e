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
- When the launcher dies without a chance to act (SIGKILL, the OOM killer), the kernel kills the
  ranks: each rank asks for ``PR_SET_PDEATHSIG`` at start-up (see :mod:`.train`). The kernel sends
  it when the *thread* that started the rank exits, so :func:`launch` starts and supervises the
  ranks on one thread.

Everything that can be checked before a rank starts is checked first and reported as one
:class:`~mlops_obs.config.ConfigError` line: the ``--inject`` faults against this run, ``--device
cuda`` against what torch sees, the log and hand-off directories.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any

import orjson

from mlops_obs.children import free_port
from mlops_obs.config import ConfigError
from mlops_obs.workload.faults import Fault, FaultError, check_world, parse_fault

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL when stopping ranks
POLL_SECONDS = 0.05  # how often the supervisor looks at the ranks and at stop requests

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

    @property
    def signum(self) -> int | None:
        """The first stop signal received, if any."""
        return self.signals[0] if self.signals else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle :data:`STOP_SIGNALS` while the block runs (main thread only); restore them after."""
        previous: dict[signal.Signals, Any] = {}
        try:
            for sig in STOP_SIGNALS:
                if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # started under nohup: a hang-up is meant to leave the job running
                previous[sig] = signal.signal(sig, self._handle)
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
    procs = start_ranks(cfg, log_dir)
    return supervise(procs, out, stop)


def start_ranks(cfg: Mapping[str, Any], log_dir: Path) -> list[subprocess.Popen[bytes]]:
    """Start one process a rank, each logging its stdout and stderr to ``<job>-rank<R>.stderr.log``."""
    world = int(cfg["world-size"])
    port = free_port()
    run_id = f"{cfg['job']}-{int(time.time())}"
    opts = orjson.dumps(rank_options(cfg)).decode()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(world):
            env = dict(os.environ)
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                MLOPS_OBS_JOB=str(cfg["job"]),
                MLOPS_OBS_RUN_ID=run_id,
                MLOPS_OBS_WORKLOAD=opts,
                OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
            )
            env[LAUNCHER_PID_ENV] = str(os.getpid())
            stderr_path = log_dir / f"{cfg['job']}-rank{rank}.stderr.log"
            try:
                err = open(stderr_path, "ab")  # noqa: SIM115 - closed below, once the child holds it
            except OSError as e:
                raise ConfigError("log-dir", f"cannot write {str(stderr_path)!r}: {e.strerror or e}") from None
            with err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "mlops_obs.workload.train"],
                        env=env,
                        stdout=err,
                        stderr=err,
                        stdin=subprocess.DEVNULL,
                    )
                )
    except BaseException:
        stop_ranks(procs, grace=0.0)  # a half-started job is not left behind
        raise
    return procs


def supervise(
    procs: list[subprocess.Popen[bytes]], out: IO[str], stop: StopRequest | None = None, grace: float = GRACE_SECONDS
) -> int:
    """Wait for every rank; on the first failure, or a stop signal, stop the rest.

    Returns 0 when every rank succeeded, 128 + the signal's number after a stop signal (whatever the
    ranks did meanwhile: a Ctrl-C in a terminal reaches the ranks too, and the signal is the cause),
    else the first failed rank's exit code (1 for a rank killed by a signal).
    """
    stop = stop or StopRequest()
    failed: tuple[int, int] | None = None
    while stop.signum is None:
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code not in (None, 0) and failed is None:
                failed = (rank, code)
                print(f"workload: rank {rank} exited with code {code}; stopping the other ranks", file=out)
        if failed or all(c is not None for c in codes):
            break
        time.sleep(POLL_SECONDS)
    if stop.signum is not None:
        print(f"workload: {signal.Signals(stop.signum).name} received; stopping the ranks", file=out, flush=True)
    if failed or stop.signum is not None:
        stop_ranks(procs, grace, stop)
    if stop.signum is not None:
        return 128 + stop.signum
    if failed:
        return failed[1] if failed[1] > 0 else 1
    return 0


def stop_ranks(procs: list[subprocess.Popen[bytes]], grace: float, stop: StopRequest | None = None) -> None:
    """SIGTERM every running rank, SIGKILL those still up after ``grace`` or at a further stop signal."""
    seen = len(stop.signals) if stop else 0
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs):
        if time.monotonic() >= deadline or (stop is not None and len(stop.signals) > seen):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            return
        time.sleep(POLL_SECONDS)
