"""Gate and publish: a candidate replaces ``current`` only if the evidence says it is not worse.

Both checks compare candidate and current on the same items, scored on the serving path (checkpoint loaded
and validated like a worker would), with a paired bootstrap of candidate minus current:

* held-out set: ROC-AUC difference; refused when the lower end of its interval is below ``-margin``;
* override regression set (items whose moderator override contradicted the model): agreement with the
  moderators at each model's review threshold; refused when the lower end is below ``-override_margin``, so a
  retrain cannot silently undo corrections a human made.

A point estimate on ten items says nothing, so each set has a minimum size (``min_heldout`` items with
``min_per_class`` of each class; ``min_overrides``) and the gate refuses below it, with the numbers. An empty
override set is not a refusal (nobody corrected the model yet); a small one is. With no ``current`` yet, the
first candidate passes unless an absolute floor ``min_roc_auc`` on the held-out set is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from scipy.stats import rankdata

from training.data import ImageSource, hard_labels, score_uris
from training.options import GatePolicy
from worker.lifecycle.registry import Registry
from worker.scoring.checkpoint import read_manifest
from worker.settings import Settings

DIGITS = 4


class GateCheck(BaseModel):
    name: str
    candidate: float | None
    current: float | None
    passed: bool
    detail: str = ""
    diff: float | None = Field(None, description="candidate minus current")
    diff_low: float | None = None
    diff_high: float | None = None
    n: int = 0

    def line(self) -> str:
        interval = ""
        if self.diff is not None:
            interval = f"; difference {self.diff:+.3f} [{_f(self.diff_low)}, {_f(self.diff_high)}]"
        versus = f"candidate {_f(self.candidate)} vs current {_f(self.current)}"
        return f"{self.name}: {versus}{interval} {self.detail}"


class GateResult(BaseModel):
    candidate_version: str
    current_version: str | None
    passed: bool
    checks: list[GateCheck] = Field(default_factory=list)
    published: bool = False
    promoted: bool = False


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), DIGITS)


# --- statistics (pure functions of score arrays) ----------------------------------------------------------


def auc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row of ``s`` against the matching row of labels ``y`` (Mann-Whitney, ties halved)."""
    ranks: np.ndarray = rankdata(s, axis=-1)
    pos = y.sum(axis=-1)
    neg = y.shape[-1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc: np.ndarray = ((ranks * y).sum(axis=-1) - pos * (pos + 1) / 2) / (pos * neg)
    return auc


def paired_bootstrap(
    y: np.ndarray,
    new: np.ndarray,
    old: np.ndarray,
    *,
    metric: str = "roc_auc",
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(difference, low, high) of ``metric(new) - metric(old)`` resampling the same items for both.

    Resampling is stratified by class so every replicate has both classes (for ROC-AUC).
    ``metric`` is ``roc_auc`` (scores) or ``mean`` (per-item values such as agreement 0/1).
    """
    y = np.asarray(y, dtype=int)
    new, old = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    rng = np.random.default_rng(seed)
    if metric == "roc_auc":
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        idx = np.concatenate(
            [
                pos[rng.integers(0, len(pos), (n_boot, len(pos)))],
                neg[rng.integers(0, len(neg), (n_boot, len(neg)))],
            ],
            axis=1,
        )
        yb = y[idx]
        diffs = auc_rows(yb, new[idx]) - auc_rows(yb, old[idx])
        point = float(auc_rows(y[None], new[None])[0] - auc_rows(y[None], old[None])[0])
    elif metric == "mean":
        idx = rng.integers(0, len(y), (n_boot, len(y)))
        diffs = new[idx].mean(axis=1) - old[idx].mean(axis=1)
        point = float(new.mean() - old.mean())
    else:
        raise ValueError(f"unknown metric {metric!r}")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    return point, float(low), float(high)


def heldout_check(
    y: np.ndarray, new: np.ndarray, old: np.ndarray | None, policy: GatePolicy
) -> list[GateCheck]:
    """Size, floor and paired ROC-AUC checks on a held-out set (``old`` None: no current to compare)."""
    y = np.asarray(y, dtype=int)
    n, n_pos = len(y), int(y.sum())
    n_neg = n - n_pos
    checks: list[GateCheck] = []
    if n < policy.min_heldout or min(n_pos, n_neg) < max(1, policy.min_per_class):
        checks.append(
            GateCheck(
                name="heldout_size",
                candidate=None,
                current=None,
                passed=False,
                n=n,
                detail=(
                    f"{n} held-out items ({n_pos} AI, {n_neg} real); the gate needs at least "
                    f"{policy.min_heldout} with {policy.min_per_class} of each class. Fix: hold out more "
                    "labelled items (split=test) or lower --min-heldout/--min-per-class knowingly"
                ),
            )
        )
        return checks
    new_auc = float(auc_rows(y[None], np.asarray(new, float)[None])[0])
    if policy.min_roc_auc is not None:
        checks.append(
            GateCheck(
                name="min_roc_auc",
                candidate=_r(new_auc),
                current=policy.min_roc_auc,
                passed=new_auc >= policy.min_roc_auc,
                n=n,
                detail="absolute floor",
            )
        )
    if old is None:
        return checks
    old_auc = float(auc_rows(y[None], np.asarray(old, float)[None])[0])
    diff, low, high = paired_bootstrap(
        y, new, old, n_boot=policy.n_boot, confidence=policy.confidence, seed=policy.seed
    )
    checks.append(
        GateCheck(
            name="heldout_roc_auc",
            candidate=_r(new_auc),
            current=_r(old_auc),
            diff=_r(diff),
            diff_low=_r(low),
            diff_high=_r(high),
            passed=low >= -policy.margin,
            n=n,
            detail=f"{n} items; refused when the interval's lower end is below -{policy.margin:g}",
        )
    )
    return checks


def override_check(
    y: np.ndarray, new: np.ndarray, old: np.ndarray, new_review: float, old_review: float, policy: GatePolicy
) -> GateCheck:
    """Agreement with moderators on the regression set, candidate minus current, paired."""
    y = np.asarray(y, dtype=int)
    n = len(y)
    if n == 0:
        return GateCheck(
            name="override_agreement", candidate=None, current=None, passed=True, detail="no overrides"
        )
    if n < policy.min_overrides:
        return GateCheck(
            name="override_agreement",
            candidate=None,
            current=None,
            passed=False,
            n=n,
            detail=(
                f"{n} override items; the gate needs at least {policy.min_overrides} to judge them. "
                "Fix: review more items, or lower --min-overrides knowingly"
            ),
        )
    agree_new = ((np.asarray(new) >= new_review).astype(int) == y).astype(float)
    agree_old = ((np.asarray(old) >= old_review).astype(int) == y).astype(float)
    diff, low, high = paired_bootstrap(
        y,
        agree_new,
        agree_old,
        metric="mean",
        n_boot=policy.n_boot,
        confidence=policy.confidence,
        seed=policy.seed,
    )
    return GateCheck(
        name="override_agreement",
        candidate=_r(agree_new.mean()),
        current=_r(agree_old.mean()),
        diff=_r(diff),
        diff_low=_r(low),
        diff_high=_r(high),
        passed=low >= -policy.override_margin,
        n=n,
        detail=f"{n} items; refused when the interval's lower end is below -{policy.override_margin:g}",
    )


# --- on checkpoints ----------------------------------------------------------------------------------------


def gate(
    candidate: Path,
    heldout: pd.DataFrame,
    regression: pd.DataFrame,
    registry: Registry,
    settings: Settings,
    policy: GatePolicy | None = None,
) -> GateResult:
    """Score candidate and current on the same items and apply ``policy``; publishes nothing."""
    from worker.scoring.scorer import Scorer

    policy = policy or GatePolicy()
    cand = read_manifest(candidate)
    pointer = registry.pointer()  # read once: version and URI of the same current
    current_uri = None if pointer is None else registry.uri_for(pointer.version)
    result = GateResult(
        candidate_version=cand.version, current_version=pointer and pointer.version, passed=True
    )
    src = ImageSource(settings)
    new_scorer = Scorer.load(str(candidate), settings)
    old_scorer = None if current_uri is None else Scorer.load(current_uri, settings)

    def scores(scorer: Scorer, df: pd.DataFrame) -> np.ndarray:
        return score_uris(scorer, list(df["image_uri"]), src)

    y = hard_labels(heldout["ai_score"]) if not heldout.empty else np.zeros(0, dtype=int)
    uses_heldout = old_scorer is not None or policy.min_roc_auc is not None
    if uses_heldout:
        big_enough = (
            len(y) >= policy.min_heldout and min(int(y.sum()), len(y) - int(y.sum())) >= policy.min_per_class
        )
        new = scores(new_scorer, heldout) if big_enough else np.zeros(len(y))
        old = scores(old_scorer, heldout) if big_enough and old_scorer is not None else None
        result.checks += heldout_check(y, new, old, policy)
    if old_scorer is None:
        result.checks.append(GateCheck(name="first version", candidate=None, current=None, passed=True))
    else:
        yr = hard_labels(regression["ai_score"]) if not regression.empty else np.zeros(0, dtype=int)
        enough = len(yr) >= policy.min_overrides
        result.checks.append(
            override_check(
                yr,
                scores(new_scorer, regression) if enough and len(yr) else np.zeros(len(yr)),
                scores(old_scorer, regression) if enough and len(yr) else np.zeros(len(yr)),
                cand.thresholds.review,
                old_scorer.manifest.thresholds.review,
                policy,
            )
        )
    result.passed = all(c.passed for c in result.checks)
    return result


def gate_and_publish(
    candidate: Path,
    heldout: pd.DataFrame,
    regression: pd.DataFrame,
    registry: Registry,
    settings: Settings,
    policy: GatePolicy | None = None,
    *,
    by: str = "training",
) -> GateResult:
    """Publish the candidate as an immutable version and flip ``current`` to it, only if the gate passes."""
    result = gate(candidate, heldout, regression, registry, settings, policy)
    return publish_if_passed(result, candidate, registry, settings, by=by)


def publish_if_passed(
    result: GateResult, candidate: Path, registry: Registry, settings: Settings, *, by: str = "training"
) -> GateResult:
    now_current = registry.current_version()
    if result.passed and now_current != result.current_version:
        # someone promoted or rolled back while we scored: the comparison no longer holds
        result.checks.append(
            GateCheck(
                name="current unchanged",
                candidate=None,
                current=None,
                passed=False,
                detail=f"current moved from {result.current_version} to {now_current} during the gate",
            )
        )
        result.passed = False
    if result.passed:
        registry.publish(candidate, promote=True, by=by)
        result.published = result.promoted = True
        notify_workers(settings, result.candidate_version, by)
    return result


def notify_workers(settings: Settings, version: str, by: str) -> bool:
    """Wake running workers so they hot-reload now; best effort, they also poll the pointer."""
    if not settings.redis_url:
        return False
    import redis

    from worker.lifecycle.reload import notify

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        return notify(client, settings.namespace, "promote", version, by)
    finally:
        client.close()
