"""The fine-tuning recipe as plain functions in the order they run (like torchvision's references).

``train(cfg)``: labels (+ overrides, + rehearsal buffer) -> group-aware splits -> loaders of native random
crops -> timm model (random, pretrained file, or an existing checkpoint) -> AdamW (optionally layer-wise LR
decay) with cosine schedule and warmup -> soft-label BCE with ``pos_weight`` under AMP -> EMA, clipping ->
a resumable state every epoch -> the final model in the worker's checkpoint format.

A run directory holds ``config.json``, ``metrics.jsonl`` (one line per epoch), ``splits.csv``, ``state.pt``
(resume) and ``checkpoint/`` (what serving loads). Under ``torchrun`` the same code runs DDP: rank and world
size come from the environment, every rank trains on its shard, rank 0 validates and writes.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from training.data import (
    Augment,
    CropDataset,
    ImageSource,
    TrainingWarning,
    assign_splits,
    expand_weights,
    rehearsal_sample,
)
from training.labels import (
    LabelsError,
    Override,
    apply_overrides,
    load_labels,
    pos_weight_of,
    snapshot_hash,
)
from training.losses import soft_bce
from training.options import TrainConfig
from worker.errors import CheckpointError
from worker.ops.experiments import Tracker, open_tracker
from worker.records import Thresholds
from worker.scoring.checkpoint import (
    Manifest,
    fetch_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from worker.scoring.model import create_model, data_config
from worker.settings import Settings, resolve_device

STATE = "state.pt"


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    manifest: Manifest | None  # None when the run stopped early (stop_after) and is to be resumed
    history: list[dict[str, Any]] = field(default_factory=list)


# --- distributed ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """DDP when launched by ``torchrun`` (WORLD_SIZE > 1), otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    return Dist(rank, world, local)


def train_device(cfg: TrainConfig, d: Dist) -> str:
    dev = resolve_device(cfg.device)
    if dev == "cuda" and d.world > 1:
        return f"cuda:{d.local_rank}"
    return dev


# --- data ---------------------------------------------------------------------------------------------


def resolve_config(cfg: TrainConfig, settings: Settings) -> TrainConfig:
    """Fill what the run starts from: an ``--init-from`` checkpoint's architecture and crop size."""
    if not cfg.init_from:
        return cfg.model_copy(update={"arch": cfg.arch or "convnext_tiny", "crop_size": cfg.crop_size or 224})
    manifest = read_manifest(fetch_checkpoint(init_uri(cfg.init_from, settings), settings))
    if cfg.arch is not None and cfg.arch != manifest.arch:
        raise CheckpointError(
            f"--init-from {cfg.init_from} is a {manifest.arch}, not {cfg.arch}; fix: drop --arch "
            "(the checkpoint records it)"
        )
    return cfg.model_copy(update={"arch": manifest.arch, "crop_size": cfg.crop_size or manifest.crop_size})


def init_uri(init_from: str, settings: Settings) -> str:
    if init_from != "current":
        return init_from
    from worker.lifecycle.registry import open_registry

    current = open_registry(settings).current_uri()
    if current is None:
        raise CheckpointError(
            "--init-from current: the registry has no current version; fix: publish one first"
        )
    return current


def rehearsal_table(path: Path) -> pd.DataFrame:
    """Old labels for the buffer; a run directory means its ``splits.csv`` (so its test split is known)."""
    if path.is_dir():
        path = path / "splits.csv"
    old, _ = load_labels(path)
    if old["split"].isna().all():
        warnings.warn(
            f"rehearsal table {path} has no split column: its old test items cannot be told apart and may be "
            "trained on. Fix: pass the old run's splits.csv (or its run directory)",
            TrainingWarning,
            stacklevel=2,
        )
    return old


def with_rehearsal(df: pd.DataFrame, old: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """``df`` plus ``size`` old training items (never ones already in ``df``), marked as rehearsal rows."""
    old = old[~old["image_uri"].isin(df["image_uri"])]
    buffer = rehearsal_sample(old, size, seed).assign(split="train", weight=1.0, label_source="rehearsal")
    return pd.concat([df, buffer], ignore_index=True)


def build_table(cfg: TrainConfig, overrides: list[Override]) -> pd.DataFrame:
    """Labels + overrides (+ rehearsal buffer), with a split for every row."""
    df, report = load_labels(cfg.labels)
    if overrides:
        df = apply_overrides(df, overrides)
    df = assign_splits(
        df,
        val_frac=cfg.val_frac,
        test_frac=cfg.test_frac,
        seed=cfg.seed,
        min_per_class=cfg.min_heldout_per_class,
    )
    if cfg.rehearsal_labels is not None and cfg.rehearsal_size > 0:
        df = with_rehearsal(df, rehearsal_table(cfg.rehearsal_labels), cfg.rehearsal_size, cfg.seed)
    if cfg.max_items is not None and len(df) > cfg.max_items:
        df = df.sample(n=cfg.max_items, random_state=cfg.seed).sort_index()
    if (df["split"] == "train").sum() == 0:
        raise LabelsError(
            f"no training items left in {cfg.labels} ({report.valid} valid rows, splits "
            f"{df['split'].value_counts().to_dict()}); fix: leave some rows' split empty or set it to train"
        )
    if (df["split"] == "val").sum() == 0:
        warnings.warn(
            "no validation items: the run reports no validation figure and cannot pick its best epoch. "
            "Fix: mark some rows split=val, or add labels",
            TrainingWarning,
            stacklevel=2,
        )
    return df.reset_index(drop=True)


def make_loader(ds: CropDataset, cfg: TrainConfig, d: Dist, cuda: bool) -> torch.utils.data.DataLoader[Any]:
    sampler: torch.utils.data.Sampler[int] | None = None
    if d.world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(ds, d.world, d.rank, seed=cfg.seed)
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=cuda,
        drop_last=len(ds) >= 2 * cfg.batch_size * d.world,
        persistent_workers=cfg.workers > 0,
        generator=g,
    )


# --- model, optimiser, schedule ------------------------------------------------------------------------


def build_model(cfg: TrainConfig, settings: Settings) -> tuple[torch.nn.Module, str | None]:
    """Random init, a pretrained backbone file, or the weights of an existing checkpoint (its version)."""
    from training.pretrained import resolve_pretrained

    assert cfg.arch is not None, "resolve_config first"
    if cfg.init_from:
        uri = init_uri(cfg.init_from, settings)
        ckpt = load_checkpoint(uri, settings)
        if ckpt.manifest.arch != cfg.arch:
            raise CheckpointError(f"--init-from {uri} is a {ckpt.manifest.arch}, not {cfg.arch}")
        model = create_model(cfg.arch, drop_path_rate=cfg.drop_path)
        model.load_state_dict(ckpt.model.state_dict())
        return model, ckpt.manifest.version
    weights = resolve_pretrained(cfg.pretrained_file, cfg.arch, settings.home / "cache" / "pretrained")
    model = create_model(cfg.arch, pretrained_file=weights, drop_path_rate=cfg.drop_path)
    if weights is not None:
        reset_head(model)
    return model, None


def reset_head(model: torch.nn.Module) -> None:
    """A near-zero new head on a pretrained backbone: start at "no opinion" instead of random large logits.

    Some timm inits scale the head by 1/sqrt(fan_out), i.e. U(-1, 1) for one output over 1280 features, which
    starts a fine-tune with logits around +-10 and losses near 10 (seen with mobilenetv2_100).
    """
    head = model.get_classifier()  # type: ignore[operator]
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=1e-3)
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW via timm, which knows each model's layer groups for layer-wise LR decay and no-decay params."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay
    )


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    """Cosine decay to ``min_lr`` with linear warmup, stepped per optimiser update."""
    from timm.scheduler import CosineLRScheduler

    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(
        opt,
        t_initial=total,
        lr_min=cfg.min_lr,
        warmup_t=max(0, warmup),
        warmup_lr_init=cfg.lr * 0.01,
        t_in_epochs=False,
    )


# --- steps --------------------------------------------------------------------------------------------


def train_one_epoch(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader[Any],
    opt: torch.optim.Optimizer,
    sched: Any,
    ema: Any,
    cfg: TrainConfig,
    *,
    pos_weight: float | None,
    mean: Any,
    std: Any,
    device: str,
    step: int,
    show: bool,
) -> tuple[float, int, int]:
    """One pass; returns (mean loss, global step, images seen)."""
    from training.progress import progress
    from worker.scoring.model import to_input

    model.train()
    if cfg.freeze_bn:
        set_bn_eval(model)
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.amp else nullcontext()
    total, n = 0.0, 0
    bar = progress(loader, desc="train", unit="batch", enabled=show)
    for crops, targets in bar:
        x = to_input(crops, mean, std, device, channels_last=cuda)
        y = targets.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        loss = soft_bce(logits, y, pos_weight=pos_weight, label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        step += 1
        sched.step_update(num_updates=step)
        if ema is not None:
            ema.update(model, step=step)
        total += float(loss.item()) * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / max(1, n):.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    return total / max(1, n), step, n


def set_bn_eval(model: torch.nn.Module) -> None:
    """BatchNorm layers normalise with their running statistics and stop updating them.

    A few-label batch is mostly crops of a handful of images: its statistics are noisy, and written into
    the running averages they replace what the start learnt from thousands. The affine weights still train.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def validate(
    model: torch.nn.Module,
    df: pd.DataFrame,
    source: ImageSource,
    cfg: TrainConfig,
    settings: Settings,
    *,
    mean: Any,
    std: Any,
    device: str,
) -> dict[str, float]:
    """ROC-AUC and loss on a split through the serving scorer (quick; ``evaluate`` is the full one)."""
    from sklearn.metrics import roc_auc_score

    from worker.scoring.scorer import Scorer

    if df.empty:
        return {}
    assert cfg.arch is not None and cfg.crop_size is not None
    scorer = Scorer.from_model(
        model,
        settings.model_copy(
            update={"device": device, "num_crops": None, "aggregation": None, "compile": False}
        ),
        arch=cfg.arch,
        crop_size=cfg.crop_size,
        mean=mean,
        std=std,
        num_crops=cfg.num_crops,
        aggregation=cfg.aggregation,
    )
    logits = scorer.image_logits(source.image(u) for u in df["image_uri"])
    y = np.array(df["ai_score"], dtype=np.float64)
    out = {"loss": float(soft_bce(torch.from_numpy(logits), torch.from_numpy(y)).item())}
    hard = (y >= 0.5).astype(int)
    if 0 < hard.sum() < len(hard):
        out["roc_auc"] = float(roc_auc_score(hard, logits))
    return out


# --- state --------------------------------------------------------------------------------------------


def save_state(path: Path, **state: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --- the recipe ---------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    settings: Settings,
    *,
    overrides: list[Override] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> RunResult | None:
    """Run (or resume) a fine-tune; returns the result on rank 0, None on other ranks.

    ``stop_after`` ends this invocation after that many epochs with the state saved (time-boxed jobs on
    preemptible machines); ``resume=True`` continues exactly where it stopped, data order included.
    """
    run = cfg.out
    d = init_distributed(resolve_device(cfg.device))
    device = train_device(cfg, d)
    seed_everything(cfg.seed + d.rank)
    state_path = run / STATE
    if resume:
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"nothing to resume in {run}: no config.json")
        saved = TrainConfig.model_validate_json((run / "config.json").read_text())
        keep = {"workers": cfg.workers, "progress": cfg.progress, "device": cfg.device}
        cfg = saved.model_copy(update=keep)
    else:
        cfg = resolve_config(cfg, settings)
        if d.main:
            if (run / "checkpoint").exists() or state_path.exists():
                raise FileExistsError(f"{run} already holds a run; pass --resume or choose another --out")
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.json").write_text(cfg.model_dump_json(indent=2))
    assert cfg.arch is not None and cfg.crop_size is not None

    if resume and (run / "splits.csv").is_file():
        table = pd.read_csv(run / "splits.csv", dtype={"split": str, "group": str, "source": str})
    else:
        table = build_table(cfg, overrides or [])
        if d.main:
            table.to_csv(run / "splits.csv", index=False)
    train_df = table[table["split"] == "train"]
    val_df = table[table["split"] == "val"]
    source = ImageSource(settings)
    bad = source.preflight(list(table["image_uri"]))
    if bad:
        train_df = train_df[~train_df["image_uri"].isin(bad)]
        val_df = val_df[~val_df["image_uri"].isin(bad)]

    seen_df = expand_weights(train_df)  # oversampled rows appear several times per epoch
    pw = pos_weight_of(seen_df["ai_score"]) if cfg.pos_weight == "auto" else cfg.pos_weight
    model, parent = build_model(cfg, settings)
    if cfg.init_from:
        base = read_manifest(fetch_checkpoint(init_uri(cfg.init_from, settings), settings))
        mean, std = base.mean, base.std
    else:
        mean, std = data_config(cfg.arch)
    model.to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    ds = CropDataset(
        list(seen_df["image_uri"]),
        list(seen_df["ai_score"]),
        source,
        cfg.crop_size,
        Augment(hflip=cfg.hflip, jpeg_prob=cfg.jpeg_prob, resample_prob=cfg.resample_prob),
        seed=cfg.seed,
    )
    loader = make_loader(ds, cfg, d, device.startswith("cuda"))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, len(loader))
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    ddp_model: torch.nn.Module = model
    if d.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if device.startswith("cuda") else None
        )

    start, step, history = 0, 0, []
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start, step = int(state["epoch"]) + 1, int(state["step"])
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        history = history[:start]

    end = cfg.epochs if stop_after is None else min(cfg.epochs, start + stop_after)
    tracker = open_tracker(settings, run) if d.main else Tracker()
    tracker.log_params(cfg.model_dump(mode="json"))
    best_auc, best_epoch, best_state = -1.0, None, None  # select_best: kept in memory, not across a resume
    swa: torch.optim.swa_utils.AveragedModel | None = None  # average_epochs: likewise
    for epoch in range(start, end):
        ds.set_epoch(epoch)
        if loader.generator is not None:  # data order depends on the epoch only, so resuming replays it
            loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        if isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler):
            loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        loss, step, seen = train_one_epoch(
            ddp_model,
            loader,
            opt,
            sched,
            ema,
            cfg,
            pos_weight=pw,
            mean=mean,
            std=std,
            device=device,
            step=step,
            show=cfg.progress and d.main,
        )
        seconds = time.perf_counter() - t0
        if d.main:
            eval_model = ema.module if ema is not None else model
            val = validate(eval_model, val_df, source, cfg, settings, mean=mean, std=std, device=device)
            row = {
                "epoch": epoch,
                "step": step,
                "train_loss": loss,
                "lr": opt.param_groups[0]["lr"],
                "images_per_s": seen * d.world / max(seconds, 1e-9),
                "seconds": seconds,
                **{f"val_{k}": v for k, v in val.items()},
            }
            history.append(row)
            tracker.log_metrics(row, step=epoch)
            if cfg.average_epochs and epoch >= cfg.epochs - cfg.average_epochs:
                if swa is None:
                    swa = torch.optim.swa_utils.AveragedModel(unwrap(eval_model), use_buffers=True)
                swa.update_parameters(unwrap(eval_model))
            if cfg.select_best and "roc_auc" in val and val["roc_auc"] > best_auc:
                best_auc, best_epoch = val["roc_auc"], epoch
                best_state = copy.deepcopy(unwrap(eval_model).state_dict())
            with (run / "metrics.jsonl").open("w") as fh:
                fh.writelines(json.dumps(h) + "\n" for h in history)
            save_state(
                state_path,
                model=model.state_dict(),
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                ema=None if ema is None else ema.state_dict(),
                epoch=epoch,
                step=step,
            )
            if cfg.progress:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                print(json.dumps(shown), flush=True)
        if d.world > 1:
            dist.barrier()
    tracker.close()

    if not d.main:
        dist.destroy_process_group()
        return None
    if end < cfg.epochs:
        return RunResult(run, run / "checkpoint", None, history)
    final = ema.module if ema is not None else model
    chosen = history[-1] if history else {}
    averaged = 0
    if best_state is not None and best_epoch is not None:
        unwrap(final).load_state_dict(best_state)
        chosen = next((h for h in history if h["epoch"] == best_epoch), chosen)
    elif swa is not None:
        averaged = int(swa.n_averaged)
        unwrap(final).load_state_dict(swa.module.state_dict())
    elif cfg.select_best:
        warnings.warn(
            "select_best: no validation ROC-AUC (no val split with both classes); the last epoch is exported",
            TrainingWarning,
            stacklevel=2,
        )
    metrics = {k: v for k, v in chosen.items() if k.startswith("val_")}
    metrics["epoch"] = chosen.get("epoch", cfg.epochs - 1)
    metrics.update(
        {
            "train_items": len(train_df),
            "train_items_per_epoch": len(seen_df),
            "val_items": len(val_df),
            "test_items": int((table["split"] == "test").sum()),
            "pos_weight": pw,
            "epochs": cfg.epochs,
            "dropped_unreadable": len(bad),
            "averaged_epochs": averaged,
        }
    )
    manifest = save_checkpoint(
        unwrap(final).float().cpu(),
        run / "checkpoint",
        arch=cfg.arch,
        crop_size=cfg.crop_size,
        num_crops=cfg.num_crops,
        aggregation=cfg.aggregation,
        mean=mean,
        std=std,
        thresholds=Thresholds(review=cfg.review, block=cfg.block),
        metrics=metrics,
        data_snapshot=snapshot_hash(table),
        parent_version=parent,
        notes=f"fine-tuned {cfg.epochs} epochs on {cfg.labels.name}",
    )
    if d.world > 1:
        dist.destroy_process_group()
    return RunResult(run, run / "checkpoint", manifest, history)
