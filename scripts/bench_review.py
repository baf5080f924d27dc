"""Measure what a moderator waits for: a queue page over N waiting items, and one Grad-CAM heatmap.

    python scripts/bench_review.py --items 1000 10000 --arch convnext_tiny --crop 224
    python scripts/bench_review.py --items 1000 10000 --no-heatmap   # the queue only

Uses a private redis-server and synthetic decisions (the queue page's cost depends on their count, not on
the images), and a randomly initialised timm model (Grad-CAM's cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch

from worker.delivery.store import DecisionStore
from worker.process.localredis import private_redis
from worker.records import Box, CropScore, Decision, Thresholds, Verdict, utcnow
from worker.review.heatmap import grad_cam
from worker.review.queue import QueueQuery, Sort, claim_next, page
from worker.scoring.model import create_model


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def synthetic(n: int) -> list[Decision]:
    now = utcnow()
    crops = [CropScore(box=Box(left=x, top=0, right=x + 224, bottom=224), ai_score=0.6) for x in (0, 224)]
    return [
        Decision(
            item_id=f"item-{i}",
            event_id=f"ev-{i}",
            image_uri=f"s3://uploads-{i % 4}/img/{i}.jpg",
            verdict=Verdict.REVIEW,
            ai_score=0.5 + 0.4 * ((i * 7919) % n) / n,
            crops=crops,
            deciding_crop=1,
            model_version="convnext_tiny-20261127-000000-deadbeef",
            thresholds=Thresholds(),
            image_size=(1024, 768),
            decided_at=now - timedelta(seconds=i),
        )
        for i in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--arch", default="convnext_tiny")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-heatmap", action="store_true", help="Skip the Grad-CAM measurement.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp) / "redis") as url:
        for n in args.items:
            store = DecisionStore.from_url(url, f"bench{n}")
            store.write_many(synthetic(n))
            filtered = QueueQuery(sort=Sort.OLDEST, source="s3://uploads-1")
            by_score = median_ms(lambda s=store: page(s, QueueQuery()), args.repeat)  # type: ignore[misc]
            by_age = median_ms(lambda s=store, q=filtered: page(s, q), args.repeat)  # type: ignore[misc]
            print(
                f"queue page, {n} waiting: by score {by_score:.0f} ms; oldest + source filter {by_age:.0f} ms"
            )
            # a team at work: 8 moderators holding 10 claims each; one moderator's view, a search, a claim
            for m in range(8):
                claim_next(store, QueueQuery(), f"mod{m}", 10, 3600)
            seen = median_ms(lambda s=store: page(s, QueueQuery(), "mod0"), args.repeat)  # type: ignore[misc]
            found = median_ms(
                lambda s=store: page(s, QueueQuery(search="uploads-2 item-1"), "mod0"),  # type: ignore[misc]
                args.repeat,
            )
            claim = median_ms(
                lambda s=store: claim_next(s, QueueQuery(), "mod9", 10, 1),  # type: ignore[misc]
                args.repeat,
            )
            print(
                f"queue page, {n} waiting, 80 claimed: one moderator's view {seen:.0f} ms; "
                f"search {found:.0f} ms; claim next 10 {claim:.0f} ms"
            )

    if args.no_heatmap:
        return

    torch.manual_seed(0)
    model = create_model(args.arch).eval().requires_grad_(False)
    x = torch.randn(1, 3, args.crop, args.crop)
    grad_cam(model, x)  # warm-up
    ms = median_ms(lambda: grad_cam(model, x), args.repeat)
    print(f"Grad-CAM {args.arch} {args.crop}px crop on CPU ({torch.get_num_threads()} threads): {ms:.0f} ms")


if __name__ == "__main__":
    main()
