"""A real worker with the device JPEG path (torchvision on the CPU here, nvJPEG on a GPU host).

The decisions must be the Pillow path's, bad files included, and every event decided exactly once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.core import images
from tests.worker_proc import running_worker
from worker.errors import ErrorReason
from worker.ingress.producer import Producer
from worker.keys import Keys
from worker.media.fetch import Fetcher
from worker.records import Event, Verdict
from worker.scoring.scorer import Scorer, score_events
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_worker_with_device_jpeg_decode_matches_pillow_and_decides_each_event_once(
    redis_url: str, producer: Producer, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(5):
        (d / f"good{i}.jpg").write_bytes(images.jpeg(96 + 50 * i, 80 + 30 * i, seed=i))
    (d / "small.jpg").write_bytes(images.jpeg(40, 30, seed=7))  # upscaled by Pillow, never planned
    (d / "photo.png").write_bytes(images.png(120, 100, seed=8))
    full = images.jpeg(200, 200, seed=3)
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    names = sorted(p.name for p in d.iterdir())
    events = [Event(item_id=f"item-{i}", image_uri=str(d / names[i % len(names)])) for i in range(160)]

    reference_settings = Settings(home=tmp_path / "ref", device="cpu", jpeg_decode="pillow")
    scorer = Scorer.load(str(tiny_checkpoint), reference_settings)
    first = events[: len(names)]
    decided = score_events(first, scorer, Fetcher(reference_settings))
    reference = {Path(e.image_uri).name: dec for e, dec in zip(first, decided, strict=True)}

    env = {"MODERATION_JPEG_DECODE": "torchvision", "MODERATION_MAX_WAIT_MS": "50"}
    with running_worker(redis_url, tmp_path, tiny_checkpoint, env=env) as w:
        producer.submit_many(events)
        got = producer.wait([e.event_id for e in events], timeout=180)
        log = w.log()
    assert len(got) == len(events)
    client: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    counts = Counter(f["event_id"] for _, f in client.xrange(Keys("moderation").decisions))
    assert set(counts) == {e.event_id for e in events} and max(counts.values()) == 1

    for e in events:
        name, dec = Path(e.image_uri).name, got[e.event_id]
        ref = reference[name]
        # Same pixels; only the batch composition differs, which moves CPU float sums in the 8th digit.
        assert (dec.verdict, dec.reason, dec.image_size) == (ref.verdict, ref.reason, ref.image_size), name
        assert [c.box for c in dec.crops] == [c.box for c in ref.crops], name
        assert dec.ai_score == pytest.approx(ref.ai_score, abs=1e-5), name
        assert ("plan" in dec.timings_ms) == name.startswith("good"), name
    assert got[events[names.index("truncated.jpg")].event_id].reason == ErrorReason.TRUNCATED_IMAGE
    batches = Counter(dec.batch_id for dec in got.values() if dec.verdict != Verdict.ERROR)
    assert max(batches.values()) > 1, "device-decoded images never shared a batch"
    assert "Traceback" not in log
