"""The central claim on synthetic data: native crops keep the 2x-upsampling fingerprint, resizing loses it."""

from __future__ import annotations

import pytest

from training.synthetic import SyntheticConfig, run_claim


@pytest.mark.slow
def test_native_crops_separate_upsampled_fakes_and_resizing_does_not() -> None:
    report = run_claim(SyntheticConfig())
    native, resized = report.arm("native"), report.arm("resized")
    assert native.roc_auc >= 0.95, report.to_dict()
    assert resized.roc_auc < 0.75, report.to_dict()  # measured ~0.51: chance level
    weighted, plain = report.arm("imbalanced_pos_weight"), report.arm("imbalanced_plain")
    assert weighted.train_positives == plain.train_positives < weighted.train_items * 0.1
    # without pos_weight the rare positives are under-predicted at the default threshold
    assert weighted.recall_at_half > plain.recall_at_half + 0.2, report.to_dict()
    assert weighted.balanced_accuracy_at_half > plain.balanced_accuracy_at_half, report.to_dict()
