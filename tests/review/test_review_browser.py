"""End to end in a real browser: sign in, open the queue, open an item, see image and heatmap, override with a
keyboard shortcut; then check the stored decision, the audit entry, the decisions stream and the label.

Set ``REVIEW_SCREENSHOTS=docs/screenshots`` to also write the queue and item page screenshots there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.review.conftest import CROP, PASSWORDS, Server, loaded
from worker.records import Decision, Verdict

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]


def test_moderator_signs_in_reviews_and_overrides_with_a_shortcut(
    browser: Any, review_server: Server, tmp_path: Path
) -> None:
    shots = os.environ.get("REVIEW_SCREENSHOTS")
    store = review_server.store
    waiting = review_server.decided.review_items()
    assert len(waiting) >= 4
    top, second = waiting[0], waiting[1]

    page = browser.new_page(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    page.goto(f"{review_server.url}/queue")
    assert "/login" in page.url  # not signed in: sent to the sign-in page
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shots) / "review-login.png"))
    page.fill("input[name=username]", "mia")
    page.fill("input[name=password]", PASSWORDS["mia"])
    page.click("button[type=submit]")
    page.wait_for_url("**/queue")

    rows = page.locator("table.queue tbody tr")
    assert rows.count() == len(waiting)
    first_href = rows.nth(0).get_attribute("data-href")
    assert first_href is not None and top.event_id in first_href  # highest score first
    for i in range(rows.count()):
        assert loaded(page, f"table.queue tbody tr:nth-child({i + 1}) img.thumb") > 0
    if shots:
        page.screenshot(path=str(Path(shots) / "review-queue.png"), full_page=True)

    page.keyboard.press("j")
    page.keyboard.press("j")
    page.keyboard.press("k")  # selection on the second row
    assert rows.nth(1).get_attribute("class") == "selected"
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/items/{second.event_id}*")

    assert loaded(page, "#image") > 0
    assert loaded(page, "#crop") == CROP
    assert loaded(page, "#heatmap") == CROP  # Grad-CAM rendered at the crop's native size
    assert page.locator("svg.boxes rect.box").count() == len(second.crops)
    deciding = page.locator("svg.boxes rect.box.deciding")
    assert deciding.count() == 1
    assert deciding.get_attribute("data-crop") == str(second.deciding_crop)
    img, rect = page.locator("#image").bounding_box(), deciding.bounding_box()
    assert img is not None and rect is not None and second.image_size is not None
    box, scale = second.crops[second.deciding_crop or 0].box, img["width"] / second.image_size[0]
    assert abs(img["height"] / second.image_size[1] - scale) < 0.01  # aspect ratio kept
    for got, want in ((rect["x"] - img["x"], box.left), (rect["y"] - img["y"], box.top)):
        assert abs(got - want * scale) < 3  # the overlay lines up with the image's pixels
    assert abs(rect["width"] - (box.right - box.left) * scale) < 4
    assert f"{second.ai_score:.3f}" in page.inner_text(".big-score")
    assert "review" in (page.text_content(".timeline") or "")
    if shots:
        page.screenshot(path=str(Path(shots) / "review-item.png"), full_page=True)

    page.keyboard.press("r")  # mark real: on to the next item in the same order
    third, fourth = waiting[2], waiting[3]
    page.wait_for_url(f"**/items/{third.event_id}*")
    assert "Marked real" in page.inner_text(".flash")
    page.keyboard.press("s")  # skip: next item, nothing recorded
    page.wait_for_url(f"**/items/{fourth.event_id}*")
    assert "Skipped" in page.inner_text(".flash")
    assert store.in_review(third.event_id) and store.audit_of(third.event_id) == []
    page.close()
    if shots:
        admin_screenshot(browser, review_server, Path(shots) / "review-admin.png")

    updated = store.get(second.event_id)
    assert updated is not None
    assert updated.verdict == Verdict.ALLOW and updated.source == "moderator:mia"
    assert updated.ai_score == second.ai_score and updated.model_version == second.model_version
    assert not store.in_review(second.event_id) and store.in_review(top.event_id)

    [audit] = [e for e in store.overrides() if e["event_id"] == second.event_id]
    assert audit["moderator"] == "mia" and audit["previous_verdict"] == "review"
    assert audit["verdict"] == "allow" and audit["model_version"] == second.model_version
    assert audit["at"] and store.audit_of(second.event_id) == [audit]

    last_id, last = store.r.xrevrange(store.keys.decisions, count=1)[0]
    assert last_id and Decision.from_json(last["decision"]) == updated

    out = tmp_path / "labels.csv"
    result = CliRunner().invoke(
        _cli(),
        ["labels", "export", "--out", str(out), "--redis-url", review_server.settings.redis_url or "",
         "--namespace", review_server.settings.namespace],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    labels = pd.read_csv(out)
    assert len(labels) == 1
    row = labels.iloc[0]
    assert row["image_uri"] == second.image_uri and row["ai_score"] == 0.0
    assert row["override_verdict"] == "allow" and row["moderator"] == "mia"


def admin_screenshot(browser: Any, server: Server, path: Path) -> None:
    page = browser.new_page(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    page.goto(f"{server.url}/login?next=/admin")
    page.fill("input[name=username]", "ada")
    page.fill("input[name=password]", PASSWORDS["ada"])
    page.click("button[type=submit]")
    page.wait_for_url("**/admin")
    page.screenshot(path=str(path), full_page=True)
    page.close()


def _cli() -> Any:
    from worker.cli.main import app

    return app
