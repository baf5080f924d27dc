"""What every handler of the review app shares, built once by ``create_app`` and kept on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import structlog
from fastapi import Depends, HTTPException, Request
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry

from worker.delivery.store import DecisionStore
from worker.media.fetch import Fetcher
from worker.records import Decision, Verdict
from worker.review.auth import Directory, LoginThrottle, Sessions
from worker.review.heatmap import Heatmaps
from worker.review.media import LRU, Images
from worker.scoring.duplicates import DuplicateIndex, propagate_override
from worker.settings import Settings

log = structlog.get_logger()

HERE = Path(__file__).parent


@dataclass
class Review:
    settings: Settings
    store: DecisionStore
    directory: Directory
    images: Images
    heatmaps: Heatmaps
    templates: Jinja2Templates
    throttle: LoginThrottle
    sessions: Sessions
    thumbs: LRU[bytes] = field(default_factory=lambda: LRU(256))
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)

    @classmethod
    def build(cls, settings: Settings, store: DecisionStore, templates: Jinja2Templates) -> Review:
        """What the page holds; ``templates`` come from :func:`worker.review.views.make_templates` (the app
        wires them, so this module stays below the views)."""
        from worker.review.metrics import backlog_registry

        images = Images(Fetcher(settings))
        return cls(
            settings=settings,
            store=store,
            directory=Directory(settings),
            images=images,
            heatmaps=Heatmaps(settings, images),
            templates=templates,
            thumbs=LRU(settings.review_cache_items),
            metrics=backlog_registry(store),
            throttle=LoginThrottle(store.r, settings.namespace, settings),
            sessions=Sessions(store.r, settings.namespace, settings.review_session_max_age_s),
        )

    def override(
        self,
        event_id: str,
        verdict: Verdict,
        moderator: str,
        note: str = "",
        *,
        expected_version: int | None = None,
    ) -> Decision:
        """A moderator's verdict: the store's versioned override, then the same verdict for near-duplicate
        copies still waiting for review (best effort: the override itself is already saved)."""
        updated = self.store.override(
            event_id,
            verdict,
            moderator,
            note,
            expected_version=expected_version,
            second_review=self.settings.review_second_review,
        )
        if self.settings.duplicates:
            try:
                index = DuplicateIndex(self.store.r, self.settings)
                propagate_override(self.store, updated, self.settings, index)
            except Exception:
                log.exception("override_propagation_failed", event_id=event_id)
        return updated

    def decision_or_404(self, event_id: str) -> Decision:
        decision = self.store.get(event_id)
        if decision is None:
            raise HTTPException(404, f"No decision for event {event_id!r}.")
        return decision


def get_review(request: Request) -> Review:
    review: Review = request.app.state.review
    return review


Ctx = Annotated[Review, Depends(get_review)]
