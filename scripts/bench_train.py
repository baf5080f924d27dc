#!/usr/bin/env python
"""Training throughput: the real loader (fetch, decode, native crop) vs the pure step on synthetic tensors.

The ratio says how busy the loader keeps the accelerator (target: >= 80%).

    PYTHONPATH=. .venv/bin/python scripts/bench_train.py --arch convnext_tiny --batch-size 128 --workers 8
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from training.data import CropDataset, ImageSource
from training.losses import soft_bce
from training.simulate import simulated_teacher
from worker.scoring.model import create_model, data_config, to_input
from worker.settings import Settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "aigen-dev"


def step_fn(
    model: torch.nn.Module, opt: torch.optim.Optimizer, device: str, mean: Any, std: Any
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def step(crops: torch.Tensor, y: torch.Tensor) -> None:
        x = to_input(crops, mean, std, device, channels_last=cuda)
        with autocast:
            logits = model(x)
        loss = soft_bce(logits, y.to(device, non_blocking=True), pos_weight=5.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="convnext_tiny")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--crop-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--repeat", type=int, default=1, help="tile the image list N times (longer epochs)")
    args = ap.parse_args()
    settings = Settings(device=args.device, local_roots=[args.data])
    device = settings.resolved_device()
    model = create_model(args.arch).to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    model.train()
    mean, std = data_config(args.arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = step_fn(model, opt, device, mean, std)

    b, s = args.batch_size, args.crop_size
    crops = (
        torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8).pin_memory()
        if device.startswith("cuda")
        else (torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8))
    )
    y = torch.rand(b)
    for _ in range(args.warmup):
        step(crops, y)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(crops, y)
    sync(device)
    pure = args.steps * b / (time.perf_counter() - t0)

    teacher, _ = simulated_teacher(args.data, pos_share=0.5)
    uris, scores = list(teacher.image_uri) * args.repeat, list(teacher.ai_score) * args.repeat
    ds = CropDataset(uris, scores, ImageSource(settings), s)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=b,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.startswith("cuda"),
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    done, seen, t0 = 0, 0, 0.0
    while done < args.steps + args.warmup:
        for batch, targets in loader:
            if done == args.warmup:
                sync(device)
                t0, seen = time.perf_counter(), 0
            step(batch, targets)
            done += 1
            seen += len(batch)
            if done >= args.steps + args.warmup:
                break
    sync(device)
    real = seen / (time.perf_counter() - t0)
    print(
        f"{args.arch} batch {b} crop {s} on {device}: pure train step {pure:.1f} img/s; "
        f"with the real loader ({args.workers} workers) {real:.1f} img/s; "
        f"the loader keeps it {real / pure:.0%} busy"
    )


if __name__ == "__main__":
    main()
