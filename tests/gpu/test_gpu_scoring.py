"""Scoring on CUDA (bf16 autocast, channels_last) gives the CPU's fp32 scores within bf16 rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker.media.crops import CropSpec
from worker.media.fetch import Fetcher
from worker.records import Event, Verdict
from worker.samples import sample_paths
from worker.scoring.checkpoint import init_checkpoint, sigmoid
from worker.scoring.golden import golden_crops
from worker.scoring.scorer import Scorer, prepare, score_events
from worker.settings import Settings

pytestmark = pytest.mark.gpu

# Probability units. bf16 keeps 8 bits of mantissa: on the CPU, bf16 autocast moves these random-init
# models' scores by at most 0.0007 on varied_crops (convnext_tiny and test_convnext, measured 2026-12-01), and
# a worker's golden check allows 0.05. A broken path (wrong normalisation or channel order, NaN from overflow)
# moves them by far more. Whole events get more room: on CUDA the JPEG decode may be nvJPEG's
# (MODERATION_JPEG_DECODE=auto), whose IDCT rounds a pixel differently from libjpeg-turbo's now and then.
SCORE_TOL = 0.01
EVENT_TOL = 0.02


def varied_crops(size: int, settings: Settings) -> np.ndarray:
    """The golden crops plus one centre crop of each bundled sample: flat, smooth, noisy and real content."""
    fetcher = Fetcher(settings)
    crops = [golden_crops(size)] + [
        np.asarray(prepare(str(p), fetcher, CropSpec(size, 1)).crops) for p in sample_paths()
    ]
    return np.concatenate(crops)


class FirstConvProbe:
    """Records the dtype and memory format the first convolution sees and returns during one forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        self.seen: list[tuple[torch.dtype, bool]] = []
        self.handle = conv.register_forward_hook(self.hook)

    def hook(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        self.seen.append((out.dtype, args[0].is_contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize(("arch", "size"), [("test_convnext", 64), ("convnext_tiny", 224)])
def test_scorer_on_device_matches_cpu_fp32(
    tmp_path: Path, arch: str, size: int, cpu_settings: Settings, gpu_settings: Settings, device: str
) -> None:
    ckpt = tmp_path / "ckpt"
    init_checkpoint(arch, ckpt, crop_size=size, seed=3)
    cpu = Scorer.load(str(ckpt), cpu_settings)
    gpu = Scorer.load(str(ckpt), gpu_settings)  # validates the golden scores on the device, as a worker does
    crops = varied_crops(size, cpu_settings)

    probe = FirstConvProbe(gpu.model)
    want = cpu.logits(crops)
    got = gpu.logits(crops)
    probe.handle.remove()

    assert got.shape == want.shape == (len(crops),)
    assert np.isfinite(got).all()
    drift = np.abs(sigmoid(got) - sigmoid(want))
    assert float(drift.max()) <= SCORE_TOL, f"max score drift {drift.max():.4f}: {np.round(drift, 4)}"
    if device.startswith("cuda"):
        assert gpu.cuda and gpu.device.type == "cuda"
        assert probe.seen and all(dtype == torch.bfloat16 for dtype, _ in probe.seen), probe.seen
        assert all(channels_last for _, channels_last in probe.seen), probe.seen
        weight = next(p for p in gpu.model.parameters() if p.dim() == 4)
        assert weight.is_contiguous(memory_format=torch.channels_last)


def test_score_events_on_device_match_cpu(
    tmp_path: Path, cpu_settings: Settings, gpu_settings: Settings
) -> None:
    """The whole scoring function (fetch, decode, crops, model, policy) on the device vs the CPU."""
    ckpt = tmp_path / "ckpt"
    init_checkpoint("test_convnext", ckpt, crop_size=64, num_crops=3, seed=5)
    events = [Event(item_id=f"s{i}", image_uri=str(p)) for i, p in enumerate(sample_paths())]
    want = score_events(events, Scorer.load(str(ckpt), cpu_settings), Fetcher(cpu_settings))
    got = score_events(events, Scorer.load(str(ckpt), gpu_settings), Fetcher(gpu_settings))
    assert [d.verdict for d in got if d.verdict == Verdict.ERROR] == []
    for a, b in zip(want, got, strict=True):
        assert a.event_id == b.event_id
        assert a.ai_score is not None and b.ai_score is not None
        assert abs(a.ai_score - b.ai_score) <= EVENT_TOL, (a.image_uri, a.ai_score, b.ai_score)
        assert len(b.crops) == 3
        assert [c.box for c in a.crops] == [c.box for c in b.crops]


def test_large_batch_in_chunks_on_device(tmp_path: Path, gpu_settings: Settings) -> None:
    """More crops than ``max_batch``: chunked calls give one finite logit per crop, in order."""
    ckpt = tmp_path / "ckpt"
    init_checkpoint("test_convnext", ckpt, crop_size=64, seed=7)
    settings = gpu_settings.model_copy(update={"max_batch": 16})
    scorer = Scorer.load(str(ckpt), settings)
    crops = np.random.default_rng(0).integers(0, 256, (50, 64, 64, 3), dtype=np.uint8)
    chunked = scorer.logits(crops)
    one_by_one = np.concatenate([scorer.logits(crops[i : i + 1]) for i in range(len(crops))])
    assert chunked.shape == (50,) and np.isfinite(chunked).all()
    assert float(np.abs(sigmoid(chunked) - sigmoid(one_by_one)).max()) <= SCORE_TOL
