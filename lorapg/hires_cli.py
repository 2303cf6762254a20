"""The ``generate`` command's hires-fix options (kept apart from cli.py, which many features share)."""

from __future__ import annotations

import argparse

from lorapg.limits import DENOISING_STRENGTH, HIRES_SCALE, HIRES_STEPS, HIRES_STRENGTH_DEFAULT, HIRES_UPSCALERS


def add_hires_arguments(gen: argparse.ArgumentParser) -> None:
    """A1111's hires fix: on when --hires-scale is given; the values are checked with the request."""
    group = gen.add_argument_group("hires fix (txt2img: a second pass on the upscaled image)")
    group.add_argument(
        "--hires-scale",
        dest="hires_scale",
        help=f"upscale factor, {HIRES_SCALE.describe()}; turns the hires fix on (Size stays the first pass's)",
    )
    group.add_argument(
        "--hires-steps",
        dest="hires_steps",
        default=f"{HIRES_STEPS.default:g}",
        help=f"second pass steps, {HIRES_STEPS.describe()}; 0 = as many as --steps (default %(default)s)",
    )
    group.add_argument(
        "--hires-strength",
        dest="hires_strength",
        default=f"{HIRES_STRENGTH_DEFAULT:g}",
        help=f"second pass denoising strength, {DENOISING_STRENGTH.describe()} (default %(default)s)",
    )
    group.add_argument(
        "--hires-upscaler",
        dest="hires_upscaler",
        default=HIRES_UPSCALERS[0],
        help=f"one of {', '.join(repr(name) for name in HIRES_UPSCALERS)} (default %(default)r)",
    )


def hires_from_args(args: argparse.Namespace):
    """The request's hires options from ``add_hires_arguments`` (None: no hires fix)."""
    from lorapg.diffusion.hires import HiresOptions

    if getattr(args, "hires_scale", None) is None:
        return None
    return HiresOptions(
        scale=args.hires_scale, steps=args.hires_steps, strength=args.hires_strength, upscaler=args.hires_upscaler
    )
