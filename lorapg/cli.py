"""Command line: ``python -m lorapg generate …`` runs the same service the UI calls, headless."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lorapg.controlnet_cli import add_controlnet_arguments, controlnet_from_args
from lorapg.errors import UserError
from lorapg.hires_cli import add_hires_arguments, hires_from_args
from lorapg.limits import (
    BATCH_SIZE,
    CFG_SCALE,
    CLIP_SKIP,
    LORA_SCALE,
    RANDOM_SEED,
    SEED,
    SIZE,
    SIZE_MULTIPLE,
    STEPS,
    VARIATION_STRENGTH,
)

log = logging.getLogger(__name__)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the app and every CLI command; they override the TOML file."""
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument(
        "--model", help="Hugging Face id, diffusers folder, .safetensors checkpoint or .gguf Flux.1/SD 3.5 transformer"
    )
    parser.add_argument("--lora-dir", dest="lora_dir", help="folder of LoRA .safetensors files")
    parser.add_argument("--outputs", help="folder for images and the gallery database")
    parser.add_argument(
        "--gallery-keep",
        dest="gallery_keep",
        type=int,
        help="newest images the gallery keeps (default 20; 0 keeps all; starred are never pruned)",
    )
    parser.add_argument(
        "--models-dir", dest="models_dir", help="folder for datasets, training runs and cached LLMs (default models)"
    )
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument(
        "--devices",
        help="one generation worker per device, all behind one queue, e.g. cuda:0,cuda:1 (overrides --device)",
    )
    parser.add_argument(
        "--train-device",
        dest="train_device",
        help="with --devices: the device training runs on (default the first); the others keep generating",
    )
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="Ray cluster whose lorapg workers join this app's queue (needs ray installed): run its head on THIS "
        "machine (`ray start --head --node-ip-address PRIVATE_IP`; the app exits ~60 s after losing the head) "
        "and keep it on a private network: Ray's ports have no authentication (see README)",
    )
    parser.add_argument("--dtype", help="auto, float16, bfloat16 or float32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (0 = torch default)")
    parser.add_argument(
        "--allow-pickle",
        dest="allow_pickle",
        action="store_true",
        default=None,
        help="allow pickled .ckpt/.pt/.bin checkpoints (they can run code: trust the source)",
    )
    parser.add_argument(
        "--model-config",
        dest="single_file_config",
        help="diffusers folder whose configs describe a single-file checkpoint (offline use)",
    )
    parser.add_argument(
        "--vram-budget",
        dest="vram_budget",
        help="GPU memory the models may use, e.g. 10GB (default: free memory minus a reserve)",
    )
    parser.add_argument("--policy", help="GPU memory policy: auto (LRU), lowvram or all-gpu")
    parser.add_argument("--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument(
        "--api",
        action="store_true",
        default=None,
        help="serve the AUTOMATIC1111-compatible REST API at /sdapi/v1 beside the UI",
    )
    parser.add_argument(
        "--api-auth",
        dest="api_auth",
        metavar="USER:PASS[,USER2:PASS2]",
        help="HTTP Basic credentials required on every API route",
    )
    parser.add_argument(
        "--compile",
        dest="compile_unet",
        action="store_true",
        default=None,
        help="torch.compile the UNet (slow first image, faster after); changing LoRAs does not recompile",
    )
    parser.add_argument(
        "--quantize",
        choices=("none", "fp8", "nf4"),
        help="Flux.1 / SD 3.5: store the transformer and T5 encoder as fp8 or 4-bit NF4 (bitsandbytes); FLUX.1-dev's "
        "weights take ~21 GB in fp8, ~13 GB in NF4, ~31 GB unquantized (default none)",
    )
    parser.add_argument(
        "--quantize-components",
        dest="quantize_components",
        metavar="COMPONENT=MODE,...",
        help="per-component override of --quantize, e.g. transformer=nf4,t5=fp8",
    )
    parser.add_argument(
        "--notify-webhook",
        dest="notify_webhook",
        metavar="URL",
        help="http(s) URL that gets a JSON POST when a training run ends (done, error or cancelled)",
    )


SETTING_FLAGS = (
    "model",
    "lora_dir",
    "models_dir",
    "outputs",
    "gallery_keep",
    "device",
    "devices",
    "train_device",
    "dtype",
    "threads",
    "allow_pickle",
    "single_file_config",
    "vram_budget",
    "policy",
    "api",
    "api_auth",
    "compile_unet",
    "notify_webhook",
    "quantize",
    "quantize_components",
    "ray",
)
LLM_SETTING_FLAGS = ("llm_backend", "llm_model", "llm_url", "llm_api_key")


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that pick the prompt tools' LLM (the app and the enhance/rewrite commands)."""
    parser.add_argument(
        "--llm-backend", dest="llm_backend", help="auto (default), transformers, bundled, openai or rules"
    )
    parser.add_argument(
        "--llm-model", dest="llm_model", help="hub id, folder or .gguf (transformers); model name (openai)"
    )
    parser.add_argument("--llm-url", dest="llm_url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--llm-api-key", dest="llm_api_key", help="API key for --llm-url (if it needs one)")


def settings_from_args(args: argparse.Namespace, extra: tuple[str, ...] = ()):
    from lorapg.config import load_settings

    overrides = {name: getattr(args, name, None) for name in SETTING_FLAGS + extra}
    return load_settings(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lorapg", description="LoRA Playground command line")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images and write PNGs")
    add_settings_arguments(gen)
    add_request_arguments(gen)
    gen.add_argument(
        "--batch",
        default=f"{BATCH_SIZE.default:g}",
        help=f"images with consecutive seeds, {BATCH_SIZE.describe()} (default %(default)s)",
    )
    gen.add_argument("--out", required=True, type=Path, help="PNG file (batch: NAME-1.png, …) or a folder")
    gen.add_argument("--no-gallery", action="store_true", help="do not record the images in the gallery")
    add_img2img_arguments(gen)
    add_hires_arguments(gen)
    add_controlnet_arguments(gen)
    add_grid_parser(commands)
    add_gallery_parser(commands)
    add_prompt_parsers(commands)
    from lorapg.train_cli import add_train_parser

    add_train_parser(commands, add_settings_arguments)
    from lorapg.lora_cli import add_lora_parser

    add_lora_parser(commands, add_settings_arguments)
    from lorapg.dataset_cli import add_dataset_parser

    add_dataset_parser(commands, add_settings_arguments)
    from lorapg.upscale_cli import add_upscale_parser

    add_upscale_parser(commands, add_settings_arguments)
    from lorapg.worker_cli import add_worker_parser

    add_worker_parser(commands, add_settings_arguments)
    return parser


def add_request_arguments(gen: argparse.ArgumentParser) -> None:
    """The generation options ``generate`` and ``grid`` share."""
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative", default="")
    # Values stay strings: request validation checks them and names the field, as for the UI and the API.
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME_OR_PATH:SCALE",
        help="a LoRA from the LoRA folder (by name, or a path inside it) and its scale "
        f"({LORA_SCALE.describe()}, default {LORA_SCALE.default:g}); repeatable",
    )
    # Left out: the model family's defaults (GenerationService.with_defaults), e.g. Flux dev 28 steps at
    # guidance 3.5, schnell 4 steps without CFG; SD this app's.
    gen.add_argument(
        "--steps", default=None, help=f"{STEPS.describe()} (default: the model family's; SD {STEPS.default:g})"
    )
    gen.add_argument(
        "--cfg",
        default=None,
        help=f"CFG scale, {CFG_SCALE.describe()}; Flux dev: its distilled guidance "
        f"(default: the model family's; SD {CFG_SCALE.default:g})",
    )
    gen.add_argument(
        "--sampler", default=None, help="default: the model family's (SD: DPM++ 2M Karras; Flux, SD 3.5: Euler)"
    )
    gen.add_argument("--seed", default=str(RANDOM_SEED), help=f"{SEED.describe()}, or {RANDOM_SEED} for random")
    for side in ("width", "height"):
        gen.add_argument(
            f"--{side}",
            default=None,
            help=f"{SIZE.describe()} px, a multiple of {SIZE_MULTIPLE} (default: the model's native size)",
        )
    gen.add_argument(
        "--clip-skip",
        dest="clip_skip",
        default=f"{CLIP_SKIP.default:g}",
        help=f"A1111's Clip skip, {CLIP_SKIP.describe()}: 2 reads the text encoder's penultimate layer; "
        "SD 1.x only (default %(default)s)",
    )
    gen.add_argument(
        "--variation-seed",
        dest="variation_seed",
        default=str(RANDOM_SEED),
        help=f"A1111's variation seed, {SEED.describe()} or {RANDOM_SEED} for random; image i of a batch uses "
        "it + i (and all keep --seed)",
    )
    gen.add_argument(
        "--variation-strength",
        dest="variation_strength",
        default=f"{VARIATION_STRENGTH.default:g}",
        help=f"how far to move from --seed's image towards the variation seed's, {VARIATION_STRENGTH.describe()}: "
        "0 = the seed's image exactly, 0.1-0.3 = the same image with other details (default %(default)s)",
    )


def add_img2img_arguments(gen: argparse.ArgumentParser) -> None:
    """img2img (--init-image) and inpainting (--mask); the values are checked with the request."""
    from lorapg.limits import DENOISING_STRENGTH, INPAINT_PADDING, MASK_BLUR, RESIZE_MODES

    group = gen.add_argument_group("img2img and inpainting")
    group.add_argument("--init-image", dest="init_image", type=Path, help="start from this image (img2img)")
    group.add_argument(
        "--strength",
        default=f"{DENOISING_STRENGTH.default:g}",
        help=f"denoising strength, {DENOISING_STRENGTH.describe()}: 0 keeps the image, 1 repaints it "
        "(default %(default)s)",
    )
    modes = ", ".join(f"{number} {label}" for number, label in RESIZE_MODES.items())
    group.add_argument("--resize-mode", dest="resize_mode", default="0", help=f"{modes} (default %(default)s)")
    group.add_argument("--mask", type=Path, help="inpainting mask, the init image's size: white = repaint")
    group.add_argument(
        "--mask-blur",
        dest="mask_blur",
        default=f"{MASK_BLUR.default:g}",
        help=f"{MASK_BLUR.describe()} px (default %(default)s)",
    )
    group.add_argument("--invert-mask", dest="invert_mask", action="store_true", help="repaint the black part instead")
    group.add_argument(
        "--masked-content",
        dest="masked_content",
        choices=["original", "fill"],
        default="original",
        help="what the masked area starts from (default %(default)s)",
    )
    group.add_argument(
        "--only-masked", dest="only_masked", action="store_true", help="repaint the mask's box at full size; paste back"
    )
    group.add_argument(
        "--only-masked-padding",
        dest="only_masked_padding",
        default=f"{INPAINT_PADDING.default:g}",
        help=f"pixels around the mask's box, {INPAINT_PADDING.describe()} (default %(default)s)",
    )


def img2img_from_args(args: argparse.Namespace):
    """The request's img2img options from ``add_img2img_arguments`` (None: txt2img)."""
    from lorapg.diffusion.img2img import FILL, ORIGINAL, Img2ImgOptions

    if getattr(args, "init_image", None) is None:
        if getattr(args, "mask", None) is not None:
            raise UserError("--mask needs --init-image: the mask says which part of that image to repaint.")
        return None
    return Img2ImgOptions(
        image=args.init_image,
        strength=args.strength,
        resize_mode=args.resize_mode,
        mask=args.mask,
        mask_blur=args.mask_blur,
        mask_invert=args.invert_mask,
        inpainting_fill=FILL if args.masked_content == "fill" else ORIGINAL,
        only_masked=args.only_masked,
        only_masked_padding=args.only_masked_padding,
    )


def add_grid_parser(commands: argparse._SubParsersAction) -> None:
    grid = commands.add_parser("grid", help="a comparison grid (X/Y/Z plot): one labelled PNG per Z value")
    add_settings_arguments(grid)
    add_request_arguments(grid)
    kinds = (
        "lora:NAME (scales), lora-file (LoRA names), lora-scale (their scales), seed, steps, cfg, sampler, "
        "checkpoint, prompt-sr"
    )
    grid.add_argument("--x", required=True, metavar="KIND=V1,V2,…", help=f"columns; KIND is one of {kinds}")
    grid.add_argument("--y", metavar="KIND=V1,V2,…", help="rows")
    grid.add_argument("--z", metavar="KIND=V1,V2,…", help="one grid per value")
    grid.add_argument("--out", type=Path, help="grid PNG (several Z values: NAME-1.png, …); default outputs/grids")
    grid.add_argument("--no-gallery", action="store_true", help="do not record the cells in the gallery")


def add_gallery_parser(commands: argparse._SubParsersAction) -> None:
    gallery = commands.add_parser("gallery", help="list, show, delete or export gallery images")
    actions = gallery.add_subparsers(dest="gallery_command", required=True)
    listing = actions.add_parser("list", help="images, newest first")
    listing.add_argument("--query", help="only images whose prompt has every one of these words")
    listing.add_argument("--lora", help="only images that used this LoRA")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (0 = all; default 50)")
    show = actions.add_parser("show", help="one image's file and generation parameters")
    delete = actions.add_parser("delete", help="delete one image (file and gallery entry)")
    export = actions.add_parser("export", help="copy the images' PNGs (metadata intact) into a folder")
    export.add_argument("dir", type=Path, help="folder to copy into (created if missing)")
    export.add_argument("--query", help="only images whose prompt has every one of these words")
    export.add_argument("--lora", help="only images that used this LoRA")
    for action in (show, delete):
        # A string, not type=int: the service checks it and explains in one line what is wrong.
        action.add_argument("id", help="gallery image id (see `gallery list`)")
    for action in (listing, show, delete, export):
        add_settings_arguments(action)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("gallery", "enhance", "rewrite", "lora", "dataset"):
        # The gallery (and the prompt tools, until an LLM loads) needs no models: skip configure_logging,
        # whose imports (torch, diffusers) take seconds.
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
        )
    else:
        from lorapg.services.build import configure_logging

        configure_logging(args.verbose, tracebacks=args.verbose)  # --verbose shows tracebacks
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "grid":
            return run_grid(args)
        if args.command == "gallery":
            return run_gallery(args)
        if args.command in ("enhance", "rewrite"):
            return run_prompt(args)
        if args.command == "train":
            from lorapg.train_cli import run_train

            return run_train(args, settings_from_args(args))
        if args.command == "lora":
            from lorapg.lora_cli import run_lora

            return run_lora(args, settings_from_args(args))
        if args.command == "dataset":
            from lorapg.dataset_cli import run_dataset

            return run_dataset(args, settings_from_args(args))
        if args.command == "upscale":
            from lorapg.upscale_cli import run_upscale

            return run_upscale(args, settings_from_args(args))
        if args.command == "worker":
            from lorapg.worker_cli import run_worker

            return run_worker(args, settings_from_args(args))
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


def request_from_args(args: argparse.Namespace):
    """The GenerationRequest the options of ``add_request_arguments`` (and ``--batch``) describe."""
    from lorapg.diffusion.request import GenerationRequest, parse_lora_list

    loras = tuple(lora for spec in args.lora for lora in parse_lora_list(spec))
    return GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        loras=loras,
        steps=args.steps,
        guidance_scale=args.cfg,
        sampler=args.sampler or None,  # None (and steps, cfg): the family's, filled in by the service
        width=args.width,
        height=args.height,
        seed=args.seed,
        batch_size=getattr(args, "batch", BATCH_SIZE.default),
        clip_skip=args.clip_skip,
        variation_seed=args.variation_seed,
        variation_strength=args.variation_strength,
        img2img=img2img_from_args(args),
        hires=hires_from_args(args),
        controlnet=controlnet_from_args(args),
    )


def run_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lorapg.outputs import record_in_gallery, write_result_pngs
    from lorapg.services.build import build_services

    settings = settings_from_args(args)
    request = request_from_args(args)
    runtime = build_services(settings, record_results=False)
    service = runtime.service
    bar = None
    try:
        service.prepare(request)  # bad LoRAs fail before the model loads
        bar = tqdm(total=0, desc="generate", unit="step", file=sys.stderr)

        def on_progress(job) -> None:
            if job.total and bar.total != job.total:
                bar.reset(total=job.total)
            bar.n = job.step
            bar.set_postfix_str(job.message if not job.total else "")
            bar.refresh()

        result = service.generate(request, on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()  # before the error line, so that line is the last one on stderr
        # The job worker (and --ray's worker discovery) must end before the interpreter does (see
        # JobQueue.close); Ctrl-C cancels the job.
        runtime.close()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    paths = write_result_pngs(result, args.out)
    if not args.no_gallery:
        record_in_gallery(runtime.gallery, result)
    variations = result.variation_seeds or [None] * len(paths)
    for path, seed, variation in zip(paths, result.seeds, variations, strict=True):
        print(f"{path}\tseed={seed}" + (f"\tvariation_seed={variation}" if variation is not None else ""))
    print(f"seed: {result.seeds[0]}")
    return 0


def run_grid(args: argparse.Namespace) -> int:
    """Prints each grid's path, then the cell count; the cells go to the gallery unless --no-gallery."""
    from lorapg.services.build import build_services
    from lorapg.services.grid import GridService

    settings = settings_from_args(args)
    runtime = build_services(settings, record_results=not args.no_gallery)
    grids = GridService(settings, runtime.service)
    try:
        grids.plan(request_from_args(args), args.x, args.y, args.z)  # bad axes fail before the model loads
        last = [""]

        def on_progress(job) -> None:
            # Polled: a quick cell may pass unseen; each one seen is shown once ("cell k of N").
            message = job.message.partition(":")[0]
            if message.startswith("cell ") and message != last[0]:
                last[0] = message
                print(message, file=sys.stderr)

        result = grids.run(request_from_args(args), args.x, args.y, args.z, out=args.out, on_progress=on_progress)
    finally:
        runtime.close()  # the job worker (and --ray discovery) must end before the interpreter does
    for path in result.grids:
        print(path)
    print(f"cells: {result.done} of {len(result.cells)}" + (" (cancelled)" if result.cancelled else ""))
    return 130 if result.cancelled else 0


def add_prompt_parsers(commands: argparse._SubParsersAction) -> None:
    enhance = commands.add_parser("enhance", help="expand keywords into a detailed prompt (prints it)")
    enhance.add_argument("--keywords", required=True, help="a few words: subject, mood, setting")
    rewrite = commands.add_parser("rewrite", help="rewrite a prompt with a preset (prints it)")
    rewrite.add_argument(
        "--preset",
        required=True,
        help="fight, portrait, cinematic, dark, vibrant, manga, painted, hd (or a file you added)",
    )
    rewrite.add_argument("--prompt", required=True)
    for command in (enhance, rewrite):
        command.add_argument(
            "--lora",
            action="append",
            default=[],
            metavar="NAME",
            help="a LoRA from the LoRA folder whose trigger words and style to use; repeatable",
        )
        command.add_argument("--seed", type=int, default=None, help="makes the LLM's sampling repeatable")
        add_settings_arguments(command)
        add_llm_arguments(command)


def run_prompt(args: argparse.Namespace) -> int:
    """The prompt on stdout (pipe it into ``generate --prompt``); who wrote it on stderr."""
    from lorapg.services.build import build_services
    from lorapg.services.prompts import result_note

    runtime = build_services(settings_from_args(args, extra=LLM_SETTING_FLAGS), engines=False)
    service = runtime.prompts
    try:
        if args.command == "enhance":
            result = service.enhance(args.keywords, args.lora, args.seed)
        else:
            result = service.rewrite(args.prompt, args.preset, args.lora, args.seed)
    finally:
        # Nothing may be inside torch when the interpreter ends (see JobQueue.close): first the model
        # threads a writer left at its deadline, then the job worker (whose writer then ends at once).
        service.close()
        runtime.close()
    print(result.text)
    info = service.backend_info()
    print(f"backend: {info.label}" + (f" ({info.why})" if info.why else ""), file=sys.stderr)
    print(result_note(result), file=sys.stderr)
    return 0


def open_gallery_service(settings):
    """The gallery without the engines. Unlike app start-up it does not reconcile: a running app
    may be saving an image right now, and reconcile would take its temp file for debris."""
    from lorapg.services.build import build_services

    return build_services(settings, engines=False, prompts=False).gallery_service


def _one_line(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def run_gallery(args: argparse.Namespace) -> int:
    service = open_gallery_service(settings_from_args(args))
    command = args.gallery_command
    if command == "list":
        records = service.list(query=args.query, lora=args.lora, limit=args.limit or None)
        for r in records:
            created = r.created_at.astimezone().strftime("%Y-%m-%d %H:%M") if r.created_at else "-"
            loras = ",".join(f"{lora.name}:{lora.scale:g}" for lora in r.loras) or "-"
            print(f"{r.id}\t{created}\t{'*' if r.starred else '-'}\tseed={r.seed}\t{loras}\t{_one_line(r.prompt)}")
        if not records:
            print("no images", file=sys.stderr)
    elif command == "show":
        details = service.show(args.id)
        r = details.record
        print(f"image #{r.id}{' (starred)' if r.starred else ''}")
        print(f"file: {r.path}")
        if r.created_at:
            print(f"created: {r.created_at.astimezone():%Y-%m-%d %H:%M:%S}")
        print()
        print(details.parameters)
    elif command == "delete":
        service.delete(args.id)
        print(f"deleted image #{int(args.id.strip().lstrip('#'))}")
    elif command == "export":
        paths = service.export(args.dir, query=args.query, lora=args.lora)
        for path in paths:
            print(path)
        print(f"exported {len(paths)} image(s) to {args.dir}", file=sys.stderr)
    return 0
