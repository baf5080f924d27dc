"""Gate and publish: a candidate replaces ``current`` only if it is not worse where it matters.

Two checks, both on the serving path (checkpoint loaded and validated like a worker would):

* held-out set: candidate ROC-AUC >= current ROC-AUC - ``tolerance``;
* override regression set (items whose moderator override contradicted the model): the candidate must agree
  with the moderators on at least as many of them as ``current`` does, so a retrain cannot silently undo a
  correction a human made.

With no ``current`` yet, the first candidate passes (there is nothing to regress from) unless an absolute
floor ``min_roc_auc`` on the held-out set is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from sklearn.metrics import roc_auc_score

from training.data import ImageSource, hard_labels
from training.evaluate import score_with_checkpoint
from worker.lifecycle.registry import Registry
from worker.scoring.checkpoint import read_manifest
from worker.settings import Settings


class GateCheck(BaseModel):
    name: str
    candidate: float | None
    current: float | None
    passed: bool
    detail: str = ""


class GateResult(BaseModel):
    candidate_version: str
    current_version: str | None
    passed: bool
    checks: list[GateCheck] = Field(default_factory=list)
    published: bool = False
    promoted: bool = False


def _auc(df: pd.DataFrame, s: np.ndarray) -> float | None:
    y = hard_labels(df["ai_score"])
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def _agreement(df: pd.DataFrame, s: np.ndarray, review: float) -> float:
    return float(((s >= review).astype(int) == hard_labels(df["ai_score"])).mean())


def gate(
    candidate: Path,
    heldout: pd.DataFrame,
    regression: pd.DataFrame,
    registry: Registry,
    settings: Settings,
    *,
    tolerance: float = 0.0,
    min_roc_auc: float | None = None,
) -> GateResult:
    cand = read_manifest(candidate)
    pointer = registry.pointer()  # read once: version and URI of the same current
    current_uri = None if pointer is None else registry.uri_for(pointer.version)
    result = GateResult(
        candidate_version=cand.version, current_version=pointer and pointer.version, passed=True
    )
    src = ImageSource(settings)
    scored: dict[int, np.ndarray] = {}  # the candidate's scores per table: each table is scored once

    def candidate_scores(df: pd.DataFrame) -> np.ndarray:
        if id(df) not in scored:
            uris = list(df["image_uri"])
            scored[id(df)] = score_with_checkpoint(str(candidate), uris, settings, source=src)
        return scored[id(df)]

    if min_roc_auc is not None and not heldout.empty:
        # an absolute floor: without it the first version of a registry passes whatever it is
        auc = _auc(heldout, candidate_scores(heldout))
        ok = auc is None or auc >= min_roc_auc
        result.checks.append(
            GateCheck(name="min_roc_auc", candidate=auc, current=min_roc_auc, passed=ok, detail="floor")
        )
    if current_uri is None:
        result.checks.append(GateCheck(name="first version", candidate=None, current=None, passed=True))
        result.passed = all(c.passed for c in result.checks)
        return result
    for name, df in (("heldout_roc_auc", heldout), ("override_agreement", regression)):
        if df.empty:
            result.checks.append(
                GateCheck(name=name, candidate=None, current=None, passed=True, detail="no items")
            )
            continue
        uris = list(df["image_uri"])
        s_new = candidate_scores(df)
        s_old = score_with_checkpoint(current_uri, uris, settings, source=src)
        if name == "heldout_roc_auc":
            new, old = _auc(df, s_new), _auc(df, s_old)
            ok = new is None or old is None or new >= old - tolerance
        else:
            current_review = registry.manifest(result.current_version or "").thresholds.review
            new = _agreement(df, s_new, cand.thresholds.review)
            old = _agreement(df, s_old, current_review)
            ok = new >= old
        result.checks.append(
            GateCheck(name=name, candidate=new, current=old, passed=ok, detail=f"{len(df)} items")
        )
    result.passed = all(c.passed for c in result.checks)
    return result


def gate_and_publish(
    candidate: Path,
    heldout: pd.DataFrame,
    regression: pd.DataFrame,
    registry: Registry,
    settings: Settings,
    *,
    tolerance: float = 0.0,
    min_roc_auc: float | None = None,
    by: str = "training",
) -> GateResult:
    """Publish the candidate as an immutable version; flip ``current`` to it only if the gate passes."""
    result = gate(
        candidate, heldout, regression, registry, settings, tolerance=tolerance, min_roc_auc=min_roc_auc
    )
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
