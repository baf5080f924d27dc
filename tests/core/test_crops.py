"""Native crops on real pixels: exact source regions, minimal upscaling, fixed and random positions."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from worker.media.crops import (
    CropSpec,
    aggregate,
    crop_array,
    ensure_min_size,
    inference_boxes,
    inference_crops,
    training_crop,
)


def noise_image(w: int, h: int, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr), arr


@pytest.mark.parametrize(("w", "h"), [(300, 260), (224, 224), (1000, 400), (225, 900)])
def test_centre_crop_is_the_exact_source_region(w: int, h: int) -> None:
    img, arr = noise_image(w, h)
    crops, boxes = inference_crops(img, CropSpec(224, 1))
    (box,) = boxes
    assert crops.shape == (1, 224, 224, 3)
    assert box.left == (w - 224) // 2 and box.top == (h - 224) // 2
    np.testing.assert_array_equal(crops[0], arr[box.top : box.bottom, box.left : box.right])


@pytest.mark.parametrize("k", [2, 4, 6, 9])
def test_every_inference_crop_is_exact_and_inside_the_image(k: int) -> None:
    img, arr = noise_image(800, 500, seed=k)
    crops, boxes = inference_crops(img, CropSpec(224, k))
    assert 1 < len(boxes) <= k
    for crop, b in zip(crops, boxes, strict=True):
        assert 0 <= b.left < b.right <= 800 and 0 <= b.top < b.bottom <= 500
        np.testing.assert_array_equal(crop, arr[b.top : b.bottom, b.left : b.right])


def test_multi_crop_grid_covers_the_image_edge_to_edge() -> None:
    boxes = inference_boxes(672, 448, CropSpec(224, 6))
    assert len(boxes) == 6
    assert min(b.left for b in boxes) == 0 and max(b.right for b in boxes) == 672
    assert min(b.top for b in boxes) == 0 and max(b.bottom for b in boxes) == 448


@pytest.mark.parametrize(
    ("w", "h", "expected"), [(100, 100, (224, 224)), (100, 50, (448, 224)), (300, 100, (672, 224))]
)
def test_small_images_are_upscaled_just_enough(w: int, h: int, expected: tuple[int, int]) -> None:
    img, _ = noise_image(w, h)
    up = ensure_min_size(img, 224)
    assert up.size == expected
    assert min(up.size) == 224


def test_image_smaller_than_window_becomes_exactly_the_window() -> None:
    img, _ = noise_image(150, 150)
    crops, boxes = inference_crops(img, CropSpec(224, 1))
    assert crops.shape == (1, 224, 224, 3)
    assert (boxes[0].left, boxes[0].top, boxes[0].right, boxes[0].bottom) == (0, 0, 224, 224)


def test_large_images_are_never_resized() -> None:
    img, _ = noise_image(640, 480)
    assert ensure_min_size(img, 224) is img


def test_training_crop_is_random_but_exact() -> None:
    img, arr = noise_image(500, 400, seed=3)
    rng = random.Random(7)
    seen = set()
    for _ in range(20):
        crop = training_crop(img, 64, rng)
        # Find where it came from: the exact match must exist somewhere in the source.
        matches = np.argwhere((arr[:, :, 0] == crop[0, 0, 0]) & (arr[:, :, 1] == crop[0, 0, 1]))
        found = [
            (y, x)
            for y, x in matches
            if y + 64 <= 400 and x + 64 <= 500 and np.array_equal(arr[y : y + 64, x : x + 64], crop)
        ]
        assert found, "training crop is not an exact window of the source"
        seen.add(found[0])
    assert len(seen) > 10


def test_crop_array_returns_the_window() -> None:
    img, arr = noise_image(50, 40)
    from worker.records import Box

    np.testing.assert_array_equal(crop_array(img, Box(left=5, top=6, right=25, bottom=36)), arr[6:36, 5:25])


def test_aggregation_max_and_mean_report_the_deciding_crop() -> None:
    logits = np.array([-1.0, 2.0, 0.5])
    assert aggregate(logits, "max") == (2.0, 1)
    value, deciding = aggregate(logits, "mean")
    assert value == pytest.approx(0.5) and deciding == 1
    with pytest.raises(ValueError):
        aggregate(np.array([]), "max")
