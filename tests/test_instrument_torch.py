"""mlops_obs.instrument.torch: loss check, data-wait wrapper, DDP comm hook, and the Lightning and
Hugging Face Trainer callbacks driven by the real frameworks on CPU."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from mlops_obs.instrument import TrainingMonitor  # noqa: E402
from mlops_obs.instrument.torch import (  # noqa: E402
    NonFiniteLossError,
    check_loss,
    hf_callback,
    lightning_callback,
    peak_flops,
    register_comm_hook,
    timed_batches,
    track_cuda_memory,
)


def _monitor(tmp_path: Path) -> TrainingMonitor:
    return TrainingMonitor("t", 0, 1, tmp_path, node="n", flush_interval=60)


def test_check_loss_raises_before_backward_on_nan(tmp_path: Path) -> None:
    m = _monitor(tmp_path)
    w = torch.ones(2, requires_grad=True)
    assert check_loss(m, (w * 2).sum()) == 4.0
    bad = (w * float("nan")).sum()
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan at step 7"):
        check_loss(m, bad, step=7)
    assert w.grad is None  # backward never ran
    assert m.nonfinite_loss == 1 and math.isnan(m.gauges["loss"])
    m.close()


def test_timed_batches_and_peak_table(tmp_path: Path) -> None:
    m = _monitor(tmp_path)

    def loader() -> Any:
        for i in range(3):
            time.sleep(0.003)
            yield torch.full((2,), i)

    assert [int(b[0]) for b in timed_batches(m, loader())] == [0, 1, 2]
    assert m.phase_seconds["data_wait"] >= 0.009
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L4") == 121e12 and peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("Some CPU") is None
    if not torch.cuda.is_available():
        assert track_cuda_memory(m) is False and not m._samplers
    m.close()


def test_comm_hook_times_the_all_reduce_in_a_real_process_group(tmp_path: Path) -> None:
    """One-rank gloo group: the hook sees every bucket, gradients stay DDP's average, time moves to collective."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mlops_obs.children import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        m = _monitor(tmp_path)
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 2)
        ref = torch.nn.Linear(8, 2)
        ref.load_state_dict(model.state_dict())
        ddp = DDP(model)
        register_comm_hook(m, ddp)
        x = torch.randn(4, 8)
        for _ in range(3):
            with m.step(samples=4), m.phase("backward"):
                ddp(x).sum().backward()
        ref(x).sum().backward()
        assert m.collectives == 3 and m.phase_seconds["collective"] > 0
        assert torch.allclose(model.weight.grad, 3 * ref.weight.grad)  # type: ignore[operator]
        m.close()
    finally:
        dist.destroy_process_group()


def test_lightning_callback_with_a_real_trainer(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch", reason="lightning not installed (pip install lightning)")

    class Tiny(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def validation_step(self, batch: Any, idx: int) -> None:
            x, y = batch
            self.log("val", torch.nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = torch.utils.data.TensorDataset(torch.randn(48, 4), torch.randn(48, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    m = _monitor(tmp_path)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[lightning_callback(m), ckpt],
                         val_check_interval=3, limit_val_batches=2, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(Tiny(), loader, loader)
    assert (m.steps, m.samples, m.failed_steps) == (6, 48, 0)
    assert all(m.phase_seconds[p] > 0 for p in ("forward", "backward", "optimizer"))
    assert m.gauges["learning_rate"] == 0.05 and math.isfinite(m.gauges["loss"])
    assert m.badput_seconds["evaluation"] > 0
    assert sum(m.checkpoint_buckets) == len(list((tmp_path / "ckpt").glob("*.ckpt"))) > 0
    m.close()


def test_hf_trainer_callback_with_a_real_trainer(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install transformers)")
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (pip install accelerate)")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def forward(self, x: Any, labels: Any = None) -> Any:
            out = self.layer(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    gen = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(4, generator=gen), "labels": torch.randn(1, generator=gen)} for _ in range(40)]
    m = _monitor(tmp_path)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=4,
                                          logging_steps=1, save_strategy="steps", save_steps=2, eval_strategy="steps",
                                          eval_steps=4, report_to=[], use_cpu=True, learning_rate=0.01,
                                          dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=rows, eval_dataset=rows[:8],
                                   callbacks=[hf_callback(m)])  # fmt: skip
    trainer.train()
    assert (m.steps, m.samples, m.failed_steps) == (5, 20, 0)
    assert m.phase_seconds["optimizer"] > 0
    assert math.isfinite(m.gauges["loss"]) and "learning_rate" in m.gauges and "grad_norm" in m.gauges
    assert sum(m.checkpoint_buckets) == len(list((tmp_path / "out").glob("checkpoint-*"))) >= 2
    assert m.badput_seconds["evaluation"] > 0
    m.close()
