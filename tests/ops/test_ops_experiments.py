"""Optional experiment tracking: TensorBoard event files a real reader can load; off means nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.ops.experiments import Tracker, installed, open_tracker
from worker.settings import Settings


@pytest.mark.skipif(not installed("tensorboard"), reason="tensorboard not installed")
def test_ops_tensorboard_tracker_writes_scalars_tensorboard_reads(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = Settings(home=tmp_path / "home", tracking="auto")
    with open_tracker(settings, tmp_path / "run") as tracker:
        assert tracker.name == "tensorboard"
        tracker.log_params({"arch": "test_convnext", "lr": 2e-4})
        for epoch, (loss, auc) in enumerate([(0.69, 0.61), (0.52, 0.74), (0.41, 0.83)]):
            tracker.log_metrics({"train_loss": loss, "val_roc_auc": auc, "note": "text is skipped"}, epoch)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert {"train_loss", "val/roc_auc"} <= set(acc.Tags()["scalars"])
    aucs = [(e.step, round(e.value, 4)) for e in acc.Scalars("val/roc_auc")]
    assert aucs == [(0, 0.61), (1, 0.74), (2, 0.83)]


def test_ops_tracking_off_writes_nothing(tmp_path: Path) -> None:
    tracker = open_tracker(Settings(home=tmp_path / "home", tracking="off"), tmp_path / "run")
    assert type(tracker) is Tracker and tracker.name == "off"
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(installed("mlflow"), reason="mlflow is installed here")
def test_ops_asking_for_a_tracker_that_is_not_installed_runs_without_one(tmp_path: Path) -> None:
    tracker = open_tracker(Settings(home=tmp_path / "home", tracking="mlflow"), tmp_path / "run")
    assert tracker.name == "off"
    tracker.log_metrics({"loss": 1.0}, 0)
