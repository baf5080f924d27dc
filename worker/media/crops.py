"""Native-resolution crops: the one crop implementation training and serving both import.

Generators leave faint high-frequency fingerprints and resizing smears them, so a crop is always a window of
the image's own pixels. The only resampling anywhere in the scoring path is here: an image smaller than the
window is upscaled, by one factor on both axes, just enough for its short side to fill the window.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from worker.records import Box

Aggregation = Literal["max", "mean"]


@dataclass(frozen=True)
class CropSpec:
    size: int = 224
    num_crops: int = 1


def ensure_min_size(img: Image.Image, size: int) -> Image.Image:
    """Upscale (never downscale) so both sides are at least ``size``; aspect ratio kept."""
    w, h = img.size
    if w >= size and h >= size:
        return img
    scale = size / min(w, h)
    new = (max(size, math.ceil(w * scale - 1e-9)), max(size, math.ceil(h * scale - 1e-9)))
    return img.resize(new, Image.Resampling.BICUBIC)


def _grid(length: int, size: int, n: int) -> list[int]:
    if n <= 1:
        return [(length - size) // 2]
    span = length - size
    return [round(i * span / (n - 1)) for i in range(n)]


def inference_boxes(width: int, height: int, spec: CropSpec) -> list[Box]:
    """Fixed windows for an image already at least ``spec.size`` on both sides.

    K=1 is the centre crop. For K>1 the windows form the grid (nx by ny, nx*ny <= K) that covers the largest
    share of the image, ties broken by fewer crops; windows are spread evenly edge to edge.
    """
    s = spec.size
    if width < s or height < s:
        raise ValueError(f"image {width}x{height} is smaller than the {s}px window; call ensure_min_size")
    max_x, max_y = math.ceil(width / s), math.ceil(height / s)
    best = (1, 1)
    best_key = (-1.0, 0)
    for nx in range(1, max_x + 1):
        for ny in range(1, max_y + 1):
            if nx * ny > max(1, spec.num_crops):
                continue
            coverage = min(width, nx * s) * min(height, ny * s) / (width * height)
            key = (round(coverage, 6), -(nx * ny))
            if key > best_key:
                best, best_key = (nx, ny), key
    xs, ys = _grid(width, s, best[0]), _grid(height, s, best[1])
    return [Box(left=x, top=y, right=x + s, bottom=y + s) for y in ys for x in xs]


def random_box(width: int, height: int, size: int, rng: random.Random) -> Box:
    """A uniformly placed window, for training."""
    x = rng.randint(0, width - size)
    y = rng.randint(0, height - size)
    return Box(left=x, top=y, right=x + size, bottom=y + size)


def crop_array(img: Image.Image, box: Box) -> np.ndarray:
    """Exact pixels of ``box`` as an HxWx3 uint8 array (no resampling)."""
    return np.asarray(img.crop((box.left, box.top, box.right, box.bottom)), dtype=np.uint8)


def stored_region(box: Box, orientation: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Rows and columns ``(top, bottom, left, right)`` of the *stored* image under a display-space ``box``.

    ``width`` x ``height`` is the stored (undecoded-orientation) size; ``orientation`` is the EXIF tag (1-8)
    that Pillow's ``ImageOps.exif_transpose`` applies. Cutting the stored pixels and then orienting the small
    crop (:func:`crop_tensor`) gives the same pixels as orienting the whole image first, at a fraction of the
    memory traffic.
    """
    t, b, left, r = box.top, box.bottom, box.left, box.right
    w, h = width, height
    regions = {
        1: (t, b, left, r),
        2: (t, b, w - r, w - left),
        3: (h - b, h - t, w - r, w - left),
        4: (h - b, h - t, left, r),
        5: (left, r, t, b),
        6: (h - r, h - left, t, b),
        7: (h - r, h - left, w - b, w - t),
        8: (left, r, w - b, w - t),
    }
    return regions.get(orientation, regions[1])


def crop_tensor(stored_hwc: torch.Tensor, box: Box, orientation: int = 1) -> torch.Tensor:
    """Exact pixels of display-space ``box`` from an H x W x C tensor in stored orientation (no resampling).

    The tensor counterpart of :func:`crop_array` for images decoded straight onto the model's device
    (``worker.media.jpeg``): the same window, the same orientation as Pillow's ``exif_transpose``.
    """
    h, w = int(stored_hwc.shape[0]), int(stored_hwc.shape[1])
    top, bottom, left, right = stored_region(box, orientation, w, h)
    if not (0 <= top < bottom <= h and 0 <= left < right <= w):
        raise ValueError(f"box {box} (orientation {orientation}) is outside the {w}x{h} stored image")
    c = stored_hwc[top:bottom, left:right]
    if orientation in (5, 6, 7, 8):
        c = c.transpose(0, 1)
    flips = {2: (1,), 3: (0, 1), 4: (0,), 6: (1,), 7: (0, 1), 8: (0,)}.get(orientation)
    return c.flip(flips) if flips else c


def inference_crops(img: Image.Image, spec: CropSpec) -> tuple[np.ndarray, list[Box]]:
    """K x S x S x 3 uint8 crops at fixed positions, and their boxes."""
    img = ensure_min_size(img, spec.size)
    boxes = inference_boxes(img.width, img.height, spec)
    return np.stack([crop_array(img, b) for b in boxes]), boxes


def training_crop(img: Image.Image, size: int, rng: random.Random) -> np.ndarray:
    """One S x S x 3 uint8 crop at a random position."""
    img = ensure_min_size(img, size)
    return crop_array(img, random_box(img.width, img.height, size, rng))


def aggregate(logits: np.ndarray, how: Aggregation) -> tuple[float, int]:
    """Per-image logit from its crops' logits, and the index of the crop that decided."""
    if logits.size == 0:
        raise ValueError("no crop logits to aggregate")
    deciding = int(np.argmax(logits))
    if how == "max":
        return float(logits[deciding]), deciding
    if how == "mean":
        return float(np.mean(logits)), deciding
    raise ValueError(f"unknown aggregation {how!r}")
