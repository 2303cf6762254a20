"""The ``generate`` command's ControlNet options (kept apart from cli.py, which many features share).

Repeatable: each ``--controlnet MODEL`` starts a unit, and the n-th ``--control-image``,
``--control-preprocessor``, ``--control-weight``, ``--control-start`` and ``--control-end`` belong to
the n-th unit (an option given fewer times leaves the later units at its default).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapg.errors import UserError
from lorapg.limits import (
    CONTROL_GUIDANCE_END,
    CONTROL_GUIDANCE_START,
    CONTROL_PREPROCESSORS,
    CONTROL_UNITS,
    CONTROL_WEIGHT,
)

# option -> (ControlUnit field, how help describes it)
_UNIT_OPTIONS = {
    "--control-image": ("image", "the control image, or the preprocessor's source image (PNG, JPEG)"),
    "--control-preprocessor": ("module", f"one of {', '.join(CONTROL_PREPROCESSORS)} (default none)"),
    "--control-weight": ("weight", f"{CONTROL_WEIGHT.describe()} (default {CONTROL_WEIGHT.default:g})"),
    "--control-start": (
        "guidance_start",
        f"fraction of the steps where it starts steering, {CONTROL_GUIDANCE_START.describe()} (default 0)",
    ),
    "--control-end": (
        "guidance_end",
        f"fraction of the steps where it stops, {CONTROL_GUIDANCE_END.describe()} (default 1)",
    ),
}


def add_controlnet_arguments(gen: argparse.ArgumentParser) -> None:
    group = gen.add_argument_group(
        f"ControlNet (SD 1.x / SDXL; repeat --controlnet and its options for up to {CONTROL_UNITS} units)"
    )
    group.add_argument(
        "--controlnet",
        dest="controlnet",
        action="append",
        default=[],
        metavar="MODEL",
        help="a ControlNet model in MODELS_DIR/controlnet (folder name or file name without .safetensors)",
    )
    for option, (field, help_text) in _UNIT_OPTIONS.items():
        group.add_argument(
            option,
            dest=f"control_{field}",
            action="append",
            default=[],
            type=Path if field == "image" else str,
            help=help_text,
        )


def controlnet_from_args(args: argparse.Namespace) -> tuple:
    """The request's ControlNet units (values checked with the request); () without --controlnet."""
    from lorapg.diffusion.controlnet import ControlUnit

    models = getattr(args, "controlnet", None) or []
    given = {field: getattr(args, f"control_{field}", []) for field, _ in _UNIT_OPTIONS.values()}
    for option, (field, _) in _UNIT_OPTIONS.items():
        if len(given[field]) > len(models):
            need = f"is given more often than --controlnet ({len(models)})" if models else "needs --controlnet MODEL"
            raise UserError(f"{option} {need}: each --controlnet starts a unit and its options follow it.")
    units = []
    for index, model in enumerate(models):
        values = {field: items[index] for field, items in given.items() if index < len(items)}
        if "image" not in values:
            raise UserError(f"--controlnet {model} needs a --control-image (the control image or its source).")
        units.append(ControlUnit(model=model, **values))
    return tuple(units)
