#!/usr/bin/env python
"""Write the example evaluation figures shown in docs/training.md (docs/img/evaluation/).

Synthetic scores, deterministic (seed 0): 600 items, AI-labelled ones scored Beta(2.5, 2), real ones
Beta(1, 4),
so the classes overlap as they do on a hard benchmark. Run from the repository root:

    python scripts/training_plots_example.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.evaluate import evaluate_scores  # noqa: E402

OUT = ROOT / "docs" / "img" / "evaluation"


def main() -> int:
    rng = np.random.default_rng(0)
    n = 600
    y = rng.integers(0, 2, n)
    df = pd.DataFrame(
        {
            "image_uri": [f"file:///example/{i}.jpg" for i in range(n)],
            "ai_score": y.astype(float),
            "score": np.where(y == 1, rng.beta(2.5, 2, n), rng.beta(1, 4, n)),
            "split": "test",
            "source": np.where(y == 1, "generator", "camera"),
        }
    )
    report = evaluate_scores(df, name="example", n_boot=200, out_dir=OUT)
    (OUT / "scores.csv").unlink(missing_ok=True)  # not needed for the docs
    print(f"wrote {', '.join(report.plots)} to {OUT}; ROC AUC {report.test.roc_auc.fmt()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
