"""The article's baseline: frozen backbone embeddings + class-balanced logistic regression.

Cheap (one forward pass per image, no backprop) and a strong reference: a fine-tune that does not beat the
probe on held-out data has learned nothing the backbone did not already know. Embeddings use the serving
centre crops (``worker.media.crops.inference_crops``), averaged over crops when there are several.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from training.data import ImageSource, hard_labels
from training.progress import progress
from worker.media.crops import CropSpec, inference_crops
from worker.scoring.model import to_input


@dataclass
class ProbeResult:
    pipeline: Pipeline
    scores: pd.DataFrame  # the input table plus ``score`` (probability of AI)
    dim: int


@torch.inference_mode()
def embed(
    model: torch.nn.Module,
    uris: Sequence[str],
    source: ImageSource,
    spec: CropSpec,
    *,
    mean: Any,
    std: Any,
    device: str = "cpu",
    transform: Callable[[Image.Image], Image.Image] | None = None,
) -> np.ndarray:
    """Pooled pre-logit features per image (mean over its crops), optionally of a transformed copy."""
    model.eval().to(device)
    feats = []
    for uri in progress(uris, desc="embed", unit="img"):
        img = source.image(uri)
        crops, _ = inference_crops(transform(img) if transform else img, spec)
        x = to_input(crops, mean, std, device)
        f = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        feats.append(f.float().mean(0).cpu().numpy())
    return np.stack(feats)


def fit_probe(
    table: pd.DataFrame,
    model: torch.nn.Module,
    settings: Any,
    *,
    crop_size: int,
    mean: Any,
    std: Any,
    num_crops: int = 1,
    device: str = "cpu",
    seed: int = 0,
    cache_dir: Path | None = None,
) -> ProbeResult:
    """Fit on the ``train`` split (hard labels from the teacher), score every row."""
    source = ImageSource(settings)
    bad = source.preflight(list(table["image_uri"]))
    table = table[~table["image_uri"].isin(bad)].reset_index(drop=True)
    x = embed(
        model,
        list(table["image_uri"]),
        source,
        CropSpec(crop_size, num_crops),
        mean=mean,
        std=std,
        device=device,
    )
    train = (table["split"] == "train").to_numpy()
    y = hard_labels(table["ai_score"])
    if len(set(y[train])) < 2:
        raise ValueError("the probe needs both classes in the training split")
    pipe = make_pipeline(
        StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000, C=0.1, random_state=seed)
    )
    pipe.fit(x[train], y[train])
    scores = table.assign(score=pipe.predict_proba(x)[:, 1])
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(cache_dir / "embeddings.npy", x)
    return ProbeResult(pipeline=pipe, scores=scores, dim=x.shape[1])
