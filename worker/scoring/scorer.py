"""The scoring pipeline without a queue: references in, one decision each out, bad images included.

Split in two halves so a worker can overlap them: :func:`prepare` (fetch, decode, crop; CPU, thread-safe) and
:class:`Scorer` (one model call over crops from many images). On CUDA, JPEGs are only planned on the CPU and
decoded with their batch on the GPU (:mod:`worker.media.jpeg`, :meth:`Scorer.materialize`).
:func:`score_events` glues the halves for the CLI, tests and small deployments.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, overload

import numpy as np
import structlog
import torch
from PIL import Image

from worker.errors import ErrorReason, ModerationError
from worker.media import jpeg
from worker.media.crops import CropSpec, aggregate, inference_crops
from worker.media.decode import decoded
from worker.media.fetch import Fetcher
from worker.media.jpeg import JpegDecoder, Pending
from worker.media.provenance import ProvenanceReader
from worker.records import Box, CropScore, Decision, Event, Provenance, Verdict
from worker.scoring.checkpoint import Checkpoint, Logits, Manifest, check_golden, load_checkpoint, sigmoid
from worker.scoring.duplicates import DuplicateIndex, Match, pdq_hash, pdq_hash_image
from worker.scoring.model import to_input
from worker.scoring.policy import provenance_verdict, verdict_for
from worker.settings import CPU_FORWARD_BATCH, Settings

__all__ = ["Prepared", "Scorer", "error_decision", "prepare", "prepare_bytes", "score_events", "sigmoid"]

log = structlog.get_logger(__name__)


@dataclass
class Prepared:
    """An image cut into native crops, ready for the model."""

    crops: np.ndarray | torch.Tensor  # K x S x S x 3 uint8; a tensor when decoded on the model's device
    boxes: list[Box]
    size: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    provenance: Provenance | None = None


@dataclass
class PendingWithProvenance(Pending):
    """A :class:`Pending` JPEG with the provenance read from its bytes in the decode stage."""

    provenance: Provenance | None = None


_readers: dict[tuple[object, ...], ProvenanceReader] = {}
_readers_lock = threading.Lock()


def _reader(settings: Settings) -> ProvenanceReader:
    """One reader per trust configuration (it holds the C2PA SDK contexts)."""
    key = (
        settings.provenance_trust_anchors,
        settings.provenance_trust_config,
        tuple(settings.provenance_ai_source_types),
    )
    with _readers_lock:
        if key not in _readers:
            _readers[key] = ProvenanceReader(settings)
        return _readers[key]


def read_evidence(
    data: bytes, settings: Settings, timings_ms: dict[str, float], image: Image.Image | None = None
) -> Provenance | None:
    """Provenance and the PDQ hash from bytes already fetched and found decodable (the hash from ``image``
    when the pixels are already decoded); never raises."""
    if not (settings.provenance or settings.duplicates):
        return None
    t0 = time.perf_counter()
    prov = _reader(settings).read(data) if settings.provenance else Provenance()
    t1 = time.perf_counter()
    timings_ms["provenance"] = (t1 - t0) * 1e3
    if settings.duplicates:
        try:
            q = settings.duplicate_min_quality
            found = pdq_hash(data, q) if image is None else pdq_hash_image(image, q)
        except Exception as exc:  # the image decoded a moment ago; a failure here only costs the hash
            log.warning("pdq_hash_failed", error=f"{type(exc).__name__}: {exc}")
            found = None
        if found is not None:
            prov = prov.model_copy(update={"pdq": found[0], "pdq_quality": found[1]})
        timings_ms["pdq"] = (time.perf_counter() - t1) * 1e3
    return prov


@overload
def prepare(
    uri: str, fetcher: Fetcher, spec: CropSpec, *, defer_jpeg: Literal[False] = False
) -> Prepared: ...
@overload
def prepare(uri: str, fetcher: Fetcher, spec: CropSpec, *, defer_jpeg: bool) -> Prepared | Pending: ...
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
            evidence = read_evidence(data, s, pending.timings_ms)
            return PendingWithProvenance(**vars(pending), provenance=evidence)
    prepared = _decode_crop(data, spec, s, evidence=True)
    prepared.timings_ms["fetch"] = (t1 - t0) * 1e3
    return prepared


def prepare_bytes(data: bytes, spec: CropSpec, settings: Settings) -> Prepared:
    """Decode (Pillow) and crop bytes already fetched; raises :class:`DecodeError` with a reason."""
    return _decode_crop(data, spec, settings)


def _decode_crop(data: bytes, spec: CropSpec, settings: Settings, *, evidence: bool = False) -> Prepared:
    t0 = time.perf_counter()
    # The decoded image counts against the decode budget until its crops are cut (and, when asked, its
    # evidence is read from the pixels already decoded).
    with decoded(
        data,
        max_pixels=settings.max_pixels,
        allowed_formats=settings.allowed_formats,
        max_bytes=settings.max_decode_bytes,
    ) as img:
        crops, boxes = inference_crops(img, spec)
        prepared = Prepared(crops, boxes, img.size, {"decode_crop": (time.perf_counter() - t0) * 1e3})
        if evidence:
            prepared.provenance = read_evidence(data, settings, prepared.timings_ms, img)
    return prepared


@overload
def prepare_or_error(
    uri: str, fetcher: Fetcher, spec: CropSpec, *, defer_jpeg: Literal[False] = False
) -> Prepared | ModerationError: ...
@overload
def prepare_or_error(
    uri: str, fetcher: Fetcher, spec: CropSpec, *, defer_jpeg: bool
) -> Prepared | Pending | ModerationError: ...
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
        self.forward_batch = max(1, settings.forward_batch or self._default_forward_batch(settings))
        model = ckpt.model.to(self.device).eval()
        if self.cuda:
            model = model.to(memory_format=torch.channels_last)
        if settings.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        self.model = model
        self.jpeg_decoder = self._jpeg_decoder(settings)

    def _default_forward_batch(self, settings: Settings) -> int:
        """One pass per model call on CUDA; on CPU a few crops at a time (same speed, a fraction of the
        activation memory)."""
        return settings.max_batch if self.cuda else min(settings.max_batch, CPU_FORWARD_BATCH)

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
            weights_sha256="0" * 64,  # in memory: no weights file to hash
        )
        return cls(Checkpoint(manifest=manifest, model=model, path=Path()), settings)

    @property
    def version(self) -> str:
        return self.manifest.version

    def calibrated(self, logits: Logits) -> Logits:
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
        return self.calibrated(np.asarray(out, dtype=np.float64))

    def image_scores(self, images: Iterable[Image.Image]) -> np.ndarray:
        """ai_score per decoded image, exactly as a decision would carry it."""
        return sigmoid(self.image_logits(images))

    @torch.inference_mode()
    def logits(self, crops: np.ndarray | torch.Tensor) -> np.ndarray:
        """One logit per crop, in forward passes of at most ``forward_batch`` crops."""
        out = []
        bs = self.forward_batch
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()
        for i in range(0, len(crops), bs):
            x = to_input(crops[i : i + bs], self.manifest.mean, self.manifest.std, self.device, self.cuda)
            with autocast:
                y = self.model(x)
            out.append(y.float().reshape(-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def decide(self, event: Event, prepared: Prepared, crop_logits: np.ndarray) -> Decision:
        if not np.isfinite(crop_logits).all():
            # NaN fails every threshold comparison, so it would read as ``allow``: never let it decide.
            exc = ModerationError(
                ErrorReason.MODEL_OUTPUT_INVALID, f"model {self.version} gave non-finite crop logits"
            )
            return error_decision(event, exc, self.version)
        logit, deciding = aggregate(crop_logits, self.aggregation)
        score = float(sigmoid(self.calibrated(logit)))
        thresholds = self.manifest.thresholds
        verdict, rule = provenance_verdict(
            verdict_for(score, thresholds), prepared.provenance, self.settings.provenance_declared_ai_verdict
        )
        return Decision(
            item_id=event.item_id,
            event_id=event.event_id,
            image_uri=event.image_uri,
            verdict=verdict,
            source="provenance" if rule else "model",
            detail=rule,
            provenance=prepared.provenance,
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
            priority=event.priority,
            metadata=event.metadata,
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
            prov = p.provenance if isinstance(p, PendingWithProvenance) else None
            if isinstance(r, torch.Tensor):
                timings = {**p.timings_ms, "decode_crop": decode_ms}
                out.append((event, Prepared(r, p.boxes, p.size, timings, prov)))
                continue
            fallback = _bytes_or_error(p.data, self.spec, self.settings)
            if isinstance(fallback, Prepared):
                fallback.timings_ms.update(p.timings_ms)
                fallback.provenance = prov
            out.append((event, fallback))
        return out

    def score_prepared(
        self,
        items: Sequence[tuple[Event, Prepared | Pending | ModerationError]],
        duplicates: DuplicateIndex | None = None,
    ) -> list[Decision]:
        """One model call over every good item's crops; errors pass through as ``error`` decisions.

        With a duplicate index, near-duplicates of decided items are looked up first and decided without
        the model (:meth:`from_duplicate`); the rest go to the model.
        """
        reused = self._reuse_duplicates(items, duplicates) if duplicates is not None else {}
        if reused:
            rest = [(e, p) for e, p in items if id(e) not in reused]
            scored = iter(self.score_prepared(rest) if rest else [])
            return [reused[id(e)] if id(e) in reused else next(scored) for e, _ in items]
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

    def _reuse_duplicates(
        self, items: Sequence[tuple[Event, Prepared | Pending | ModerationError]], index: DuplicateIndex
    ) -> dict[int, Decision]:
        evidence = [None if isinstance(p, ModerationError) else _provenance_of(p) for _, p in items]
        hashes = [None if prov is None else prov.pdq for prov in evidence]
        t0 = time.perf_counter()
        try:
            matches = index.lookup_many(hashes)
        except Exception as exc:  # the index is an optimisation: without it, the model decides
            log.warning("duplicate_lookup_failed", error=f"{type(exc).__name__}: {exc}")
            return {}
        lookup_ms = (time.perf_counter() - t0) * 1e3
        out = {}
        for (event, p), prov, match in zip(items, evidence, matches, strict=True):
            if match is None or isinstance(p, ModerationError):
                continue
            decision = self.from_duplicate(event, p, prov, match)
            if decision is not None:
                decision.timings_ms["duplicate_lookup"] = lookup_ms
                out[id(event)] = decision
        return out

    def from_duplicate(
        self, event: Event, p: Prepared | Pending, prov: Provenance | None, match: Match
    ) -> Decision | None:
        """A copy of a decided image: a moderator's verdict is inherited; a model decision by this model
        version lends its score (``duplicate_reuse_model``), the copy's own credential rule still applying.
        None: the model decides."""
        if match.by_moderator:
            verdict, score = match.verdict, match.ai_score
        elif (
            self.settings.duplicate_reuse_model
            and match.model_version == self.version
            and match.ai_score is not None
            and match.source in ("model", "provenance")
        ):
            score = match.ai_score
            verdict, _ = provenance_verdict(
                verdict_for(score, self.manifest.thresholds),
                prov,
                self.settings.provenance_declared_ai_verdict,
            )
        else:
            return None
        return Decision(
            item_id=event.item_id,
            event_id=event.event_id,
            image_uri=event.image_uri,
            verdict=verdict,
            ai_score=score,
            model_version=match.model_version if match.by_moderator else self.version,
            thresholds=self.manifest.thresholds,
            image_size=p.size,
            timings_ms=dict(p.timings_ms),
            source="duplicate",
            provenance=prov,
            matched_event=match.matched_event(),
            priority=event.priority,
            metadata=event.metadata,
        )

    def _concat(self, crops: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray | torch.Tensor:
        if all(isinstance(c, np.ndarray) for c in crops):
            return np.concatenate(crops)
        # Some crops already live on the device: bring the host ones over (uint8, small) and join them there.
        return torch.cat(
            [c if isinstance(c, torch.Tensor) else torch.from_numpy(c).to(self.device) for c in crops]
        )


def _provenance_of(p: Prepared | Pending) -> Provenance | None:
    if isinstance(p, Prepared | PendingWithProvenance):
        return p.provenance
    return None


def error_decision(event: Event, exc: ModerationError, model_version: str | None = None) -> Decision:
    return Decision(
        item_id=event.item_id,
        event_id=event.event_id,
        image_uri=event.image_uri,
        verdict=Verdict.ERROR,
        reason=exc.reason,
        detail=exc.detail[:1000],
        model_version=model_version,
        priority=event.priority,
        metadata=event.metadata,
    )


def score_events(
    events: Sequence[Event],
    scorer: Scorer,
    fetcher: Fetcher,
    *,
    threads: int | None = None,
    duplicates: DuplicateIndex | None = None,
) -> list[Decision]:
    """The batch scoring function: many references in, one decision each out, never raising for an image."""
    n = threads or scorer.settings.decode_threads
    with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
        defer = scorer.defers_jpeg
        prepared = list(
            pool.map(lambda e: prepare_or_error(e.image_uri, fetcher, scorer.spec, defer_jpeg=defer), events)
        )
    return scorer.score_prepared(list(zip(events, prepared, strict=True)), duplicates)
