"""Few-label adaptation: 10 to 200 new labelled items from a new domain, on top of a working checkpoint.

The generic recipe wastes a tiny set: it holds 30% out, mixes the rest into a rehearsal buffer that drowns it,
and exports whatever the last epoch gave. Here:

* every new item trains, except a stratified slice for best-epoch selection when the new items have enough
  of each class for one (``min_per_class``); otherwise the last epoch is exported and a warning says why;
* the new items are oversampled so they make about half of what each epoch sees next to the rehearsal buffer
  (``weight`` column, see :func:`training.data.expand_weights`); explicit weights in the table win;
* the rehearsal buffer comes from the old labels' training rows only (never the old test split);
* epochs and learning rate are set from the number of new items: a fixed budget of images seen, so ten items
  do not get a two-epoch run and two hundred do not get fifty;
* a second candidate, the probe refit (the init checkpoint's frozen backbone with a new linear head on the
  same items), costs one forward pass per image and is sometimes the better one on very few labels.

Two gentler variants of the fine-tune are options, off by default: ``lp_ft`` starts it from the refitted
probe's head instead of the init checkpoint's (LP-FT: a head that already fits the new items moves the
backbone less), and ``interpolate`` exports a point on the line from the start to the fine-tune's weights
(WiSE-FT). Both protect what the start knows; on the adaptation benchmark (docs/benchmarks.md) the start is
already a working detector whose features need to move, and both lost to the plain fine-tune there. Two
more are off by default for the same reason (no win at both 10 and 25 items there): ``freeze_bn`` keeps
the init checkpoint's BatchNorm statistics (+0.01 at 10 items over five draws, none at 25) and
``average_epochs`` exports the mean of the last epochs when no slice is held out (SWA; about level).

Both candidates are ordinary checkpoints; ``moderation adapt`` sends both through the gate and publishes the
better passing one only when asked.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from training.data import TrainingWarning, hard_labels
from training.labels import LabelsError, load_labels
from training.options import AdaptConfig, TrainConfig
from training.recipe import init_uri, rehearsal_table, train, with_rehearsal
from worker.scoring.checkpoint import (
    Manifest,
    fetch_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from worker.settings import Settings

IMAGES_SEEN = 2400  # per run, whatever the set size: about 10 epochs of 25 items x4 + 140 old ones


@dataclass
class Candidate:
    name: str  # "finetune" or "probe"
    checkpoint: Path
    manifest: Manifest


@dataclass
class AdaptResult:
    run_dir: Path
    candidates: list[Candidate]
    new_items: int
    heldout_items: int
    oversample: float
    rehearsal_size: int
    epochs: int


def plan(n_new: int, cfg: AdaptConfig, old_train: int) -> tuple[int, float, int]:
    """(rehearsal size, oversampling of new items, epochs) for ``n_new`` training items."""
    rehearsal = cfg.rehearsal_size if cfg.rehearsal_size is not None else max(100, 4 * n_new)
    rehearsal = min(rehearsal, old_train)
    over = cfg.oversample or float(min(8, max(1, round(rehearsal / max(1, n_new)))))
    per_epoch = rehearsal + round(over) * n_new
    epochs = cfg.epochs or int(min(30, max(5, math.ceil(IMAGES_SEEN / max(1, per_epoch)))))
    return rehearsal, over, epochs


def split_new(df: pd.DataFrame, cfg: AdaptConfig) -> pd.DataFrame:
    """New items train; a stratified, group-aware slice goes to ``val`` only if it gets enough of each class.

    Rows the table already marks ``test`` stay held out (for the gate); explicit ``val`` rows stay ``val``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    out = df.copy()
    free = out["split"].isna() | (out["split"] == "train")
    rest = out[free]
    y = hard_labels(rest["ai_score"]) if len(rest) else np.zeros(0, dtype=int)
    counts = np.bincount(y, minlength=2)
    expected = [int(c * cfg.holdout_frac) for c in counts]
    if (out["split"] == "val").any():
        pass
    elif cfg.holdout_frac > 0 and min(expected) >= cfg.min_per_class:
        n_splits = max(2, round(1 / min(cfg.holdout_frac, 0.5)))
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=cfg.seed)
        _, held = next(cv.split(rest, y, groups=rest["group"]))
        out.loc[rest.index[held], "split"] = "val"
    else:
        warnings.warn(
            f"{len(rest)} new items ({counts[1]} AI, {counts[0]} real): too few to hold "
            f"{cfg.min_per_class} of each class out for best-epoch selection, so all of them train and "
            + (
                f"the mean of the last {cfg.average_epochs} epochs"
                if cfg.average_epochs
                else "the last epoch"
            )
            + " is exported. "
            "Fix: label more items, or mark some split=val",
            TrainingWarning,
            stacklevel=2,
        )
    out.loc[out["split"].isna(), "split"] = "train"
    return out


def adapt(cfg: AdaptConfig, settings: Settings) -> AdaptResult:
    """Fine-tune and probe-refit candidates from ``cfg.init_from`` on the new items (+ rehearsal)."""
    new, report = load_labels(cfg.labels)
    if new.empty:
        raise LabelsError(f"no valid new items in {cfg.labels} ({len(report.bad)} bad rows)")
    y = hard_labels(new["ai_score"])
    if len(set(y)) < 2:
        raise LabelsError(
            f"{cfg.labels}: all {len(new)} new items are one class; fix: label items of both classes "
            "(ai_score >= 0.5 and < 0.5)"
        )
    uri = init_uri(cfg.init_from, settings)
    base = read_manifest(fetch_checkpoint(uri, settings))
    crop = cfg.crop_size or base.crop_size
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "adapt.json").write_text(cfg.model_dump_json(indent=2))

    table = split_new(new, cfg)
    train_new = table[table["split"] == "train"]
    old = rehearsal_table(cfg.rehearsal_labels) if cfg.rehearsal_labels is not None else None
    old_train = 0 if old is None else int((~old["split"].isin(["test", "val"])).sum())
    rehearsal, over, epochs = plan(len(train_new), cfg, old_train)
    explicit = "weight" in table and (table["weight"] != 1.0).any()
    if not explicit:
        table.loc[table["split"] == "train", "weight"] = over
    table.to_csv(cfg.out / "new.csv", index=False)
    if old is not None and rehearsal > 0:
        table = with_rehearsal(table, old, rehearsal, cfg.seed)
    train_csv = cfg.out / "train.csv"  # the rows both candidates learn from: new items + rehearsal buffer
    table.to_csv(train_csv, index=False)

    probe = refit_probe(uri, train_csv, cfg, settings, base, crop) if cfg.probe or cfg.lp_ft else None
    start = str(probe.checkpoint) if cfg.lp_ft and probe is not None else uri
    select_best = bool((table["split"] == "val").any())
    tcfg = TrainConfig(
        labels=train_csv,
        out=cfg.out / "finetune",
        init_from=start,
        crop_size=crop,
        epochs=epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_epochs=min(1.0, 0.1 * epochs),
        weight_decay=0.05,
        layer_decay=cfg.layer_decay,
        clip_grad=1.0,
        val_frac=0.0,
        test_frac=0.0,
        select_best=select_best,
        freeze_bn=cfg.freeze_bn,
        average_epochs=0 if select_best else min(cfg.average_epochs, epochs),
        num_crops=base.num_crops,
        aggregation=base.aggregation,
        review=base.thresholds.review,
        block=base.thresholds.block,
        seed=cfg.seed,
        workers=cfg.workers,
        device=cfg.device,
        progress=cfg.progress,
    )
    result = train(tcfg, settings)
    assert result is not None and result.manifest is not None
    manifest = result.manifest
    if cfg.lp_ft or cfg.interpolate < 1:
        manifest = export_finetune(result.checkpoint, start, cfg, settings, base)
    candidates = [Candidate("finetune", result.checkpoint, manifest)]
    if cfg.probe and probe is not None:
        candidates.append(probe)
    return AdaptResult(
        run_dir=cfg.out,
        candidates=candidates,
        new_items=len(new),
        heldout_items=int((table["split"].isin(["val", "test"])).sum()),
        oversample=over,
        rehearsal_size=rehearsal,
        epochs=epochs,
    )


def export_finetune(
    ckpt_dir: Path, start: str, cfg: AdaptConfig, settings: Settings, base: Manifest
) -> Manifest:
    """Rewrite the fine-tune's checkpoint in place: weights ``interpolate`` of the way from its start
    (WiSE-FT: the average of a few-label fine-tune and its start keeps what the start knew and most of what
    the new items taught, and varies less from seed to seed), parent the init checkpoint (not the probe
    an LP-FT run started from).
    """
    tuned = load_checkpoint(str(ckpt_dir), settings)
    a = cfg.interpolate
    if a < 1:
        start_state = load_checkpoint(start, settings).model.state_dict()
        with torch.no_grad():
            for name, t in tuned.model.state_dict().items():
                if t.is_floating_point():
                    t.copy_(a * t + (1 - a) * start_state[name])
    m = tuned.manifest
    fields = m.model_dump(exclude={"format_version", "version", "created_at", "weights_sha256", "golden"})
    fields.update(
        parent_version=base.version,
        metrics={**m.metrics, "interpolate": a, "lp_ft": cfg.lp_ft},
        notes=f"{m.notes}; {'LP-FT, ' if cfg.lp_ft else ''}{a:g} of the way from its start",
    )
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.export")
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = save_checkpoint(tuned.model, tmp, **fields)
    shutil.rmtree(ckpt_dir)
    os.replace(tmp, ckpt_dir)
    return manifest


def refit_probe(
    uri: str, rows: Path, cfg: AdaptConfig, settings: Settings, base: Manifest, crop: int
) -> Candidate:
    """The init checkpoint's frozen backbone with a new linear head, fitted on the train rows of ``rows``."""
    from training.probe import fit_probe, save_probe

    table, _ = load_labels(rows)
    ckpt = load_checkpoint(uri, settings)
    result = fit_probe(
        table,
        ckpt.model,
        settings,
        crop_size=crop,
        mean=base.mean,
        std=base.std,
        num_crops=base.num_crops,
        device=settings.model_copy(update={"device": cfg.device}).resolved_device(),
        seed=cfg.seed,
    )
    manifest = save_probe(
        result,
        cfg.out / "probe",
        arch=base.arch,
        crop_size=crop,
        mean=base.mean,
        std=base.std,
        num_crops=base.num_crops,
        aggregation="mean",
        thresholds=base.thresholds,
        parent_version=base.version,
    )
    return Candidate("probe", cfg.out / "probe", manifest)
