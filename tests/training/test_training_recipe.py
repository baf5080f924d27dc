"""The fine-tuning recipe on a tiny real image set: checkpoint format, exact resume, splits, rehearsal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import run_cli
from training.data import assign_splits, rehearsal_sample
from training.labels import LabelsError, load_labels
from training.options import TrainConfig
from training.recipe import train
from worker.lifecycle.registry import LocalStore, Registry
from worker.media.fetch import Fetcher
from worker.records import Event, Verdict
from worker.scoring.checkpoint import load_checkpoint, read_manifest
from worker.scoring.scorer import Scorer, score_events
from worker.settings import Settings


def config(labels: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        labels=labels,
        out=out,
        arch="test_resnet",
        crop_size=32,
        epochs=2,
        batch_size=8,
        lr=2e-3,
        workers=0,
        device="cpu",
        progress=False,
        ema_decay=0.9,
        clip_grad=1.0,
        jpeg_prob=0.5,
        label_smoothing=0.05,
        min_heldout_per_class=2,
    )
    base.update(kw)
    return TrainConfig.model_validate(base)


def test_resume_replays_exactly_and_the_checkpoint_serves(image_set: Path, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", device="cpu")
    full = train(config(image_set, tmp_path / "full"), settings)
    assert full is not None and full.manifest is not None and len(full.history) == 2

    part = train(config(image_set, tmp_path / "cut"), settings, stop_after=1)
    assert part is not None and part.manifest is None
    assert (tmp_path / "cut" / "state.pt").is_file() and not (tmp_path / "cut" / "checkpoint").exists()
    resumed = train(config(image_set, tmp_path / "cut", epochs=99), settings, resume=True)
    assert resumed is not None and resumed.manifest is not None
    assert [h["epoch"] for h in resumed.history] == [0, 1]  # epochs come from the saved config.json

    a = load_checkpoint(full.checkpoint).model.state_dict()
    b = load_checkpoint(resumed.checkpoint).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    m = read_manifest(full.checkpoint)
    assert m.arch == "test_resnet" and m.crop_size == 32 and m.data_snapshot
    assert m.metrics["train_items"] + m.metrics["val_items"] + m.metrics["test_items"] == 24
    config_json = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config_json["ema_decay"] == 0.9 and config_json["arch"] == "test_resnet"
    splits = pd.read_csv(tmp_path / "full" / "splits.csv")
    assert splits.groupby("group")["split"].nunique().max() == 1  # pairs never straddle splits

    scorer = Scorer.load(str(full.checkpoint), settings)  # validates checksum and golden scores
    uris = list(splits["image_uri"])[:4]
    decisions = score_events([Event(item_id=u, image_uri=u) for u in uris], scorer, Fetcher(settings))
    assert all(d.verdict != Verdict.ERROR and d.model_version == m.version for d in decisions)

    with pytest.raises(FileExistsError):
        train(config(image_set, tmp_path / "full"), settings)


def test_group_splits_and_conflicts(image_set: Path) -> None:
    df, _ = load_labels(image_set)
    out = assign_splits(df, val_frac=0.2, test_frac=0.25, seed=3, min_per_class=2)
    assert set(out["split"]) == {"train", "val", "test"}
    assert out.groupby("group")["split"].nunique().max() == 1
    pinned = df.copy()
    pinned.loc[0, "split"] = "test"  # its group partner has no split: it must follow into test
    out2 = assign_splits(pinned, val_frac=0.2, test_frac=0.25, seed=3, min_per_class=2)
    assert set(out2.loc[out2["group"] == pinned.loc[0, "group"], "split"]) == {"test"}
    pinned.loc[1, "split"] = "train"
    with pytest.raises(LabelsError, match="span several explicit splits"):
        assign_splits(pinned, val_frac=0.2, test_frac=0.25, seed=3, min_per_class=2)


def test_rehearsal_buffer_keeps_each_stratum(image_set: Path) -> None:
    df, _ = load_labels(image_set)
    cam = df[df["source"] == "cam"]
    copies = [cam.assign(image_uri=cam["image_uri"] + f"#{i}") for i in range(3)]
    old = pd.concat([df, *copies], ignore_index=True)  # cam 4x as frequent as gen
    buf = rehearsal_sample(old, 10, seed=0)
    assert len(buf) == 10 and buf["image_uri"].is_unique
    counts = buf["source"].value_counts()
    assert counts["cam"] >= 7 and counts["gen"] >= 1


def test_cli_train_continual_from_a_checkpoint_with_rehearsal(
    image_set: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    df, _ = load_labels(image_set)
    df.iloc[:8].to_csv(tmp_path / "new.csv", index=False)
    out = run_cli(
        *("train", "-l", "new.csv", "-o", "run", "--quiet", "--crop-size", "64"),
        *("--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu"),
        *("--init-from", str(tiny_checkpoint), "--layer-decay", "0.7"),
        *("--rehearsal-labels", str(image_set), "--rehearsal-size", "6", "--publish"),
        cwd=tmp_path,
        MODERATION_HOME=str(tmp_path / "home"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    m = read_manifest(tmp_path / "run" / "checkpoint")
    assert m.parent_version == read_manifest(tiny_checkpoint).version
    registry = Registry(LocalStore(tmp_path / "home" / "registry"))
    assert registry.current_version() == m.version  # --publish: gated (first version) and promoted
    splits = pd.read_csv(tmp_path / "run" / "splits.csv")
    assert (splits["label_source"] == "rehearsal").sum() == 6
    assert set(splits.loc[splits["label_source"] == "rehearsal", "split"]) == {"train"}

    wrong = run_cli(
        *("train", "-l", "new.csv", "-o", "run2", "--quiet", "--arch", "test_resnet", "--device", "cpu"),
        *("--init-from", str(tiny_checkpoint)),
        cwd=tmp_path,
    )
    assert wrong.returncode == 2 and "test_convnext" in wrong.stderr and "Traceback" not in wrong.stderr


def test_weights_oversample_select_best_and_loud_warnings(image_set: Path, tmp_path: Path) -> None:
    from training.data import TrainingWarning

    df = pd.read_csv(image_set)
    df["weight"] = [3] * 4 + [0] * 2 + [1] * 18  # four precious rows seen 3x, two left out
    df["split"] = ["train"] * 18 + ["val"] * 6
    df.to_csv(tmp_path / "w.csv", index=False)
    settings = Settings(home=tmp_path / "home", device="cpu")
    with pytest.warns(TrainingWarning, match="no split column"):
        res = train(
            config(
                tmp_path / "w.csv",
                tmp_path / "run",
                select_best=True,
                rehearsal_labels=image_set,  # a raw table: its old test rows cannot be told apart
                rehearsal_size=2,
            ),
            settings,
        )
    assert res is not None and res.manifest is not None
    m = res.manifest.metrics
    assert (
        m["train_items"] == 18 + 0 and m["train_items_per_epoch"] == 4 * 3 + 12 * 1 + 0
    )  # rehearsal: none new
    best = max(res.history, key=lambda h: h.get("val_roc_auc", -1))
    assert m["epoch"] == best["epoch"] and m["val_roc_auc"] == best["val_roc_auc"]

    # the in-memory scorer used for validation and the loaded checkpoint give the same scores
    from training.data import ImageSource, score_uris
    from worker.scoring.checkpoint import load_checkpoint as load

    ck = load(res.checkpoint)
    mf = ck.manifest
    uris = list(df["image_uri"][:6])
    src = ImageSource(settings)
    mem = Scorer.from_model(
        ck.model, settings, arch=mf.arch, crop_size=mf.crop_size, mean=mf.mean, std=mf.std
    )
    assert np.allclose(
        score_uris(mem, uris, src), score_uris(Scorer.load(str(res.checkpoint), settings), uris, src)
    )

    df.assign(split=["train"] * 24).to_csv(tmp_path / "noval.csv", index=False)
    with pytest.warns(TrainingWarning, match="no validation items"):
        train(config(tmp_path / "noval.csv", tmp_path / "run2", epochs=1), settings)
