"""One rank of the reference workload: a small MLP trained with DDP on synthetic data.

Started by :mod:`mlops_obs.workload.command` with the torchrun environment; options come as JSON in
``MLOPS_OBS_WORKLOAD``. Instrumented with :class:`~mlops_obs.instrument.TrainingMonitor` and logging
JSON lines through :mod:`mlops_obs.logs` into ``<log-dir>/<job>-rank<R>.jsonl``.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path
from typing import Any

import orjson


def _options() -> dict[str, Any]:
    return dict(orjson.loads(os.environ.get("MLOPS_OBS_WORKLOAD", "{}")))


def main() -> int:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mlops_obs.instrument import TrainingMonitor
    from mlops_obs.logs import configure, get_logger

    opts = _options()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    job = os.environ.get("MLOPS_OBS_JOB", "workload")
    node = os.environ.get("MLOPS_OBS_NODE") or socket.gethostname()
    log_dir = Path(opts.get("log_dir", "logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(log_dir / f"{job}-rank{rank}.jsonl", "ab")  # noqa: SIM115 - lives as long as the process
    configure(
        opts.get("log_level", "info"),
        "json",
        stream=log_file,
        context={"job": job, "rank": rank, "node": node, "run_id": os.environ.get("MLOPS_OBS_RUN_ID", "")},
    )
    log = get_logger()

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

    monitor = TrainingMonitor(
        job=job,
        rank=rank,
        world_size=world,
        directory=opts.get("multiproc_dir"),
        node=node,
        flush_interval=float(opts.get("flush_interval", 1.0)),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = model.to(device)
    ddp = DDP(model, device_ids=[device.index] if use_cuda else None)
    lr = 0.2
    optimizer = torch.optim.SGD(ddp.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1000 + rank)
    batch = int(opts.get("batch_size", 64))
    steps = int(opts["steps"])
    log_every = int(opts.get("log_every", 10))
    # A fixed synthetic task (labels from a random linear teacher) so the loss really goes down.
    teacher = torch.randn(128, 10, generator=torch.Generator().manual_seed(7))

    for step in range(steps):
        with monitor.step(samples=batch):
            with monitor.phase("data_wait"):
                x = torch.randn(batch, 128, generator=gen)
                y = (x @ teacher).argmax(dim=1)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with monitor.phase("forward"):
                loss = criterion(ddp(x), y)
            with monitor.phase("backward"):
                loss.backward()
            with monitor.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.item())
            monitor.record(loss=loss_value, lr=lr)
        if step % log_every == 0 or step == steps - 1:
            log.info("step", step=step, loss=round(loss_value, 6))

    log.info("training finished", steps=steps)
    monitor.close()
    dist.destroy_process_group()
    log_file.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
