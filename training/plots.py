"""Evaluation plots: ROC and precision-recall with their AUC in the legend, the chance line and the chosen
operating points; score histograms whose bins follow the scores; a reliability diagram with its ECE.

PNG files (matplotlib's Agg backend, no display). Each PNG also carries its legend in the file's text
metadata (``Legend``), and ``plots.json`` beside them lists every figure's title and legend, so a report
reader (or a test) can check what a figure says without looking at it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

_MARKERS = ("o", "s", "^", "D", "v", "P")


def hist_bins(p: np.ndarray, lo_bins: int = 20, hi_bins: int = 100) -> np.ndarray:
    """Bin edges over the range the scores actually use, as many as the Freedman-Diaconis rule asks for
    (bounded to ``lo_bins``..``hi_bins``): scores crowded near 0 or 1, or in a narrow band, still spread
    over several bins instead of one."""
    p = p[np.isfinite(p)]
    if p.size == 0:
        return np.linspace(0.0, 1.0, lo_bins + 1)
    lo, hi = float(p.min()), float(p.max())
    if hi - lo < 1e-9:  # every score equal: one narrow bin around it
        return np.array([lo - 0.005, hi + 0.005])
    n = len(np.histogram_bin_edges(p, bins="fd", range=(lo, hi))) - 1
    return np.linspace(lo, hi, int(np.clip(n, lo_bins, hi_bins)) + 1)


def reliability(
    y: np.ndarray, p: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Equal-width reliability curve: mean score, fraction positive and count per non-empty bin; ECE."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    conf, frac, count = [], [], []
    for b in range(bins):
        m = which == b
        if m.any():
            conf.append(float(p[m].mean()))
            frac.append(float(y[m].mean()))
            count.append(int(m.sum()))
    c, f, n = np.array(conf), np.array(frac), np.array(count)
    ece = float(np.sum(n / max(1, len(p)) * np.abs(c - f))) if len(n) else 0.0
    return c, f, n, ece


def write_plots(
    out: Path,
    name: str,
    y: np.ndarray,
    p: np.ndarray,
    thresholds: Mapping[str, float] | None = None,
) -> list[str]:
    """roc.png, pr.png (both classes present), hist.png and reliability.png in ``out``; their names.

    ``thresholds`` (label -> score, e.g. ``{"review": 0.5, "precision>=0.9": 0.71}``) are marked on every
    figure as operating points.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=float)
    marks = {k: float(v) for k, v in (thresholds or {}).items() if v is not None}
    figures: dict[str, dict[str, Any]] = {}

    def save(fig: Any, ax: Any, fname: str) -> None:
        handles, labels = ax.get_legend_handles_labels()
        if labels:
            ax.legend(handles, labels, loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100, metadata={"Title": ax.get_title(), "Legend": " | ".join(labels)})
        plt.close(fig)
        figures[fname] = {"title": ax.get_title(), "legend": labels}

    both = 0 < int(y.sum()) < len(y)
    if both:
        fpr, tpr, _ = roc_curve(y, p)
        auc = float(roc_auc_score(y, p))
        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        ax.plot(fpr, tpr, label=f"{name} (ROC AUC = {auc:.3f})")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUC = 0.5)")
        for (label, t), marker in zip(marks.items(), _MARKERS * 4, strict=False):
            pred = p >= t
            x_pt = float(pred[y == 0].mean()) if (y == 0).any() else 0.0
            y_pt = float(pred[y == 1].mean()) if (y == 1).any() else 0.0
            ax.plot([x_pt], [y_pt], marker=marker, linestyle="none", label=f"{label} @ {t:.3f}")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{name}: ROC")
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        save(fig, ax, "roc.png")

        prec, rec, _ = precision_recall_curve(y, p)
        ap = float(average_precision_score(y, p))
        prevalence = float(y.mean())
        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        ax.plot(rec, prec, label=f"{name} (PR AUC = {ap:.3f})")
        ax.axhline(
            prevalence, linestyle="--", color="grey", linewidth=1, label=f"chance (= {prevalence:.3f})"
        )
        for (label, t), marker in zip(marks.items(), _MARKERS * 4, strict=False):
            pred = p >= t
            r_pt = float(pred[y == 1].mean())
            p_pt = float(y[pred].mean()) if pred.any() else 1.0
            ax.plot([r_pt], [p_pt], marker=marker, linestyle="none", label=f"{label} @ {t:.3f}")
        ax.set(xlabel="recall", ylabel="precision", title=f"{name}: precision-recall")
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        save(fig, ax, "pr.png")

    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    edges = hist_bins(p)
    for cls, label in ((0, "real (label 0)"), (1, "AI (label 1)")):
        if (y == cls).any():
            ax.hist(
                p[y == cls], bins=edges.tolist(), alpha=0.6, label=f"{label}, n = {int((y == cls).sum())}"
            )
    for (label, t), style in zip(marks.items(), ("--", ":", "-.", "--") * 4, strict=False):
        ax.axvline(t, color="black", linestyle=style, linewidth=1, label=f"{label} @ {t:.3f}")
    ax.set(xlabel="ai_score", ylabel="items", title=f"{name}: score histogram ({len(edges) - 1} bins)")
    save(fig, ax, "hist.png")

    conf, frac, count, ece = reliability(y, p)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    if len(conf):
        ax.plot(conf, frac, marker="o", label=f"{name} (ECE = {ece:.3f})")
        for c, f, n in zip(conf, frac, count, strict=True):
            ax.annotate(str(n), (c, f), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel="mean ai_score in bin", ylabel="fraction labelled AI", title=f"{name}: reliability")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    save(fig, ax, "reliability.png")

    (out / "plots.json").write_text(json.dumps(figures, indent=2) + "\n")
    return list(figures)
