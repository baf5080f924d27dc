"""Training on CUDA: bf16 autocast + channels_last steps learn; the recipe runs end to end on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.conftest import write_image_set
from training.losses import soft_bce
from training.options import TrainConfig
from training.recipe import train
from worker.scoring.model import create_model, data_config, to_input
from worker.scoring.scorer import Scorer
from worker.settings import Settings

pytestmark = pytest.mark.gpu


def test_amp_steps_fit_one_batch(device: str) -> None:
    """The train step bench_train.py times (bf16 autocast, channels_last, AdamW) drives the loss down."""
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    model = create_model("test_convnext").to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    mean, std = data_config("test_convnext")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    crops = torch.from_numpy(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    y = torch.tensor([0.0, 1.0] * 8, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    losses = []
    for _ in range(60):
        x = to_input(crops, mean, std, device, channels_last=cuda)
        with autocast:
            logits = model(x)
        if cuda:
            assert logits.dtype == torch.bfloat16
        loss = soft_bce(logits, y, pos_weight=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())  # fp32 master


def test_recipe_trains_on_device_and_the_checkpoint_serves_there(
    tmp_path: Path, gpu_settings: Settings, device: str
) -> None:
    labels = write_image_set(tmp_path / "images", n=32, size=64)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(
        labels=labels,
        out=tmp_path / "run",
        arch="test_convnext",
        crop_size=32,
        epochs=2,
        batch_size=8,
        lr=1e-3,
        warmup_epochs=0.5,
        workers=2,
        device=device,
        progress=False,
    )
    run = train(cfg, gpu_settings)
    assert run is not None and run.manifest is not None
    assert [h["epoch"] for h in run.history] == [0, 1]
    assert all(np.isfinite(h["train_loss"]) and h["images_per_s"] > 0 for h in run.history)
    if device.startswith("cuda"):
        assert torch.cuda.max_memory_allocated() > 0  # the steps ran on the GPU
    scorer = Scorer.load(str(run.checkpoint), gpu_settings)  # golden scores re-checked on the device
    crops = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert np.isfinite(scorer.logits(crops)).all()
