"""New concepts for LoRAs to teach the demo model, and the datasets that teach them.

``ring`` is a shape the base model has never been shown; ``magenta`` a colour it has never been
told about (its VAE has seen every colour, its text encoder not this word). A third dataset of
ordinary scenes serves as regularization images (prior preservation), so that a LoRA learns its
concept without turning every prompt into it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lorapg.demo.shapes import COLOURS, NEW_COLOURS, SHAPES, Scene, render, training_scenes
from lorapg.training.validation import NEAR_DUPLICATE_LEVELS, colour_thumbnail, thumbnail_distance

# Training images are stored 8× larger than the model's 32 px with nearest-neighbour pixels: the
# trainer's usual minimum size for a base model's buckets is 256 px, and scaling back down to
# the native 32 px recovers the drawn pixels.
STORED_SCALE = 8
PRIOR_DATASET = "demo-prior"
# No two images of a dataset may be near duplicates by the trainer's own measure (so no preset has to
# drop any): each image is the farthest of MAX_REDRAWS drawings (size and position jittered) from the
# images already written, and must be over the trainer's bar by a level. A scene with no such drawing
# is skipped and the next scene takes its place: a small magenta star on red differs from a magenta
# triangle on red only in a few pixels' blue, so "a magenta star on a red background" is left out
# (29 of the 30 magenta scenes are drawn; the evaluation still prompts all 30).
DISTINCT_LEVELS = NEAR_DUPLICATE_LEVELS + 1.0
MAX_REDRAWS = 20


@dataclass(frozen=True)
class Concept:
    word: str  # the new word, used as trigger and inside captions
    kind: str  # "shape" or "colour"

    @property
    def dataset(self) -> str:
        return f"demo-{self.word}"

    def scenes(self) -> list[Scene]:
        """Every prompt that should show the concept (colour pairs for a shape, shapes × backgrounds for a colour)."""
        if self.kind == "shape":
            return [Scene(self.word, c, b) for c, b in itertools.product(COLOURS, COLOURS) if c != b]
        return [Scene(shape, self.word, b) for shape, b in itertools.product(SHAPES, COLOURS)]

    def shows_concept(self, verdict) -> bool:
        return (verdict.shape if self.kind == "shape" else verdict.colour) == self.word


CONCEPTS = {"ring": Concept("ring", "shape"), "magenta": Concept("magenta", "colour")}
JUDGE_PALETTE = {**COLOURS, **NEW_COLOURS}
JUDGE_SHAPES = (*SHAPES, *(c.word for c in CONCEPTS.values() if c.kind == "shape"))


def write_dataset(folder: Path, scenes: list[Scene], count: int, seed: int) -> Path:
    """``count`` PNGs cycling through ``scenes`` with a caption ``.txt`` beside each (kohya layout).

    No two images are near duplicates by the trainer's measure (see ``DISTINCT_LEVELS``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
        stale.with_suffix(".txt").unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    order = [scenes[int(i)] for i in rng.permutation(len(scenes))]
    thumbnails: list[np.ndarray] = []
    written = 0
    while written < count:
        before = written
        for scene in order:  # a second pass repeats scenes; one that cannot be apart is skipped
            image = _distinct_drawing(scene, rng, thumbnails)
            if image is None:
                continue
            image.save(folder / f"{written:03d}.png")
            (folder / f"{written:03d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
            written += 1
            if written == count:
                break
        if written == before:
            raise RuntimeError(f"only {written} distinct drawings of {len(scenes)} scene(s), {count} asked")
    return folder


def _distinct_drawing(scene: Scene, rng: np.random.Generator, thumbnails: list[np.ndarray]) -> Image.Image | None:
    """The one of MAX_REDRAWS drawings of ``scene`` farthest from every earlier image, if that is apart
    enough (its thumbnail is then added); None if none is."""
    best, best_thumbnail, best_distance = None, None, -1.0
    for _ in range(MAX_REDRAWS):
        pixels = render(scene, rng).repeat(STORED_SCALE, axis=0).repeat(STORED_SCALE, axis=1)
        image = Image.fromarray(pixels)
        # The trainer's own measure, on the stored file's pixels: what it computes when it loads them.
        thumbnail = colour_thumbnail(image)
        distance = min((thumbnail_distance(thumbnail, earlier) for earlier in thumbnails), default=np.inf)
        if distance > best_distance:
            best, best_thumbnail, best_distance = image, thumbnail, distance
    if best_distance <= DISTINCT_LEVELS:
        return None
    thumbnails.append(best_thumbnail)
    return best


def write_concept_datasets(
    datasets_dir: Path, images_per_concept: int = 40, prior_images: int = 40, seed: int = 7
) -> dict[str, Path]:
    """The ring and magenta datasets and the shared prior dataset, under ``datasets_dir``."""
    written = {}
    for index, concept in enumerate(CONCEPTS.values()):
        written[concept.word] = write_dataset(
            datasets_dir / concept.dataset, concept.scenes(), images_per_concept, seed + index
        )
    written["prior"] = write_dataset(datasets_dir / PRIOR_DATASET, training_scenes(), prior_images, seed + 100)
    return written
