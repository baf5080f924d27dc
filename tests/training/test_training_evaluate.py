"""Evaluation report, probe baseline and the publish gate, with real checkpoints, files and registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from timm.models import ConvNeXt

from tests.training.helpers import invoke
from training.evaluate import bootstrap, calibration, threshold_for_fpr, threshold_for_precision
from worker.lifecycle.registry import LocalStore, Registry
from worker.scoring.checkpoint import save_checkpoint
from worker.scoring.model import create_model, data_config


def constant_checkpoint(path: Path, logit: float) -> Path:
    """A real test_convnext checkpoint whose head ignores the image: always this logit."""
    torch.manual_seed(0)
    model = create_model("test_convnext")
    assert isinstance(model, ConvNeXt)
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(logit)
    mean, std = data_config("test_convnext")
    save_checkpoint(model, path, arch="test_convnext", crop_size=32, mean=mean, std=std)
    return path


def test_metric_helpers_on_known_scores() -> None:
    y = np.array([0] * 50 + [1] * 50)
    p = np.concatenate([np.linspace(0.0, 0.4, 50), np.linspace(0.6, 1.0, 50)])
    from sklearn.metrics import roc_auc_score

    iv = bootstrap(y, p, roc_auc_score, n_boot=200)
    assert iv.value == 1.0 and iv.low == pytest.approx(1.0)
    noisy = np.where(np.arange(100) % 7 == 0, 1 - p, p)
    iv2 = bootstrap(y, noisy, roc_auc_score, n_boot=200)
    assert iv2.low is not None and iv2.high is not None and iv2.low < iv2.value < iv2.high  # type: ignore[operator]
    t = threshold_for_precision(y, p, 0.99)
    assert t.threshold is not None and 0.4 < t.threshold <= 0.6 and t.recall == 1.0
    f = threshold_for_fpr(y, noisy, 0.05)
    assert f.fpr is not None and f.fpr <= 0.05
    cal = calibration(y, p)
    assert 0 <= cal.ece < 0.3 and sum(b.count for b in cal.bins) == 100


def test_evaluate_cli_report_plots_and_variants(
    image_set: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    code, _, err = invoke(
        *("evaluate", "-l", str(image_set), "-c", str(tiny_checkpoint), "-o", "ev", "--split", "all"),
        *("--reencode-quality", "70", "--resize", "0.5", "--n-boot", "100", "--device", "cpu"),
        cwd=tmp_path,
    )
    assert code == 0, err[-3000:]
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["test"]["n"] == 24 and rep["test"]["positives"] == 12
    assert {s["source"] for s in rep["per_source"]} == {"cam", "gen"}
    assert set(rep["variants"]) == {"jpeg_q70", "resize_0.5"}
    for png in ("roc.png", "pr.png", "hist.png"):
        assert (tmp_path / "ev" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = pd.read_csv(tmp_path / "ev" / "scores.csv")
    assert scores["score"].between(0, 1).all() and len(scores) == 24

    code, _, err = invoke(
        *("probe", "-l", str(image_set), "--arch", "test_resnet", "--crop-size", "32", "-o", "pr"),
        *("--n-boot", "50", "--device", "cpu", "--test-frac", "0.5"),
        cwd=tmp_path,
    )
    assert code == 0, err[-3000:]
    prep = json.loads((tmp_path / "pr" / "eval" / "report.json").read_text())
    assert prep["name"] == "probe:test_resnet" and prep["test"]["n"] == 12
    code, out, err = invoke(
        *("evaluate", "-l", "pr/splits.csv", "--scores", "pr/eval/scores.csv", "-o", "ev2", "--json"),
        cwd=tmp_path,
    )
    assert code == 0, err[-3000:]
    assert json.loads(out)["test"]["n"] == prep["test"]["n"]
    # the probe is a checkpoint like any other: evaluate loads it (checksum, golden scores) and agrees
    code, out, err = invoke(
        *("evaluate", "-l", "pr/splits.csv", "-c", "pr/checkpoint", "-o", "ev3", "--json", "--n-boot", "50"),
        *("--variant", "resize:0.5+jpeg:60", "--device", "cpu"),
        cwd=tmp_path,
    )
    assert code == 0, err[-3000:]
    via_checkpoint = json.loads(out)
    assert via_checkpoint["test"]["roc_auc"]["value"] == pytest.approx(prep["test"]["roc_auc"]["value"])
    assert set(via_checkpoint["variants"]) == {"resize_0.5+jpeg_q60"}
    code, _, err = invoke(
        *("evaluate", "-l", "pr/splits.csv", "-c", "pr/checkpoint", "-o", "ev4", "--variant", "blur:2"),
        cwd=tmp_path,
    )
    assert code == 2 and "jpeg:QUALITY" in err


def test_per_source_auc_is_within_the_source_and_the_pooled_figure_is_labelled() -> None:
    from training.evaluate import per_source

    # source "a": both classes, ranked backwards within it; source "b": one class, far from a's reals
    df = pd.DataFrame(
        {
            "source": ["a"] * 8 + ["b"] * 4,
            "ai_score": [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1],
            "score": [0.2, 0.3, 0.25, 0.35, 0.6, 0.7, 0.65, 0.75, 0.9, 0.95, 0.92, 0.99],
        }
    )
    rows = {r.source: r for r in per_source(df, review=0.5, n_boot=50)}
    assert rows["a"].roc_auc_within.value == 0.0  # the figure that says this source is broken
    assert rows["b"].roc_auc_within.value is None  # one class: no within-source AUC
    assert rows["b"].roc_auc_pooled_cross_source.value == 1.0  # b's AI against a's reals


def test_gate_refuses_a_candidate_that_undoes_moderator_overrides(image_set: Path, tmp_path: Path) -> None:
    says_real = constant_checkpoint(tmp_path / "real", -5.0)
    says_ai = constant_checkpoint(tmp_path / "ai", 5.0)
    labels = pd.read_csv(image_set)
    # moderators allowed four images the model had blocked: the regression set
    pd.DataFrame(
        {
            "image_uri": labels["image_uri"][:4],
            "verdict": ["allow"] * 4,
            "previous_verdict": ["block"] * 4,
        }
    ).to_csv(tmp_path / "overrides.csv", index=False)
    reg_dir = tmp_path / "registry"
    env = {"MODERATION_HOME": str(tmp_path / "home")}
    labels.assign(split="test").to_csv(tmp_path / "heldout.csv", index=False)  # nothing here was trained on
    common = ["-l", "heldout.csv", "--overrides-file", "overrides.csv"]
    common += ["--registry", str(reg_dir), "--min-heldout", "20", "--min-per-class", "10", "--n-boot", "200"]

    code, out, err = invoke("gate", str(says_real), *common, "--min-roc-auc", "0.9", cwd=tmp_path, env=env)
    assert code == 3 and "min_roc_auc" in err, out + err  # a constant model is below any useful floor
    assert not (reg_dir / "current.json").exists()
    code, _, err = invoke("gate", str(says_real), *common, cwd=tmp_path, env=env)
    assert code == 0, err[-2000:]
    registry = Registry(LocalStore(reg_dir))
    real_version = registry.current_version()
    assert real_version is not None

    # four overrides are fewer than the default ten: refused for lack of evidence, with the numbers
    code, out, err = invoke("gate", str(says_ai), *common, cwd=tmp_path, env=env)
    assert code == 3 and "4 override items" in out and "at least 10" in out, out + err
    # enough overrides allowed: refused because it gets every correction wrong again
    code, out, err = invoke("gate", str(says_ai), *common, "--min-overrides", "4", cwd=tmp_path, env=env)
    assert code == 3, out + err
    assert "override_agreement" in out and "gate refused" in err
    assert registry.current_version() == real_version
    assert len(registry.versions()) == 1  # a refused candidate is not published at all

    # too few held-out items: refused before any comparison, naming the numbers
    code, out, err = invoke(
        *("gate", str(says_real), "-l", str(image_set), "--registry", str(reg_dir)), cwd=tmp_path, env=env
    )
    assert code == 3 and "heldout_size" in err and "needs at least 40" in out, out + err
