"""``python -m lorapg train [CONFIG] [flags]``: the Train tab's config file, run headless with a tqdm bar.

Under ``accelerate launch --num_processes N`` every process runs this; the main one alone shows
progress, prints the result and notifies the webhook (see ``lorapg.training.distributed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

# flag -> TrainConfig field, for the common fields (the rest are set in the config file).
FLAG_FIELDS = {
    "images": "images",
    "trigger": "trigger",
    "name": "name",
    "preset": "preset",
    "epochs": "epochs",
    "max_steps": "max_steps",
    "rank": "rank",
    "lr": "unet_lr",
    "resolution": "resolution",
    "seed": "seed",
    "overwrite": "overwrite",
    "resume": "resume",
    "batch_size": "batch_size",
    "regularization_images": "regularization_images",
    "prior_loss_weight": "prior_loss_weight",
    "drop_near_duplicates": "drop_near_duplicates",
    "shuffle_tags": "shuffle_tags",
    "keep_tokens": "keep_tokens",
    "caption_dropout": "caption_dropout",
    # Flux.1 / SD 3.5 flow matching (ignored, with a log line, for SD 1.x/SDXL: see flow_matching).
    "weighting_scheme": "weighting_scheme",
    "logit_mean": "logit_mean",
    "logit_std": "logit_std",
    "mode_scale": "mode_scale",
    "guidance_scale": "guidance_scale",
}
# diffusers' scripts call the uniform timestep sampling "none"; TrainConfig calls it "uniform".
SCHEME_ALIASES = {"none": "uniform"}


def add_train_parser(commands: argparse._SubParsersAction, add_settings_arguments) -> None:
    train = commands.add_parser("train", help="train a LoRA from a folder of images (or a config file)")
    train.add_argument(
        "train_config",
        nargs="?",
        type=Path,
        metavar="CONFIG",
        help="training config TOML (the Train tab writes one); flags override its values",
    )
    add_settings_arguments(train)  # --model is the base model to train on
    train.add_argument(
        "--images", metavar="DIR", help="folder of PNG/JPEG/WebP images, captions in NAME.txt beside them"
    )
    train.add_argument(
        "--regularization-images",
        dest="regularization_images",
        metavar="DIR",
        help="prior preservation: ordinary images of the class with their captions (no trigger added)",
    )
    train.add_argument(
        "--prior-loss-weight",
        dest="prior_loss_weight",
        type=str,
        help="loss weight of the regularization images (default 1.0)",
    )
    train.add_argument("--trigger", help="trigger word put first in every caption")
    train.add_argument("--name", help="the LoRA's name (file NAME.safetensors)")
    train.add_argument("--preset", help="character, style or concept")
    train.add_argument("--epochs", type=str)
    train.add_argument("--max-steps", dest="max_steps", type=str, help="stop after N optimizer steps (0 = no limit)")
    train.add_argument("--rank", type=str)
    train.add_argument("--lr", type=str, help="UNet learning rate")
    train.add_argument("--resolution", type=str, help="training size in px (0 = the model's native size)")
    train.add_argument("--batch-size", dest="batch_size", type=str)
    train.add_argument("--seed", type=str)
    train.add_argument("--out", help="folder to write the LoRA to (default: the LoRA folder), or a .safetensors path")
    train.add_argument("--overwrite", action="store_true", default=None, help="replace an existing LoRA of that name")
    train.add_argument(
        "--drop-near-duplicates",
        dest="drop_near_duplicates",
        action="store_true",
        default=None,
        help="leave out images that look like an earlier one (resized or re-encoded copies); "
        "by default they are reported and kept",
    )
    train.add_argument(
        "--shuffle-tags",
        dest="shuffle_tags",
        action="store_true",
        default=None,
        help="shuffle each caption's comma-separated tags every step (after the first --keep-tokens)",
    )
    train.add_argument(
        "--keep-tokens", dest="keep_tokens", type=str, help="tags kept in place when shuffling (default 1: the trigger)"
    )
    train.add_argument(
        "--caption-dropout",
        dest="caption_dropout",
        type=str,
        help="chance (0-1) that an image trains on an empty caption at a step (default 0)",
    )
    add_flow_arguments(train)
    train.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        default=None,
        help="start over even when a checkpoint of this run exists",
    )


def add_flow_arguments(train: argparse.ArgumentParser) -> None:
    """Flux.1 / SD 3.5 timestep sampling and guidance, as diffusers' train_dreambooth_lora_flux/_sd3 name them."""
    from lorapg.training.config import WEIGHTING_SCHEMES

    flow = train.add_argument_group("Flux.1 / SD 3.5 (flow matching; ignored for SD 1.x/SDXL)")
    flow.add_argument(
        "--weighting-scheme",
        dest="weighting_scheme",
        choices=[*WEIGHTING_SCHEMES, *SCHEME_ALIASES],
        help="how training timesteps are drawn (default logit_normal; none = uniform)",
    )
    flow.add_argument("--logit-mean", dest="logit_mean", type=str, help="logit_normal: mean (default 0.0)")
    flow.add_argument("--logit-std", dest="logit_std", type=str, help="logit_normal: standard deviation (default 1.0)")
    flow.add_argument("--mode-scale", dest="mode_scale", type=str, help="mode: scale (default 1.29)")
    flow.add_argument(
        "--guidance-scale",
        dest="guidance_scale",
        type=str,
        help="Flux dev: the distilled guidance input while training (default 1.0)",
    )


def train_overrides(args: argparse.Namespace) -> dict:
    overrides = {field: getattr(args, flag) for flag, field in FLAG_FIELDS.items() if getattr(args, flag) is not None}
    if "weighting_scheme" in overrides:
        overrides["weighting_scheme"] = SCHEME_ALIASES.get(overrides["weighting_scheme"], overrides["weighting_scheme"])
    if args.model:
        overrides["model"] = args.model
    if args.quantize or args.quantize_components:  # the shared flags: how the frozen base is stored while training
        overrides["quantize"] = training_quantize(args.quantize, args.quantize_components)
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() == ".safetensors":
            overrides["out"] = str(out.parent)
            overrides.setdefault("name", out.stem)
        else:
            overrides["out"] = str(out)
    for folder in ("images", "regularization_images"):
        if getattr(args, folder):
            overrides[folder] = str(Path(getattr(args, folder)).expanduser())
    return overrides


def training_quantize(quantize: str | None, components: str | None) -> str:
    """The transformer's mode from --quantize and --quantize-components; training stores T5 alike,
    so a different mode named for T5 is refused rather than silently ignored."""
    from lorapg.diffusion.quantization import parse_plan
    from lorapg.errors import UserError, shorten

    plan = parse_plan(quantize, components)
    named = {item.partition("=")[0].strip().lower() for item in (components or "").split(",")}
    if "t5" in named and plan.t5 != plan.transformer:
        raise UserError(
            f"Setting quantize_components: {shorten(components, 60)!r} gives T5 another mode than the "
            "transformer, but training stores both alike; name one mode (e.g. transformer=nf4)."
        )
    return plan.transformer


def warn_near_duplicates(config, settings) -> None:
    """Near duplicates are the user's call: say which ones, and what the run does with them."""
    from lorapg.training.dataset import Dataset

    images = Path(config.images).expanduser() if config.images else None
    if images is None or not images.is_dir():
        return  # the service names the problem
    action = (
        "left out (--drop-near-duplicates)"
        if config.drop_near_duplicates
        else "kept; pass --drop-near-duplicates to leave them out"
    )
    for check in Dataset(images, settings.max_image_pixels).validate().near_duplicates:
        print(f"warning: near duplicate {action}: {check.near_duplicate_note}", file=sys.stderr)


def run_train(args: argparse.Namespace, settings) -> int:
    from lorapg.services.build import build_services
    from lorapg.training import distributed
    from lorapg.training.config import load_config

    distributed.check_launch()
    # The app's model trains when the file names none: its family (Flux.1, SD 3.5) picks the preset's version.
    config = load_config(args.train_config, train_overrides(args), preset_model=settings.model)
    if not distributed.is_main_process():
        # One run, N processes: the others' logs and webhook calls would repeat the main process's.
        logging.getLogger().setLevel(logging.ERROR)
        settings = dataclasses.replace(settings, notify_webhook="")
    services = build_services(settings, record_results=False)
    try:
        return _train(args, config, services.training)
    finally:
        # The job worker must end before the interpreter does (see JobQueue.close); Ctrl-C cancels the run.
        services.jobs.close()
        # Then the run's webhook, already on its way (a daemon thread would die with the process).
        services.training.close_notifications()


def _train(args: argparse.Namespace, config, service) -> int:
    from tqdm import tqdm

    from lorapg.training import distributed

    bar = None
    main = distributed.is_main_process()
    if main:
        warn_near_duplicates(config, service.settings)

    def on_progress(progress) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=0, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
        if progress.total_steps and bar.total != progress.total_steps:
            bar.reset(total=progress.total_steps)
        if progress.phase == "train":
            bar.n = progress.step
            postfix = f"epoch {progress.epoch}/{progress.epochs}"
            if progress.loss is not None:
                postfix += f", loss {progress.loss:.4f}"
            bar.set_postfix_str(postfix)
            bar.refresh()
        elif progress.message:
            bar.write(progress.message, file=sys.stderr)

    run = service.submit(config, on_progress)
    if main:
        print(f"config: {run.config_path}", file=sys.stderr)
    try:
        run.job.wait()
    except KeyboardInterrupt:
        print("cancelling after the current step…", file=sys.stderr)
        service.cancel(run.job.id)
        run.job.wait()
    finally:
        if bar is not None:
            bar.close()
    if run.job.error:
        from lorapg.errors import UserError

        raise UserError(run.job.error)
    result = run.job.result
    if not main:
        return 130 if result.cancelled else 0
    if result.cancelled:
        checkpoint = result.checkpoint or "none"
        print(
            f"cancelled at step {result.steps} of {result.total_steps}; checkpoint: {checkpoint}. "
            "Run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    for path in result.epoch_loras:
        print(f"epoch LoRA: {path}", file=sys.stderr)
    print(f"{result.lora_path}\tsteps={result.steps}\t{result.steps_per_s:.2f} steps/s")
    return 0
