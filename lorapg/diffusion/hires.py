"""A1111's hires fix: a txt2img made at the base size, upscaled, then refined by an img2img pass.

This module holds the request's option and its checks (no torch at import: the CLI and the API
build options without it); the engine runs the two passes (``image_pipelines.HiresRun``).
Written from A1111's behaviour (``StableDiffusionProcessingTxt2Img``: hr_scale, hr_resize_x/y,
hr_second_pass_steps, hr_upscaler, denoising_strength), not its code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lorapg.coercion import checked_number, checked_whole, shown
from lorapg.errors import UserError
from lorapg.limits import (
    DENOISING_STRENGTH,
    HIRES_SCALE,
    HIRES_STEPS,
    HIRES_STRENGTH_DEFAULT,
    HIRES_UPSCALERS,
    SIZE,
    SIZE_MULTIPLE,
)

LATENT, LATENT_NEAREST, LANCZOS_RESIZE = "Latent", "Latent (nearest)", "None"
# How each latent upscaler resizes the latents (torch.nn.functional.interpolate's mode).
LATENT_MODES = {LATENT: "bilinear", LATENT_NEAREST: "nearest"}
UPSCALERS = HIRES_UPSCALERS  # the built-in ones; any other name is an upscaler model's (models/upscalers)
MAX_MODEL_NAME = 200  # characters: no upscaler file's name is longer, and a message repeats it


@dataclass(frozen=True)
class HiresOptions:
    """The hires pass of a txt2img request; names follow A1111's API."""

    scale: float = HIRES_SCALE.default  # hr_scale; used when resize_x and resize_y are both 0
    resize_x: int = 0  # hr_resize_x: a target width (0: from the scale, or from resize_y and the aspect)
    resize_y: int = 0  # hr_resize_y
    steps: int = int(HIRES_STEPS.default)  # hr_second_pass_steps; 0 = the first pass's steps
    strength: float = HIRES_STRENGTH_DEFAULT  # denoising_strength of the second pass
    upscaler: str = LATENT  # hr_upscaler: one of UPSCALERS


def check_upscaler(value: object) -> str:
    """``value`` as one of UPSCALERS (case-insensitive) or as an upscaler model's name, or a UserError.

    Whether a model of that name is in the upscalers folder is checked where the folder is known
    (``DiffusionEngine.check_hires_upscaler``, before the queue and again when the pass runs)."""
    text = value.strip() if isinstance(value, str) else ""
    for name in UPSCALERS:
        if text.casefold() == name.casefold():
            return name
    if text and len(text) <= MAX_MODEL_NAME and not any(mark in text for mark in "/\\\0"):
        return text
    raise not_available(value)


def not_available(value: object, models: list[str] | tuple[str, ...] = ()) -> UserError:
    """The refusal of an upscaler name, listing the built-in upscalers and the ``models`` there are."""
    available = ", ".join(f'"{name}"' for name in (*UPSCALERS, *models))
    where = "" if models else " or an upscaler model's name (models/upscalers)"
    return UserError(f"Hires upscaler {shown(value)} is not available; pick one of {available}{where}.")


def check_upscaler_model(value: object, upscalers: object | None) -> None:
    """Refuse an upscaler name that is neither built in (any case) nor a model file in ``upscalers``
    (a ``lorapg.diffusion.upscalers.UpscalerLibrary``; None: no models)."""
    name = check_upscaler(value)
    if name in UPSCALERS:
        return
    models = [item.name for item in upscalers.files()] if upscalers is not None else []
    if not any(name.casefold() == model.casefold() for model in models):
        raise not_available(name, models)


def check_hires(options: HiresOptions, width: int, height: int, max_pixels: int = 0) -> HiresOptions:
    """The options with every value in range and the upscaled size within the limits.

    ``width`` x ``height``: the first pass's (checked) size; ``max_pixels``: Settings.max_image_pixels
    (0 = no limit). Idempotent: checked options pass again.
    """
    scale = checked_number("Hires upscale", options.scale)
    if scale not in HIRES_SCALE:
        raise UserError(f"Hires upscale must be {HIRES_SCALE.describe()}, got {scale:g}.")
    resize_x, resize_y = (
        checked_whole("Hires resize width", options.resize_x),
        checked_whole("Hires resize height", options.resize_y),
    )
    for label, value in (("Hires resize width", resize_x), ("Hires resize height", resize_y)):
        if value != 0 and value not in SIZE:
            raise UserError(f"{label} must be 0 (from the upscale factor) or {SIZE.describe()} pixels, got {value}.")
    steps = checked_whole("Hires steps", options.steps)
    if steps not in HIRES_STEPS:
        raise UserError(f"Hires steps must be {HIRES_STEPS.describe()} (0 = as many as the first pass), got {steps}.")
    strength = checked_number("Hires denoising strength", options.strength)
    if strength not in DENOISING_STRENGTH:
        raise UserError(f"Hires denoising strength must be {DENOISING_STRENGTH.describe()}, got {strength:g}.")
    checked = replace(
        options,
        scale=scale,
        resize_x=resize_x,
        resize_y=resize_y,
        steps=steps,
        strength=strength,
        upscaler=check_upscaler(options.upscaler),
    )
    _check_target(*target_size(checked, width, height), max_pixels)
    return checked


def target_size(options: HiresOptions, width: int, height: int) -> tuple[int, int]:
    """The result's size: A1111's hr_resize_x/y (one of them 0: from the aspect ratio) or the scale,
    rounded down to the VAE's multiple (the latents are 1/8 of it)."""
    if options.resize_x and options.resize_y:
        x, y = options.resize_x, options.resize_y
    elif options.resize_x:
        x, y = options.resize_x, options.resize_x * height / width
    elif options.resize_y:
        x, y = options.resize_y * width / height, options.resize_y
    else:
        x, y = width * options.scale, height * options.scale
    return _multiple(x), _multiple(y)


def second_pass_steps(options: HiresOptions, first_steps: int) -> int:
    """The steps the second pass is set to (A1111: 0 = the first pass's count)."""
    return options.steps or first_steps


def _multiple(value: float) -> int:
    return max(SIZE_MULTIPLE, int(value) // SIZE_MULTIPLE * SIZE_MULTIPLE)


def _check_target(width: int, height: int, max_pixels: int) -> None:
    largest = int(SIZE.maximum)
    if width > largest or height > largest:
        raise UserError(
            f"Hires fix would make {width}×{height}, over the {largest} px limit per side; "
            "lower Hires upscale (or the hires resize) or the base size."
        )
    if max_pixels > 0 and width * height > max_pixels:
        raise UserError(
            f"Hires fix would make {width}×{height} ({width * height / 1e6:.1f} megapixels), over the limit of "
            f"{max_pixels / 1e6:g} megapixels (setting max_image_pixels); lower Hires upscale or the base size."
        )
