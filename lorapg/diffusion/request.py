"""A generation request, checked before it reaches the GPU queue."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from lorapg import lora_tags
from lorapg.coercion import SHOWN_CHARS, CoercionError, parse_seed, shown, to_float, to_int
from lorapg.diffusion.samplers import DEFAULT_SAMPLER, check_sampler_name
from lorapg.errors import UserError, shorten
from lorapg.limits import BATCH_SIZE, CFG_SCALE, CLIP_SKIP, SEED, SIZE, SIZE_MULTIPLE, STEPS, VARIATION_STRENGTH
from lorapg.lora_tags import find_lora_tags, strip_lora_tags

if TYPE_CHECKING:
    from lorapg.diffusion.controlnet import ControlUnit
    from lorapg.diffusion.hires import HiresOptions
    from lorapg.diffusion.img2img import Img2ImgOptions

# The ranges live in lorapg.limits; these names are kept for the modules that import them from here.
MAX_SEED = int(SEED.maximum)
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = int(STEPS.minimum), int(STEPS.maximum), int(STEPS.default)
MIN_SIZE, MAX_SIZE = int(SIZE.minimum), int(SIZE.maximum)
MAX_BATCH = int(BATCH_SIZE.maximum)
MAX_GUIDANCE = float(CFG_SCALE.maximum)
# parse_seed and shown live in lorapg.coercion (one seed parser for the app); callers may import them from here.


# GenerationRequest.extra key: its fields left out (None) take A1111's API defaults (flux.A1111_SD,
# size included) if the model it runs on is SD, the family's if Flux or SD 3.5 (/sdapi/v1 sets it).
A1111_DEFAULTS = "a1111_defaults"


@dataclass(frozen=True)
class LoraRequest:
    name: str  # library name, or a path to a file inside the LoRA folder
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    loras: tuple[LoraRequest, ...] = ()
    # None: left out by the caller; GenerationService.with_defaults sets the model family's value.
    steps: int | None = DEFAULT_STEPS
    guidance_scale: float | None = CFG_SCALE.default
    sampler: str | None = DEFAULT_SAMPLER
    width: int | None = None  # None: the model's native size
    height: int | None = None
    seed: int | None = None  # None or -1: pick one at random (the one used is reported)
    batch_size: int = int(BATCH_SIZE.default)
    clip_skip: int = int(CLIP_SKIP.default)  # A1111's "Clip skip": 1 = the text encoder's last layer
    # A1111's variation seed ("subseed") and strength; at strength 0 the seed's image is made unchanged.
    variation_seed: int | None = None  # None or -1: random (picked only when the strength is over 0)
    variation_strength: float = VARIATION_STRENGTH.default
    extra: dict = field(default_factory=dict, compare=False)
    # img2img / inpainting (lorapg.diffusion.img2img checks it); None: txt2img
    img2img: Img2ImgOptions | None = None
    # A1111's hires fix (lorapg.diffusion.hires checks it); None: one pass at width x height
    hires: HiresOptions | None = None
    # ControlNet units (lorapg.diffusion.controlnet checks them); empty: no ControlNet
    controlnet: tuple[ControlUnit, ...] = ()


def _whole(name: str, value: object) -> int:
    try:
        return to_int(value)
    except CoercionError:
        raise UserError(f"{name} must be a whole number, got {shown(value)}.") from None


def _number(name: str, value: object) -> float:
    try:
        return to_float(value)
    except CoercionError:
        raise UserError(f"{name} must be a number, got {shown(value)}.") from None


# A lone UTF-16 surrogate (JSON "\ud800") is not a character: tokenizers and PNG text chunks fail on it.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def check_text(label: str, value: object, max_chars: int = 0, *, optional: bool = False) -> str:
    """``value`` if it is text a prompt can hold, else a UserError naming ``label``.

    ``max_chars``: Settings.max_prompt_chars (0 = no limit); ``optional``: None means "".
    """
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{label} must be text, got {type(value).__name__ if value is not None else 'null'}.")
    if "\x00" in value:
        raise UserError(f"{label} contains a null character (U+0000) at position {value.index(chr(0))}; remove it.")
    surrogate = _SURROGATE.search(value)
    if surrogate:
        raise UserError(
            f"{label} contains a lone UTF-16 surrogate (U+{ord(surrogate.group()):04X}) at position "
            f"{surrogate.start()}, which is not a character; remove it."
        )
    if max_chars > 0 and len(value) > max_chars:
        raise UserError(
            f"{label} is {len(value):,} characters, over the limit of {max_chars:,} "
            "(setting max_prompt_chars); shorten it or raise the setting."
        )
    return value


def check_prompts(request: GenerationRequest, max_chars: int = 0) -> GenerationRequest:
    """The prompt and negative prompt as text within the length limit; run before anything reads them."""
    return replace(
        request,
        prompt=check_text("Prompt", request.prompt, max_chars),
        negative_prompt=check_text("Negative prompt", request.negative_prompt, max_chars, optional=True),
    )


def validate(
    request: GenerationRequest,
    native_size: int,
    max_prompt_chars: int = 0,
    family: str | None = None,
    max_image_pixels: int = 0,
) -> GenerationRequest:
    """Return the request with defaults filled in and a concrete seed, or raise UserError.

    ``max_prompt_chars``: Settings.max_prompt_chars (0 = no limit); ``family``: the loaded model's
    (its samplers are checked; None: any sampler name this app knows); ``max_image_pixels``:
    Settings.max_image_pixels, which bounds the hires fix's upscaled size (0 = no limit).
    """
    request = check_prompts(request, max_prompt_chars)
    steps = _whole("Steps", request.steps)
    if steps not in STEPS:
        raise UserError(f"Steps must be {STEPS.describe()}, got {steps}.")
    width = native_size if request.width in (None, 0) else _whole("Width", request.width)
    height = native_size if request.height in (None, 0) else _whole("Height", request.height)
    for label, size in (("Width", width), ("Height", height)):
        if size not in SIZE:
            raise UserError(f"{label} must be {SIZE.describe()} pixels, got {size}.")
        if size % SIZE_MULTIPLE:
            raise UserError(
                f"{label} must be a multiple of {SIZE_MULTIPLE}, got {size} "
                f"(try {round(size / SIZE_MULTIPLE) * SIZE_MULTIPLE})."
            )
    batch = _whole("Batch size", request.batch_size)
    if batch not in BATCH_SIZE:
        raise UserError(f"Batch size must be {BATCH_SIZE.describe()}, got {batch}.")
    guidance = _number("CFG scale", request.guidance_scale)
    if guidance not in CFG_SCALE:
        raise UserError(f"CFG scale must be {CFG_SCALE.describe()}, got {guidance:g}.")
    clip_skip = _whole("Clip skip", request.clip_skip)
    if clip_skip not in CLIP_SKIP:
        raise UserError(f"Clip skip must be {CLIP_SKIP.describe()} (1 = no skip), got {clip_skip}.")
    if not isinstance(request.sampler, str):
        raise UserError(f"Sampler must be text, got {shown(request.sampler)}.")
    check_sampler_name(request.sampler[: SHOWN_CHARS * 2], family)  # no sampler name is longer; the message repeats it
    seed = parse_seed(request.seed)
    if seed is None:
        # Leave room for the batch's seed + i so every image's seed stays in range.
        seed = random.randint(0, MAX_SEED - MAX_BATCH)
    if seed + batch - 1 > MAX_SEED:
        raise UserError(f"Seed {seed} + batch {batch} runs past {MAX_SEED}; pick a smaller seed.")
    variation_seed, variation_strength = _variation(request, batch)
    hires = _hires(request, family, width, height, max_image_pixels)
    controlnet = _controlnet(request, family, max_image_pixels)
    return replace(
        request,
        hires=hires,
        controlnet=controlnet,
        steps=steps,
        width=width,
        height=height,
        batch_size=batch,
        guidance_scale=guidance,
        seed=seed,
        clip_skip=clip_skip,
        variation_seed=variation_seed,
        variation_strength=variation_strength,
    )


def _hires(request: GenerationRequest, family: str | None, width: int, height: int, max_pixels: int):
    """The checked hires options (None: no hires pass); refused where A1111 has no hires fix."""
    if request.hires is None:
        return None
    from lorapg.diffusion.families import is_transformer_family
    from lorapg.diffusion.hires import check_hires

    if request.img2img is not None:
        # A1111's hires fix is a txt2img option: an init image already sets the result's size.
        raise UserError("Hires fix applies to txt2img only; turn it off or clear the init image.")
    if family is not None and is_transformer_family(family):
        raise UserError("Hires fix is built for SD 1.x and SDXL so far; turn it off for Flux and SD 3.5.")
    return check_hires(request.hires, width, height, max_pixels)


def _controlnet(request: GenerationRequest, family: str | None, max_pixels: int) -> tuple:
    """The checked ControlNet units (images decoded); refused where this app runs no ControlNet pipeline."""
    if not request.controlnet:
        return ()
    from lorapg.diffusion.controlnet import check_units
    from lorapg.diffusion.families import is_transformer_family

    if family is not None and is_transformer_family(family):
        raise UserError("ControlNet is built for SD 1.x and SDXL so far; remove the ControlNet units for this model.")
    if request.hires is not None:
        raise UserError("ControlNet runs without the hires fix so far; turn hires fix off or remove the units.")
    return check_units(request.controlnet, max_pixels)


def _variation(request: GenerationRequest, batch: int) -> tuple[int | None, float]:
    """The checked variation seed (random when unset and the strength is over 0) and strength."""
    strength = _number("Variation strength", request.variation_strength)
    if strength not in VARIATION_STRENGTH:
        raise UserError(f"Variation strength must be {VARIATION_STRENGTH.describe()} (0 = off), got {strength:g}.")
    if strength > 0 and request.img2img is not None:
        # img2img starts from the init image's latents plus noise; blending seeds there is not built yet.
        raise UserError("Variation strength applies to txt2img only; set it to 0 for img2img and inpainting.")
    seed = parse_seed(request.variation_seed, "Variation seed")
    if seed is None and strength > 0:
        seed = random.randint(0, MAX_SEED - MAX_BATCH)  # room for variation_seed + i, as for the seed
    if seed is not None and seed + batch - 1 > MAX_SEED:
        raise UserError(f"Variation seed {seed} + batch {batch} runs past {MAX_SEED}; pick a smaller variation seed.")
    return seed, strength


def extract_lora_tags(prompt: str) -> tuple[str, tuple[LoraRequest, ...]]:
    """Split AUTOMATIC1111-style ``<lora:name:0.7>`` tags out of a prompt (parsed by lorapg.lora_tags).

    Users coming from A1111 type LoRAs into the prompt; the tags are not words for the text
    encoder, so they are removed from the text and returned as LoRA requests.
    """
    loras = []
    for tag in find_lora_tags(prompt):
        if tag.scale is None:
            raise UserError(
                f"LoRA tag {shorten(tag.text, SHOWN_CHARS)}: scale {tag.scale_text!r} is not a number; "
                "write it like <lora:name:0.7>."
            )
        loras.append(LoraRequest(tag.name, tag.scale))
    return strip_lora_tags(prompt), tuple(loras)


def parse_lora_list(spec: str) -> tuple[LoraRequest, ...]:
    """``"name:0.7, other"`` (scale defaults to 1) — the CLI's and the API's way to list LoRAs."""
    return tuple(LoraRequest(name, scale) for name, scale in lora_tags.parse_lora_list(spec))
