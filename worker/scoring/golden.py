"""Golden images: a few deterministic crops whose scores a checkpoint records and a worker re-checks.

They are generated from fixed seeds rather than shipped, so every machine rebuilds identical pixels, and they
cover what a detector reacts to: flat colour, smooth gradients, sensor-like noise and the periodic pattern
2x upsampling leaves.
"""

from __future__ import annotations

import numpy as np

GOLDEN_NAMES = ("flat", "gradient", "noise", "upsampled_noise")


def golden_crops(size: int) -> np.ndarray:
    """len(GOLDEN_NAMES) x size x size x 3 uint8."""
    rng = np.random.default_rng(20261123)
    flat = np.full((size, size, 3), (120, 140, 160), dtype=np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    gradient = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))], axis=-1
    ).astype(np.uint8)
    noise = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    half = rng.integers(0, 256, size=((size + 1) // 2, (size + 1) // 2, 3), dtype=np.uint8)
    upsampled = half.repeat(2, axis=0).repeat(2, axis=1)[:size, :size]
    return np.stack([flat, gradient, noise, upsampled])
