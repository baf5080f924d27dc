"""Labels tables: typed validation, overrides from a real Redis stream and from a file, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
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
    ("s3://b/a.jpg", 0.9, "sd", "train"),
    ("s3://b/b.jpg", 0.05, "photo", ""),
    ("s3://b/b.jpg", 0.1, "photo", ""),  # duplicate
    ("s3://b/c.jpg", 1.5, "sd", ""),  # out of range
    ("", 0.3, "", ""),  # no uri
    ("s3://b/d.jpg", "abc", "", ""),  # not a number
    ("s3://b/e.jpg", 0.2, "photo", "holdout"),  # unknown split
    ("s3://b/f.jpg", None, "photo", ""),  # missing score
    ("s3://b/g.jpg", 0.02, "photo", "test"),
    ("s3://b/h.jpg", 0.01, "photo", "val"),
]


def write_csv(path: Path, rows: Sequence[tuple[object, ...]] = ROWS) -> Path:
    pd.DataFrame(rows, columns=["image_uri", "ai_score", "source", "split"]).to_csv(path, index=False)
    return path


def test_validation_keeps_good_rows_and_types_every_bad_one(tmp_path: Path) -> None:
    df, report = load_labels(write_csv(tmp_path / "l.csv"))
    assert list(df["image_uri"]) == ["s3://b/a.jpg", "s3://b/b.jpg", "s3://b/g.jpg", "s3://b/h.jpg"]
    assert report.total == len(ROWS) and report.valid == 4
    assert {b.row: b.reason for b in report.bad} == {
        2: BadRowReason.DUPLICATE_URI,
        3: BadRowReason.SCORE_OUT_OF_RANGE,
        4: BadRowReason.MISSING_URI,
        5: BadRowReason.SCORE_NOT_A_NUMBER,
        6: BadRowReason.UNKNOWN_SPLIT,
        7: BadRowReason.MISSING_SCORE,
    }
    assert df.loc[df.image_uri == "s3://b/b.jpg", "split"].isna().all()
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
    _decide(store, "e1", "s3://b/a.jpg", Verdict.BLOCK, 0.95)  # teacher said AI, moderator allows
    _decide(store, "e2", "s3://b/g.jpg", Verdict.ALLOW, 0.02)  # moderator blocks
    _decide(store, "e3", "s3://b/new.jpg", Verdict.REVIEW, 0.6)  # not in the table, moderator confirms
    store.override("e1", Verdict.ALLOW, "ann")
    store.override("e2", Verdict.BLOCK, "bob")
    store.override("e3", Verdict.REVIEW, "bob")
    overrides = overrides_from_store(store)
    assert [o.target for o in overrides] == [0.0, 1.0, 1.0]

    df, _ = load_labels(write_csv(tmp_path / "l.csv"))
    merged = apply_overrides(df, overrides).set_index("image_uri")
    assert (
        merged.loc["s3://b/a.jpg", "ai_score"] == 0.0 and merged.loc["s3://b/a.jpg", "teacher_score"] == 0.9
    )
    assert (
        merged.loc["s3://b/g.jpg", "ai_score"] == 1.0
        and merged.loc["s3://b/g.jpg", "label_source"] == "override"
    )
    assert merged.loc["s3://b/b.jpg", "label_source"] == "teacher"
    assert merged.loc["s3://b/new.jpg", "ai_score"] == 1.0
    # review -> review is not a disagreement; allow<->block flips are the regression set
    assert sorted(regression_set(overrides)["image_uri"]) == ["s3://b/a.jpg", "s3://b/g.jpg"]
    # items the candidate trained on cannot test it
    assert list(regression_set(overrides, exclude=["s3://b/a.jpg"])["image_uri"]) == ["s3://b/g.jpg"]
    assert summarize(merged.reset_index()).overridden == 3


def test_overrides_file_latest_wins_and_cli_report(tmp_path: Path) -> None:
    pd.DataFrame(
        {
            "image_uri": ["s3://b/a.jpg", "s3://b/a.jpg", "s3://b/b.jpg"],
            "verdict": ["allow", "block", "error"],
        }
    ).to_csv(tmp_path / "ov.csv", index=False)
    ov = overrides_from_file(tmp_path / "ov.csv")
    assert [(o.image_uri, o.target) for o in ov] == [
        ("s3://b/a.jpg", 0.0),
        ("s3://b/a.jpg", 1.0),
    ]  # error is no label
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
    _decide(store, "e1", "s3://b/a.jpg", Verdict.BLOCK, 0.95)
    _decide(store, "e2", "s3://b/g.jpg", Verdict.ALLOW, 0.02)
    store.override("e1", Verdict.ALLOW, "ann")
    store.override("e2", Verdict.BLOCK, "bob")
    write_labels(override_labels(store), tmp_path / "export.parquet")
    ov = {o.image_uri: o for o in overrides_from_file(tmp_path / "export.parquet")}
    assert (ov["s3://b/a.jpg"].target, ov["s3://b/a.jpg"].model_score, ov["s3://b/a.jpg"].disagreed) == (
        0.0,
        0.95,
        True,
    )
    assert (ov["s3://b/g.jpg"].target, ov["s3://b/g.jpg"].moderator) == (1.0, "bob")


def test_relative_paths_resolve_against_the_tables_folder_and_weights_validate(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    pd.DataFrame(
        {
            "image_uri": ["img/a.png", "/abs/b.png", "s3://b/c.png", "img/d.png", "img/e.png"],
            "ai_score": [0.9, 0.1, 0.2, 0.8, 0.7],
            "weight": [4, None, 0, -1, "x"],
        }
    ).to_csv(tmp_path / "data" / "l.csv", index=False)
    df, report = load_labels(tmp_path / "data" / "l.csv")
    assert list(df["image_uri"]) == [str(tmp_path / "data" / "img" / "a.png"), "/abs/b.png", "s3://b/c.png"]
    assert list(df["weight"]) == [4.0, 1.0, 0.0]
    assert [b.reason for b in report.bad] == [BadRowReason.BAD_WEIGHT] * 2
    line = report.bad[0].describe()
    assert line.startswith("row 3 (CSV line 5)") and "fix:" in line and "weight" in line
    pd.DataFrame({"image_uri": ["img/a.png"], "verdict": ["allow"]}).to_csv(tmp_path / "data" / "ov.csv")
    (ov,) = overrides_from_file(tmp_path / "data" / "ov.csv")
    assert ov.image_uri == str(tmp_path / "data" / "img" / "a.png")  # matches the table's row


def test_the_bundled_samples_are_a_valid_labels_table(tmp_path: Path) -> None:
    from tests.training.helpers import invoke
    from worker.samples import sample_dir, sample_labels

    code, out, err = invoke(
        "labels", "report", "-l", str(sample_dir() / "labels.csv"), "--json", cwd=tmp_path
    )
    assert code == 0, err
    rep = json.loads(out)
    assert rep["validation"]["bad"] == [] and rep["summary"]["n"] == len(sample_labels()) == 8
    df, _ = load_labels(sample_dir() / "labels.csv")
    assert all(Path(u).is_file() for u in df["image_uri"])  # resolved next to the table, from any cwd
