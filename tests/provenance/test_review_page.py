"""The item page shows the provenance record and the matched original beside the image (a real server)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.provenance import credentials as cr
from tests.served import served
from worker.delivery.store import DecisionStore
from worker.media.provenance import ProvenanceReader
from worker.records import Decision, MatchedEvent, Verdict
from worker.review.app import create_app
from worker.review.auth import User, hash_password, write_user
from worker.settings import Settings

PASSWORD = "mia-password-1"


@pytest.fixture
def page(
    tmp_path: Path, redis_url: str, trust_file: Path, trusted_chain: cr.Chain
) -> Iterator[tuple[str, dict[str, Decision]]]:
    settings = Settings(
        home=tmp_path / "home",
        redis_url=redis_url,
        namespace=f"pv{uuid.uuid4().hex[:8]}",
        device="cpu",
        provenance_trust_anchors=trust_file,
        review_users_file=tmp_path / "users.json",
    )
    write_user(tmp_path / "users.json", User(name="mia", hash=hash_password(PASSWORD)))
    hostile = cr.make_chain('Evil <script>alert("x")</script> Corp')
    files = {
        "orig.jpg": cr.sign(cr.photo(seed=1), trusted_chain),
        "copy.jpg": cr.sign(cr.photo(seed=1), hostile),
    }
    reader = ProvenanceReader(settings)
    decisions = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        decisions[name] = Decision(
            item_id=f"item-{name}",
            event_id=f"event-{name}",
            image_uri=str(tmp_path / name),
            verdict=Verdict.REVIEW,
            ai_score=0.7,
            image_size=(320, 240),
            provenance=reader.read(data),
        )
    orig = decisions["orig.jpg"]
    decisions["copy.jpg"] = decisions["copy.jpg"].model_copy(
        update={
            "verdict": Verdict.BLOCK,
            "source": "duplicate",
            "matched_event": MatchedEvent(
                event_id=orig.event_id, item_id=orig.item_id, distance=6, source="moderator:mia"
            ),
        }
    )
    store = DecisionStore.from_url(redis_url, settings.namespace)
    assert all(store.write_many(decisions.values()))
    with served(create_app(settings)) as url:
        yield url, decisions


def test_item_page_shows_provenance_and_the_matched_original(page: tuple[str, dict[str, Decision]]) -> None:
    url, decisions = page
    with httpx.Client(base_url=url, timeout=30) as c:
        token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text)
        assert token
        r = c.post(
            "/login",
            data={"username": "mia", "password": PASSWORD, "csrf_token": token.group(1), "next": "/queue"},
            headers={"Origin": url},
        )
        assert r.status_code in (200, 303)

        orig = c.get(f"/items/{decisions['orig.jpg'].event_id}").text
        assert 'id="provenance"' in orig
        assert "trusted (Trusted)" in orig and "declares AI, trusted" in orig
        assert "Trusted Generator Inc Signer" in orig and "TestGen/2.1" in orig
        assert "trainedAlgorithmicMedia" in orig
        assert 'id="matched"' not in orig

        copy = c.get(f"/items/{decisions['copy.jpg'].event_id}").text
        orig_id = decisions["orig.jpg"].event_id
        assert 'id="matched"' in copy
        assert f'src="/items/{orig_id}/image"' in copy and f'href="/items/{orig_id}"' in copy
        assert "6 bits apart" in copy and "moderator:mia" in copy
        assert "untrusted (Valid)" in copy and "signingCredential.untrusted" in copy
        # What a hostile file claims is shown escaped, never as markup.
        assert "Evil <script>" not in copy and "Evil &lt;script&gt;" in copy
        assert c.get(f"/items/{orig_id}/image").status_code == 200
