"""The article's baseline: frozen backbone embeddings + class-balanced logistic regression.

Cheap (one forward pass per image, no backprop) and a strong reference: a fine-tune that does not beat the
probe on held-out data has learned nothing the backbone did not already know. Embeddings use the serving
centre crops (``worker.media.crops.inference_crops``), averaged over crops when there are several.

The fitted probe is a linear head on the backbone's pre-logit features, so it is saved as an ordinary
checkpoint: the scaler and the logistic regression fold into the model's own classifier layer
(``w = coef / scale``, ``b = intercept - sum(coef * mean / scale)``). ``score``, ``evaluate``, the gate and
the worker load it like any other version; its scores come from the one serving scorer.
"""

from __future__ import annotations

import copy
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
from worker.records import Thresholds
from worker.scoring.checkpoint import Manifest, save_checkpoint
from worker.scoring.model import to_input


@dataclass
class ProbeResult:
    pipeline: Pipeline
    table: pd.DataFrame  # the input table without unreadable rows
    dim: int
    model: torch.nn.Module  # the backbone with the probe folded into its classifier


def fold_probe(model: torch.nn.Module, pipe: Pipeline) -> torch.nn.Module:
    """A copy of ``model`` whose classifier computes the probe's logit from the pre-logit features."""
    scaler: StandardScaler = pipe[0]
    lr: LogisticRegression = pipe[-1]
    head = model.get_classifier()  # type: ignore[operator]
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ValueError(f"cannot fold a probe into a {type(head).__name__} head; need Linear(features, 1)")
    scale = np.asarray(scaler.scale_, dtype=np.float64)
    coef = np.asarray(lr.coef_[0], dtype=np.float64) / scale
    bias = float(lr.intercept_[0]) - float((coef * np.asarray(scaler.mean_, dtype=np.float64)).sum())
    out = copy.deepcopy(model).cpu().eval()
    new_head = out.get_classifier()  # type: ignore[operator]
    with torch.no_grad():
        new_head.weight.copy_(torch.from_numpy(coef).float().reshape(1, -1))
        if new_head.bias is None:
            raise ValueError("the classifier has no bias; cannot fold the probe's intercept")
        new_head.bias.fill_(bias)
    return out


def save_probe(
    result: ProbeResult,
    out_dir: Path,
    *,
    arch: str,
    crop_size: int,
    mean: Any,
    std: Any,
    num_crops: int = 1,
    aggregation: str = "mean",
    thresholds: Thresholds | None = None,
    parent_version: str | None = None,
    data_snapshot: str | None = None,
) -> Manifest:
    """The probe as a normal checkpoint (backbone + folded linear head) in the worker's format."""
    train = result.table[result.table["split"] == "train"]
    return save_checkpoint(
        result.model,
        out_dir,
        arch=arch,
        crop_size=crop_size,
        num_crops=num_crops,
        aggregation=aggregation,
        mean=mean,
        std=std,
        thresholds=thresholds or Thresholds(),
        metrics={"train_items": len(train), "probe_dim": result.dim},
        parent_version=parent_version,
        data_snapshot=data_snapshot,
        notes=f"linear probe on a frozen {arch} backbone, fitted on {len(train)} items",
    )


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
    weight = table["weight"].fillna(1.0).to_numpy(float) if "weight" in table else np.ones(len(table))
    pipe.fit(x[train], y[train], logisticregression__sample_weight=weight[train])
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(cache_dir / "embeddings.npy", x)
    return ProbeResult(pipeline=pipe, table=table, dim=x.shape[1], model=fold_probe(model, pipe))
