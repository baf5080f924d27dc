"""Evaluation: ranking quality with bootstrap intervals, per-source figures, calibration, thresholds, plots.

Scores come from a checkpoint run through the serving path (``worker.scoring.scorer.Scorer``: checksum and
golden validation, the shared crops, aggregation and calibration), or from a scores table, so every candidate
is judged by one function. Small benchmarks lie easily, so every AUC carries a bootstrap interval, per-source
rows show which part of the data a number comes from (within the source when it holds both classes; the
pooled figure against the other sources is labelled as such), and modified copies of the test images (a
resize, a JPEG re-encode, or both in a row) expose models that learned the file format, not the generator.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, Field
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from training.data import ImageSource, hard_labels, jpeg_reencode, resize, score_uris
from training.plots import write_plots
from worker.settings import Settings

Transform = Callable[[Image.Image], Image.Image]


class Interval(BaseModel):
    value: float | None
    low: float | None = None
    high: float | None = None

    def fmt(self) -> str:
        if self.value is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


class Ranking(BaseModel):
    n: int
    positives: int
    roc_auc: Interval
    pr_auc: Interval


class SourceRow(BaseModel):
    source: str
    n: int
    positives: int
    mean_score: float
    flagged_at_review: float = Field(description="share with score >= the review threshold")
    roc_auc_within: Interval = Field(
        description="both classes of this source only; n/a when the source holds one class"
    )
    roc_auc_pooled_cross_source: Interval = Field(
        description="this source against every other source's items of the other class (cross-source)"
    )


class CalibrationBin(BaseModel):
    mean_predicted: float
    fraction_positive: float
    count: int


class Calibration(BaseModel):
    ece: float
    bins: list[CalibrationBin]


class ThresholdChoice(BaseModel):
    target: str
    threshold: float | None
    precision: float | None = None
    recall: float | None = None
    fpr: float | None = None


class EvalReport(BaseModel):
    name: str
    split: str
    test: Ranking
    train: Ranking | None = None
    train_test_gap: float | None = None
    per_source: list[SourceRow] = Field(default_factory=list)
    calibration: Calibration | None = None
    thresholds: list[ThresholdChoice] = Field(default_factory=list)
    variants: dict[str, Ranking] = Field(default_factory=dict)
    plots: list[str] = Field(default_factory=list)


# --- scoring --------------------------------------------------------------------------------------------


def reencode_jpeg(quality: int) -> Transform:
    return lambda img: jpeg_reencode(img, quality)


def resize_by(factor: float) -> Transform:
    return lambda img: resize(img, factor)


def compose(*steps: Transform) -> Transform:
    """Steps applied left to right, e.g. resize then re-encode (what a platform does to an upload)."""

    def f(img: Image.Image) -> Image.Image:
        for step in steps:
            img = step(img)
        return img

    return f


def parse_variant(spec: str) -> tuple[str, Transform]:
    """``resize:0.5+jpeg:75`` -> (name, transform); steps run left to right."""
    steps: list[Transform] = []
    names: list[str] = []
    for part in spec.split("+"):
        kind, _, value = part.strip().partition(":")
        try:
            if kind == "jpeg":
                q = int(value)
                if not 1 <= q <= 100:
                    raise ValueError
                steps.append(reencode_jpeg(q))
                names.append(f"jpeg_q{q}")
            elif kind == "resize":
                f = float(value)
                if not f > 0:
                    raise ValueError
                steps.append(resize_by(f))
                names.append(f"resize_{f:g}")
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad variant step {part!r} in {spec!r}; fix: use jpeg:QUALITY (1-100) or resize:FACTOR "
                "(> 0), joined with + (e.g. resize:0.5+jpeg:75)"
            ) from None
    return "+".join(names), compose(*steps)


def score_with_checkpoint(
    uri: str,
    uris: Sequence[str],
    settings: Settings,
    *,
    transform: Transform | None = None,
    source: ImageSource | None = None,
) -> np.ndarray:
    """ai_score per image exactly as a worker would compute it (optionally on transformed copies)."""
    from worker.scoring.scorer import Scorer

    return score_uris(Scorer.load(uri, settings), uris, source or ImageSource(settings), transform)


# --- metrics --------------------------------------------------------------------------------------------


def _auc(y: np.ndarray, s: np.ndarray, fn: Callable[..., float]) -> float | None:
    return float(fn(y, s)) if 0 < y.sum() < len(y) else None


def bootstrap(
    y: np.ndarray, s: np.ndarray, fn: Callable[..., float], n_boot: int = 1000, seed: int = 0
) -> Interval:
    """Point estimate with a 95% percentile bootstrap interval (resampling items, stratified by class)."""
    value = _auc(y, s, fn)
    if value is None:
        return Interval(value=None)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    stats = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        stats.append(fn(y[idx], s[idx]))
    low, high = np.percentile(stats, [2.5, 97.5])
    return Interval(value=value, low=float(low), high=float(high))


def ranking(y: np.ndarray, s: np.ndarray, n_boot: int = 1000) -> Ranking:
    return Ranking(
        n=len(y),
        positives=int(y.sum()),
        roc_auc=bootstrap(y, s, roc_auc_score, n_boot),
        pr_auc=bootstrap(y, s, average_precision_score, n_boot),
    )


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> Calibration:
    """Reliability curve on equal-width bins and the expected calibration error."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        conf, acc = float(p[m].mean()), float(y[m].mean())
        ece += m.mean() * abs(conf - acc)
        out.append(CalibrationBin(mean_predicted=conf, fraction_positive=acc, count=int(m.sum())))
    return Calibration(ece=float(ece), bins=out)


def threshold_for_precision(y: np.ndarray, p: np.ndarray, target: float) -> ThresholdChoice:
    """The lowest threshold whose precision reaches ``target`` (most recall at that precision)."""
    prec, rec, thr = precision_recall_curve(y, p)
    ok = np.flatnonzero(prec[:-1] >= target)
    name = f"precision>={target}"
    if not len(ok):
        return ThresholdChoice(target=name, threshold=None)
    i = ok[0]
    return ThresholdChoice(
        target=name, threshold=float(thr[i]), precision=float(prec[i]), recall=float(rec[i])
    )


def threshold_for_fpr(y: np.ndarray, p: np.ndarray, target: float) -> ThresholdChoice:
    """The lowest threshold whose false-positive rate stays at or below ``target``."""
    fpr, tpr, thr = roc_curve(y, p)
    ok = np.flatnonzero(fpr <= target)
    i = ok[-1]
    t = float(min(1.0, thr[i]))
    return ThresholdChoice(target=f"fpr<={target}", threshold=t, recall=float(tpr[i]), fpr=float(fpr[i]))


def per_source(df: pd.DataFrame, review: float, n_boot: int) -> list[SourceRow]:
    y_all = hard_labels(df["ai_score"])
    rows = []
    for name, g in df.groupby("source", sort=True):
        y = hard_labels(g["ai_score"])
        # within: only this source's items (the figure that says whether the model works on this source)
        within = bootstrap(y, g["score"].to_numpy(float), roc_auc_score, n_boot)
        # pooled cross-source: a one-class source against the other sources' items of the other class
        majority = int(y.mean() >= 0.5)
        other = df[(y_all != majority) & (df["source"] != name)]
        both = pd.concat([g, other])
        rows.append(
            SourceRow(
                source=str(name),
                n=len(g),
                positives=int(y.sum()),
                mean_score=float(g["score"].mean()),
                flagged_at_review=float((g["score"] >= review).mean()),
                roc_auc_within=within,
                roc_auc_pooled_cross_source=bootstrap(
                    hard_labels(both["ai_score"]), both["score"].to_numpy(float), roc_auc_score, n_boot
                ),
            )
        )
    return rows


# --- report ---------------------------------------------------------------------------------------------


def evaluate_scores(
    df: pd.DataFrame,
    *,
    name: str,
    split: str = "test",
    review: float = 0.5,
    target_precision: float = 0.9,
    target_fpr: float = 0.01,
    n_boot: int = 1000,
    variants: dict[str, np.ndarray] | None = None,
    out_dir: Path | None = None,
) -> EvalReport:
    """A report from a table with ``ai_score`` (the label), ``score`` (the model), ``split``, ``source``."""
    test = df[df["split"] == split] if split != "all" else df
    if test.empty:
        raise ValueError(
            f"no rows in split {split!r} ({len(df)} rows, splits {df['split'].value_counts().to_dict()}); "
            "fix: choose --split all/val/train, or mark rows split=test"
        )
    y, p = hard_labels(test["ai_score"]), test["score"].to_numpy(float)
    report = EvalReport(name=name, split=split, test=ranking(y, p, n_boot))
    train = df[df["split"] == "train"]
    if split != "train" and not train.empty:
        report.train = ranking(hard_labels(train["ai_score"]), train["score"].to_numpy(float), n_boot)
        if report.train.roc_auc.value is not None and report.test.roc_auc.value is not None:
            report.train_test_gap = report.train.roc_auc.value - report.test.roc_auc.value
    report.per_source = per_source(test, review, n_boot)
    report.calibration = calibration(y, p)
    if 0 < y.sum() < len(y):
        report.thresholds = [
            threshold_for_precision(y, p, target_precision),
            threshold_for_fpr(y, p, target_fpr),
        ]
    for key, scores in (variants or {}).items():
        report.variants[key] = ranking(y, scores, n_boot)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        marks = {"review": review} | {
            t.target: t.threshold for t in report.thresholds if t.threshold is not None
        }
        report.plots = write_plots(out_dir, name, y, p, thresholds=marks)
        (out_dir / "report.json").write_text(report.model_dump_json(indent=2))
        test.assign(label=y).to_csv(out_dir / "scores.csv", index=False)
    return report


def summary_lines(r: EvalReport) -> list[str]:
    lines = [
        f"{r.name} on {r.split} ({r.test.n} items, {r.test.positives} positive): "
        f"ROC-AUC {r.test.roc_auc.fmt()}, PR-AUC {r.test.pr_auc.fmt()}"
    ]
    if r.train is not None:
        gap = "n/a" if r.train_test_gap is None else f"{r.train_test_gap:+.3f}"
        lines.append(f"  train ROC-AUC {r.train.roc_auc.fmt()}; train-test gap {gap}")
    if r.calibration is not None:
        lines.append(f"  ECE {r.calibration.ece:.3f}")
    for t in r.thresholds:
        lines.append(
            f"  threshold for {t.target}: {t.threshold} (precision {t.precision}, recall {t.recall})"
        )
    for s in r.per_source:
        lines.append(
            f"  source {s.source}: n={s.n} pos={s.positives} mean={s.mean_score:.3f} "
            f"flagged={s.flagged_at_review:.1%} AUC within source {s.roc_auc_within.fmt()}, "
            f"pooled cross-source {s.roc_auc_pooled_cross_source.fmt()}"
        )
    for k, v in r.variants.items():
        lines.append(f"  variant {k}: ROC-AUC {v.roc_auc.fmt()}, PR-AUC {v.pr_auc.fmt()}")
    return lines


def report_json(r: EvalReport) -> str:
    return json.dumps(r.model_dump(mode="json"), indent=2)
