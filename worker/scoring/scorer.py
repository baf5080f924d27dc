"""The scoring pipeline without a queue: references in, one decision each out, bad images included.

Split in two halves so a worker can overlap them: :func:`prepare` (fetch, decode, crop; CPU, thread-safe) and
:class:`Scorer` (one model call over crops from many images). On CUDA, JPEGs are only planned on the CPU and
decoded with their batch on the GPU (:mod:`worker.media.jpeg`, :meth:`Scorer.materialize`).
:func:`score_events` glues the halves for the CLI, tests and small deployments.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from PIL import Image

from worker.errors import ErrorReason, ModerationError
from worker.media import jpeg
from worker.media.crops import CropSpec, aggregate, inference_crops
from worker.media.decode import decode_image
from worker.media.fetch import Fetcher
from worker.media.jpeg import JpegDecoder, Pending
from worker.records import Box, CropScore, Decision, Event, Verdict
from worker.scoring.checkpoint import Checkpoint, Manifest, check_golden, load_checkpoint, sigmoid
from worker.scoring.model import to_input
from worker.scoring.policy import verdict_for
from worker.settings import Settings

__all__ = ["Prepared", "Scorer", "error_decision", "prepare", "prepare_bytes", "score_events", "sigmoid"]

log = structlog.get_logger(__name__)


@dataclass
class Prepared:
    """An image cut into native crops, ready for the model."""

    crops: np.ndarray | torch.Tensor  # K x S x S x 3 uint8; a tensor when decoded on the model's device
    boxes: list[Box]
    size: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)


def prepare(uri: str, fetcher: Fetcher, spec: CropSpec, *, defer_jpeg: bool = False) -> Prepared | Pending:
    """Fetch, decode and crop one image; raises :class:`ModerationError` with a reason.

    With ``defer_jpeg`` a JPEG the device decoder can take is only planned (header read, boxes placed) and
    returned as :class:`Pending`; :meth:`Scorer.materialize` decodes it with its batch.
    """
    t0 = time.perf_counter()
    data = fetcher.fetch(uri)
    t1 = time.perf_counter()
    s = fetcher.settings
    if defer_jpeg:
        pending = jpeg.plan(data, spec, max_pixels=s.max_pixels, allowed_formats=s.allowed_formats)
        if pending is not None:
            pending.timings_ms.update(fetch=(t1 - t0) * 1e3, plan=(time.perf_counter() - t1) * 1e3)
            return pending
    prepared = prepare_bytes(data, spec, s)
    prepared.timings_ms["fetch"] = (t1 - t0) * 1e3
    return prepared


def prepare_bytes(data: bytes, spec: CropSpec, settings: Settings) -> Prepared:
    """Decode (Pillow) and crop bytes already fetched; raises :class:`DecodeError` with a reason."""
    t0 = time.perf_counter()
    img = decode_image(data, max_pixels=settings.max_pixels, allowed_formats=settings.allowed_formats)
    size = img.size
    crops, boxes = inference_crops(img, spec)
    return Prepared(crops, boxes, size, {"decode_crop": (time.perf_counter() - t0) * 1e3})


def prepare_or_error(
    uri: str, fetcher: Fetcher, spec: CropSpec, *, defer_jpeg: bool = False
) -> Prepared | Pending | ModerationError:
    """Never raises: one bad image must not fail its batch."""
    try:
        return prepare(uri, fetcher, spec, defer_jpeg=defer_jpeg)
    except ModerationError as exc:
        return exc
    except Exception as exc:  # a decoder bug on hostile input is still this image's problem only
        return ModerationError(ErrorReason.INTERNAL, f"{type(exc).__name__}: {exc}")


def _bytes_or_error(data: bytes, spec: CropSpec, settings: Settings) -> Prepared | ModerationError:
    try:
        return prepare_bytes(data, spec, settings)
    except ModerationError as exc:
        return exc
    except Exception as exc:
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
        self.jpeg_decoder = self._jpeg_decoder(settings)

    def _jpeg_decoder(self, settings: Settings) -> JpegDecoder | None:
        mode = settings.jpeg_decode
        if mode == "pillow" or (mode == "auto" and not self.cuda):
            return None
        if not jpeg.available():
            log.warning("jpeg_device_decode_unavailable", wanted=mode, using="pillow")
            return None
        return JpegDecoder(self.device, settings.jpeg_batch_pixels)

    @property
    def defers_jpeg(self) -> bool:
        """Whether :func:`prepare` should leave JPEG decoding to this scorer's device."""
        return self.jpeg_decoder is not None

    @classmethod
    def load(cls, uri: str, settings: Settings, *, validate: bool = True) -> Scorer:
        ckpt = load_checkpoint(uri, settings, device=settings.resolved_device())
        if validate:
            check_golden(ckpt, settings.resolved_device(), settings.golden_tolerance)
        return cls(ckpt, settings)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        settings: Settings,
        *,
        arch: str,
        crop_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_crops: int = 1,
        aggregation: str = "max",
    ) -> Scorer:
        """A scorer around a model still in memory (training's validation), with the serving preprocessing."""
        manifest = Manifest(
            version="unsaved",
            arch=arch,
            crop_size=crop_size,
            num_crops=num_crops,
            aggregation=aggregation,
            mean=tuple(mean),
            std=tuple(std),
            weights_sha256="",
        )
        return cls(Checkpoint(manifest=manifest, model=model, path=Path()), settings)

    @property
    def version(self) -> str:
        return self.manifest.version

    def calibrated(self, logits: Any) -> Any:
        """The manifest's calibration applied to aggregated logits (identity without one)."""
        cal = self.manifest.calibration
        return logits if cal is None else cal.apply(logits)

    def image_logits(self, images: Iterable[Image.Image]) -> np.ndarray:
        """One calibrated, aggregated logit per decoded image: the serving crops, batched across images."""
        out: list[float] = []
        pending: list[np.ndarray] = []

        def flush() -> None:
            if pending:
                logits = self.logits(np.concatenate(pending))
                k = 0
                for c in pending:
                    out.append(aggregate(logits[k : k + len(c)], self.aggregation)[0])
                    k += len(c)
                pending.clear()

        n = 0
        for img in images:
            crops, _ = inference_crops(img, self.spec)
            pending.append(crops)
            n += len(crops)
            if n >= self.settings.max_batch:
                flush()
                n = 0
        flush()
        return np.asarray(self.calibrated(np.asarray(out, dtype=np.float64)), dtype=np.float64)

    def image_scores(self, images: Iterable[Image.Image]) -> np.ndarray:
        """ai_score per decoded image, exactly as a decision would carry it."""
        return sigmoid(self.image_logits(images))

    @torch.inference_mode()
    def logits(self, crops: np.ndarray | torch.Tensor) -> np.ndarray:
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
        score = float(sigmoid(self.calibrated(logit)))
        thresholds = self.manifest.thresholds
        return Decision(
            item_id=event.item_id,
            event_id=event.event_id,
            image_uri=event.image_uri,
            verdict=verdict_for(score, thresholds),
            ai_score=score,
            crops=[
                CropScore(box=b, ai_score=float(sigmoid(self.calibrated(float(v)))))
                for b, v in zip(prepared.boxes, crop_logits, strict=True)
            ],
            deciding_crop=deciding,
            model_version=self.version,
            thresholds=thresholds,
            image_size=prepared.size,
            timings_ms=dict(prepared.timings_ms),
        )

    def materialize(
        self, items: Sequence[tuple[Event, Prepared | Pending | ModerationError]]
    ) -> list[tuple[Event, Prepared | ModerationError]]:
        """Decode every :class:`Pending` item in one device batch; never raises for an image.

        An image the device decoder refuses, or one planned for another crop window (the model was swapped
        since), is decoded by Pillow from the bytes already fetched, so it gets the Pillow path's decision.
        """
        todo = [(i, p) for i, (_, p) in enumerate(items) if isinstance(p, Pending) and p.spec == self.spec]
        results: list[torch.Tensor | Exception] = []
        decode_ms = 0.0
        if todo and self.jpeg_decoder is not None:
            t0 = time.perf_counter()
            try:
                results = self.jpeg_decoder.crops([p for _, p in todo])
            except Exception as exc:  # e.g. device out of memory: the Pillow path still decides every item
                log.warning("jpeg_device_decode_failed", error=f"{type(exc).__name__}: {exc}", n=len(todo))
                results = []
            decode_ms = (time.perf_counter() - t0) * 1e3
        decoded = {i: r for (i, _), r in zip(todo, results, strict=False)}
        out: list[tuple[Event, Prepared | ModerationError]] = []
        for i, (event, p) in enumerate(items):
            if not isinstance(p, Pending):
                out.append((event, p))
                continue
            r = decoded.get(i)
            if isinstance(r, torch.Tensor):
                out.append((event, Prepared(r, p.boxes, p.size, {**p.timings_ms, "decode_crop": decode_ms})))
                continue
            fallback = _bytes_or_error(p.data, self.spec, self.settings)
            if isinstance(fallback, Prepared):
                fallback.timings_ms.update(p.timings_ms)
            out.append((event, fallback))
        return out

    def score_prepared(
        self, items: Sequence[tuple[Event, Prepared | Pending | ModerationError]]
    ) -> list[Decision]:
        """One model call over every good item's crops; errors pass through as ``error`` decisions."""
        ready = self.materialize(items)
        good = [(e, p) for e, p in ready if isinstance(p, Prepared)]
        t0 = time.perf_counter()
        all_logits = self.logits(self._concat([p.crops for _, p in good])) if good else np.zeros(0)
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
            for e, p in ready
        ]

    def _concat(self, crops: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray | torch.Tensor:
        if all(isinstance(c, np.ndarray) for c in crops):
            return np.concatenate(crops)
        # Some crops already live on the device: bring the host ones over (uint8, small) and join them there.
        return torch.cat(
            [c if isinstance(c, torch.Tensor) else torch.from_numpy(c).to(self.device) for c in crops]
        )


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


def score_events(
    events: Sequence[Event], scorer: Scorer, fetcher: Fetcher, *, threads: int | None = None
) -> list[Decision]:
    """The batch scoring function: many references in, one decision each out, never raising for an image."""
    n = threads or scorer.settings.decode_threads
    with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
        defer = scorer.defers_jpeg
        prepared = list(
            pool.map(lambda e: prepare_or_error(e.image_uri, fetcher, scorer.spec, defer_jpeg=defer), events)
        )
    return scorer.score_prepared(list(zip(events, prepared, strict=True)))
