"""Images for moderators' eyes: fetched and decoded exactly as the worker did, re-encoded for a browser.

The page never hands the browser the original bytes (a hostile file could target the browser's decoder, and
``s3://`` is not a URL a browser can open): it fetches through :class:`~worker.media.fetch.Fetcher` with the
same caps and allow-lists as the worker, decodes with :func:`~worker.media.decode.decode_image` (EXIF
orientation applied, so crop boxes line up), and serves PNG (lossless, for inspecting artefacts) or, for very
large images, high-quality JPEG. Small images are upscaled the same way the worker's crop code upscaled them,
so the stored crop boxes are in the served image's pixel coordinates.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar
from urllib.parse import unquote

from PIL import Image

from worker.media.crops import ensure_min_size
from worker.media.decode import decode_image
from worker.media.fetch import Fetcher
from worker.records import Box, Decision

LOSSLESS_MAX_PIXELS = 4_000_000  # above this a PNG gets too heavy for a page load; JPEG q95 instead
THUMB_SIZE = 160

V = TypeVar("V")


class LRU(Generic[V]):
    """A small thread-safe LRU; ``get_or_make`` computes outside the lock so slow work never blocks reads."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            return None

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        hit = self.get(key)
        if hit is not None:
            return hit
        value = make()
        with self._lock:
            self.misses += 1
        self.put(key, value)
        return value


def crop_size_of(decision: Decision) -> int | None:
    """The model's window, read off the stored boxes (all crops share one size)."""
    if not decision.crops:
        return None
    box = decision.crops[0].box
    return box.right - box.left


def display_size(image_size: tuple[int, int], crop_size: int | None) -> tuple[int, int]:
    """Size of the image the crop boxes refer to; mirrors :func:`worker.media.crops.ensure_min_size`."""
    w, h = image_size
    if crop_size is None or (w >= crop_size and h >= crop_size):
        return w, h
    scale = crop_size / min(w, h)
    return max(crop_size, math.ceil(w * scale - 1e-9)), max(crop_size, math.ceil(h * scale - 1e-9))


def image_source(decision: Decision) -> str:
    """Where an image came from, for filtering: ``metadata.source`` if the decision carries one, else
    :func:`uri_source` of its URI."""
    meta = getattr(decision, "metadata", None)
    if isinstance(meta, dict) and isinstance(meta.get("source"), str) and meta["source"]:
        return str(meta["source"])
    return uri_source(decision.image_uri)


def uri_source(uri: str) -> str:
    """The bucket (``s3://b``), the host (``https://h``) or the folder name (``file:uploads``) of a URI.

    String operations only: the queue page calls this for every waiting item.
    """
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme in ("s3", "https", "http"):
        return f"{scheme}://{rest.split('/', 1)[0]}"
    path = unquote(rest) if scheme == "file" else uri
    parts = path.replace("\\", "/").rstrip("/").rsplit("/", 2)
    return f"file:{parts[-2]}" if len(parts) >= 2 and parts[-2] else "file"


class Images:
    """Decoded images by URI (a page load asks for image, crop, heatmap and thumbnail of the same one)."""

    def __init__(self, fetcher: Fetcher, capacity: int = 4) -> None:
        self.fetcher = fetcher
        self._cache: LRU[Image.Image] = LRU(capacity)
        # Kept images are outside the decode budget, so together they may hold at most half of it.
        self.max_cached_bytes = fetcher.settings.max_decode_bytes // (2 * self._cache.capacity)

    def decoded(self, uri: str) -> Image.Image:
        """RGB in display orientation; raises :class:`~worker.errors.ModerationError` with a reason."""
        hit = self._cache.get(uri)
        if hit is not None:
            return hit
        s = self.fetcher.settings
        data = self.fetcher.fetch(uri)
        # The same memory budget as the worker's decodes: thumbnails of hostile images cannot pile up.
        img = decode_image(
            data, max_pixels=s.max_pixels, allowed_formats=s.allowed_formats, max_bytes=s.max_decode_bytes
        )
        if img.width * img.height * 4 <= self.max_cached_bytes:  # Pillow stores RGB in 4 bytes per pixel
            self._cache.put(uri, img)
        return img

    def for_display(self, decision: Decision) -> Image.Image:
        img = self.decoded(decision.image_uri)
        size = crop_size_of(decision)
        return img if size is None else ensure_min_size(img, size)

    def crop(self, decision: Decision, box: Box) -> Image.Image:
        return self.for_display(decision).crop((box.left, box.top, box.right, box.bottom))


def encode(img: Image.Image) -> tuple[bytes, str]:
    """PNG up to a few megapixels, JPEG q95 above; returns (bytes, media type)."""
    buf = io.BytesIO()
    if img.width * img.height <= LOSSLESS_MAX_PIXELS:
        img.save(buf, format="PNG", compress_level=3)
        return buf.getvalue(), "image/png"
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), "image/jpeg"


def thumbnail(img: Image.Image, size: int = THUMB_SIZE) -> bytes:
    """A small JPEG for the queue table (display only; nothing here feeds the model)."""
    thumb = img.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
