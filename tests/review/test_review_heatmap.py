"""Grad-CAM: the hooks compute exactly Grad-CAM, with the checkpoint and on the crop that decided."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.review.conftest import CROP, Decided
from worker.media.crops import ensure_min_size
from worker.media.fetch import Fetcher
from worker.records import Decision, Verdict
from worker.review.heatmap import Heatmaps, HeatmapUnavailable, grad_cam
from worker.review.media import Images, display_size
from worker.scoring.model import create_model


def test_hooked_grad_cam_equals_grad_cam_by_hand() -> None:
    torch.manual_seed(0)
    model: Any = create_model("test_convnext").eval()
    x = torch.randn(1, 3, 96, 96)
    cam, logit = grad_cam(model, x)

    feats = model.stem(x)
    for stage in model.stages:
        feats = stage(feats)
    feats.retain_grad()
    out = model.forward_head(model.norm_pre(feats)).reshape(-1)[0]
    out.backward()
    weights = feats.grad[0].mean(dim=(1, 2))
    want = torch.relu((weights[:, None, None] * feats[0].detach()).sum(0))
    want = F.interpolate(want[None, None], size=(96, 96), mode="bilinear", align_corners=False)[0, 0]
    want = want / want.max()

    assert cam.shape == (96, 96) and cam.min() >= 0.0 and cam.max() == pytest.approx(1.0)
    assert logit == pytest.approx(float(out.detach()), abs=1e-5)
    assert torch.allclose(torch.from_numpy(cam), want, atol=1e-5)


def test_heatmap_uses_the_deciding_version_and_crop_and_is_cached(decided: Decided) -> None:
    heatmaps = Heatmaps(decided.settings, Images(Fetcher(decided.settings)))
    d = decided.review_items()[0]
    assert d.deciding_crop is not None
    heat = heatmaps.for_decision(d)
    assert heat.exact and heat.version == d.model_version
    # the explaining model reproduces the stored score of the deciding crop: same weights, same pixels
    assert heat.score == pytest.approx(d.crops[d.deciding_crop].ai_score, abs=1e-4)
    with Image.open(io.BytesIO(heat.png)) as img:
        assert img.format == "PNG" and img.size == (CROP, CROP)
    misses = heatmaps._results.misses
    assert heatmaps.for_decision(d) is heat and heatmaps._results.misses == misses


def test_heatmap_falls_back_to_the_configured_checkpoint_and_says_so(decided: Decided) -> None:
    d = decided.review_items()[0]
    gone = d.model_copy(update={"model_version": "convnext-retired", "event_id": "gone"})
    with pytest.raises(HeatmapUnavailable, match="not in the registry"):
        Heatmaps(decided.settings, Images(Fetcher(decided.settings))).for_decision(gone)
    from worker.lifecycle.registry import open_registry

    current = open_registry(decided.settings).current_uri()
    settings = decided.settings.model_copy(update={"checkpoint": current})
    heat = Heatmaps(settings, Images(Fetcher(settings))).for_decision(gone)
    assert not heat.exact and heat.version == d.model_version

    error = Decision(item_id="x", event_id="x", image_uri="missing.jpg", verdict=Verdict.ERROR)
    with pytest.raises(HeatmapUnavailable, match="no crops"):
        Heatmaps(settings, Images(Fetcher(settings))).for_decision(error)


@pytest.mark.parametrize("size", [(48, 40), (40, 48), (96, 96), (95, 300), (1000, 20), (97, 96), (500, 400)])
def test_display_size_is_the_size_the_crop_code_produces(size: tuple[int, int]) -> None:
    assert display_size(size, 96) == ensure_min_size(Image.new("RGB", size), 96).size
