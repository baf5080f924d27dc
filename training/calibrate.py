"""Recalibration from moderator overrides: same weights, a new logit map and thresholds, in seconds.

When a model ranks a new kind of upload well but scores it on the wrong side of the threshold, a retrain is
overkill: a temperature and an offset on the logit (Platt scaling, ``p = sigmoid(logit / T + b)``) fitted on
the items moderators labelled moves the scores where the moderators put them. It cannot fix a model that
ranks the items wrongly (then ``T`` would have to be negative, and the fit refuses). Thresholds can be set for
a target precision (review) or false-positive rate (block) on the same labelled items.

The result is a new registry version that shares the weights file (same sha256) and differs only in the
manifest's ``calibration`` and ``thresholds``; workers hot-reload it like any other version.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from training.data import ImageSource, hard_labels
from training.evaluate import threshold_for_fpr, threshold_for_precision
from worker.records import Thresholds, utcnow
from worker.scoring.checkpoint import (
    MANIFEST,
    Calibration,
    Manifest,
    fetch_checkpoint,
    make_version,
    read_manifest,
    sigmoid,
)
from worker.settings import Settings

MIN_ITEMS = 10


class CalibrationError(ValueError):
    """The labelled items cannot support a calibration (too few, one class, or ranked backwards)."""


def raw_logits(
    uri: str, uris: Sequence[str], settings: Settings, source: ImageSource | None = None
) -> np.ndarray:
    """The model's aggregated logits before any calibration (the existing one is undone)."""
    from worker.scoring.scorer import Scorer

    scorer = Scorer.load(uri, settings)
    src = source or ImageSource(settings)
    z = scorer.image_logits(src.image(u) for u in uris)
    cal = scorer.manifest.calibration
    return z if cal is None else (z - cal.offset) * cal.temperature


def fit_calibration(logits: np.ndarray, y: np.ndarray, *, min_items: int = MIN_ITEMS) -> Calibration:
    """Platt scaling of raw logits against hard labels (mildly regularised: tens of items, not thousands)."""
    y = np.asarray(y, dtype=int)
    n_pos = int(y.sum())
    if len(y) < min_items or n_pos == 0 or n_pos == len(y):
        raise CalibrationError(
            f"{len(y)} labelled items ({n_pos} AI, {len(y) - n_pos} real); calibration needs at least "
            f"{min_items} with both classes. Fix: review more items, or lower --min-items knowingly"
        )
    lr = LogisticRegression(C=10.0).fit(np.asarray(logits, dtype=float).reshape(-1, 1), y)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if a <= 0:
        raise CalibrationError(
            f"the model ranks these {len(y)} items backwards (slope {a:.3f}); a calibration cannot fix that. "
            "Fix: adapt or retrain on them (moderation adapt)"
        )
    return Calibration(temperature=1.0 / a, offset=b, fitted_on=len(y))


def choose_thresholds(
    p: np.ndarray,
    y: np.ndarray,
    current: Thresholds,
    *,
    target_precision: float | None = None,
    target_fpr: float | None = None,
) -> Thresholds:
    """Review at the lowest threshold reaching ``target_precision``, block at the FPR target."""
    review, block = current.review, current.block
    if target_precision is not None:
        t = threshold_for_precision(y, p, target_precision).threshold
        if t is None:
            raise CalibrationError(f"no threshold reaches precision {target_precision} on these items")
        review = t
    if target_fpr is not None:
        t = threshold_for_fpr(y, p, target_fpr).threshold
        if t is not None:
            block = t
    block = max(block, review)
    return Thresholds(review=round(review, 6), block=round(block, 6))


def calibrate_labels(
    uri: str,
    items: pd.DataFrame,
    settings: Settings,
    *,
    target_precision: float | None = None,
    target_fpr: float | None = None,
    min_items: int = MIN_ITEMS,
) -> tuple[Calibration, Thresholds]:
    """Fit on ``items`` (``image_uri``, ``ai_score`` labels) scored by the checkpoint at ``uri``."""
    base = read_manifest(fetch_checkpoint(uri, settings))
    y = hard_labels(items["ai_score"])
    z = raw_logits(uri, list(items["image_uri"]), settings)
    cal = fit_calibration(z, y, min_items=min_items)
    p = sigmoid(cal.apply(z))
    thresholds = choose_thresholds(
        p, y, base.thresholds, target_precision=target_precision, target_fpr=target_fpr
    )
    return cal, thresholds


def write_calibrated(
    uri: str, out_dir: Path, calibration: Calibration, thresholds: Thresholds, settings: Settings
) -> Manifest:
    """A new checkpoint directory: the same weights file, a manifest with the calibration, a new version."""
    src = fetch_checkpoint(uri, settings)
    base = read_manifest(src)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; fix: choose another --out")
    now = utcnow()
    manifest = base.model_copy(
        update={
            "version": make_version(base.arch, base.weights_sha256, now) + "-cal",
            "created_at": now,
            "parent_version": base.version,
            "calibration": calibration,
            "thresholds": thresholds,
            "notes": f"recalibrated {base.version} on {calibration.fitted_on} moderator labels",
        }
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shutil.copyfile(src / base.weights_file, tmp / base.weights_file)
        (tmp / MANIFEST).write_text(Manifest.model_validate(manifest.model_dump()).model_dump_json(indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
