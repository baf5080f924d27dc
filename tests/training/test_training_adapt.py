"""The label loop's new steps: labels build, few-label adaptation with its gate, recalibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.training.conftest import write_image_set
from tests.training.helpers import invoke
from training.build import build_labels, decisions_from_archive, decisions_from_store
from training.calibrate import CalibrationError, fit_calibration, raw_logits, write_calibrated
from training.data import ImageSource
from training.labels import load_labels, overrides_from_store
from worker.delivery.store import DecisionStore
from worker.lifecycle.registry import LocalStore, Registry
from worker.records import Decision, Verdict
from worker.scoring.checkpoint import Calibration, read_manifest
from worker.scoring.scorer import Scorer, sigmoid
from worker.settings import Settings


def test_labels_build_joins_teacher_decisions_and_overrides_and_overrides_win(
    redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "t").mkdir()
    pd.DataFrame(
        {
            "image_uri": ["a.jpg", "b.jpg", "c.jpg"],
            "ai_score": [0.9, 0.2, 0.05],
            "source": ["sd", "cam", "cam"],
        }
    ).to_csv(tmp_path / "t" / "teacher.csv", index=False)
    a, b, c, d = (str(tmp_path / "t" / f"{n}.jpg") for n in "abcd")  # relative rows resolve next to the table
    store = DecisionStore.from_url(redis_url, "lb")
    for i, (uri, verdict, score) in enumerate(
        [(a, Verdict.BLOCK, 0.95), (b, Verdict.ALLOW, 0.1), (d, Verdict.REVIEW, 0.6)]
    ):
        store.write(
            Decision(
                item_id=f"i{i}",
                event_id=f"e{i}",
                image_uri=uri,
                verdict=verdict,
                ai_score=score,
                model_version="m1",
            )
        )
    store.override("e0", Verdict.ALLOW, "ann")  # the moderators say a is real
    store.override("e0", Verdict.ALLOW, "bob")
    store.override("e2", Verdict.BLOCK, "ann")  # d is not in the teacher's table
    pd.DataFrame(
        {
            "image_uri": [a, b],
            "ai_score": [0.95, 0.1],
            "model_version": ["m1", "m1"],
            "verdict": ["block", "allow"],
        }
    ).to_parquet(tmp_path / "archive.parquet")

    teacher, _ = load_labels(tmp_path / "t" / "teacher.csv")
    built = build_labels(teacher, decisions_from_store(store), overrides_from_store(store)).set_index(
        "image_uri"
    )
    assert set(built.index) == {a, b, c, d}
    assert built.loc[a, "ai_score"] == 0.0 and built.loc[a, "teacher_score"] == 0.9  # the override won
    assert built.loc[a, "label_source"] == "override" and built.loc[b, "label_source"] == "teacher"
    assert built.loc[a, "n_verdicts"] == 2 and built.loc[a, "n_agree"] == 2
    assert "ann:allow@" in str(built.loc[a, "verdicts"]) and "bob:allow@" in str(built.loc[a, "verdicts"])
    assert built.loc[a, "moderator"] == "bob" and built.loc[a, "model_version"] == "m1"
    assert built.loc[a, "model_score"] == 0.95 and built.loc[d, "ai_score"] == 1.0
    assert built["model_version"].isna()[c]  # never decided: no model provenance
    assert list(decisions_from_archive(tmp_path / "archive.parquet")["model_score"]) == [0.95, 0.1]

    code, out, err = invoke(
        *("labels", "build", "-o", "built/labels.parquet", "--teacher", "t/teacher.csv"),
        *("--decisions", "archive.parquet", "--overrides-from-redis"),
        cwd=tmp_path,
        env={"REDIS_URL": redis_url, "MODERATION_NAMESPACE": "lb"},
    )
    assert code == 0, err
    assert "4 items, 2 labelled by moderators" in out
    df, report = load_labels(tmp_path / "built" / "labels.parquet")  # what report, probe and train read
    assert report.bad == [] and len(df) == 4
    code, _, err = invoke("labels", "report", "-l", "built/labels.parquet", cwd=tmp_path)
    assert code == 0, err
    code, _, err = invoke("labels", "build", "-o", "x.csv", "--decisions", "nope", cwd=tmp_path)
    assert code == 2 and "not found" in err and "fix:" in err


def test_fit_calibration_recovers_a_known_map_and_refuses_a_backwards_model() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < sigmoid(z / 2.0 - 1.0)).astype(int)
    cal = fit_calibration(z, y)
    assert cal.temperature == pytest.approx(2.0, rel=0.15) and cal.offset == pytest.approx(-1.0, abs=0.15)
    with pytest.raises(CalibrationError, match="backwards"):
        fit_calibration(-z, y)
    with pytest.raises(CalibrationError, match="at least 10"):
        fit_calibration(z[:5], y[:5])


def test_calibrated_version_shares_the_weights_and_the_scorer_applies_it(
    image_set: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", device="cpu")
    uris = list(pd.read_csv(image_set)["image_uri"])
    base = read_manifest(tiny_checkpoint)
    z = raw_logits(str(tiny_checkpoint), uris, settings)
    cal = Calibration(temperature=0.5, offset=1.0, fitted_on=24)
    m = write_calibrated(str(tiny_checkpoint), tmp_path / "cal", cal, base.thresholds, settings)
    assert (
        m.weights_sha256 == base.weights_sha256
        and m.parent_version == base.version
        and m.version != base.version
    )
    scorer = Scorer.load(str(tmp_path / "cal"), settings)  # checksum and golden scores still validate
    src = ImageSource(settings)
    got = scorer.image_scores(src.image(u) for u in uris)
    assert np.allclose(got, sigmoid(z / 0.5 + 1.0), atol=1e-5)
    assert np.allclose(raw_logits(str(tmp_path / "cal"), uris, settings, src), z, atol=1e-4)

    # the CLI: labels the model ranks right (by construction), thresholds for a target precision, published
    pd.DataFrame({"image_uri": uris, "ai_score": (z > np.median(z)).astype(float)}).to_csv(
        tmp_path / "mods.csv"
    )
    reg = tmp_path / "registry"
    code, out, err = invoke(
        *(
            "calibrate",
            "-c",
            str(tiny_checkpoint),
            "-l",
            "mods.csv",
            "-o",
            "cal2",
            "--target-precision",
            "0.9",
        ),
        *("--publish", "--registry", str(reg), "--device", "cpu"),
        cwd=tmp_path,
        env={"MODERATION_HOME": str(tmp_path / "home")},
    )
    assert code == 0, err
    current = Registry(LocalStore(reg)).current_version()
    published = read_manifest(tmp_path / "cal2")
    assert current == published.version and published.calibration is not None
    assert published.calibration.fitted_on == 24 and "temperature" in out


def test_adapt_trains_every_new_item_gates_both_candidates_and_publishes_the_better(
    image_set: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    old = pd.read_csv(image_set)
    old["split"] = ["test"] * 8 + ["train"] * 16  # the old run's splits: its test rows must stay unseen
    old.to_csv(tmp_path / "old-splits.csv", index=False)
    new_labels = write_image_set(tmp_path / "new", n=12, size=64, seed=5)
    code, out, err = invoke(
        *("adapt", "-l", str(new_labels), "-o", "ad", "--init-from", str(tiny_checkpoint)),
        *("--rehearsal-labels", "old-splits.csv", "--rehearsal-size", "6", "--oversample", "3"),
        *("--epochs", "1", "--batch-size", "8", "--device", "cpu", "--n-boot", "200", "--publish"),
        *("--min-heldout", "8", "--min-per-class-gate", "4"),
        cwd=tmp_path,
        env={"MODERATION_HOME": str(tmp_path / "home"), "COLUMNS": "200"},
    )
    assert code in (0, 3), err
    assert "too few to hold" in out  # 12 new items: no best-epoch slice, and the user is told
    new = pd.read_csv(tmp_path / "ad" / "new.csv")
    assert (new["split"] == "train").all() and (new["weight"] == 3).all()  # all train, oversampled
    splits = pd.read_csv(tmp_path / "ad" / "finetune" / "splits.csv")
    rehearsed = set(splits.loc[splits["label_source"] == "rehearsal", "image_uri"])
    assert len(rehearsed) == 6 and not rehearsed & set(old.loc[old["split"] == "test", "image_uri"])
    assert "finetune" in out and "probe" in out and "first version" in out  # an empty registry
    ckpts = {"finetune": tmp_path / "ad" / "finetune" / "checkpoint", "probe": tmp_path / "ad" / "probe"}
    for path in ckpts.values():
        m = read_manifest(path)
        assert m.arch == "test_convnext" and m.parent_version == read_manifest(tiny_checkpoint).version
        Scorer.load(str(path), Settings(device="cpu"))  # loads like any checkpoint
    assert code == 0, out + err
    registry = Registry(LocalStore(tmp_path / "home" / "registry"))
    assert registry.current_version() in {read_manifest(p).version for p in ckpts.values()}
    assert "Traceback" not in err


def test_adapt_lp_ft_starts_from_the_probe_head_and_interpolate_exports_part_of_the_way(
    image_set: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import torch

    from training.adapt import adapt
    from training.options import AdaptConfig
    from worker.scoring.checkpoint import load_checkpoint

    settings = Settings(home=tmp_path / "home", device="cpu")
    old = pd.read_csv(image_set).assign(split="train")
    old.to_csv(tmp_path / "old-splits.csv", index=False)
    common = {
        "labels": write_image_set(tmp_path / "new", n=12, size=64, seed=5),
        "init_from": str(tiny_checkpoint),
        "rehearsal_labels": tmp_path / "old-splits.csv",
        "rehearsal_size": 6,
        "epochs": 1,
        "batch_size": 8,
        "device": "cpu",
        "lp_ft": True,
    }

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return load_checkpoint(str(path), settings).model.state_dict()

    def head(state: dict[str, torch.Tensor]) -> torch.Tensor:
        return next(v for k, v in state.items() if k.endswith("head.fc.weight"))

    # a near-zero learning rate: the exported head is the probe's, not the init checkpoint's
    still = adapt(AdaptConfig(out=tmp_path / "still", lr=1e-8, **common), settings)
    ft, probe = (weights(c.checkpoint) for c in still.candidates)
    assert torch.allclose(head(ft), head(probe), atol=1e-5)
    assert not torch.allclose(head(ft), head(weights(tiny_checkpoint)), atol=1e-3)

    # interpolate 0.5: every weight halfway between the start (the probe) and the full fine-tune
    full = adapt(AdaptConfig(out=tmp_path / "full", lr=1e-2, **common), settings)
    half = adapt(AdaptConfig(out=tmp_path / "half", lr=1e-2, interpolate=0.5, **common), settings)
    f, p = weights(full.candidates[0].checkpoint), weights(full.candidates[1].checkpoint)
    h = weights(half.candidates[0].checkpoint)
    moved = [k for k, v in f.items() if v.is_floating_point() and not torch.allclose(v, p[k], atol=1e-4)]
    assert len(moved) > len(f) // 2  # the fine-tune went somewhere, so halfway is a real check
    for k in moved:
        assert torch.allclose(h[k], (f[k] + p[k]) / 2, atol=1e-5), k
    m = half.candidates[0].manifest
    assert m.parent_version == read_manifest(tiny_checkpoint).version  # the init, not the probe it started at
    assert m.metrics["interpolate"] == 0.5 and m.metrics["lp_ft"] is True
    Scorer.load(str(half.candidates[0].checkpoint), settings)  # checksum and golden scores validate

    code, out, _ = invoke("adapt", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert code == 0 and "--lp-ft" in out and "--interpolate" in out and "--layer-decay" in out
    assert "--freeze-bn" in out and "--average-epochs" in out


def test_adapt_freeze_bn_keeps_the_init_statistics_while_the_weights_train(
    image_set: Path, tmp_path: Path
) -> None:
    import torch

    from training.adapt import adapt
    from training.options import AdaptConfig
    from worker.scoring.checkpoint import init_checkpoint, load_checkpoint

    settings = Settings(home=tmp_path / "home", device="cpu")
    init = tmp_path / "bn-init"
    init_checkpoint("test_efficientnet", init, crop_size=64, seed=1)  # a tiny real model with BatchNorm
    old = pd.read_csv(image_set).assign(split="train")
    old.to_csv(tmp_path / "old-splits.csv", index=False)
    common = {
        "labels": write_image_set(tmp_path / "new", n=12, size=64, seed=5),
        "init_from": str(init),
        "rehearsal_labels": tmp_path / "old-splits.csv",
        "rehearsal_size": 6,
        "epochs": 2,
        "batch_size": 8,
        "lr": 1e-2,
        "device": "cpu",
        "probe": False,
    }

    def bn_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        state = load_checkpoint(str(path), settings).model.state_dict()
        stats = {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}
        affine = {
            k[: -len("running_mean")] + "weight": state[k[: -len("running_mean")] + "weight"]
            for k in stats
            if k.endswith("running_mean")
        }
        return stats, affine

    start_stats, start_affine = bn_state(init)
    assert start_stats  # the model has BatchNorm layers, so the check below means something
    frozen = adapt(AdaptConfig(out=tmp_path / "frozen", freeze_bn=True, **common), settings)
    stats, affine = bn_state(frozen.candidates[0].checkpoint)
    assert all(torch.equal(stats[k], v) for k, v in start_stats.items())
    assert any(not torch.allclose(affine[k], v, atol=1e-4) for k, v in start_affine.items())

    free = adapt(AdaptConfig(out=tmp_path / "free", **common), settings)  # the default: statistics move
    stats, _ = bn_state(free.candidates[0].checkpoint)
    assert any(not torch.allclose(stats[k], v, atol=1e-4) for k, v in start_stats.items())


def test_average_epochs_exports_the_mean_of_the_last_epochs_weights(image_set: Path, tmp_path: Path) -> None:
    import torch

    from training.options import TrainConfig
    from training.recipe import STATE, train
    from worker.scoring.checkpoint import init_checkpoint, load_checkpoint

    settings = Settings(home=tmp_path / "home", device="cpu")
    init = tmp_path / "bn-init"
    init_checkpoint("test_efficientnet", init, crop_size=64, seed=1)

    def cfg(out: str, average: int) -> TrainConfig:
        return TrainConfig(
            labels=image_set,
            out=tmp_path / out,
            init_from=str(init),
            epochs=3,
            batch_size=8,
            lr=1e-2,
            val_frac=0.0,
            test_frac=0.0,
            average_epochs=average,
            workers=0,
            device="cpu",
            progress=False,
        )

    averaged = train(cfg("avg", 2), settings)
    assert averaged is not None and averaged.manifest is not None
    assert averaged.manifest.metrics["averaged_epochs"] == 2
    # the same run without averaging, stopped after two epochs (the second-to-last weights), then finished
    train(cfg("plain", 0), settings, stop_after=2)
    second = torch.load(tmp_path / "plain" / STATE, map_location="cpu", weights_only=True)["model"]
    plain = train(cfg("plain", 0), settings, resume=True)
    assert plain is not None and plain.manifest is not None
    assert plain.manifest.metrics["averaged_epochs"] == 0
    last = load_checkpoint(str(plain.checkpoint), settings).model.state_dict()
    got = load_checkpoint(str(averaged.checkpoint), settings).model.state_dict()
    moved = [
        k for k, v in last.items() if v.is_floating_point() and not torch.allclose(v, second[k], atol=1e-4)
    ]
    assert len(moved) > len(last) // 4  # the last epoch changed the weights, so the mean is a real check
    for k in moved:
        assert torch.allclose(got[k], (second[k] + last[k]) / 2, atol=1e-5), k
