"""The distillation loss: BCE against the teacher's soft score, weighted for the class imbalance.

The teacher's ``ai_score`` is a probability, not a hard label, so the target stays soft: a 0.7 teaches "fairly
likely AI", which carries more information than rounding it to 1. ``pos_weight`` (negatives / positives)
stops the ~11% positives of real traffic from being drowned by the negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth(targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Pull targets towards 0.5 by ``label_smoothing`` (0 keeps them)."""
    if not label_smoothing:
        return targets
    return targets * (1.0 - label_smoothing) + 0.5 * label_smoothing


def soft_bce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    pos_weight: float | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean BCE-with-logits of one logit per item against soft targets in [0, 1]."""
    t = smooth(targets.float().reshape(-1), label_smoothing)
    pw = None if pos_weight is None else torch.tensor(float(pos_weight), device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float().reshape(-1), t, pos_weight=pw)
