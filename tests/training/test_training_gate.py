"""The gate's statistics on constructed score sets: sizes, the paired bootstrap, the margin."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training.gate import auc_rows, heldout_check, override_check, paired_bootstrap
from training.options import GatePolicy


def scores(y: np.ndarray, separation: float, seed: int) -> np.ndarray:
    """Scores whose classes are ``separation`` standard deviations apart."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, len(y)) + separation * y


def test_auc_rows_matches_sklearn_with_ties() -> None:
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.5, 0.5, 0.9, 0.3, 0.2, 0.7, 0.7])
    assert auc_rows(y[None], s[None])[0] == pytest.approx(roc_auc_score(y, s))


def test_refuses_a_candidate_judged_on_too_few_items() -> None:
    y = np.array([0] * 5 + [1] * 5)
    perfect, chance = y.astype(float), np.full(10, 0.5)
    checks = heldout_check(y, perfect, chance, GatePolicy())
    assert [c.name for c in checks] == ["heldout_size"] and not checks[0].passed
    assert "10 held-out items (5 AI, 5 real)" in checks[0].detail and "at least 40" in checks[0].detail
    # enough items in all but one class is still too few
    y2 = np.array([0] * 60 + [1] * 4)
    assert not heldout_check(y2, y2.astype(float), np.zeros(64), GatePolicy())[0].passed
    # and a handful of overrides cannot be judged either
    few = override_check(np.ones(3, int), np.ones(3), np.zeros(3), 0.5, 0.5, GatePolicy())
    assert not few.passed and "3 override items" in few.detail
    assert override_check(np.zeros(0, int), np.zeros(0), np.zeros(0), 0.5, 0.5, GatePolicy()).passed


def test_refuses_when_the_paired_interval_crosses_the_margin() -> None:
    y = np.array([0] * 30 + [1] * 30)
    current = scores(y, 2.0, seed=1)
    # a noisy candidate: its paired interval reaches below -margin
    noisy = 0.5 * current + scores(y, 1.0, seed=2)
    _, low, high = paired_bootstrap(y, noisy, current, n_boot=2000, seed=0)
    assert low < -0.02 < high
    (check,) = heldout_check(y, noisy, current, GatePolicy(margin=0.02))
    assert check.name == "heldout_roc_auc" and not check.passed
    assert check.diff_low == round(low, 4) and check.candidate is not None
    assert len(str(check.candidate).split(".")[1]) <= 4  # figures are rounded
    # the same candidate with a margin wider than its interval's lower end passes
    (lenient,) = heldout_check(y, noisy, current, GatePolicy(margin=abs(low) + 0.01))
    assert lenient.passed


def test_passes_a_clearly_better_candidate_and_refuses_a_clearly_worse_one() -> None:
    y = np.array([0] * 40 + [1] * 40)
    weak, strong = scores(y, 0.5, seed=3), scores(y, 3.0, seed=4)
    (better,) = heldout_check(y, strong, weak, GatePolicy())
    assert better.passed and better.diff_low is not None and better.diff_low > 0
    (worse,) = heldout_check(y, weak, strong, GatePolicy())
    assert not worse.passed and worse.diff_high is not None and worse.diff_high < 0


def test_override_agreement_is_paired_on_the_same_items() -> None:
    y = np.array([1] * 12 + [0] * 12)
    current = np.where(y == 1, 0.9, 0.1)  # agrees with every moderator
    undoes = current.copy()
    undoes[:6] = 0.1  # the candidate flips six corrections back
    check = override_check(y, undoes, current, 0.5, 0.5, GatePolicy())
    assert not check.passed and check.candidate == 0.75 and check.current == 1.0
    same = override_check(y, current, current, 0.5, 0.5, GatePolicy())
    assert same.passed and same.diff == 0.0
