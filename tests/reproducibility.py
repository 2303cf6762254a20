"""The product's reproducibility promise, as assertions (README, "Reproducibility").

1. The same request on the same machine gives the same bytes: compared exactly.
2. Image i of a batch, made again alone with its seed, is visually identical: a batch runs other
   matrix kernels than a single image (which ones depends on the CPU), so pixels may differ by a
   level or so. Measured on an AVX-512 EPYC (tiny test model and models/demo, batches of 2-4,
   several seeds and samplers): at most 1 level in any channel, mean below 0.005 level. The bound
   below leaves ample margin for other CPUs while still failing on any visible change (another
   seed or LoRA scale differs by tens of levels).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Levels of 255, per channel: the largest difference any pixel may have, and the mean over the image.
BATCH_MAX_LEVELS = 8
BATCH_MEAN_LEVELS = 0.5


def as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """Signed pixels, so differences do not wrap around."""
    return np.asarray(image, dtype=np.int16)


def assert_same_bytes(first, second) -> None:
    """Promise 1: one request made twice on the same code path."""
    a, b = as_pixels(first), as_pixels(second)
    assert a.shape == b.shape, f"sizes differ: {a.shape} vs {b.shape}"
    assert np.array_equal(a, b), f"pixels differ (max {np.abs(a - b).max()} levels) for the same request"


def assert_batch_item_matches_alone(batch_item, alone) -> None:
    """Promise 2: a batch item and the same seed generated alone are within the stated bound."""
    a, b = as_pixels(batch_item), as_pixels(alone)
    assert a.shape == b.shape, f"sizes differ: {a.shape} vs {b.shape}"
    difference = np.abs(a - b)
    assert difference.max() <= BATCH_MAX_LEVELS and difference.mean() <= BATCH_MEAN_LEVELS, (
        f"batch item differs from its seed alone by up to {difference.max()} levels "
        f"(mean {difference.mean():.3f}); the promise is <= {BATCH_MAX_LEVELS} (mean <= {BATCH_MEAN_LEVELS})"
    )


def assert_visibly_different(first, second) -> None:
    """The bound is not so loose that another image would pass it."""
    difference = np.abs(as_pixels(first) - as_pixels(second))
    assert difference.max() > BATCH_MAX_LEVELS and difference.mean() > BATCH_MEAN_LEVELS, (
        f"images expected to differ are within the batch bound (max {difference.max()}, mean {difference.mean():.3f})"
    )
