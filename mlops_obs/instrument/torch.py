"""PyTorch integration for :class:`~mlops_obs.instrument.TrainingMonitor`.

- :func:`register_comm_hook` times DDP's gradient all-reduce from launch to completion, so each
  rank's time spent waiting for its peers is seen as the ``collective`` phase (and kept out of the
  compute time that the sidecar's straggler score compares);
- :func:`track_cuda_memory` adds allocated/reserved/peak CUDA memory, read by the monitor's flush
  thread, never on the step;
- :func:`check_loss` records the loss and raises :class:`NonFiniteLossError` *before* ``backward``,
  so a NaN never reaches the all-reduce and poisons every rank's weights;
- :func:`timed_batches` wraps a DataLoader (any iterable) and times each ``next()`` as data wait;
- :func:`peak_flops` knows the dense BF16 peak of common GPUs, for MFU;
- :func:`lightning_callback` and :func:`hf_callback` plug the monitor into PyTorch Lightning and
  the Hugging Face ``Trainer``.

torch is imported lazily: importing this module costs nothing for code that never calls into it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from mlops_obs.instrument.monitor import TrainingMonitor, _perf

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# Dense (no sparsity) BF16 tensor-core peak FLOP/s from NVIDIA's datasheets, by name fragment; the
# first fragment found in the device name wins, so more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or infinite; raised before ``backward`` so no rank applies a poisoned update."""

    def __init__(self, value: float, step: int) -> None:
        super().__init__(f"non-finite loss {value} at step {step}")
        self.value = value
        self.step = step


def peak_flops(device_name: str) -> float | None:
    """Dense BF16 peak FLOP/s of a GPU by its name (``torch.cuda.get_device_name``), or ``None``."""
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment.lower() in device_name.lower():
            return flops
    return None


def check_loss(monitor: TrainingMonitor, loss: torch.Tensor | float, step: int | None = None) -> float:
    """Record ``loss`` and return it as a float; raise :class:`NonFiniteLossError` if it is NaN/inf.

    Call it between ``forward`` and ``backward``. Reading the value synchronises with the GPU, which
    a loop that logs its loss does anyway.
    """
    value = float(loss.detach().item()) if hasattr(loss, "detach") else float(loss)
    monitor.record(loss=value)
    if not math.isfinite(value):
        raise NonFiniteLossError(value, monitor.steps if step is None else step)
    return value


def timed_batches(monitor: TrainingMonitor, loader: Iterable[T]) -> Iterator[T]:
    """``for batch in timed_batches(monitor, loader)``: each wait for a batch counts as data wait."""
    return monitor.timed(loader)


def register_comm_hook(
    monitor: TrainingMonitor,
    ddp: Any,
    hook: Callable[[Any, Any], Any] | None = None,
    state: Any = None,
) -> None:
    """Register a DDP communication hook that times each bucket's all-reduce.

    ``hook(state, bucket)`` is the hook doing the communication (default: DDP's own
    ``allreduce_hook``; pass ``fp16_compress_hook`` or yours to keep it). The time from the hook's
    call to its future's completion is reported with ``monitor.add_collective``; on NCCL the future
    completes when the all-reduce finishes on the device's stream, as seen from the host. From the
    launch of a step's last bucket to its completion the rank's current phase is ``collective``
    (waiting for its peers), which is what tells a hung rank from the ranks waiting for it. The
    completion callback runs on the backend's thread while the training thread waits in
    ``backward`` for the same future, so the two never update the monitor at once.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if not monitor.enabled:
        # Disabled costs nothing: DDP keeps its built-in C++ all-reduce unless a hook was asked for.
        if hook is not None:
            ddp.register_comm_hook(state, hook)
        return
    inner = hook or allreduce_hook
    add = monitor.add_collective
    wait_begin, wait_end = monitor._wait_begin, monitor._wait_end

    def timed_hook(st: Any, bucket: Any) -> Any:
        t0 = _perf()
        fut = inner(st, bucket)
        # The step's last bucket: from its launch until it completes, the rank has nothing of its own
        # left to compute in backward and only waits for its peers (its current phase: collective).
        token = wait_begin() if bucket.is_last() else None

        def done(f: Any) -> Any:
            if token is not None:
                wait_end(token)
            add(_perf() - t0)
            return f.value()

        return fut.then(done)

    # DDP checks the hook's annotations against the real classes; under postponed evaluation they
    # are strings, so the wrapper declares none (DDP then accepts it).
    timed_hook.__annotations__ = {}
    ddp.register_comm_hook(state, timed_hook)


def track_cuda_memory(monitor: TrainingMonitor, device: Any = None) -> bool:
    """Report CUDA allocated/reserved/peak bytes of ``device`` at each flush; ``False`` without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())

    def sample(m: TrainingMonitor) -> None:
        g = m.gauges
        g["cuda_memory_allocated"] = float(torch.cuda.memory_allocated(dev))
        g["cuda_memory_reserved"] = float(torch.cuda.memory_reserved(dev))
        g["cuda_memory_peak"] = float(torch.cuda.max_memory_allocated(dev))

    monitor.add_sampler(sample)
    if monitor.peak_flops is None:
        monitor.peak_flops = peak_flops(torch.cuda.get_device_name(dev))
    return True


# --- framework callbacks ----------------------------------------------------------------------------
#
# Both frameworks call hooks at the same points of a step; _StepHooks holds that shared logic so the
# two adapters are only signatures. Hooks that the framework does not call cost nothing.


class _StepHooks:
    """Turns begin/before-backward/before-optimizer/end events into the monitor's step and phases."""

    def __init__(self, monitor: TrainingMonitor, samples_per_step: int = 0, tokens_per_step: int = 0) -> None:
        self.monitor = monitor
        self.samples_per_step = samples_per_step
        self.tokens_per_step = tokens_per_step
        self._step: Any = None
        self._phase: Any = None

    def _switch(self, name: str | None) -> None:
        if self._phase is not None:
            self._phase.__exit__(None, None, None)
            self._phase = None
        if name is not None and self._step is not None:
            self._phase = self.monitor.phase(name)
            self._phase.__enter__()

    def begin(self, samples: int | None = None) -> None:
        if self._step is not None:  # a previous step that never ended (exception in the framework)
            self.end(failed=True)
        self._step = self.monitor.step(
            samples=self.samples_per_step if samples is None else samples, tokens=self.tokens_per_step
        )
        self._step.__enter__()
        self._switch("forward")

    def before_backward(self) -> None:
        self._switch("backward")

    def before_optimizer(self) -> None:
        self._switch("optimizer")

    def end(self, failed: bool = False) -> None:
        self._switch(None)
        if self._step is not None:
            err = RuntimeError("step did not finish") if failed else None
            self._step.__exit__(type(err) if err else None, err, None)
            self._step = None

    def scalars(self, loss: Any = None, grad_norm: Any = None, lr: Any = None) -> None:
        self.monitor.record(loss=_float(loss), grad_norm=_float(grad_norm), lr=_float(lr))


def _float(v: Any) -> float | None:
    if v is None:
        return None
    try:
        return float(v.detach().item()) if hasattr(v, "detach") else float(v)
    except (TypeError, ValueError, RuntimeError):
        return None


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of the first tensor found (dict, list or tensor)."""
    if hasattr(batch, "shape") and len(batch.shape) > 0:
        return int(batch.shape[0])
    if isinstance(batch, dict):
        for v in batch.values():
            n = _batch_size(v)
            if n:
                return n
    if isinstance(batch, list | tuple):
        for v in batch:
            n = _batch_size(v)
            if n:
                return n
    return 0


def lightning_callback(monitor: TrainingMonitor, *, tokens_per_step: int = 0) -> Any:
    """A ``lightning.pytorch.Callback`` (or ``pytorch_lightning``) feeding ``monitor``.

    Steps, forward/backward/optimizer phases, samples (from the batch), loss (from the step's
    output), learning rate, checkpoint saves and validation as ``evaluation`` badput.
    """
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:  # the older package name
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment]

    class MlopsObsLightningCallback(Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.hooks = _StepHooks(monitor, tokens_per_step=tokens_per_step)
            self._eval: Any = None
            self._ckpt_since = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._settle_checkpoint()
            self.hooks.begin(_batch_size(batch))

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
            self.hooks.before_backward()

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self.hooks.before_optimizer()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            lr = None
            if trainer.optimizers:
                lr = trainer.optimizers[0].param_groups[0].get("lr")
            self.hooks.end()
            self.hooks.scalars(loss=loss, lr=lr)

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            self._settle_checkpoint()
            self._eval = monitor.badput("evaluation")
            self._eval.__enter__()

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if self._eval is not None:
                self._eval.__exit__(None, None, None)
                self._eval = None

        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
            # Lightning calls this before writing the file and has no hook after it: the save is
            # charged up to the next event the callback sees (next batch, validation or the end).
            self._ckpt_since = _perf()

        def _settle_checkpoint(self) -> None:
            if self._ckpt_since:
                _charge(monitor, "checkpoint_save", self._ckpt_since)
                self._ckpt_since = 0.0

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self.hooks.end(failed=True)
            monitor.flush()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._settle_checkpoint()
            monitor.flush()

    return MlopsObsLightningCallback()


def hf_callback(monitor: TrainingMonitor, *, samples_per_step: int | None = None, tokens_per_step: int = 0) -> Any:
    """A ``transformers.TrainerCallback`` feeding ``monitor``.

    The Trainer has no forward/backward hooks; the step is timed whole, with ``optimizer`` from
    ``on_pre_optimizer_step`` to ``on_optimizer_step``. Samples per step default to
    ``per_device_train_batch_size * gradient_accumulation_steps``. Loss, grad norm and learning
    rate come from ``on_log``; saves are checkpoints and evaluations are ``evaluation`` badput
    (from the previous step's end, the closest point the Trainer exposes).
    """
    from transformers import TrainerCallback

    class MlopsObsHFCallback(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.hooks = _StepHooks(monitor, tokens_per_step=tokens_per_step)
            self._last_end = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if samples_per_step is None:
                self.hooks.samples_per_step = int(args.per_device_train_batch_size) * int(
                    args.gradient_accumulation_steps
                )
            else:
                self.hooks.samples_per_step = samples_per_step

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.hooks.begin()

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.hooks.before_optimizer()

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.hooks._switch("other")

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.hooks.end()
            self._last_end = _perf()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            logs = logs or {}
            self.hooks.scalars(loss=logs.get("loss"), grad_norm=logs.get("grad_norm"), lr=logs.get("learning_rate"))

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _charge(monitor, "evaluation", self._last_end)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _charge(monitor, "checkpoint_save", self._last_end)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.hooks.end()
            monitor.flush()

    return MlopsObsHFCallback()


def _charge(monitor: TrainingMonitor, kind: str, since: float) -> None:
    """Count the time since ``since`` as ``kind`` (the Trainer only says when a save/eval ended)."""
    if not monitor.enabled or not since:
        return
    t = monitor.checkpoint() if kind == "checkpoint_save" else monitor.badput(kind)
    t.__enter__()
    t.start = since  # type: ignore[union-attr]
    t.__exit__(None, None, None)
