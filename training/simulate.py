"""A simulated production teacher for experiments on a labelled set (e.g. ``shared/data/aigen-dev``).

The article trains on a production model's scores, with ~11% of the traffic flagged. To reproduce that on a
small labelled benchmark: keep every real image, subsample the AI ones so they are ``pos_share`` of the table,
and draw ``ai_score = sigmoid(N(+margin, noise))`` for AI images and ``sigmoid(N(-margin, noise))`` for real
ones, so the teacher is confident but wrong on a few percent, like a real one. Splits are group-aware and
stratified; the true labels are kept alongside (``truth``) so models are judged against the truth while
training only ever sees teacher scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from training.data import assign_splits
from training.labels import LabelsError, validate


def simulated_teacher(
    data: Path,
    *,
    pos_share: float = 0.11,
    margin: float = 2.2,
    noise: float = 1.2,
    val_frac: float = 0.1,
    test_frac: float = 0.3,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(teacher table, truth table): same rows and splits, ``ai_score`` = teacher score vs true label."""
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        raise LabelsError(f"no manifest.csv in {data}")
    m = pd.read_csv(manifest)
    rng = np.random.default_rng(seed)
    real, fake = m[m.label == 0], m[m.label == 1]
    n_pos = round(len(real) * pos_share / (1 - pos_share))
    fake = fake.sample(n=min(n_pos, len(fake)), random_state=seed)
    m = pd.concat([real, fake]).sort_values("file").reset_index(drop=True)
    logit = np.where(m.label == 1, margin, -margin) + rng.normal(0, noise, len(m))
    table = pd.DataFrame(
        {
            "image_uri": [str(data / f) for f in m.file],
            "ai_score": 1 / (1 + np.exp(-logit)),
            "source": m.source,
            "group": m.file,
            "split": None,
        }
    )
    teacher, _ = validate(table)
    teacher = assign_splits(teacher, val_frac=val_frac, test_frac=test_frac, seed=seed)
    truth = teacher.assign(ai_score=m.label.astype(float).to_numpy())
    return teacher, truth
