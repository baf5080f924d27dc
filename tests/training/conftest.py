"""A tiny labelled image set on disk: synthetic camera and 2x-upsampled images with soft teacher scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.synthetic import make_image


def write_image_set(root: Path, n: int = 24, size: int = 64, seed: int = 0) -> Path:
    """``n`` PNGs, every other one 'fake', plus ``labels.csv`` (teacher scores with noise, pairs grouped)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        fake = i % 2 == 0
        path = root / f"img{i:03d}.png"
        make_image(size, fake, rng).save(path)
        score = float(np.clip((0.85 if fake else 0.08) + rng.normal(0, 0.05), 0, 1))
        rows.append((str(path), score, "gen" if fake else "cam", f"g{i // 2}"))
    labels = root / "labels.csv"
    pd.DataFrame(rows, columns=["image_uri", "ai_score", "source", "group"]).to_csv(labels, index=False)
    return labels


@pytest.fixture(scope="session")
def image_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_set(tmp_path_factory.mktemp("imageset"))
