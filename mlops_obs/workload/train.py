"""One rank of the reference workload: a small MLP trained with DDP on synthetic data.

Started by :mod:`mlops_obs.workload.launcher` with the torchrun environment; options come as JSON in
``MLOPS_OBS_WORKLOAD``. Instrumented with :class:`~mlops_obs.instrument.TrainingMonitor` and logging
JSON lines through :mod:`mlops_obs.logs` into ``<log-dir>/<job>-rank<R>.jsonl``: a ``step`` line every
``log_every`` steps with that step's ``loss``, ``step_s``, ``data_wait_s`` and ``collective_s``; ``rank
stopped by signal`` when SIGTERM or SIGINT ends it. ``SIGUSR1`` dumps its stacks
(:mod:`.signals`); each completed step is a heartbeat for the launcher (:mod:`.progress`), which
also carries the launcher's request to finish early (after the same step on every rank).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from mlops_obs.workload.progress import Beat
from mlops_obs.workload.signals import RankSignals, stack_path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _options() -> dict[str, Any]:
    return dict(orjson.loads(os.environ.get("MLOPS_OBS_WORKLOAD", "{}")))


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this rank when its launcher dies, however it dies.

    The launcher stops its ranks itself on SIGINT, SIGTERM and SIGHUP; this covers the deaths it cannot
    act on (SIGKILL, the OOM killer), which would otherwise leave the ranks running under PID 1, a
    stalled one holding its GPU forever. A launcher that died before the request took effect is seen
    as a changed parent, and the rank ends at once. Linux only; elsewhere the launcher's own handlers
    are all there is.
    """
    launcher = os.environ.get("MLOPS_OBS_LAUNCHER_PID")
    if not launcher or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(f"workload: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}", file=sys.stderr)
        return
    if os.getppid() != int(launcher):
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    die_with_launcher()
    opts = _options()
    rank = int(os.environ["RANK"])
    job = os.environ.get("MLOPS_OBS_JOB", "workload")
    log_dir = Path(opts.get("log_dir", "logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # First, before the seconds torch takes to import: stacks on SIGUSR1, one line on SIGTERM, and
    # only then the word to the launcher that this rank may be signalled.
    beat = Beat.from_env(rank)
    signals = RankSignals(stack_path(log_dir, job, rank), rank, beat)
    signals.install()

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mlops_obs.config import node_name
    from mlops_obs.instrument import TrainingMonitor
    from mlops_obs.instrument.lifecycle import HOOKS
    from mlops_obs.instrument.torch import (
        NonFiniteLossError,
        check_loss,
        timed_batches,
        track_cuda_memory,
    )
    from mlops_obs.logs import configure, get_logger
    from mlops_obs.workload.faults import Injector, parse_fault

    world = int(os.environ["WORLD_SIZE"])
    node = node_name()
    log_file = open(log_dir / f"{job}-rank{rank}.jsonl", "ab")  # noqa: SIM115 - lives as long as the process
    configure(
        opts.get("log_level", "info"),
        "json",
        stream=log_file,
        context={"job": job, "rank": rank, "node": node, "run_id": os.environ.get("MLOPS_OBS_RUN_ID", "")},
    )
    log = get_logger()
    step = -1

    def stopped(name: str) -> None:
        log.warning("rank stopped by signal", signal=name, step=step)
        HOOKS.ended_by_signal(name)  # the monitor's final snapshot: failed by this signal

    signals.on_stop(stopped)

    want = opts.get("device", "auto")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        log.error("cuda requested but not available")
        print("workload: --device=cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % max(1, torch.cuda.device_count())}"
                          if use_cuda else "cpu")  # fmt: skip
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=float(opts.get("timeout", 600)))
    log.info("rank starting", world_size=world, backend=backend, device=str(device), pid=os.getpid())
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    peak = float(opts.get("peak_flops") or 0.0) or None
    monitor = TrainingMonitor(
        job=job,
        rank=rank,
        world_size=world,
        directory=opts.get("multiproc_dir"),
        node=node,
        # None (--flush-interval=auto): just before the sidecar's rounds, at the cadence it is scraped.
        flush_interval=None if opts.get("flush_interval") is None else float(opts["flush_interval"]),
        flops_per_sample=6.0 * n_params,  # forward + backward of a dense model: ~6 FLOPs a parameter
        peak_flops=peak,
    )
    if use_cuda:
        track_cuda_memory(monitor, device)
    ddp = DDP(model, device_ids=[device.index] if use_cuda else None)
    collective = CollectiveClock(monitor, ddp)
    faults = Injector([parse_fault(x) for x in opts.get("inject") or []], rank)
    lr = 0.2
    optimizer = torch.optim.SGD(ddp.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    batch = int(opts.get("batch_size", 64))
    steps = int(opts["steps"])
    log_every = int(opts.get("log_every", 10))
    ckpt_every = int(opts.get("checkpoint_every") or 0)
    ckpt_path = log_dir / f"{job}-checkpoint.pt"

    def batches() -> Iterator[tuple[Any, Any]]:
        """Synthetic data: labels from a fixed random linear teacher, so the loss really goes down."""
        gen = torch.Generator().manual_seed(1000 + rank)
        teacher = torch.randn(128, 10, generator=torch.Generator().manual_seed(7))
        for _ in range(steps):
            t0 = time.perf_counter()
            x = torch.randn(batch, 128, generator=gen)
            y = (x @ teacher).argmax(dim=1)
            delay = faults.slow_data_delay(time.perf_counter() - t0)
            if delay:
                time.sleep(delay)
            yield x, y

    compute = 0.0  # this rank's own compute time last step (without waiting), for the straggler fault
    data = DataClock(batches())
    try:
        for step, (x, y) in enumerate(timed_batches(monitor, data)):
            with monitor.step(samples=batch):
                t_step, c0 = time.perf_counter(), collective.seconds
                if faults.at(faults.crash, step):
                    raise RuntimeError(f"injected crash at step {step}")
                if faults.at(faults.stall, step):
                    _hang(faults.stall.seconds if faults.stall else 0.0)
                if faults.at(faults.oom, step):
                    _exhaust_cuda_memory(torch, device)
                with monitor.phase("forward"):
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    loss = criterion(ddp(x), y)
                    if faults.nan_from(step):
                        loss = loss * float("nan")
                    slowed = faults.straggler_delay(compute)
                    if slowed:
                        time.sleep(slowed)
                    loss_value = check_loss(monitor, loss, step)
                with monitor.phase("backward"):
                    loss.backward()
                with monitor.phase("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                monitor.record(lr=lr)
                t_end = time.perf_counter()
                compute = t_end - t_step - (collective.seconds - c0) - slowed
            beat.step(step + 1)
            finish = beat.finish()  # the launcher asked every rank to stop after this many steps
            last = step == steps - 1 or 0 < finish <= step + 1
            if step % log_every == 0 or last:
                # This step's own times, so a slow loader or a slow peer shows in the logs alone.
                log.info("step", step=step, loss=round(loss_value, 6), step_s=round(t_end - t_step + data.last, 6),
                         data_wait_s=round(data.last, 6), collective_s=round(collective.seconds - c0, 6))  # fmt: skip
            if ckpt_every and rank == 0 and (step + 1) % ckpt_every == 0:
                with monitor.checkpoint():
                    torch.save({"step": step, "model": model.state_dict()}, ckpt_path)
                log.info("checkpoint saved", step=step, path=str(ckpt_path))
            if last:
                break
    except NonFiniteLossError as e:
        # A job with a loss check stops here, on the rank that saw it; its peers block in the next
        # all-reduce until the launcher stops them.
        log.error("non-finite loss, stopping", step=e.step, loss=str(e.value))
        log_file.flush()
        monitor.close(error=e)  # the rank stops on an error it handled: failed, not finished
        print(f"workload rank {rank}: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        # What a real job's top-level handler leaves: a log line with the traceback, the traceback on
        # stderr (the re-raise), exit code 1. The monitor's exception hook writes the rank failed.
        log.exception("rank failed", step=step, error=f"{type(e).__name__}: {e}")
        log_file.flush()
        raise

    log.info("training finished", steps=step + 1)
    monitor.close()
    dist.destroy_process_group()
    log_file.flush()
    return 0


class DataClock:
    """Iterates ``batches``, keeping how long the last ``next()`` waited (the step's data wait)."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self._it = batches
        self.last = 0.0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.last = time.perf_counter() - t0


class CollectiveClock:
    """Seconds this rank spent in DDP's all-reduce, launch to completion: the monitor's count where it
    is enabled (the SDK's hook times it), else a hook of our own, so step lines carry it either way.
    One hook only: each wraps a failed all-reduce's error in one more "Got the following error when
    running the callback"."""

    def __init__(self, monitor: Any, ddp: Any) -> None:
        from mlops_obs.instrument.torch import register_comm_hook

        self._monitor = monitor if monitor.enabled else None
        self._own = 0.0
        if self._monitor is not None:
            register_comm_hook(monitor, ddp)
            return
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def timed_allreduce(state: Any, bucket: Any) -> Any:
            t0 = time.perf_counter()

            def done(fut: Any) -> Any:
                self._own += time.perf_counter() - t0
                return fut.value()

            return allreduce_hook(state, bucket).then(done)

        timed_allreduce.__annotations__ = {}  # DDP checks annotations against real classes; none is accepted
        ddp.register_comm_hook(None, timed_allreduce)

    @property
    def seconds(self) -> float:
        return float(self._monitor.collective_seconds) if self._monitor is not None else self._own


def _hang(seconds: float) -> None:
    """A hung rank: blocked, silent, alive (as in a deadlock or a wedged device); 0 = until killed."""
    threading.Event().wait(seconds if seconds > 0 else None)


def _exhaust_cuda_memory(torch: Any, device: Any) -> None:
    """Allocate 1 GiB blocks until the caching allocator raises a real ``torch.cuda.OutOfMemoryError``."""
    hoard = []
    while True:
        hoard.append(torch.empty(1 << 30, dtype=torch.uint8, device=device))


if __name__ == "__main__":
    raise SystemExit(main())
