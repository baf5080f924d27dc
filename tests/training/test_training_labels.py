"""Labels tables: typed validation, overrides from a real Redis stream and from a file, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import subprocess_env
from training.labels import (
    BadRowReason,
    LabelsError,
    apply_overrides,
    load_labels,
    overrides_from_file,
    overrides_from_store,
    regression_set,
    summarize,
)
from worker.delivery.store import DecisionStore
from worker.records import Decision, Verdict

ROWS = [
    ("a.jpg", 0.9, "sd", "train"),
    ("b.jpg", 0.05, "photo", ""),
    ("b.jpg", 0.1, "photo", ""),  # duplicate
    ("c.jpg", 1.5, "sd", ""),  # out of range
    ("", 0.3, "", ""),  # no uri
    ("d.jpg", "abc", "", ""),  # not a number
    ("e.jpg", 0.2, "photo", "holdout"),  # unknown split
    ("f.jpg", None, "photo", ""),  # missing score
    ("g.jpg", 0.02, "photo", "test"),
    ("h.jpg", 0.01, "photo", "val"),
]


def write_csv(path: Path, rows: list[tuple[object, ...]] = ROWS) -> Path:
    pd.DataFrame(rows, columns=["image_uri", "ai_score", "source", "split"]).to_csv(path, index=False)
    return path


def test_validation_keeps_good_rows_and_types_every_bad_one(tmp_path: Path) -> None:
    df, report = load_labels(write_csv(tmp_path / "l.csv"))
    assert list(df["image_uri"]) == ["a.jpg", "b.jpg", "g.jpg", "h.jpg"]
    assert report.total == len(ROWS) and report.valid == 4
    assert {b.row: b.reason for b in report.bad} == {
        2: BadRowReason.DUPLICATE_URI,
        3: BadRowReason.SCORE_OUT_OF_RANGE,
        4: BadRowReason.MISSING_URI,
        5: BadRowReason.SCORE_NOT_A_NUMBER,
        6: BadRowReason.UNKNOWN_SPLIT,
        7: BadRowReason.MISSING_SCORE,
    }
    assert df.loc[df.image_uri == "b.jpg", "split"].isna().all()
    assert (df["group"] == df["image_uri"]).all()  # no group column: each image is its own group


def test_parquet_and_clear_errors(tmp_path: Path) -> None:
    pd.DataFrame({"image_uri": ["x", "y"], "ai_score": [0.2, 0.7], "group": ["g", "g"]}).to_parquet(
        tmp_path / "l.parquet"
    )
    df, report = load_labels(tmp_path / "l.parquet")
    assert report.bad == [] and list(df["group"]) == ["g", "g"]
    with pytest.raises(LabelsError, match="not found"):
        load_labels(tmp_path / "missing.csv")
    pd.DataFrame({"uri": ["x"], "score": [0.1]}).to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(LabelsError, match="required column"):
        load_labels(tmp_path / "cols.csv")


def test_summary_shares_and_pos_weight(tmp_path: Path) -> None:
    rows = [(f"p{i}", 0.8, "gen", "") for i in range(2)] + [(f"n{i}", 0.05, "cam", "") for i in range(6)]
    df, _ = load_labels(write_csv(tmp_path / "l.csv", rows))
    s = summarize(df)
    assert (s.n, s.positives, s.negatives) == (8, 2, 6)
    assert s.share_low == pytest.approx(0.75) and s.share_high == pytest.approx(0.25)
    assert s.pos_weight == pytest.approx(3.0)
    assert {x.source: x.positives for x in s.per_source} == {"cam": 0, "gen": 2}


def _decide(store: DecisionStore, event_id: str, uri: str, verdict: Verdict, score: float) -> None:
    store.write(Decision(item_id=event_id, event_id=event_id, image_uri=uri, verdict=verdict, ai_score=score))


def test_overrides_from_the_real_redis_stream_win_over_the_teacher(redis_url: str, tmp_path: Path) -> None:
    store = DecisionStore.from_url(redis_url, "t")
    _decide(store, "e1", "a.jpg", Verdict.BLOCK, 0.95)  # teacher said AI, moderator allows
    _decide(store, "e2", "g.jpg", Verdict.ALLOW, 0.02)  # moderator blocks
    _decide(store, "e3", "new.jpg", Verdict.REVIEW, 0.6)  # not in the table, moderator confirms
    store.override("e1", Verdict.ALLOW, "ann")
    store.override("e2", Verdict.BLOCK, "bob")
    store.override("e3", Verdict.REVIEW, "bob")
    overrides = overrides_from_store(store)
    assert [o.target for o in overrides] == [0.0, 1.0, 1.0]

    df, _ = load_labels(write_csv(tmp_path / "l.csv"))
    merged = apply_overrides(df, overrides).set_index("image_uri")
    assert merged.loc["a.jpg", "ai_score"] == 0.0 and merged.loc["a.jpg", "teacher_score"] == 0.9
    assert merged.loc["g.jpg", "ai_score"] == 1.0 and merged.loc["g.jpg", "label_source"] == "override"
    assert merged.loc["b.jpg", "label_source"] == "teacher"
    assert merged.loc["new.jpg", "ai_score"] == 1.0
    # review -> review is not a disagreement; allow<->block flips are the regression set
    assert sorted(regression_set(overrides)["image_uri"]) == ["a.jpg", "g.jpg"]
    # items the candidate trained on cannot test it
    assert list(regression_set(overrides, exclude=["a.jpg"])["image_uri"]) == ["g.jpg"]
    assert summarize(merged.reset_index()).overridden == 3


def test_overrides_file_latest_wins_and_cli_report(tmp_path: Path) -> None:
    pd.DataFrame({"image_uri": ["a.jpg", "a.jpg", "b.jpg"], "verdict": ["allow", "block", "error"]}).to_csv(
        tmp_path / "ov.csv", index=False
    )
    ov = overrides_from_file(tmp_path / "ov.csv")
    assert [(o.image_uri, o.target) for o in ov] == [("a.jpg", 0.0), ("a.jpg", 1.0)]  # error is no label
    write_csv(tmp_path / "l.csv")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            *("labels", "report", "-l", "l.csv"),
            *("--overrides-file", "ov.csv", "--json"),
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["validation"]["by_reason"]["duplicate_uri"] == 1
    assert rep["summary"]["overridden"] == 1 and rep["summary"]["positives"] == 1
    bad = subprocess.run(
        [sys.executable, "-m", "worker", "labels", "report", "-l", "nope.csv"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr


def test_help_for_every_training_command(tmp_path: Path) -> None:
    from tests.training.helpers import invoke

    for args in (
        ("labels", "report"),
        ("train",),
        ("probe",),
        ("evaluate",),
        ("gate",),
        ("retrain",),
        ("retrain", "status"),
        ("train-worker",),
    ):
        code, out, err = invoke(*args, "--help", cwd=tmp_path)
        assert code == 0 and "Usage" in out, (args, err)


def test_the_review_pages_labels_export_is_an_overrides_file(redis_url: str, tmp_path: Path) -> None:
    from worker.review.labels import override_labels, write_labels

    store = DecisionStore.from_url(redis_url, "rx")
    _decide(store, "e1", "a.jpg", Verdict.BLOCK, 0.95)
    _decide(store, "e2", "g.jpg", Verdict.ALLOW, 0.02)
    store.override("e1", Verdict.ALLOW, "ann")
    store.override("e2", Verdict.BLOCK, "bob")
    write_labels(override_labels(store), tmp_path / "export.parquet")
    ov = {o.image_uri: o for o in overrides_from_file(tmp_path / "export.parquet")}
    assert (ov["a.jpg"].target, ov["a.jpg"].model_score, ov["a.jpg"].disagreed) == (0.0, 0.95, True)
    assert (ov["g.jpg"].target, ov["g.jpg"].moderator) == (1.0, "bob")
