"""Score a demo model (and LoRAs on it) by generating through the app's own engine and judging.

Base quality: every (shape, colour, background) prompt with fixed seeds; the rates of right
shape, colour, background and all three, overall and on the combinations held out of training.
LoRA effect: the rate at which a concept appears at each scale, beside the accuracy on ordinary
prompts at the same scale, so that a LoRA which teaches its concept by breaking everything else
shows up as such.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lorapg.demo.concepts import JUDGE_PALETTE, JUDGE_SHAPES, Concept
from lorapg.demo.judge import Verdict, judge_image
from lorapg.demo.shapes import COLOURS, SHAPES, Scene, all_scenes, held_out_scenes
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.request import GenerationRequest, LoraRequest

log = logging.getLogger(__name__)

STEPS = 20
SEEDS_PER_PROMPT = 4  # one batch; image i uses seed + i
BASE_SEED = 1000


@dataclass
class Tally:
    images: int = 0
    shape: int = 0
    colour: int = 0
    background: int = 0
    all_three: int = 0

    def add(self, scene: Scene, verdict: Verdict) -> None:
        self.images += 1
        self.shape += verdict.shape == scene.shape
        self.colour += verdict.colour == scene.colour
        self.background += verdict.background == scene.background
        self.all_three += (verdict.shape, verdict.colour, verdict.background) == (
            scene.shape,
            scene.colour,
            scene.background,
        )

    def rate(self, name: str) -> float:
        return getattr(self, name) / self.images if self.images else 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: round(self.rate(name), 4) for name in ("shape", "colour", "background", "all_three")} | {
            "images": self.images
        }


@dataclass
class BaseReport:
    overall: Tally = field(default_factory=Tally)
    held_out: Tally = field(default_factory=Tally)
    failures: list[tuple[str, Verdict]] = field(default_factory=list)

    def passes(self) -> bool:
        """The bar the bundled model must clear (issue: ≥ 97 % each attribute, ≥ 95 % all three)."""
        o = self.overall
        return (
            min(o.rate("shape"), o.rate("colour"), o.rate("background")) >= 0.97
            and o.rate("all_three") >= 0.95
            and self.held_out.rate("all_three") >= 0.95
        )


def generate(
    engine: DiffusionEngine,
    prompt: str,
    seed: int,
    count: int = SEEDS_PER_PROMPT,
    loras: Iterable[tuple[str, float]] = (),
) -> list:
    request = GenerationRequest(
        prompt=prompt,
        steps=STEPS,
        seed=seed,
        batch_size=count,
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
    )
    return engine.generate(request).images


def evaluate_base(
    engine: DiffusionEngine,
    scenes: list[Scene] | None = None,
    seeds: int = SEEDS_PER_PROMPT,
    on_progress: Callable[[int, int], None] | None = None,
) -> BaseReport:
    scenes = all_scenes() if scenes is None else scenes
    held = set(held_out_scenes())
    report = BaseReport()
    for index, scene in enumerate(scenes):
        for image in generate(engine, scene.caption, BASE_SEED + index * seeds, seeds):
            verdict = judge_image(image, COLOURS, SHAPES)
            report.overall.add(scene, verdict)
            if scene in held:
                report.held_out.add(scene, verdict)
            if (verdict.shape, verdict.colour, verdict.background) != (scene.shape, scene.colour, scene.background):
                report.failures.append((scene.caption, verdict))
        if on_progress:
            on_progress(index + 1, len(scenes))
    return report


def spread(scenes: list[Scene], count: int | None) -> list[Scene]:
    """``count`` scenes evenly spread over ``scenes`` (all of them for None)."""
    if count is None or count >= len(scenes):
        return scenes
    return scenes[:: max(1, len(scenes) // count)][:count]


def ordinary_scenes(count: int = 30) -> list[Scene]:
    """An even spread of the base model's own prompts, to watch for side effects of a LoRA."""
    return spread(all_scenes(), count)


@dataclass
class ConceptRow:
    scales: dict[str, float]
    concept_rates: dict[str, float]  # concept word -> share of its prompts that show it
    ordinary: float  # all three attributes right on ordinary prompts (judged with the new concepts known)


def _ordinary_accuracy(engine, scenes, loras, seeds) -> float:
    tally = Tally()
    for index, scene in enumerate(scenes):
        for image in generate(engine, scene.caption, BASE_SEED + index * seeds, seeds, loras):
            tally.add(scene, judge_image(image, JUDGE_PALETTE, JUDGE_SHAPES))
    return tally.rate("all_three")


def concept_rates(
    engine, concepts: Iterable[Concept], loras, seeds: int = 2, prompt_scenes: list[Scene] | None = None
) -> dict[str, float]:
    """Share of images that show each concept, judging every image once for all of them."""
    concepts = list(concepts)
    scenes = prompt_scenes or concepts[0].scenes()
    shown = dict.fromkeys((c.word for c in concepts), 0)
    total = 0
    for index, scene in enumerate(scenes):
        for image in generate(engine, scene.caption, BASE_SEED + index * seeds, seeds, loras):
            total += 1
            verdict = judge_image(image, JUDGE_PALETTE, JUDGE_SHAPES)
            for concept in concepts:
                shown[concept.word] += concept.shows_concept(verdict)
    return {word: count / total if total else 0.0 for word, count in shown.items()}


def concept_rate(engine, concept: Concept, loras, seeds: int = 2, prompt_scenes: list[Scene] | None = None) -> float:
    return concept_rates(engine, [concept], loras, seeds, prompt_scenes)[concept.word]


def lora_effect(
    engine: DiffusionEngine,
    lora_name: str,
    concept: Concept,
    scales=(0.0, 0.5, 1.0),
    seeds: int = 2,
    ordinary_count: int = 30,
    concept_count: int | None = None,
) -> list[ConceptRow]:
    """Concept rate and ordinary-prompt accuracy of one LoRA at each scale.

    ``seeds`` images of one prompt come from one batched call, which costs little more than one
    image on a CPU; fewer prompts with more seeds each is the cheap way to a given sample size.
    """
    rows = []
    ordinary = ordinary_scenes(ordinary_count)
    prompts = spread(concept.scenes(), concept_count)
    for scale in scales:
        loras = [(lora_name, scale)]
        rows.append(
            ConceptRow(
                {lora_name: scale},
                {concept.word: concept_rate(engine, concept, loras, seeds, prompts)},
                _ordinary_accuracy(engine, ordinary, loras, seeds),
            )
        )
    return rows


def blend_effect(
    engine: DiffusionEngine,
    shape: tuple[str, Concept],
    colour: tuple[str, Concept],
    blends=((1.0, 0.5), (0.5, 1.0)),
    seeds: int = 2,
) -> list[ConceptRow]:
    """Both LoRAs at once on prompts naming both concepts ("a magenta ring on …"), at several mixes."""
    (shape_lora, shape_concept), (colour_lora, colour_concept) = shape, colour
    prompts = [Scene(shape_concept.word, colour_concept.word, b) for b in COLOURS]
    rows = []
    for shape_scale, colour_scale in blends:
        loras = [(shape_lora, shape_scale), (colour_lora, colour_scale)]
        rows.append(
            ConceptRow(
                {shape_lora: shape_scale, colour_lora: colour_scale},
                concept_rates(engine, (shape_concept, colour_concept), loras, seeds, prompts),
                float("nan"),
            )
        )
    return rows


def load_engine(model: str | Path, lora_dir: Path, threads: int = 0) -> DiffusionEngine:
    """The app's engine on the CPU in fp32: the same loading and LoRA code a user's model takes."""
    import torch

    from lorapg.devices import set_cpu_threads
    from lorapg.diffusion.lora_library import LoraLibrary

    set_cpu_threads(threads)
    engine = DiffusionEngine(LoraLibrary(lora_dir), torch.device("cpu"), torch.float32, preview_every=10**6)
    engine.load_model(str(model))
    return engine
