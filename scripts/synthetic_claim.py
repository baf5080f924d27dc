#!/usr/bin/env python
"""Print the synthetic central-claim figures: native crops vs resized inputs, and pos_weight under imbalance.

PYTHONPATH=. .venv/bin/python scripts/synthetic_claim.py [--json]
"""

from __future__ import annotations

import json
import sys
import time

from training.synthetic import SyntheticConfig, run_claim


def main() -> None:
    t0 = time.perf_counter()
    report = run_claim(SyntheticConfig())
    if "--json" in sys.argv:
        print(json.dumps(report.to_dict(), indent=2))
        return
    c = report.config
    print(
        f"{c.n_train} train / {c.n_test} test images of {c.image_size}px, {c.crop_size}px inputs, "
        f"timm {c.arch}, {c.epochs} epochs (imbalanced: {c.imbalanced_n_train} items, "
        f"{c.imbalanced_pos_share:.0%} positives, {c.imbalanced_epochs} epoch)"
    )
    print(f"{'arm':<24}{'ROC-AUC':>9}{'recall@0.5':>12}{'bal.acc@0.5':>13}{'seconds':>9}")
    for a in report.arms:
        print(
            f"{a.name:<24}{a.roc_auc:>9.3f}{a.recall_at_half:>12.3f}"
            f"{a.balanced_accuracy_at_half:>13.3f}{a.seconds:>9.1f}"
        )
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
