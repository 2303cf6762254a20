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

# Training images are stored 8× larger than the model's 32 px with nearest-neighbour pixels: the
# trainer's usual minimum size for a base model's buckets is 256 px, and scaling back down to
# the native 32 px recovers the drawn pixels.
STORED_SCALE = 8
PRIOR_DATASET = "demo-prior"


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
    """``count`` PNGs cycling through ``scenes`` with a caption ``.txt`` beside each (kohya layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
        stale.with_suffix(".txt").unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scenes))
    for i in range(count):
        scene = scenes[int(order[i % len(scenes)])]
        pixels = render(scene, rng).repeat(STORED_SCALE, axis=0).repeat(STORED_SCALE, axis=1)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
    return folder


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
