"""Every page passes axe-core (WCAG 2.1 A and AA, colour contrast included) at desktop and phone width, the
phone layout never scrolls sideways, and the item page zooms to the image's native pixels.

``REVIEW_SCREENSHOTS=docs/screenshots`` also writes the phone-width queue and item pages there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.review.conftest import PASSWORDS, Server, loaded

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

WCAG = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}}
DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}


def axe_violations(page: Any) -> list[str]:
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page, options=WCAG)
    return [
        f"{v['id']}: {v['help']} at {[n['target'] for n in v['nodes']][:5]}"
        for v in results.response["violations"]
    ]


@pytest.fixture(scope="module")
def pages(review_server: Server) -> list[str]:
    """Every kind of page, with real worker decisions behind it (one item overridden, for a history)."""
    store = review_server.store
    first, second = review_server.decided.review_items()[:2]
    store.override(second.event_id, store.get(second.event_id).verdict, "ada")  # type: ignore[union-attr]
    return ["/queue", f"/items/{first.event_id}", f"/items/{second.event_id}", "/appeals", "/admin"]


def signed_in(browser: Any, server: Server, viewport: dict[str, int], name: str = "ada") -> Any:
    context = browser.new_context(viewport=viewport, device_scale_factor=1)
    page = context.new_page()
    page.goto(f"{server.url}/login")
    assert axe_violations(page) == []  # the sign-in page, before anyone signs in
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")
    page.wait_for_url("**/queue")
    return page


@pytest.fixture(params=["desktop", "phone"])
def page(request: pytest.FixtureRequest, browser: Any, review_server: Server) -> Iterator[Any]:
    p = signed_in(browser, review_server, DESKTOP if request.param == "desktop" else PHONE)
    yield p
    p.context.close()


def test_every_page_is_axe_clean_and_fits_the_width(
    page: Any, review_server: Server, pages: list[str]
) -> None:
    for path in pages:
        page.goto(f"{review_server.url}{path}")
        page.wait_for_load_state("networkidle")
        assert axe_violations(page) == [], path
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} scrolls sideways by {overflow} px at {page.viewport_size}"
        shots = os.environ.get("REVIEW_SCREENSHOTS")
        if shots and page.viewport_size == PHONE and path in ("/queue", pages[1]):
            Path(shots).mkdir(parents=True, exist_ok=True)
            name = "queue" if path == "/queue" else "item"
            page.screenshot(path=str(Path(shots) / f"review-{name}-phone.png"), full_page=True)
    page.keyboard.press("?")  # the shortcuts overlay too
    assert page.locator("#help").is_visible()
    assert axe_violations(page) == []


def test_native_pixels_show_one_image_pixel_per_screen_pixel(
    browser: Any, review_server: Server, pages: list[str]
) -> None:
    page = signed_in(browser, review_server, DESKTOP)
    target = max(review_server.decided.review_items(), key=lambda d: (d.image_size or (0, 0))[0])
    page.goto(f"{review_server.url}/items/{target.event_id}")
    natural = loaded(page, "#image")
    assert natural > 0
    fitted = page.locator("#image").bounding_box()
    page.keyboard.press("z")
    assert page.get_attribute("#zoom", "aria-pressed") == "true"
    zoomed = page.locator("#image").bounding_box()
    assert fitted is not None and zoomed is not None
    assert abs(zoomed["width"] - natural) < 1  # device_scale_factor 1: one CSS pixel per image pixel
    boxes = page.locator("svg.boxes").bounding_box()
    assert boxes is not None and abs(boxes["width"] - zoomed["width"]) < 1  # the overlay follows
    page.click("#zoom")
    back = page.locator("#image").bounding_box()
    assert back is not None and abs(back["width"] - fitted["width"]) < 1
    page.context.close()
