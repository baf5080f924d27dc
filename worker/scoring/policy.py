"""Thresholds to verdicts.

The thresholds travel in the checkpoint, so a model and its calibration ship together.
"""

from __future__ import annotations

from worker.records import Thresholds, Verdict


def verdict_for(ai_score: float, thresholds: Thresholds) -> Verdict:
    if ai_score >= thresholds.block:
        return Verdict.BLOCK
    if ai_score >= thresholds.review:
        return Verdict.REVIEW
    return Verdict.ALLOW
