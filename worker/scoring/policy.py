"""Thresholds to verdicts.

The thresholds travel in the checkpoint, so a model and its calibration ship together.
"""

from __future__ import annotations

import math

from worker.records import Thresholds, Verdict


def verdict_for(ai_score: float, thresholds: Thresholds) -> Verdict:
    """Raises on a non-finite score: NaN fails every comparison and would silently read as ``allow``."""
    if not math.isfinite(ai_score):
        raise ValueError(f"ai_score {ai_score} is not a finite number")
    if ai_score >= thresholds.block:
        return Verdict.BLOCK
    if ai_score >= thresholds.review:
        return Verdict.REVIEW
    return Verdict.ALLOW
