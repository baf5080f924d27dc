"""Model factory and the pixel normalisation both training and serving apply to crops.

Models are built by timm name with one output logit (AI-generated vs real). Weights come from a local file or
a checkpoint, never from a hub: production users bring their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def create_model(
    arch: str, *, pretrained_file: str | Path | None = None, drop_path_rate: float = 0.0
) -> nn.Module:
    """A timm model with a single-logit head; ``pretrained_file`` loads backbone weights from disk.

    The file's classifier is dropped when its shape differs (ImageNet's 1000 classes vs our one logit), which
    is timm's own behaviour for ``pretrained_cfg_overlay=dict(file=...)``.
    """
    kwargs: dict[str, Any] = {"num_classes": 1}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_file is None:
        return timm.create_model(arch, pretrained=False, **kwargs)
    path = Path(pretrained_file)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)


def to_input(
    crops: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """N x S x S x 3 uint8 crops to a normalised float N x 3 x S x S tensor on ``device``.

    Crops travel as uint8 (4x fewer bytes to the GPU) and are normalised there.
    """
    t = torch.from_numpy(np.ascontiguousarray(crops)) if isinstance(crops, np.ndarray) else crops
    t = t.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=t.device, dtype=t.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=t.device, dtype=t.dtype).view(1, 3, 1, 1)
    t = (t - m) / s
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def data_config(arch: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The mean/std timm recorded for ``arch`` (ImageNet's when it records none)."""
    try:
        cfg = timm.get_pretrained_cfg(arch)
    except Exception:  # unknown tag: fall back to ImageNet statistics
        cfg = None
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    mean = tuple(float(x) for x in cfg.mean)
    std = tuple(float(x) for x in cfg.std)
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])
