"""Read a demo image back into (shape, colour, background), the way a person would describe it.

Colours: every pixel snaps to the nearest colour of a palette; the background is the most common
colour along the border, the foreground the most common other colour. Shape: the foreground mask
is compared (IoU) with every shape drawn at every size and offset the generator uses, and the best
matching shape wins, if it matches at all: a foreground that overlaps no drawn shape by at least
``MIN_SHAPE_IOU`` (a few specks inside a smudge) is no shape. No learned classifier, so the judge
cannot share a model's blind spots.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from lorapg.demo.shapes import COLOURS, OFFSET_RANGE, RADIUS_RANGE, SHAPES, SIZE, shape_mask

BORDER = 2  # pixels along each edge that count as background
# Measured on the demo model: every shape drawn for a known word overlaps its best template by
# IoU ≥ 0.70, while the smudges it draws for a word it does not know reach 0.02–0.38. Without a
# floor those smudges still "win" as whichever template overlaps them least badly.
MIN_SHAPE_IOU = 0.5


@dataclass(frozen=True)
class Verdict:
    shape: str | None
    colour: str | None
    background: str | None


@lru_cache(maxsize=16)
def _templates(shape: str) -> np.ndarray:
    """Binary masks of ``shape`` over a grid of sizes and offsets a little wider than training's."""
    radii = np.linspace(RADIUS_RANGE[0] - 0.05, RADIUS_RANGE[1] + 0.05, 7)
    offsets = np.linspace(-OFFSET_RANGE - 0.04, OFFSET_RANGE + 0.04, 7)
    masks = [shape_mask(shape, float(r), float(cx), float(cy)) > 0.5 for r in radii for cx in offsets for cy in offsets]
    return np.stack(masks).reshape(len(masks), -1)


def snap(image: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[np.ndarray, list[str]]:
    """Index of the nearest palette colour for each pixel, and the palette's names."""
    names = list(palette)
    colours = np.asarray([palette[n] for n in names], dtype=np.float32)
    distances = ((image[..., None, :].astype(np.float32) - colours) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1), names


def judge_image(
    image: Image.Image | np.ndarray,
    palette: dict[str, tuple[int, int, int]] = COLOURS,
    shapes: Iterable[str] = SHAPES,
) -> Verdict:
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.shape[:2] != (SIZE, SIZE):
        pixels = np.asarray(Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR))
    labels, names = snap(pixels, palette)
    border = np.ones(labels.shape, dtype=bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    background = int(np.bincount(labels[border], minlength=len(names)).argmax())
    inside = labels[~border]
    others = inside[inside != background]
    if others.size == 0:
        return Verdict(None, None, names[background])
    colour = int(np.bincount(others, minlength=len(names)).argmax())
    mask = (labels == colour).reshape(-1)
    best_shape, best_iou = None, -1.0
    for shape in shapes:
        templates = _templates(shape)
        intersection = (templates & mask).sum(axis=1)
        union = (templates | mask).sum(axis=1)
        iou = float((intersection / np.maximum(union, 1)).max())
        if iou > best_iou:
            best_shape, best_iou = shape, iou
    return Verdict(best_shape if best_iou >= MIN_SHAPE_IOU else None, names[colour], names[background])
