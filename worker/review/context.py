"""What every handler of the review app shares, built once by ``create_app`` and kept on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry

from worker.delivery.store import DecisionStore
from worker.media.fetch import Fetcher
from worker.records import Decision
from worker.review.auth import Directory, LoginThrottle, Sessions
from worker.review.heatmap import Heatmaps
from worker.review.media import LRU, Images
from worker.settings import Settings

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
    def build(cls, settings: Settings, store: DecisionStore) -> Review:
        from worker.review.metrics import backlog_registry
        from worker.review.views import make_templates

        images = Images(Fetcher(settings))
        return cls(
            settings=settings,
            store=store,
            directory=Directory(settings),
            images=images,
            heatmaps=Heatmaps(settings, images),
            templates=make_templates(HERE / "templates"),
            thumbs=LRU(settings.review_cache_items),
            metrics=backlog_registry(store),
            throttle=LoginThrottle(store.r, settings.namespace, settings),
            sessions=Sessions(store.r, settings.namespace, settings.review_session_max_age_s),
        )

    def decision_or_404(self, event_id: str) -> Decision:
        decision = self.store.get(event_id)
        if decision is None:
            raise HTTPException(404, f"No decision for event {event_id!r}.")
        return decision


def get_review(request: Request) -> Review:
    review: Review = request.app.state.review
    return review


Ctx = Annotated[Review, Depends(get_review)]
