"""Command line: ``python -m lorapg generate …`` runs the same service the UI calls, headless."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lorapg.errors import UserError

log = logging.getLogger(__name__)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the app and every CLI command; they override the TOML file."""
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--model", help="Hugging Face id, diffusers folder or .safetensors checkpoint")
    parser.add_argument("--lora-dir", dest="lora_dir", help="folder of LoRA .safetensors files")
    parser.add_argument("--outputs", help="folder for images and the gallery database")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--dtype", help="auto, float16, bfloat16 or float32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--allow-pickle", dest="allow_pickle", action="store_true", default=None,
                        help="allow pickled .ckpt/.pt/.bin checkpoints (they can run code: trust the source)")
    parser.add_argument("--model-config", dest="single_file_config",
                        help="diffusers folder whose configs describe a single-file checkpoint (offline use)")
    parser.add_argument("--verbose", action="store_true", help="debug logging and tracebacks")


SETTING_FLAGS = ("model", "lora_dir", "outputs", "device", "dtype", "threads", "allow_pickle", "single_file_config")


def settings_from_args(args: argparse.Namespace, extra: tuple[str, ...] = ()):
    from lorapg.config import load_settings

    overrides = {name: getattr(args, name, None) for name in SETTING_FLAGS + extra}
    return load_settings(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lorapg", description="LoRA Playground command line")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images and write PNGs")
    add_settings_arguments(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative", default="")
    gen.add_argument("--lora", action="append", default=[], metavar="NAME_OR_PATH:SCALE",
                     help="a LoRA from the LoRA folder (by name, or a path inside it) and its scale; repeatable")
    gen.add_argument("--steps", default="30")
    gen.add_argument("--cfg", default="7")
    gen.add_argument("--sampler", default=None)
    gen.add_argument("--seed", default="-1", help="0..4294967295, or -1 for random")
    gen.add_argument("--width", default=None)
    gen.add_argument("--height", default=None)
    gen.add_argument("--batch", default="1")
    gen.add_argument("--out", required=True, type=Path, help="PNG file (batch: NAME-1.png, …) or a folder")
    gen.add_argument("--no-gallery", action="store_true", help="do not record the images in the gallery")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lorapg.bootstrap import configure_logging

    configure_logging(args.verbose)
    try:
        if args.command == "generate":
            return run_generate(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # no traceback for users; --verbose shows it
        if args.verbose:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --verbose for details)", file=sys.stderr)
        return 1
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lorapg.bootstrap import build_runtime
    from lorapg.diffusion.request import GenerationRequest, parse_lora_list
    from lorapg.diffusion.samplers import DEFAULT_SAMPLER
    from lorapg.outputs import record_in_gallery, write_result_pngs

    settings = settings_from_args(args)
    loras = tuple(lora for spec in args.lora for lora in parse_lora_list(spec))
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        loras=loras,
        steps=args.steps,
        guidance_scale=args.cfg,
        sampler=args.sampler or DEFAULT_SAMPLER,
        width=args.width,
        height=args.height,
        seed=args.seed,
        batch_size=args.batch,
    )
    runtime = build_runtime(settings, record_results=False)
    service = runtime.service
    service.prepare(request)  # bad LoRAs fail before the model loads
    bar = tqdm(total=0, desc="generate", unit="step", file=sys.stderr)

    def on_progress(job) -> None:
        if job.total and bar.total != job.total:
            bar.reset(total=job.total)
        bar.n = job.step
        bar.set_postfix_str(job.message if not job.total else "")
        bar.refresh()

    result = service.generate(request, on_progress=on_progress)
    bar.close()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    paths = write_result_pngs(result, args.out)
    if not args.no_gallery:
        record_in_gallery(runtime.gallery, result)
    for path, seed in zip(paths, result.seeds, strict=True):
        print(f"{path}\tseed={seed}")
    print(f"seed: {result.seeds[0]}")
    return 0
