"""Images for training and evaluation: the serving fetch and decode, the shared native crops, splits.

Training reads pixels exactly the way serving does (``worker.media.fetch``, ``worker.media.decode``,
``worker.media.crops``) so a model never learns a preprocessing difference. Encoded bytes are cached in memory
(a few hundred MB for tens of thousands of JPEGs), decoding happens per step in the loader workers.
"""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from PIL import Image

from training.labels import HIGH, LabelsError
from training.options import MIN_HELDOUT_PER_CLASS
from worker.errors import ModerationError
from worker.media.crops import training_crop
from worker.media.decode import decode_image
from worker.media.fetch import Fetcher

if TYPE_CHECKING:
    from worker.scoring.scorer import Scorer
    from worker.settings import Settings

Transform = Callable[[Image.Image], Image.Image]


class TrainingWarning(UserWarning):
    """Something a run can go on with but its user must see (a missing validation slice, contamination)."""


@dataclass(frozen=True)
class Augment:
    """Optional robustness augmentations; both are off by default because both touch the fingerprint.

    ``jpeg_prob``: re-encode the crop as JPEG at a random quality (robust to platform recompression).
    ``resample_prob``: rescale the whole image by a random factor before cropping (robust to resized uploads,
    at the cost of teaching the model to ignore some of the upsampling fingerprint).
    """

    hflip: bool = True
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (60, 95)
    resample_prob: float = 0.0
    resample_scale: tuple[float, float] = (0.5, 1.5)


def jpeg_reencode(img: Image.Image, quality: int) -> Image.Image:
    """The one JPEG re-encode (augmentation and robustness variants): Pillow, baseline, RGB out."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def resize(
    img: Image.Image, factor: float, method: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """The one resize (augmentation and robustness variants): both sides scaled by ``factor``."""
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(size, method)


def resample(img: Image.Image, scale: float, rng: random.Random) -> Image.Image:
    method = rng.choice([Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS])
    return resize(img, scale, method)


class ImageSource:
    """Encoded bytes by URI (fetched once, kept in memory), decoded with the serving decoder."""

    def __init__(self, settings: Settings, *, cache: bool = True) -> None:
        self.settings = settings
        self.cache = cache
        self._bytes: dict[str, bytes] = {}
        self._fetcher: Fetcher | None = None

    def __getstate__(self) -> dict[str, object]:  # loader workers rebuild their own clients
        state = dict(self.__dict__)
        state["_fetcher"] = None
        return state

    @property
    def fetcher(self) -> Fetcher:
        if self._fetcher is None:
            self._fetcher = Fetcher(self.settings)
        return self._fetcher

    def data(self, uri: str) -> bytes:
        cached = self._bytes.get(uri)
        if cached is not None:
            return cached
        data = self.fetcher.fetch(uri)
        if self.cache:
            self._bytes[uri] = data
        return data

    def image(self, uri: str) -> Image.Image:
        s = self.settings
        return decode_image(self.data(uri), max_pixels=s.max_pixels, allowed_formats=s.allowed_formats)

    def preflight(self, uris: Sequence[str]) -> dict[str, str]:
        """Fetch and decode every item once; return the failures (uri -> reason) so they can be dropped."""
        bad: dict[str, str] = {}
        for uri in uris:
            try:
                self.image(uri)
            except ModerationError as exc:
                bad[uri] = exc.reason.value
                self._bytes.pop(uri, None)
        return bad


class CropDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One random native crop per item per epoch, as uint8 HxWx3 (normalised later, on the device)."""

    def __init__(
        self,
        uris: Sequence[str],
        targets: Sequence[float],
        source: ImageSource,
        crop_size: int,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        self.uris = list(uris)
        self.targets = torch.tensor(list(targets), dtype=torch.float32)
        self.source = source
        self.crop_size = crop_size
        self.augment = augment or Augment()
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        img = self.source.image(self.uris[i])
        a = self.augment
        if a.resample_prob and rng.random() < a.resample_prob:
            img = resample(img, rng.uniform(*a.resample_scale), rng)
        crop = training_crop(img, self.crop_size, rng)
        if a.jpeg_prob and rng.random() < a.jpeg_prob:
            crop = np.asarray(jpeg_reencode(Image.fromarray(crop), rng.randint(*a.jpeg_quality)))
        if a.hflip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        return torch.from_numpy(np.array(crop, copy=True)), self.targets[i]


def score_uris(
    scorer: Scorer, uris: Sequence[str], source: ImageSource, transform: Transform | None = None
) -> np.ndarray:
    """ai_score per image through the serving scorer (crops, aggregation, calibration).

    ``transform`` scores a modified copy of each image (a robustness variant such as resize then re-encode).
    """
    from training.progress import progress

    images = (source.image(u) for u in progress(uris, desc="score", unit="img"))
    return scorer.image_scores(transform(img) for img in images) if transform else scorer.image_scores(images)


# --- splits ----------------------------------------------------------------------------------------------


def hard_labels(scores: pd.Series | np.ndarray) -> np.ndarray:
    return (np.asarray(scores, dtype=float) >= HIGH).astype(int)


def assign_splits(
    df: pd.DataFrame,
    *,
    val_frac: float,
    test_frac: float,
    seed: int,
    min_per_class: int = MIN_HELDOUT_PER_CLASS,
) -> pd.DataFrame:
    """Fill missing ``split`` values group-wise, stratified by label: near-duplicates never straddle splits.

    Explicit splits in the table win; a group with conflicting explicit splits is an error (it would leak).
    Rows without a split train unless a held-out slice would get ``min_per_class`` items of each class;
    when it would not, they all train and a :class:`TrainingWarning` says so with the numbers.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    out = df.copy()
    explicit = out.dropna(subset=["split"]).groupby("group")["split"].nunique()
    conflicting = explicit[explicit > 1]
    if len(conflicting):
        raise LabelsError(
            f"{len(conflicting)} group(s) span several explicit splits, e.g. group {conflicting.index[0]!r}; "
            "fix: give every row of a group the same split"
        )
    group_split = out.dropna(subset=["split"]).groupby("group")["split"].first()
    known = out["group"].map(group_split)
    out["split"] = out["split"].fillna(known)
    todo = out["split"].isna()
    rest = out[todo]
    for name, frac, share in (
        ("test", test_frac, test_frac),
        ("val", val_frac / max(1e-9, 1 - test_frac), val_frac),
    ):
        if frac <= 0 or rest.empty:
            continue
        y = hard_labels(rest["ai_score"])
        counts = np.bincount(y, minlength=2)
        expected = [int(c * frac) for c in counts]
        n_splits = max(2, round(1 / min(frac, 0.5)))
        if min(expected) < min_per_class or rest["group"].nunique() < n_splits:
            if not (out["split"] == name).any():
                warnings.warn(
                    f"no {name} split: {len(rest)} unsplit rows ({counts[1]} AI, {counts[0]} real) "
                    f"would give {share:.0%} = {expected[1]} AI and {expected[0]} real items, fewer than "
                    f"{min_per_class} of each; they all train. Fix: add labels or mark rows split={name}",
                    TrainingWarning,
                    stacklevel=2,
                )
            continue
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, held = next(cv.split(rest, y, groups=rest["group"]))
        out.loc[rest.index[held], "split"] = name
        rest = rest.drop(rest.index[held])
    out["split"] = out["split"].fillna("train")
    return out


def expand_weights(df: pd.DataFrame) -> pd.DataFrame:
    """Each row repeated ``weight`` times (rounded; 0 drops it): the oversampling an epoch sees."""
    if "weight" not in df.columns:
        return df
    reps = np.rint(df["weight"].fillna(1.0).to_numpy(float)).astype(int)
    return df.loc[df.index.repeat(reps)]


def rehearsal_sample(old: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A buffer of ``n`` old items stratified by (source, label), so old domains keep their share.

    Never from the old table's held-out rows (``split`` test or val): the old test figure must stay honest.
    """
    if "split" in old.columns:
        old = old[~old["split"].isin(["test", "val"])]
    if n <= 0 or old.empty:
        return old.iloc[0:0]
    if n >= len(old):
        return old.copy()
    strata = (
        old["source"].astype(str) + ":" + pd.Series(hard_labels(old["ai_score"]), index=old.index).astype(str)
    )
    parts = []
    for _, g in old.groupby(strata):
        k = max(1, round(n * len(g) / len(old)))
        parts.append(g.sample(n=min(k, len(g)), random_state=seed))
    return pd.concat(parts).sample(frac=1.0, random_state=seed).head(n)
