"""Evaluation report, probe baseline and the publish gate, with real checkpoints, files and registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.training.helpers import invoke
from training.evaluate import bootstrap, calibration, threshold_for_fpr, threshold_for_precision
from worker.lifecycle.registry import LocalStore, Registry
from worker.scoring.checkpoint import save_checkpoint
from worker.scoring.model import create_model, data_config


def constant_checkpoint(path: Path, logit: float) -> Path:
    """A real test_convnext checkpoint whose head ignores the image: always this logit."""
    torch.manual_seed(0)
    model = create_model("test_convnext")
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
        *("--n-boot", "50", "--device", "cpu"),
        cwd=tmp_path,
    )
    assert code == 0, err[-3000:]
    prep = json.loads((tmp_path / "pr" / "report.json").read_text())
    assert prep["name"] == "probe:test_resnet" and prep["test"]["n"] > 0
    code, out, err = invoke(
        *("evaluate", "-l", str(image_set), "--scores", "pr/scores.csv", "-o", "ev2", "--json"),
        cwd=tmp_path,
    )
    assert code == 0, err[-3000:]
    assert json.loads(out)["test"]["n"] == prep["test"]["n"]


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
    common = ("-l", str(image_set), "--overrides-file", "overrides.csv", "--registry", str(reg_dir))

    code, out, err = invoke("gate", str(says_real), *common, "--min-roc-auc", "0.9", cwd=tmp_path, env=env)
    assert code == 3 and "min_roc_auc" in err, out + err  # a constant model is below any useful floor
    assert not (reg_dir / "current.json").exists()
    code, _, err = invoke("gate", str(says_real), *common, cwd=tmp_path, env=env)
    assert code == 0, err[-2000:]
    registry = Registry(LocalStore(reg_dir))
    real_version = registry.current_version()
    assert real_version is not None

    code, out, err = invoke("gate", str(says_ai), *common, cwd=tmp_path, env=env)
    assert code == 3, out + err
    assert "override_agreement" in out and "gate failed" in err
    assert registry.current_version() == real_version
    assert len(registry.versions()) == 1  # a failed candidate is not published at all
