"""Grad-CAM on the deciding crop: which part of the window drove the score.

Grad-CAM (Selvaraju et al. 2017) weights the last feature stage's channels by the mean gradient of the logit
and keeps the positive part: a coarse map (1/32 of the crop for ConvNeXt) that costs one forward and one
backward pass. It is computed with the checkpoint that made the decision (the registry version named by
``decision.model_version``), because a newer model's heatmap would explain a score nobody acted on; only when
that version is gone does it fall back to the configured checkpoint, and says so.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from worker.errors import CheckpointError
from worker.media.crops import crop_array, ensure_min_size
from worker.records import Decision
from worker.review.media import LRU, Images
from worker.scoring.checkpoint import Checkpoint, load_checkpoint
from worker.scoring.model import to_input
from worker.settings import Settings


class HeatmapUnavailable(Exception):
    """No checkpoint can explain this decision (or it has no crops)."""


def target_layer(model: nn.Module) -> nn.Module:
    """The last feature stage of a timm model (ConvNeXt/Swin ``stages``, ResNet ``layer4``, ...)."""
    for attr in ("stages", "layers", "features", "blocks"):
        seq = getattr(model, attr, None)
        if isinstance(seq, nn.Sequential | nn.ModuleList) and len(seq) > 0:
            return seq[-1]
    layer4 = getattr(model, "layer4", None)
    if isinstance(layer4, nn.Module):
        return layer4
    raise HeatmapUnavailable(f"no feature stage found on {type(model).__name__}")


def grad_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module | None = None) -> tuple[np.ndarray, float]:
    """(H x W map in [0, 1] at the input's resolution, the logit) for a 1 x 3 x H x W input."""
    layer = layer or target_layer(model)
    seen: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        seen["act"] = output
        output.register_hook(lambda grad: seen.__setitem__("grad", grad))

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)  # the graph exists even when weights are frozen
            logit = model(x).reshape(-1)[0]
            logit.backward()
    finally:
        handle.remove()
    act, grad = seen["act"].detach()[0], seen["grad"].detach()[0]
    if act.ndim != 3:
        raise HeatmapUnavailable(f"expected C x h x w features, got shape {tuple(act.shape)}")
    weights = grad.mean(dim=(1, 2))
    cam = torch.relu((weights[:, None, None] * act).sum(dim=0))
    cam = F.interpolate(cam[None, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return cam.float().cpu().numpy(), float(logit.detach())


def overlay_png(crop: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> bytes:
    """The crop with the map blended on top in a perceptual colour scale (matplotlib's turbo)."""
    from matplotlib import colormaps

    colours = colormaps["turbo"](cam)[..., :3]
    blended = (1 - alpha) * (crop.astype(np.float64) / 255.0) + alpha * colours
    img = Image.fromarray(np.clip(blended * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Heatmap:
    png: bytes
    version: str  # the checkpoint that computed it
    exact: bool  # False when the decision's own version was not found and a fallback explained it
    score: float  # that checkpoint's score for the crop, a cross-check against the stored crop score


class Heatmaps:
    """Loads the deciding checkpoint on demand and caches both models and finished heatmaps."""

    def __init__(self, settings: Settings, images: Images) -> None:
        self.settings = settings
        self.images = images
        self._models: LRU[Checkpoint] = LRU(2)
        self._results: LRU[Heatmap] = LRU(settings.review_cache_items)
        self._lock = threading.Lock()  # one Grad-CAM at a time: hooks live on a shared model
        self._known: dict[str, str] = {}  # registry versions found, by name

    def checkpoint_uri(self, decision: Decision) -> tuple[str, bool]:
        """(uri, exact): the registry's copy of the deciding version, else the configured checkpoint."""
        from worker.lifecycle.registry import open_registry

        version = decision.model_version
        if version and version in self._known:
            return self._known[version], True
        if version:
            registry = open_registry(self.settings)
            try:
                registry.manifest(version)
                self._known[version] = registry.uri_for(version)  # versions are immutable: remember it
                return self._known[version], True
            except (CheckpointError, ValueError, OSError):
                pass
        if self.settings.checkpoint:
            return self.settings.checkpoint, False
        raise HeatmapUnavailable(
            f"model version {decision.model_version!r} is not in the registry and no checkpoint is configured"
        )

    def _model(self, uri: str) -> Checkpoint:
        def load() -> Checkpoint:
            ckpt = load_checkpoint(uri, self.settings, device="cpu")
            ckpt.model.eval().requires_grad_(False)
            return ckpt

        return self._models.get_or_make(uri, load)

    def for_decision(self, decision: Decision) -> Heatmap:
        if decision.deciding_crop is None or not decision.crops:
            raise HeatmapUnavailable("this decision has no crops (an error decision?)")
        box = decision.crops[decision.deciding_crop].box
        key = (decision.event_id, decision.model_version, decision.image_uri, box)
        return self._results.get_or_make(key, lambda: self._compute(decision))

    def _compute(self, decision: Decision) -> Heatmap:
        uri, exact = self.checkpoint_uri(decision)
        try:
            ckpt = self._model(uri)
        except CheckpointError as exc:
            raise HeatmapUnavailable(str(exc)) from exc
        m = ckpt.manifest
        assert decision.deciding_crop is not None
        box = decision.crops[decision.deciding_crop].box
        if box.right - box.left != m.crop_size:  # a fallback checkpoint with another window: wrong pixels
            raise HeatmapUnavailable(
                f"the decision's crops are {box.right - box.left} px; "
                f"checkpoint {m.version} uses {m.crop_size} px"
            )
        img = ensure_min_size(self.images.decoded(decision.image_uri), m.crop_size)
        crop = crop_array(img, box)
        x = to_input(np.array(crop[None]), m.mean, m.std, "cpu")  # a writable copy for torch
        with self._lock:
            cam, logit = grad_cam(ckpt.model, x)
        score = float(torch.sigmoid(torch.tensor(logit)))
        return Heatmap(png=overlay_png(crop, cam), version=m.version, exact=exact, score=score)
