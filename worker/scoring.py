"""The scoring pipeline without a queue: references in, one decision each out, bad images included.

Split in two halves so a worker can overlap them: :func:`prepare` (fetch, decode, crop; CPU, thread-safe) and
:class:`Scorer` (one model call over crops from many images). :func:`score_events` glues them for the CLI,
tests and small deployments.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from worker.checkpoint import Checkpoint, check_golden, load_checkpoint
from worker.crops import CropSpec, aggregate, inference_crops
from worker.decode import decode_image
from worker.errors import ErrorReason, ModerationError
from worker.fetch import Fetcher
from worker.model import to_input
from worker.policy import verdict_for
from worker.records import Box, CropScore, Decision, Event, Verdict
from worker.settings import Settings


@dataclass
class Prepared:
    """An image cut into native crops, ready for the model."""

    crops: np.ndarray  # K x S x S x 3 uint8
    boxes: list[Box]
    size: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)


def prepare(uri: str, fetcher: Fetcher, spec: CropSpec) -> Prepared:
    """Fetch, decode and crop one image; raises :class:`ModerationError` with a reason."""
    t0 = time.perf_counter()
    data = fetcher.fetch(uri)
    t1 = time.perf_counter()
    s = fetcher.settings
    img = decode_image(data, max_pixels=s.max_pixels, allowed_formats=s.allowed_formats)
    size = img.size
    crops, boxes = inference_crops(img, spec)
    t2 = time.perf_counter()
    return Prepared(crops, boxes, size, {"fetch": (t1 - t0) * 1e3, "decode_crop": (t2 - t1) * 1e3})


def prepare_or_error(uri: str, fetcher: Fetcher, spec: CropSpec) -> Prepared | ModerationError:
    """Never raises: one bad image must not fail its batch."""
    try:
        return prepare(uri, fetcher, spec)
    except ModerationError as exc:
        return exc
    except Exception as exc:  # a decoder bug on hostile input is still this image's problem only
        return ModerationError(ErrorReason.INTERNAL, f"{type(exc).__name__}: {exc}")


class Scorer:
    """A loaded, validated model plus the preprocessing its manifest prescribes."""

    def __init__(self, ckpt: Checkpoint, settings: Settings) -> None:
        self.ckpt = ckpt
        self.manifest = ckpt.manifest
        self.settings = settings
        self.device = torch.device(settings.resolved_device())
        self.spec = CropSpec(self.manifest.crop_size, settings.num_crops or self.manifest.num_crops)
        self.aggregation = settings.aggregation or self.manifest.aggregation
        self.cuda = self.device.type == "cuda"
        model = ckpt.model.to(self.device).eval()
        if self.cuda:
            model = model.to(memory_format=torch.channels_last)
        if settings.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        self.model = model

    @classmethod
    def load(cls, uri: str, settings: Settings, *, validate: bool = True) -> Scorer:
        ckpt = load_checkpoint(uri, settings, device=settings.resolved_device())
        if validate:
            check_golden(ckpt, settings.resolved_device(), settings.golden_tolerance)
        return cls(ckpt, settings)

    @property
    def version(self) -> str:
        return self.manifest.version

    @torch.inference_mode()
    def logits(self, crops: np.ndarray) -> np.ndarray:
        """One logit per crop, in chunks of ``max_batch``."""
        out = []
        bs = max(1, self.settings.max_batch)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()
        for i in range(0, len(crops), bs):
            x = to_input(crops[i : i + bs], self.manifest.mean, self.manifest.std, self.device, self.cuda)
            with autocast:
                y = self.model(x)
            out.append(y.float().reshape(-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def decide(self, event: Event, prepared: Prepared, crop_logits: np.ndarray) -> Decision:
        logit, deciding = aggregate(crop_logits, self.aggregation)
        score = _sigmoid(logit)
        thresholds = self.manifest.thresholds
        return Decision(
            item_id=event.item_id,
            event_id=event.event_id,
            image_uri=event.image_uri,
            verdict=verdict_for(score, thresholds),
            ai_score=score,
            crops=[
                CropScore(box=b, ai_score=_sigmoid(float(v)))
                for b, v in zip(prepared.boxes, crop_logits, strict=True)
            ],
            deciding_crop=deciding,
            model_version=self.version,
            thresholds=thresholds,
            image_size=prepared.size,
            timings_ms=dict(prepared.timings_ms),
        )

    def score_prepared(self, items: Sequence[tuple[Event, Prepared | ModerationError]]) -> list[Decision]:
        """One model call over every good item's crops; errors pass through as ``error`` decisions."""
        good = [(e, p) for e, p in items if isinstance(p, Prepared)]
        t0 = time.perf_counter()
        all_logits = self.logits(np.concatenate([p.crops for _, p in good])) if good else np.zeros(0)
        model_ms = (time.perf_counter() - t0) * 1e3
        by_event: dict[int, Decision] = {}
        offset = 0
        for event, prep in good:
            k = len(prep.crops)
            decision = self.decide(event, prep, all_logits[offset : offset + k])
            decision.timings_ms["model"] = model_ms
            by_event[id(event)] = decision
            offset += k
        return [
            by_event[id(e)] if isinstance(p, Prepared) else error_decision(e, p, self.version)
            for e, p in items
        ]


def error_decision(event: Event, exc: ModerationError, model_version: str | None = None) -> Decision:
    return Decision(
        item_id=event.item_id,
        event_id=event.event_id,
        image_uri=event.image_uri,
        verdict=Verdict.ERROR,
        reason=exc.reason,
        detail=exc.detail[:1000],
        model_version=model_version,
    )


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def score_events(
    events: Sequence[Event], scorer: Scorer, fetcher: Fetcher, *, threads: int | None = None
) -> list[Decision]:
    """The batch scoring function: many references in, one decision each out, never raising for an image."""
    n = threads or scorer.settings.decode_threads
    with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
        prepared = list(pool.map(lambda e: prepare_or_error(e.image_uri, fetcher, scorer.spec), events))
    return scorer.score_prepared(list(zip(events, prepared, strict=True)))
