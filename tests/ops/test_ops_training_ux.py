"""Training UX: evaluation plots that say what they show, and progress that suits a terminal or a log."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from training.evaluate import evaluate_scores
from training.plots import hist_bins
from training.progress import LineProgress, progress


def _scores(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Synthetic labelled scores: AI items score higher, real ones crowd near 0 (a confident model)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = np.where(y == 1, rng.beta(5, 2, n), rng.beta(1, 12, n))
    return pd.DataFrame(
        {
            "image_uri": [f"file:///x/{i}.jpg" for i in range(n)],
            "ai_score": y.astype(float),
            "score": score,
            "split": "test",
            "source": np.where(y == 1, "gen", "photo"),
        }
    )


def test_ops_evaluation_plots_exist_and_their_legends_carry_auc_thresholds_and_ece(tmp_path: Path) -> None:
    report = evaluate_scores(_scores(), name="synthetic", n_boot=50, out_dir=tmp_path)
    assert set(report.plots) == {"roc.png", "pr.png", "hist.png", "reliability.png"}
    for png in report.plots:
        with Image.open(tmp_path / png) as img:
            assert isinstance(img, PngImageFile)
            assert img.size[0] > 300
            assert img.text["Legend"]  # the legend travels in the file's metadata
    figures = json.loads((tmp_path / "plots.json").read_text())
    roc = " | ".join(figures["roc.png"]["legend"])
    assert report.test.roc_auc.value is not None
    assert f"ROC AUC = {report.test.roc_auc.value:.3f}" in roc
    assert "chance (AUC = 0.5)" in roc  # the diagonal
    chosen = [t for t in report.thresholds if t.threshold is not None]
    assert chosen
    for t in chosen:  # every chosen operating point is marked, with its threshold
        assert f"{t.target} @ {t.threshold:.3f}" in roc
        assert any(f"{t.target} @" in label for label in figures["hist.png"]["legend"])
    assert "review @ 0.500" in roc
    assert report.test.pr_auc.value is not None
    assert f"PR AUC = {report.test.pr_auc.value:.3f}" in " | ".join(figures["pr.png"]["legend"])
    assert report.calibration is not None
    assert f"ECE = {report.calibration.ece:.3f}" in " | ".join(figures["reliability.png"]["legend"])
    assert "perfectly calibrated" in figures["reliability.png"]["legend"]


def test_ops_histogram_bins_follow_the_scores() -> None:
    crowded = np.concatenate([np.linspace(0.0, 0.02, 500), np.linspace(0.97, 1.0, 20)])
    edges = hist_bins(crowded)
    # 25 fixed bins over [0, 1] put all 500 low scores into one bin; these resolve them
    assert np.histogram(crowded[:500], bins=edges)[0].max() < 500
    narrow = np.linspace(0.40, 0.41, 300)
    e = hist_bins(narrow)
    assert e[0] >= 0.40 and e[-1] <= 0.41 + 1e-9 and len(e) - 1 >= 20
    same = hist_bins(np.full(10, 0.3))
    assert len(same) == 2 and same[0] < 0.3 < same[1]


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_ops_progress_writes_lines_without_carriage_returns_when_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MODERATION_PROGRESS", raising=False)
    out = _Pipe()
    bar = progress(range(50), desc="score", unit="img", stream=out, interval_s=0.0)
    assert isinstance(bar, LineProgress)
    seen = 0
    for _ in bar:
        seen += 1
        bar.set_postfix(loss="0.1234")
    assert seen == 50
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[-1].startswith("score: 50/50 img (100%)") and "done in" in lines[-1]
    assert "loss=0.1234" in lines[-1]
    assert all(re.match(r"score: \d+/50 img", line) for line in lines)


def test_ops_progress_is_a_bar_on_a_terminal_and_silent_when_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MODERATION_PROGRESS", raising=False)
    term = _Terminal()
    assert list(progress(range(5), desc="train", stream=term)) == list(range(5))
    assert "\r" in term.getvalue()  # tqdm redraws in place
    quiet = _Pipe()
    bar = progress(range(5), desc="train", stream=quiet, enabled=False)
    assert list(bar) == list(range(5))
    bar.set_postfix(loss=1)
    assert quiet.getvalue() == ""
    monkeypatch.setenv("MODERATION_PROGRESS", "off")
    forced = _Terminal()
    assert list(progress(range(3), desc="x", stream=forced)) == [0, 1, 2]
    assert forced.getvalue() == ""
