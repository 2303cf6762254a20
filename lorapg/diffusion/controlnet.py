"""ControlNet units: the request's option, its checks, and the preprocessors that make control images.

A unit names a ControlNet model (from ``models/controlnet/``, ``controlnet_models``), a control
image given as it is (module ``none``) or made from a source image by a preprocessor (``canny``,
``depth``), and how strongly and over which steps it steers. Names follow A1111's sd-webui-controlnet
API (module, model, weight, guidance_start, guidance_end, resize_mode, threshold_a/b); written from
its documented behaviour, not its code. No torch at import: the CLI and the API build units without it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from lorapg.coercion import checked_number, shown
from lorapg.diffusion.img2img import ImageInput, load_image
from lorapg.diffusion.resize_modes import resize_image
from lorapg.errors import UserError, check_ref_length, shorten
from lorapg.limits import (
    CONTROL_GUIDANCE_END,
    CONTROL_GUIDANCE_START,
    CONTROL_PREPROCESSORS,
    CONTROL_RESIZE_MODES,
    CONTROL_THRESHOLD,
    CONTROL_UNITS,
    CONTROL_WEIGHT,
)

NONE, CANNY, DEPTH = CONTROL_PREPROCESSORS
# The extension's other names for what these preprocessors do (A1111 PNGs and API calls use them).
MODULE_ALIASES = {
    "": NONE,
    "none": NONE,
    "canny": CANNY,
    "depth": DEPTH,
    "depth_midas": DEPTH,
    "depth_anything": DEPTH,
    "depth_anything_v2": DEPTH,
    "depth_zoe": DEPTH,
}
CROP_AND_RESIZE = 1  # the extension's default resize mode
DEPTH_FOLDER = "depth"  # models/annotators/depth: a transformers depth-estimation model
DEPTH_DOWNLOAD = "depth-anything/Depth-Anything-V2-Small-hf"  # small (25M parameters), safetensors


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit. ``image``: the control image (module ``none``) or the preprocessor's source."""

    model: str  # a name from models/controlnet (a folder or a file's stem)
    image: ImageInput | None = None
    module: str = NONE  # the preprocessor
    weight: float = CONTROL_WEIGHT.default  # diffusers' controlnet_conditioning_scale
    guidance_start: float = CONTROL_GUIDANCE_START.default  # fraction of the steps where it starts steering
    guidance_end: float = CONTROL_GUIDANCE_END.default  # ... and where it stops
    resize_mode: int = CROP_AND_RESIZE  # CONTROL_RESIZE_MODES: how the image becomes width x height
    threshold_a: float = CONTROL_THRESHOLD.default  # canny's low threshold
    threshold_b: float = 200.0  # canny's high threshold


# --- checks -------------------------------------------------------------------------------------


def check_units(units, max_pixels: int = 0) -> tuple[ControlUnit, ...]:
    """The units with images decoded (RGB) and every value in range; idempotent.

    ``max_pixels``: Settings.max_image_pixels (0 = no limit).
    """
    units = tuple(units or ())
    if len(units) > CONTROL_UNITS:
        raise UserError(f"ControlNet takes at most {CONTROL_UNITS} units, got {len(units)}; remove some.")
    return tuple(check_unit(index, unit, max_pixels) for index, unit in enumerate(units))


def check_unit(index: int, unit: ControlUnit, max_pixels: int = 0) -> ControlUnit:
    label = f"ControlNet unit {index}"
    if not isinstance(unit, ControlUnit):
        raise UserError(f"{label} must be an object with a model and an image, got {type(unit).__name__}.")
    model = check_model_name(f"{label} model", unit.model)
    if unit.image is None:
        raise UserError(f"{label} has no image; give a control image (or a source image and a preprocessor).")
    image = load_image(f"{label} image", unit.image, max_pixels).convert("RGB")
    weight = _in_range(f"{label} weight", unit.weight, CONTROL_WEIGHT)
    start = _in_range(f"{label} guidance start", unit.guidance_start, CONTROL_GUIDANCE_START)
    end = _in_range(f"{label} guidance end", unit.guidance_end, CONTROL_GUIDANCE_END)
    if start >= end:
        # diffusers refuses an empty window; a window past the last step (start 0.99) steers no step.
        raise UserError(f"{label} guidance start ({start:g}) must be below its guidance end ({end:g}).")
    low = _in_range(f"{label} threshold A (canny low)", unit.threshold_a, CONTROL_THRESHOLD)
    high = _in_range(f"{label} threshold B (canny high)", unit.threshold_b, CONTROL_THRESHOLD)
    return replace(
        unit,
        model=model,
        image=image,
        module=check_module(f"{label} preprocessor", unit.module),
        weight=weight,
        guidance_start=start,
        guidance_end=end,
        resize_mode=check_control_resize_mode(f"{label} resize mode", unit.resize_mode),
        threshold_a=low,
        threshold_b=high,
    )


def check_model_name(label: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{label} is missing; pick a ControlNet model from models/controlnet.")
    text = value.strip()
    check_ref_length(text, label)
    return model_name_without_hash(text)


def model_name_without_hash(text: str) -> str:
    """``"control_canny [a1b2c3d4]"`` (how A1111 writes and lists models) as ``"control_canny"``."""
    name, bracket, rest = text.rpartition(" [")
    return name.strip() if bracket and rest.endswith("]") else text


def check_module(label: str, value: object) -> str:
    """A preprocessor this app runs (A1111's names for them accepted), or a UserError listing them."""
    text = value.strip().casefold() if isinstance(value, str) else None
    if value is None:
        text = NONE
    if text not in MODULE_ALIASES:
        raise UserError(f"{label} {shown(value)} is not available; pick one of {', '.join(CONTROL_PREPROCESSORS)}.")
    return MODULE_ALIASES[text]


def check_control_resize_mode(label: str, value: object) -> int:
    """0/1/2 or the extension's names ("Just Resize", "Crop and Resize", "Resize and Fill")."""
    if isinstance(value, str):
        for number, name in CONTROL_RESIZE_MODES.items():
            if value.strip().casefold() in (name.casefold(), str(number)):
                return number
    elif isinstance(value, int) and not isinstance(value, bool) and value in CONTROL_RESIZE_MODES:
        return value
    choices = ", ".join(f"{number} {name}" for number, name in CONTROL_RESIZE_MODES.items())
    raise UserError(f"{label} must be one of {choices}; got {shown(value)}.")


def _in_range(label: str, value: object, limits) -> float:
    number = checked_number(label, value)
    if number not in limits:
        raise UserError(f"{label} must be {limits.describe()}, got {number:g}.")
    return number


# --- preprocessors ------------------------------------------------------------------------------


def control_image(unit: ControlUnit, width: int, height: int, annotators: Path | None = None) -> Image.Image:
    """What the ControlNet sees for ``unit`` (checked): its image at width x height, preprocessed."""
    image = resize_image(unit.resize_mode, unit.image, width, height)
    if unit.module == CANNY:
        return canny(image, unit.threshold_a, unit.threshold_b)
    if unit.module == DEPTH:
        return depth_map(image, annotators or Path("models/annotators"))
    return image


def canny(image: Image.Image, low: float, high: float) -> Image.Image:
    """OpenCV's Canny edges as a white-on-black RGB image (what canny ControlNets were trained on)."""
    import cv2  # opencv-python-headless; imported here so the app starts without it until canny is used

    edges = cv2.Canny(np.asarray(image.convert("RGB")), int(low), int(high))
    return Image.fromarray(edges).convert("RGB")


def depth_folder(annotators: Path) -> Path:
    return Path(annotators) / DEPTH_FOLDER


def depth_map(image: Image.Image, annotators: Path) -> Image.Image:
    """A depth map (near = white) by the transformers depth model in ``annotators/depth``."""
    from lorapg.diffusion.annotators import estimate_depth

    return estimate_depth(image, depth_folder(annotators))


def missing_depth_model_message(folder: Path) -> str:
    return (
        f"Preprocessor depth needs a depth-estimation model in {folder} (a transformers folder: config.json, "
        f"model.safetensors, preprocessor_config.json); get one with `hf download {DEPTH_DOWNLOAD} --local-dir "
        f"{folder}`, or pick preprocessor none and give a depth map."
    )


def describe_units(units) -> str:
    """A short log line for the units of a request."""
    return "; ".join(f"{shorten(u.model, 40)} ({u.module}, weight {u.weight:g})" for u in units)
