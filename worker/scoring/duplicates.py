"""Near-duplicate reuse: a PDQ hash per image and an index of the hashes of decided items.

The same AI image is uploaded again and again, each copy re-encoded or resized; a moderator's verdict on one
should decide its copies, and a model score need not be computed twice. PDQ (Meta's perceptual hash, via
``pdqhash``) gives 256 bits that survive re-encoding and resizing; copies differ by a few bits, unrelated
images by about 128 (docs/provenance.md has the distances measured on aigen-dev).

The index lives in one Redis stream, ``{ns}:pdq``: one entry per remembered decision (hash, event, item,
verdict, score, source, model version), trimmed to ``duplicate_max_entries`` and to ``duplicate_ttl_s`` of
age. Each worker mirrors it in memory and catches up with one ``XREAD`` before each lookup, so what one worker
remembers every other worker matches from its next batch on; a lookup is then a NumPy XOR and popcount over
the mirror (exact, about a millisecond per 100,000 entries). docs/provenance.md says how it scales further.

The interface the pipeline calls:

* :func:`pdq_hash` (bytes already fetched) or :func:`pdq_hash_image` (pixels already decoded) in the decode
  stage;
* :meth:`DuplicateIndex.lookup` before the model, :meth:`DuplicateIndex.remember` after the decision write;
* :func:`propagate_override` from the override path: the overridden hash is remembered with the moderator's
  verdict and copies already waiting in the review queue get it too.
"""

from __future__ import annotations

import io
import json
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pdqhash
import redis
from PIL import Image, ImageOps

from worker.delivery.store import STREAM_MAXLEN, DecisionStore
from worker.keys import Keys
from worker.records import Decision, MatchedEvent, Verdict, utcnow
from worker.settings import Settings

HASH_BITS = 256
_HASH_SIDE = 256  # PDQ filters down to 64x64 anyway; a 256 px input keeps its cost below a tenth of a decode
_SYNC_COUNT = 10_000


def pdq_hash(data: bytes, min_quality: int = 50) -> tuple[str, int] | None:
    """(64 hex digits, quality) of an image's PDQ hash, or None when it is too flat to hash reliably.

    JPEGs are decoded at a reduced DCT scale (Pillow's draft mode), so hashing costs a fraction of a decode.
    The caller has already checked the header (format allow-list, pixel cap). EXIF orientation is applied:
    a copy whose pixels were rotated matches an original that only carried the tag.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (_HASH_SIDE, _HASH_SIDE))  # a DCT scale that keeps >= 256 px a side
            img.seek(0)
            img.load()
            rgb = (ImageOps.exif_transpose(img) or img).convert("RGB")
    return pdq_hash_image(rgb, min_quality)


def pdq_hash_image(img: Image.Image, min_quality: int = 50) -> tuple[str, int] | None:
    """:func:`pdq_hash` of an RGB image already decoded in display orientation (the Pillow path's)."""
    w, h = img.size
    scale = _HASH_SIDE / max(w, h)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    bits, quality = pdqhash.compute(np.asarray(img))
    if int(quality) < min_quality:
        return None
    return np.packbits(bits.astype(np.uint8)).tobytes().hex(), int(quality)


def distance(a: str, b: str) -> int:
    """Hamming distance between two hex PDQ hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _words(hex_hash: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_hash), dtype=">u8").astype(np.uint64)


@dataclass(frozen=True)
class Match:
    """A remembered decision within the threshold of a new image."""

    event_id: str
    item_id: str
    distance: int
    verdict: Verdict
    ai_score: float | None
    source: str
    model_version: str | None

    @property
    def by_moderator(self) -> bool:
        return self.source.startswith("moderator")

    def matched_event(self) -> MatchedEvent:
        return MatchedEvent(
            event_id=self.event_id, item_id=self.item_id, distance=self.distance, source=self.source
        )


def rememberable(decision: Decision) -> bool:
    """Decided by the model, a credential or a moderator, with a hash; copies are never re-remembered, so a
    chain of copies of copies cannot drift away from the image a moderator saw."""
    p = decision.provenance
    return (
        p is not None
        and p.pdq is not None
        and decision.verdict != Verdict.ERROR
        and decision.source != "duplicate"
    )


class DuplicateIndex:
    """The Redis stream of decided hashes and this process's mirror of it; thread-safe."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r: Any = client
        self.key = Keys(settings.namespace).pdq
        self.threshold = settings.duplicate_threshold
        self.max_entries = settings.duplicate_max_entries
        self.ttl_ms = settings.duplicate_ttl_s * 1000
        self._lock = threading.Lock()
        self._last_id = "0-0"
        self._hashes = np.zeros(
            (4, 1024), dtype=np.uint64
        )  # one row per 64-bit word: popcounts stay contiguous
        self._ts = np.zeros(1024, dtype=np.int64)
        self._alive = np.zeros(1024, dtype=bool)
        self._meta: list[tuple[str, str, str, float | None, str, str | None] | None] = []
        self._row_of: dict[str, int] = {}
        self._head = 0  # rows below are all dead (expired or evicted); rows are in stream order
        self._n = 0
        self._n_alive = 0

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> DuplicateIndex:
        return cls(redis.Redis.from_url(url, decode_responses=True), settings)

    # --- writes -----------------------------------------------------------------------------------
    def remember(self, hash_hex: str, decision: Decision) -> None:
        """Make ``decision`` matchable by copies of its image (call it after the decision is written)."""
        self._append(self.r, hash_hex, decision)

    def remember_decisions(self, decisions: Iterable[Decision]) -> int:
        """Remember every decision that carries a hash, in one round trip; returns how many."""
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for d in decisions:
            if rememberable(d) and d.provenance is not None and d.provenance.pdq is not None:
                self._append(pipe, d.provenance.pdq, d)
                n += 1
        if n:
            pipe.execute()
        return n

    def _append(self, client: Any, hash_hex: str, d: Decision) -> None:
        fields = {
            "h": hash_hex,
            "e": d.event_id,
            "i": d.item_id,
            "v": d.verdict.value,
            "s": "" if d.ai_score is None else repr(d.ai_score),
            "src": d.source,
            "m": d.model_version or "",
        }
        client.xadd(self.key, fields, maxlen=self.max_entries, approximate=True)
        cutoff = int(time.time() * 1000) - self.ttl_ms
        client.xtrim(self.key, minid=f"{max(cutoff, 0)}-0", approximate=True)

    # --- the mirror -------------------------------------------------------------------------------
    def sync(self) -> None:
        """Catch up with the stream (one XREAD when nothing is new) and drop what has expired."""
        with self._lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        while True:
            reply = self.r.xread({self.key: self._last_id}, count=_SYNC_COUNT)
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                self._add(str(entry_id), fields)
            if entries:
                self._last_id = str(entries[-1][0])
            if len(entries) < _SYNC_COUNT:
                break
        self._expire(int(time.time() * 1000) - self.ttl_ms)

    def _add(self, entry_id: str, f: dict[str, str]) -> None:
        try:
            words = _words(f["h"])
            meta = (
                f["e"],
                f["i"],
                f["v"],
                float(f["s"]) if f.get("s") else None,
                f["src"],
                f.get("m") or None,
            )
            Verdict(meta[2])
        except (KeyError, ValueError):
            return  # not an entry we wrote; never let one stop the mirror
        if len(words) != 4:
            return
        old = self._row_of.pop(meta[0], None)
        if old is not None and self._alive[old]:  # a later decision of the same event (an override) wins
            self._alive[old] = False
            self._meta[old] = None
            self._n_alive -= 1
        if self._n == len(self._ts):
            self._make_room()
        row = self._n
        self._hashes[:, row] = words
        self._ts[row] = int(entry_id.split("-", 1)[0])
        self._alive[row] = True
        self._meta.append(meta)
        self._row_of[meta[0]] = row
        self._n += 1
        self._n_alive += 1
        while self._n_alive > self.max_entries:
            self._kill_head()

    def _kill_head(self) -> None:
        while self._head < self._n and not self._alive[self._head]:
            self._head += 1
        if self._head < self._n:
            self._drop(self._head)
            self._head += 1

    def _drop(self, row: int) -> None:
        meta = self._meta[row]
        if meta is not None and self._row_of.get(meta[0]) == row:
            del self._row_of[meta[0]]
        self._alive[row] = False
        self._meta[row] = None
        self._n_alive -= 1

    def _expire(self, cutoff_ms: int) -> None:
        while self._head < self._n and (not self._alive[self._head] or self._ts[self._head] < cutoff_ms):
            if self._alive[self._head]:
                self._drop(self._head)
            self._head += 1

    def _make_room(self) -> None:
        """Compact away dead rows, growing the arrays only when most rows are alive."""
        keep = np.flatnonzero(self._alive[: self._n])
        cap = len(self._ts) if len(keep) < len(self._ts) // 2 else len(self._ts) * 2
        hashes, ts, alive = np.zeros((4, cap), np.uint64), np.zeros(cap, np.int64), np.zeros(cap, bool)
        hashes[:, : len(keep)] = self._hashes[:, keep]
        ts[: len(keep)] = self._ts[keep]
        alive[: len(keep)] = True
        self._meta = [self._meta[i] for i in keep]
        self._hashes, self._ts, self._alive = hashes, ts, alive
        self._row_of = {m[0]: i for i, m in enumerate(self._meta) if m is not None}
        self._n, self._head = len(keep), 0

    def __len__(self) -> int:
        return self._n_alive

    # --- reads ------------------------------------------------------------------------------------
    def lookup(self, hash_hex: str, *, exclude_event: str | None = None) -> Match | None:
        """The best remembered decision within the threshold: a moderator's first, then the nearest."""
        return self.lookup_many([hash_hex], exclude_event=exclude_event)[0]

    def lookup_many(
        self, hashes: Sequence[str | None], *, exclude_event: str | None = None
    ) -> list[Match | None]:
        """:meth:`lookup` for a batch, with one catch-up read for all of them."""
        if not any(hashes):
            return [None] * len(hashes)
        with self._lock:
            self._sync_locked()
            lo, hi = self._head, self._n
            if hi <= lo:
                return [None] * len(hashes)
            table, alive = self._hashes[:, lo:hi], self._alive[lo:hi]
            out: list[Match | None] = []
            for h in hashes:
                out.append(None if h is None else self._best(table, alive, lo, _words(h), exclude_event))
            return out

    def _best(
        self, table: np.ndarray, alive: np.ndarray, lo: int, q: np.ndarray, exclude: str | None
    ) -> Match | None:
        d = np.bitwise_count(table[0] ^ q[0]).astype(np.uint16)
        for k in range(1, 4):
            d += np.bitwise_count(table[k] ^ q[k])
        rows = np.flatnonzero(alive & (d <= self.threshold))
        best: tuple[int, int, Match] | None = None
        for r in rows:
            meta = self._meta[lo + int(r)]
            if meta is None or meta[0] == exclude:
                continue
            m = Match(meta[0], meta[1], int(d[r]), Verdict(meta[2]), meta[3], meta[4], meta[5])
            key = (0 if m.by_moderator else 1, m.distance)
            if best is None or key < best[:2]:
                best = (*key, m)
        return best[2] if best else None


# Take a copy off the review queue and give it the inherited verdict, only if it is still waiting: a
# moderator who decided the copy in the meantime wins. KEEPTTL keeps the decision's retention.
_PROPAGATE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('SET', KEYS[2], ARGV[2], 'KEEPTTL')
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event_id', ARGV[1], 'decision', ARGV[2])
  redis.call('RPUSH', KEYS[4], ARGV[3])
  return 1
end
return 0
"""


def propagate_override(
    store: DecisionStore, decision: Decision, settings: Settings, index: DuplicateIndex | None = None
) -> list[Decision]:
    """After a moderator's override: remember it and give its verdict to copies waiting for review.

    ``decision`` is the overridden decision (what :meth:`DecisionStore.override` returns). Returns the copies'
    new decisions. Propagated copies are not moderator labels (nobody looked at them), so they go to the
    decisions stream and to each copy's audit list, not to the overrides stream that training reads.
    """
    p = decision.provenance
    if p is None or p.pdq is None:
        return []
    if index is not None:
        index.remember(p.pdq, decision)
    script = store.r.register_script(_PROPAGATE)
    match = MatchedEvent(
        event_id=decision.event_id, item_id=decision.item_id, distance=0, source=decision.source
    )
    out = []
    for event_id, raw in store.review_scan():
        if event_id == decision.event_id:
            continue
        obj = json.loads(raw)
        other = (obj.get("provenance") or {}).get("pdq")
        if not other:
            continue
        dist = distance(p.pdq, other)
        if dist > settings.duplicate_threshold:
            continue
        current = Decision.model_validate(obj)
        updated = current.model_copy(
            update={
                "verdict": decision.verdict,
                "source": "duplicate",
                "matched_event": match.model_copy(update={"distance": dist}),
                "decided_at": utcnow(),
            }
        )
        audit = {
            "event_id": event_id,
            "item_id": current.item_id,
            "image_uri": current.image_uri,
            "moderator": decision.source,
            "previous_verdict": current.verdict.value,
            "verdict": decision.verdict.value,
            "previous_source": current.source,
            "matched_event": decision.event_id,
            "distance": str(dist),
            "at": utcnow().isoformat(),
        }
        keys = [
            store.keys.review,
            store.keys.decision(event_id),
            store.keys.decisions,
            store.keys.audit(event_id),
        ]
        if script(keys=keys, args=[event_id, updated.to_json(), json.dumps(audit), STREAM_MAXLEN]):
            out.append(updated)
    return out
