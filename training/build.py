"""``labels build``: production (teacher scores, model decisions, moderator overrides) into one labels table.

The table ``labels report``, ``probe``, ``train`` and ``adapt`` read, with provenance per row so a label can
be traced back: ``teacher_score``; the latest model decision's ``model_score``, ``model_version``,
``model_verdict`` and ``decided_at``; every moderator verdict (``verdicts``: ``who:verdict@when`` oldest
first, ``n_verdicts``, ``n_agree`` with the final one) plus the last ``moderator`` and ``overridden_at``.

Rows are the teacher's items plus every item a moderator labelled; the label (``ai_score``) is the latest
override where there is one (``label_source`` ``override``), the teacher's score otherwise. Model decisions
only add provenance: a model's own scores are no label for its successor.

Decisions come from the Redis decisions stream or from a Parquet archive (a file or a folder of files with
``image_uri``, ``ai_score``, ``model_version`` and optionally ``verdict``, ``decided_at``, ``source``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from training.labels import LabelsError, Override, latest_per_uri

if TYPE_CHECKING:
    from worker.delivery.store import DecisionStore

DECISION_COLUMNS = ["image_uri", "model_score", "model_version", "model_verdict", "decided_at"]


def decisions_from_store(store: DecisionStore, count: int | None = None) -> pd.DataFrame:
    """Model decisions from the ``{ns}:decisions`` stream (moderators' entries there are skipped)."""
    from worker.records import Decision

    rows = []
    for _, fields in store.r.xrange(store.keys.decisions, count=count):
        raw = fields.get("decision") or fields.get(b"decision")
        if raw is None:
            continue
        d = Decision.from_json(raw)
        if d.source != "model":
            continue
        rows.append(
            {
                "image_uri": d.image_uri,
                "model_score": d.ai_score,
                "model_version": d.model_version,
                "model_verdict": d.verdict.value,
                "decided_at": d.decided_at.isoformat(),
            }
        )
    return pd.DataFrame(rows, columns=DECISION_COLUMNS)


def decisions_from_archive(path: str | Path) -> pd.DataFrame:
    """Model decisions from a Parquet file or a folder of them (an archive of decision records)."""
    p = Path(path)
    if not p.exists():
        raise LabelsError(
            f"decisions archive not found: {p}; fix: give the archive's folder or a .parquet file"
        )
    try:
        df = pd.read_parquet(p)
    except Exception as exc:  # pyarrow raises many types for odd folders
        raise LabelsError(f"cannot read decisions archive {p}: {type(exc).__name__}: {exc}") from exc
    missing = [c for c in ("image_uri", "ai_score") if c not in df.columns]
    if missing:
        raise LabelsError(
            f"decisions archive {p} lacks column(s) {missing}; it has {list(df.columns)[:12]}. "
            "Fix: point at the decision records' archive"
        )
    if "source" in df.columns:
        df = df[df["source"].fillna("model").astype(str) == "model"]
    out = pd.DataFrame(
        {
            "image_uri": df["image_uri"].astype(str),
            "model_score": pd.to_numeric(df["ai_score"], errors="coerce"),
            "model_version": df.get("model_version"),
            "model_verdict": df["verdict"].astype(str) if "verdict" in df else None,
            "decided_at": df["decided_at"].astype(str) if "decided_at" in df else None,
        }
    )
    return out[DECISION_COLUMNS]


def build_labels(
    teacher: pd.DataFrame | None, decisions: pd.DataFrame | None, overrides: Sequence[Override]
) -> pd.DataFrame:
    """One row per image: teacher items plus overridden ones, overrides win, provenance columns filled."""
    if teacher is None and not overrides:
        raise LabelsError("nothing to build from: give a teacher table and/or overrides")
    base = teacher.copy() if teacher is not None else pd.DataFrame(columns=["image_uri", "ai_score"])
    for col, default in (("split", None), ("source", "unknown"), ("weight", 1.0)):
        if col not in base:
            base[col] = default
    if "group" not in base:
        base["group"] = base["image_uri"]
    base["teacher_score"] = base["ai_score"]
    base["label_source"] = "teacher"

    latest = latest_per_uri(overrides)
    extra = [
        {
            "image_uri": u,
            "ai_score": o.target,
            "split": None,
            "group": u,
            "source": "override",
            "weight": 1.0,
            "teacher_score": None,
            "label_source": "override",
        }
        for u, o in latest.items()
        if u not in set(base["image_uri"])
    ]
    if extra:
        base = pd.concat([base, pd.DataFrame(extra)], ignore_index=True)
    hit = base["image_uri"].isin(latest.keys())
    base.loc[hit, "ai_score"] = base.loc[hit, "image_uri"].map(lambda u: latest[u].target)
    base.loc[hit, "label_source"] = "override"

    history: dict[str, list[Override]] = {}
    for o in overrides:
        history.setdefault(o.image_uri, []).append(o)
    prov: list[dict[str, Any]] = []
    for u in base["image_uri"]:
        hist = history.get(u, [])
        final = latest.get(u)
        prov.append(
            {
                "verdicts": "; ".join(
                    f"{o.moderator or '?'}:{o.verdict}@{o.at.isoformat() if o.at else '?'}" for o in hist
                )
                or None,
                "n_verdicts": len(hist),
                "n_agree": sum(1 for o in hist if final is not None and o.target == final.target),
                "moderator": final.moderator if final else None,
                "overridden_at": final.at.isoformat() if final and final.at else None,
                "override_model_score": final.model_score if final else None,
            }
        )
    base = pd.concat([base.reset_index(drop=True), pd.DataFrame(prov)], axis=1)

    if decisions is not None and not decisions.empty:
        last = decisions.drop_duplicates("image_uri", keep="last").set_index("image_uri")
        for col in ("model_score", "model_version", "model_verdict", "decided_at"):
            base[col] = base["image_uri"].map(last[col])
    else:
        for col in ("model_score", "model_version", "model_verdict", "decided_at"):
            base[col] = None
    # the score the moderator saw, when no decision record is at hand
    base["model_score"] = base["model_score"].fillna(base.pop("override_model_score"))
    return base


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Parquet, CSV or JSONL by suffix; written next to a temporary name and renamed into place."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        df.to_parquet(tmp, index=False)
    elif suffix == ".csv":
        df.to_csv(tmp, index=False)
    elif suffix in (".jsonl", ".ndjson"):
        df.to_json(tmp, orient="records", lines=True)
    else:
        raise LabelsError(f"{path}: unknown labels format {path.suffix!r}; fix: use .parquet, .csv or .jsonl")
    os.replace(tmp, path)
