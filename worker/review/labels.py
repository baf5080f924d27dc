"""Moderator overrides as a labels table the training pipeline reads (overrides win over the teacher).

Columns: ``image_uri, ai_score, source, group, override_verdict, moderator, at`` and, for tracing,
``verdict`` (the same as ``override_verdict``, the name the trainer's overrides reader expects),
``item_id, event_id, previous_verdict, model_version, model_score``. ``ai_score`` is the label, not the
model's score: a moderator's ``block`` (or ``review``) is 1.0, ``allow`` is 0.0. ``group`` is the item id,
so a group-aware split never puts two overrides of one item on both sides. When an image was overridden
more than once the latest word counts, and every verdict stays visible: ``n_verdicts, n_block, n_allow,
n_agree`` (verdicts equal to the final one), ``moderators`` (in order, ``;``-separated) and ``verdicts``
(JSON: every moderator's verdict with who and when). ``per_verdict=True`` writes one row per verdict
instead, each with the image's ``final_verdict`` and ``final_label`` (for agreement studies, not training).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from worker.delivery.store import DecisionStore
from worker.records import Decision
from worker.review.media import image_source

LABEL_OF = {"block": 1.0, "review": 1.0, "allow": 0.0}
COLUMNS = [
    "image_uri",
    "ai_score",
    "source",
    "group",
    "override_verdict",
    "verdict",
    "moderator",
    "at",
    "item_id",
    "event_id",
    "previous_verdict",
    "model_version",
    "model_score",
    "final_verdict",
    "n_verdicts",
    "n_block",
    "n_allow",
    "n_agree",
    "moderators",
    "verdicts",
]
PER_VERDICT_COLUMNS = [*COLUMNS, "final_label"]


class LabelsError(ValueError):
    """The output path cannot hold a labels table."""


def override_labels(store: DecisionStore, per_verdict: bool = False) -> pd.DataFrame:
    """One row per overridden image (its latest override wins), with every verdict it had; verdicts without
    a label are skipped. ``per_verdict``: one row per verdict instead."""
    by_image: dict[str, list[dict[str, str]]] = {}
    for entry in store.overrides():
        if entry.get("verdict") in LABEL_OF and entry.get("image_uri"):
            uri = entry["image_uri"]
            by_image[uri] = [*by_image.pop(uri, []), entry]  # re-insert: row order follows the latest one
    latest = [entries[-1] for entries in by_image.values()]
    decisions = dict(zip(by_image, store.get_many([e["event_id"] for e in latest]), strict=True))
    rows = []
    for uri, entries in by_image.items():
        final = entries[-1]["verdict"]
        d = decisions[uri]
        votes = {
            "final_verdict": final,
            "n_verdicts": len(entries),
            "n_block": sum(e["verdict"] == "block" for e in entries),
            "n_allow": sum(e["verdict"] == "allow" for e in entries),
            "n_agree": sum(e["verdict"] == final for e in entries),
            "moderators": ";".join(e.get("moderator", "") for e in entries),
            "verdicts": json.dumps(
                [{k: e.get(k, "") for k in ("moderator", "verdict", "at", "note")} for e in entries]
            ),
        }
        for e in entries if per_verdict else entries[-1:]:
            row = _row(e, d)
            row.update(votes)
            if per_verdict:
                row["final_label"] = LABEL_OF[final]
            rows.append(row)
    return pd.DataFrame(rows, columns=PER_VERDICT_COLUMNS if per_verdict else COLUMNS)


def _row(e: dict[str, str], d: Decision | None) -> dict[str, object]:
    return {
        "image_uri": e["image_uri"],
        "ai_score": LABEL_OF[e["verdict"]],
        "source": image_source(d) if d is not None else "",
        "group": e.get("item_id", ""),
        "override_verdict": e["verdict"],
        "verdict": e["verdict"],  # the name training.labels.overrides_from_file reads
        "moderator": e.get("moderator", ""),
        "at": e.get("at", ""),
        "item_id": e.get("item_id", ""),
        "event_id": e["event_id"],
        "previous_verdict": e.get("previous_verdict", ""),
        "model_version": e.get("model_version", ""),
        "model_score": float(e["ai_score"]) if e.get("ai_score") else float("nan"),
    }


def write_labels(df: pd.DataFrame, out: Path) -> None:
    """Parquet or CSV by extension, written to a temporary sibling and renamed into place."""
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise LabelsError(f"{out}: use a .parquet or .csv file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    tmp.replace(out)
