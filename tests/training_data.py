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


def write_images(
    folder: Path, count: int = 4, *, captions: bool = True, start: int = 0, sizes: list[tuple[int, int]] | None = None
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{start + i:02d}.png"
        smooth_image(start + i, (sizes or [(288, 288)] * count)[i]).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"a picture, pattern {i}", encoding="utf-8")
        paths.append(path)
    return paths


def striped_image(colour: tuple[int, int, int], size: tuple[int, int] = (288, 288), period: int = 36) -> Image.Image:
    """Vertical stripes of ``colour`` on black: the same layout in every colour (flat regions, sharp edges)."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    for x in range(0, size[0], period * 2):
        pixels[:, x : x + period] = colour
    return Image.fromarray(pixels)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims ``width``×``height`` (IHDR patched, CRC fixed)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), body (13), crc (4)
    assert data[ihdr + 4 : ihdr + 8] == b"IHDR"
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])))
    return bytes(data)
