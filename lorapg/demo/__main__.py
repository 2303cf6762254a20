"""``python -m lorapg.demo train|evaluate|datasets|loras``: rebuild, score and extend the demo model.

- ``train``: the model from scratch (seeded; 40 min on this project's 2-core machine).
- ``evaluate``: every (shape, colour, background) prompt at 20 steps with fixed seeds, judged.
- ``datasets``: the ring / magenta / prior datasets under ``models/datasets``.
- ``loras``: write the datasets, train a ring and a magenta LoRA with the ``demo-concept`` preset
  through the app's trainer, and report their effect at scales 0, 0.5, 1.0 and blended.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from lorapg.quiet import quiet_third_party_imports

quiet_third_party_imports()

from lorapg.config import DEMO_MODEL  # noqa: E402
from lorapg.errors import UserError  # noqa: E402

log = logging.getLogger("lorapg.demo")


def _scene_argument(text: str):
    """``SHAPE,COLOUR,BACKGROUND`` as a Scene; argparse turns the error into a one-line usage message."""
    from lorapg.demo.concepts import JUDGE_PALETTE, JUDGE_SHAPES
    from lorapg.demo.shapes import Scene

    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not SHAPE,COLOUR,BACKGROUND (for example star,red,blue)")
    shape, colour, background = parts
    if shape not in JUDGE_SHAPES:
        raise argparse.ArgumentTypeError(f"unknown shape {shape!r}; choose one of {', '.join(JUDGE_SHAPES)}")
    for name in (colour, background):
        if name not in JUDGE_PALETTE:
            raise argparse.ArgumentTypeError(f"unknown colour {name!r}; choose one of {', '.join(JUDGE_PALETTE)}")
    return Scene(shape, colour, background)


def _lora_argument(text: str) -> tuple[str, float]:
    """NAME:SCALE, read by the app's one NAME:SCALE parser (lorapg.lora_tags) as one LoRA."""
    from lorapg.lora_tags import parse_lora_list

    try:
        loras = parse_lora_list(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    # A contact sheet compares scales, so the scale is not optional here (the parser would read 1).
    if len(loras) != 1 or loras[0][0] == text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:SCALE (for example demo-ring:0.8)")
    return loras[0]


def _count_argument(text: str) -> int:
    """A number of prompts or images: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lorapg.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the demo model from scratch (about 40 min on 2 CPU cores)")
    train.add_argument("--out", type=Path, default=DEMO_MODEL, help=f"output folder (default {DEMO_MODEL})")
    train.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (default 2; the committed weights were made with 1, which gives "
        "a model of the same quality, not the identical file)",
    )
    train.add_argument("--seed", type=int, default=0)
    evaluate = commands.add_parser("evaluate", help="score the model on every prompt")
    evaluate.add_argument("--model", default=str(DEMO_MODEL))
    evaluate.add_argument("--seeds", type=_count_argument, default=4, help="images per prompt (default 4)")
    evaluate.add_argument("--threads", type=int, default=1)
    evaluate.add_argument("--json", type=Path, help="also write the scores to this file")
    sheet = commands.add_parser("sheet", help="a PNG contact sheet of generated images")
    sheet.add_argument("--model", default=str(DEMO_MODEL))
    sheet.add_argument("--out", type=Path, required=True)
    sheet.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME:SCALE",
        type=_lora_argument,
        help="apply a LoRA from --lora-dir (repeatable)",
    )
    sheet.add_argument("--lora-dir", type=Path, default=Path("models/loras"))
    sheet.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="SHAPE,COLOUR,BACKGROUND",
        type=_scene_argument,
        help="scenes to draw (default: ten across the shapes)",
    )
    datasets = commands.add_parser("datasets", help="write the concept and prior datasets")
    datasets.add_argument("--datasets-dir", type=Path, default=Path("models/datasets"))
    loras = commands.add_parser("loras", help="train the ring and magenta LoRAs and measure their effect")
    loras.add_argument("--model", default=str(DEMO_MODEL))
    loras.add_argument("--datasets-dir", type=Path, default=Path("models/datasets"))
    loras.add_argument("--lora-dir", type=Path, default=Path("models/loras"))
    loras.add_argument("--work-dir", type=Path, default=Path("models/training"))
    loras.add_argument("--seeds", type=_count_argument, default=2, help="images per prompt (default 2)")
    loras.add_argument("--threads", type=int, default=1)
    loras.add_argument("--json", type=Path, help="also write the results to this file")
    effect = commands.add_parser("effect", help="concept rate and ordinary accuracy of one LoRA at scales 0, 0.5, 1")
    effect.add_argument("--lora", required=True, help="LoRA name in --lora-dir (without .safetensors)")
    effect.add_argument(
        "--concept", required=True, choices=sorted(_concept_words()), help="what the LoRA was trained to add"
    )
    effect.add_argument("--model", default=str(DEMO_MODEL))
    effect.add_argument("--lora-dir", type=Path, default=Path("models/loras"))
    effect.add_argument("--seeds", type=_count_argument, default=2, help="images per prompt (default 2)")
    effect.add_argument("--prompts", type=_count_argument, help="concept prompts, evenly spread (default: all 30)")
    effect.add_argument(
        "--ordinary", type=_count_argument, default=30, help="ordinary prompts to watch for side effects"
    )
    effect.add_argument("--threads", type=int, default=1)
    effect.add_argument("--json", type=Path, help="also write the results to this file")
    return parser


def _concept_words() -> list[str]:
    from lorapg.demo.concepts import CONCEPTS

    return list(CONCEPTS)


def _evaluate(args) -> int:
    from lorapg.demo.evaluate import evaluate_base, load_engine

    engine = load_engine(args.model, Path(args.model) / "no-loras", args.threads)
    started = time.monotonic()
    report = evaluate_base(
        engine,
        seeds=args.seeds,
        on_progress=lambda done, total: done % 25 == 0 and log.info("%d/%d prompts", done, total),
    )
    scores = {
        "overall": report.overall.as_dict(),
        "held_out": report.held_out.as_dict(),
        "seconds": round(time.monotonic() - started, 1),
        "passes": report.passes(),
    }
    print(json.dumps(scores, indent=2))
    for caption, verdict in report.failures[:20]:
        log.info("miss: %r judged as %s %s on %s", caption, verdict.colour, verdict.shape, verdict.background)
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    return 0 if report.passes() else 1


def train_concept_loras(model: str, datasets_dir: Path, lora_dir: Path, work_dir: Path) -> dict[str, dict]:
    """Both concept LoRAs through the app's TrainingService (the Train tab's and CLI's path)."""
    from lorapg.config import Settings
    from lorapg.demo.concepts import CONCEPTS, write_concept_datasets
    from lorapg.jobs import JobQueue
    from lorapg.services.training import TrainingService

    folders = write_concept_datasets(datasets_dir)
    settings = Settings(model=model, lora_dir=lora_dir, models_dir=work_dir.parent)
    jobs = JobQueue()
    service = TrainingService(settings, jobs)
    trained = {}
    try:
        for word, concept in CONCEPTS.items():
            config = service.config_for(
                {
                    "name": concept.dataset,
                    "model": model,
                    "images": str(folders[word]),
                    "trigger": word,
                    "regularization_images": str(folders["prior"]),
                    "preset": "demo-concept",
                    "out": str(lora_dir),
                    "work_dir": str(work_dir / concept.dataset),
                    "overwrite": True,
                    "resume": False,
                    "sample_steps": 0,
                }
            )
            started = time.monotonic()
            result = service.train(config)
            trained[word] = {
                "lora": concept.dataset,
                "steps": result.steps,
                "seconds": round(time.monotonic() - started, 1),
            }
            log.info("trained %s: %d steps in %.0f s", result.lora_path, result.steps, trained[word]["seconds"])
    finally:
        jobs.shutdown()
    return trained


def _loras(args) -> int:
    from lorapg.demo.concepts import CONCEPTS
    from lorapg.demo.evaluate import blend_effect, load_engine
    from lorapg.devices import set_cpu_threads

    set_cpu_threads(args.threads)
    trained = train_concept_loras(args.model, args.datasets_dir, args.lora_dir, args.work_dir)
    engine = load_engine(args.model, args.lora_dir, args.threads)
    results = {"trained": trained, "effect": {}, "blend": []}
    for word, concept in CONCEPTS.items():
        results["effect"][word] = _effect_rows(engine, concept.dataset, concept, args.seeds, 30)
    ring, magenta = CONCEPTS["ring"], CONCEPTS["magenta"]
    for row in blend_effect(engine, (ring.dataset, ring), (magenta.dataset, magenta), seeds=args.seeds):
        results["blend"].append({"scales": row.scales, "concept_rates": row.concept_rates})
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def _effect_rows(engine, lora: str, concept, seeds: int, ordinary: int, prompts: int | None = None) -> list[dict]:
    from lorapg.demo.evaluate import lora_effect

    rows = lora_effect(engine, lora, concept, seeds=seeds, ordinary_count=ordinary, concept_count=prompts)
    return [
        {
            "scale": r.scales[lora],
            "concept_rate": round(r.concept_rates[concept.word], 4),
            "ordinary_accuracy": round(r.ordinary, 4),
        }
        for r in rows
    ]


def _effect(args) -> int:
    from lorapg.demo.concepts import CONCEPTS
    from lorapg.demo.evaluate import load_engine

    engine = load_engine(args.model, args.lora_dir, args.threads)
    engine.library.resolve(args.lora)  # an unknown name is a UserError before any image is made
    rows = _effect_rows(engine, args.lora, CONCEPTS[args.concept], args.seeds, args.ordinary, args.prompts)
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


def _sheet(args) -> int:
    from lorapg.demo.evaluate import load_engine
    from lorapg.demo.shapes import all_scenes, held_out_scenes
    from lorapg.demo.sheet import contact_sheet

    scenes = args.prompt or all_scenes()[7::16] + held_out_scenes()[:1]
    loras = tuple(args.lora)
    engine = load_engine(args.model, args.lora_dir)
    contact_sheet(engine, scenes, loras=loras).save(args.out)
    print(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "train":
            from lorapg.demo.training import Recipe, train_demo_model

            train_demo_model(args.out, replace(Recipe(), threads=args.threads, seed=args.seed))
            return 0
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "sheet":
            return _sheet(args)
        if args.command == "effect":
            return _effect(args)
        if args.command == "datasets":
            from lorapg.demo.concepts import write_concept_datasets

            for name, folder in write_concept_datasets(args.datasets_dir).items():
                print(f"{name}\t{folder}")
            return 0
        return _loras(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from lorapg.process_exit import skip_the_final_collection

    try:
        sys.exit(main())
    finally:  # done: exit without collecting the whole heap (seconds after a model was loaded)
        skip_the_final_collection()
