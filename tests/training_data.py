"""Small synthetic training images for the training tests: distinct, structured, ≥ 256 px."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def smooth_image(seed: int, size: tuple[int, int] = (288, 288)) -> Image.Image:
    """Random 6×6 colour field upscaled smoothly: every seed gives a visibly different picture."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC)


def write_images(folder: Path, count: int = 4, *, captions: bool = True, start: int = 0,
                 sizes: list[tuple[int, int]] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{start + i:02d}.png"
        smooth_image(start + i, (sizes or [(288, 288)] * count)[i]).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"a picture, pattern {i}", encoding="utf-8")
        paths.append(path)
    return paths
