"""The review backlog for Prometheus, computed on each scrape from Redis (no counters kept in the page).

``moderation_review_oldest_item_age_seconds`` is what an SLA alert watches: how long the longest-waiting item
has been queued (0 when the queue is empty).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.delivery.store import DecisionStore
from worker.review.queue import Row


class BacklogCollector(Collector):
    def __init__(self, store: DecisionStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = [Row.parse(e, raw) for e, raw in self.store.review_scan()]
        waiting = {r.event_id for r in rows}
        oldest = min((r.decided_at for r in rows), default=None)
        age = 0.0 if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        claims = [e for e in self.store.claims() if e in waiting]
        second = [e for e in self.store.second_reviews() if e in waiting]
        yield from families(len(rows), age, len(claims), len(second))

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The families without reading Redis (what dashboards and alerts may name)."""
        yield from families(0, 0.0, 0, 0)


def families(items: int, age: float, claimed: int, second: int) -> Iterator[GaugeMetricFamily]:
    yield GaugeMetricFamily("moderation_review_queue_items", "Items waiting for a moderator.", items)
    yield GaugeMetricFamily(
        "moderation_review_oldest_item_age_seconds", "How long the longest-waiting item has waited.", age
    )
    yield GaugeMetricFamily(
        "moderation_review_claimed_items", "Waiting items a moderator holds a live claim on.", claimed
    )
    yield GaugeMetricFamily(
        "moderation_review_second_review_items", "Blocks awaiting a second moderator.", second
    )


def backlog_registry(store: DecisionStore) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BacklogCollector(store))
    return registry
