"""Two moderators in two browser contexts on one queue: claims keep them apart, a stale override is refused
with a page that says what changed, a second review keeps both verdicts, and the audit and the labels export
show every verdict.

``REVIEW_SCREENSHOTS=docs/screenshots`` also writes the team queue and the conflict page there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.review.conftest import PASSWORDS, Decided, Server, page_settings, serving
from worker.records import Verdict

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

BATCH = 3


@pytest.fixture(scope="module")
def team_server(decided: Decided) -> Iterator[Server]:
    """Claims of three items with a long lease; second review on."""
    settings = page_settings(decided, review_claim_batch=BATCH, review_second_review=True)
    with serving(decided, settings) as server:
        yield server


def sign_in(browser: Any, server: Server, name: str) -> Any:
    """A browser context of its own (its own cookies) with ``name`` signed in, on the queue."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{server.url}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")
    page.wait_for_url("**/queue")
    return page


ROWS = "table.queue tbody tr"


def listed(page: Any) -> list[str]:
    """Event ids of the queue rows on this moderator's page, in order."""
    return [str(x) for x in page.eval_on_selector_all(ROWS, "rs => rs.map(r => r.dataset.event)")]


def claimed(page: Any) -> list[str]:
    """The rows marked "claimed by you"."""
    script = "rs => rs.filter(r => r.querySelector('.badge.mine')).map(r => r.dataset.event)"
    return [str(x) for x in page.eval_on_selector_all(ROWS, script)]


def export(server: Server, out: Path) -> pd.DataFrame:
    from worker.cli.main import app

    args = ["labels", "export", "--out", str(out), "--redis-url", server.settings.redis_url or ""]
    result = CliRunner().invoke(app, [*args, "--namespace", server.settings.namespace])
    assert result.exit_code == 0, result.output
    return pd.read_csv(out).set_index("image_uri")


def test_two_moderators_never_hold_the_same_item_and_a_second_review_keeps_both_verdicts(
    browser: Any, team_server: Server, tmp_path: Path
) -> None:
    store = team_server.store
    waiting = [d.event_id for d in team_server.decided.review_items()]
    mia, ada = sign_in(browser, team_server, "mia"), sign_in(browser, team_server, "ada")
    assert listed(mia) == waiting and listed(ada) == waiting  # nothing claimed yet: both see everything

    mia.click("#claim-next")
    mia.wait_for_url("**/items/*")
    assert "You hold 3 items" in mia.inner_text(".flash")
    ada.click("#claim-next")
    ada.wait_for_url("**/items/*")
    mia.goto(f"{team_server.url}/queue")
    ada.goto(f"{team_server.url}/queue")
    mine, hers = claimed(mia), claimed(ada)
    assert len(mine) == BATCH and len(hers) == BATCH and not set(mine) & set(hers)
    assert mine == waiting[:BATCH] and hers == waiting[BATCH : 2 * BATCH]  # each took the next free ones
    assert not set(hers) & set(listed(mia)) and not set(mine) & set(listed(ada))
    assert "3 held by other moderators" in mia.inner_text(".page-head")
    holders = {e: c.moderator for e, c in store.claims().items()}
    assert holders == {**dict.fromkeys(mine, "mia"), **dict.fromkeys(hers, "ada")}

    # ada opens one of mia's items by its address: told who holds it, and cannot act on it
    ada.goto(f"{team_server.url}/items/{mine[0]}")
    assert "mia is reviewing this item" in ada.inner_text("#claimed")
    assert ada.locator("button[value=confirm_ai]").is_disabled()
    assert store.claim_of(mine[0]).moderator == "mia"  # type: ignore[union-attr]

    # mia confirms AI on her first item: with second review it stays queued, for ada, not for mia
    mia.goto(f"{team_server.url}/items/{mine[0]}")
    mia.keyboard.press("a")
    mia.wait_for_url(f"**/items/{mine[1]}*")  # on to her next claimed item
    assert store.in_review(mine[0]) and store.get(mine[0]).verdict == Verdict.BLOCK  # type: ignore[union-attr]
    mia.goto(f"{team_server.url}/queue")
    assert mine[0] not in listed(mia)
    ada.goto(f"{team_server.url}/queue")
    assert mine[0] in listed(ada)
    if shots := os.environ.get("REVIEW_SCREENSHOTS"):
        Path(shots).mkdir(parents=True, exist_ok=True)
        ada.screenshot(path=str(Path(shots) / "review-queue-team.png"), full_page=True)
    assert "second review · blocked by mia" in ada.inner_text(f"tr[data-event='{mine[0]}']")
    ada.goto(f"{team_server.url}/items/{mine[0]}")
    assert "mia confirmed this item AI" in ada.inner_text("#second")
    ada.click("button[value=mark_real]")
    ada.wait_for_url("**/items/*")
    assert "Marked real" in ada.inner_text(".flash")
    assert not store.in_review(mine[0]) and store.get(mine[0]).verdict == Verdict.ALLOW  # type: ignore[union-attr]

    # skipping gives an item back: ada sees mia's skipped item again
    mia.goto(f"{team_server.url}/items/{mine[1]}")
    mia.keyboard.press("s")
    # on to her next claimed item: the skip's redirect, not the skipped page's own address, which would
    # match "**/items/*" before the form was even sent
    mia.wait_for_url(f"**/items/{mine[2]}*")
    assert "Skipped" in mia.inner_text(".flash")
    ada.goto(f"{team_server.url}/queue")
    assert mine[1] in listed(ada)

    [first] = [d for d in team_server.decided.decisions if d.event_id == mine[0]]
    row = export(team_server, tmp_path / "labels.csv").loc[first.image_uri]
    assert row["moderators"] == "mia;ada" and row["n_verdicts"] == 2 and row["n_agree"] == 1
    assert row["final_verdict"] == "allow" and row["ai_score"] == 0.0
    mia.context.close()
    ada.context.close()


def test_a_stale_override_gets_a_409_that_says_what_changed(
    browser: Any, decided: Decided, tmp_path: Path
) -> None:
    """mia's claim runs out while her page is open; ada takes the item and marks it real; mia's late click
    is refused, and the page tells her who did what and when. She then decides on what she now sees."""
    store = decided.store
    settings = page_settings(decided, review_claim_lease_s=1.0)
    with serving(decided, settings) as server:
        mia = sign_in(browser, server, "mia")
        ada = sign_in(browser, server, "ada")
        free = [e for e in listed(mia) if store.claim_of(e) is None]
        target = free[0]
        mia.goto(f"{server.url}/items/{target}")  # opening claims it, for one second
        assert mia.locator(".badge.mine").count() == 1
        deadline = time.monotonic() + 20
        while store.claim_of(target) is not None:  # the lease runs out in Redis' clock
            assert time.monotonic() < deadline, "the lease never expired"
            time.sleep(0.1)

        ada.goto(f"{server.url}/items/{target}")
        assert ada.locator("#claimed").count() == 0  # hers now
        ada.click("button[value=mark_real]")
        ada.wait_for_selector(".flash:has-text('Marked real')")  # the next page, so the POST was served
        assert store.get(target).verdict == Verdict.ALLOW  # type: ignore[union-attr]

        mia.click("button[value=confirm_ai]")  # her page still shows version 0
        mia.wait_for_selector("#conflict")
        text = mia.inner_text("#conflict")
        assert "Not saved" in text and "ada marked it real (review → allow)" in text
        assert "version 1; your page showed version 0" in text and " UTC" in text
        if shots := os.environ.get("REVIEW_SCREENSHOTS"):
            Path(shots).mkdir(parents=True, exist_ok=True)
            mia.screenshot(path=str(Path(shots) / "review-conflict.png"))
        assert store.get(target).verdict == Verdict.ALLOW  # type: ignore[union-attr]
        assert [a["moderator"] for a in store.audit_of(target)] == ["ada"]
        timeline = mia.inner_text(".timeline")
        assert "ada" in timeline  # the page now shows the current decision and its history

        mia.click("button[value=confirm_ai]")  # a deliberate second opinion on version 1
        mia.wait_for_selector(".flash:has-text('Confirmed AI')")
        assert [(a["moderator"], a["verdict"]) for a in store.audit_of(target)] == [
            ("ada", "allow"),
            ("mia", "block"),
        ]

        ada.goto(f"{server.url}/admin")  # the audit log keeps both verdicts
        rows = ada.locator(f"tr:has(a[href='/items/{target}'])")
        assert rows.count() == 2
        assert "mia" in rows.nth(0).inner_text() and "ada" in rows.nth(1).inner_text()  # newest first
        mia.context.close()
        ada.context.close()

    [d] = [x for x in decided.decisions if x.event_id == target]
    row = export(server, tmp_path / "labels.csv").loc[d.image_uri]
    assert row["moderators"] == "ada;mia" and (row["n_block"], row["n_allow"]) == (1, 1)
    assert row["final_verdict"] == "block" and row["ai_score"] == 1.0


def test_bulk_actions_on_a_page_of_the_queue_check_each_rows_version(
    browser: Any, team_server: Server
) -> None:
    store = team_server.store
    ada = sign_in(browser, team_server, "ada")
    rows = listed(ada)
    ada.keyboard.press("x")  # the shortcut ticks the selected row; again unticks it
    assert ada.locator(f"{ROWS}.selected input[type=checkbox]").is_checked()
    ada.keyboard.press("x")
    free = [e for e in rows if store.claim_of(e) is None]  # not held by anyone (mia may still act on them)
    assert len(free) >= 3
    first, second, third = free[:3]
    for e in (first, second, third):
        ada.check(f"tr[data-event='{e}'] input[type=checkbox]")
    assert ada.locator(f"{ROWS} input[type=checkbox]:checked").count() == 3
    v = store.version_of(third)
    store.override(third, Verdict.BLOCK, "mia", expected_version=v)  # changes after ada's page loaded
    ada.click("#bulk button[value=mark_real]")
    flash = ada.inner_text(".flash:has-text('Marked real')")  # the queue again, once the POST was served
    assert "Marked real: 2 items." in flash and "1 not saved" in flash and "mia confirmed it AI" in flash
    for e in (first, second):
        assert store.get(e).verdict == Verdict.ALLOW and store.audit_of(e)[-1]["moderator"] == "ada"  # type: ignore[union-attr]
    assert store.audit_of(third)[-1]["moderator"] == "mia"
    assert first not in listed(ada) and second not in listed(ada)
    ada.context.close()
