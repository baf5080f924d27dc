"""Thresholds to verdicts, and the explicit rules for provenance.

The thresholds travel in the checkpoint, so a model and its calibration ship together. Provenance has one
rule that can change a verdict: a *trusted* content credential that declares the image AI-made raises it to
the configured verdict (``declared_ai``); it never lowers one. Unsigned metadata (XMP, EXIF) and credentials
that are invalid, tampered or signed by an untrusted key are recorded on the decision and change nothing.
"""

from __future__ import annotations

import math

from worker.records import Provenance, Thresholds, Verdict

DECLARED_AI = "declared_ai"
_SEVERITY = {Verdict.ALLOW: 0, Verdict.REVIEW: 1, Verdict.BLOCK: 2}


def verdict_for(ai_score: float, thresholds: Thresholds) -> Verdict:
    """Raises on a non-finite score: NaN fails every comparison and would silently read as ``allow``."""
    if not math.isfinite(ai_score):
        raise ValueError(f"ai_score {ai_score} is not a finite number")
    if ai_score >= thresholds.block:
        return Verdict.BLOCK
    if ai_score >= thresholds.review:
        return Verdict.REVIEW
    return Verdict.ALLOW


def provenance_verdict(
    verdict: Verdict, provenance: Provenance | None, declared_ai_verdict: str
) -> tuple[Verdict, str | None]:
    """(verdict, rule that set it or None); ``declared_ai_verdict`` is ``block``, ``review`` or ``off``."""
    if provenance is None or not provenance.proven_ai or declared_ai_verdict == "off":
        return verdict, None
    wanted = Verdict(declared_ai_verdict)
    if verdict in _SEVERITY and _SEVERITY[wanted] > _SEVERITY[verdict]:
        return wanted, DECLARED_AI
    return verdict, None
