"""The simulated teacher on the aigen-dev set.

Found through ``MODERATION_DEV_DATA`` or ``../shared/data/aigen-dev`` beside the checkout; skipped without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.labels import summarize
from training.simulate import simulated_teacher

BESIDE = Path(__file__).resolve().parents[3] / "shared" / "data" / "aigen-dev"
DATA = Path(os.environ.get("MODERATION_DEV_DATA") or BESIDE)


@pytest.mark.skipif(not (DATA / "manifest.csv").is_file(), reason="shared aigen-dev data not available")
def test_simulated_teacher_has_the_articles_imbalance_and_clean_splits() -> None:
    teacher, truth = simulated_teacher(DATA, pos_share=0.11, seed=0)
    s = summarize(truth)
    assert 0.10 <= s.positives / s.n <= 0.12  # ~11% positives, every real image kept
    assert s.negatives == 327
    agree = ((teacher["ai_score"] >= 0.5) == (truth["ai_score"] == 1)).mean()
    assert 0.9 < agree < 1.0  # confident, but wrong on a few percent
    assert teacher.groupby("group")["split"].nunique().max() == 1
    test = truth[truth["split"] == "test"]
    assert 0 < test["ai_score"].sum() < len(test)  # both classes in the held-out split
    assert all(Path(u).is_file() for u in teacher["image_uri"].head(5))
