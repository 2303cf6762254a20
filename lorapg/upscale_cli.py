"""``python -m lorapg upscale``: one image through an upscaler model (A1111's Extras) into a PNG."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from lorapg.limits import UPSCALE_BY


def add_upscale_parser(commands: argparse._SubParsersAction, add_settings: Callable) -> None:
    upscale = commands.add_parser(
        "upscale", help="upscale an image with an upscaler model from MODELS_DIR/upscalers (or Lanczos)"
    )
    upscale.add_argument("--upscaler", required=True, help='a model\'s file name without its suffix, or "Lanczos"')
    upscale.add_argument("--image", required=True, type=Path, help="the image to upscale (PNG, JPEG, WEBP)")
    upscale.add_argument("--out", required=True, type=Path, help="the PNG to write (its parameters kept)")
    upscale.add_argument(
        "--scale", help=f"upscale by, {UPSCALE_BY.describe()} (default: the model's own factor, 2 for the resizers)"
    )
    upscale.add_argument(
        "--tile",
        dest="upscale_tile",
        type=int,
        help="input pixels per tile side (default 256; smaller needs less memory; 0 = no tiles)",
    )
    add_settings(upscale)


def run_upscale(args: argparse.Namespace, settings) -> int:
    """Upscale ``--image`` into ``--out``; prints the path and the size."""
    from lorapg.services.build import build_upscale_service
    from lorapg.services.upscale import write_result

    if args.upscale_tile is not None:
        settings.upscale_tile = args.upscale_tile
    service, jobs = build_upscale_service(settings)
    try:
        result = service.upscale(args.image, args.upscaler, args.scale, fields=("--image", "--upscaler", "--scale"))
    finally:
        jobs.close()  # the job worker must end before the interpreter does (see JobQueue.close)
    path = write_result(result, args.out)
    print(path)
    print(f"{result.image.width}x{result.image.height} ({result.upscaler}, ×{result.scale:g})", file=sys.stderr)
    return 0
