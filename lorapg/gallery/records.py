"""The gallery's record of one image: everything needed to make it again.

Kept free of SQLite and PIL so services, the UI and the generator can build and read records
without touching storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import lorapg
from lorapg.errors import UserError
from lorapg.lora_tags import strip_lora_tags  # the one <lora:…> parser; gallery callers import it from here

if TYPE_CHECKING:  # a1111 imports this module; the type is only needed for annotations
    from lorapg.gallery.a1111 import ParsedParameters


# SQLite's INTEGER is 64-bit signed: a larger id cannot exist, and binding one overflows.
MAX_IMAGE_ID = 2**63 - 1


def check_image_id(image_id: object) -> int:
    """The one check for a gallery image id from a widget, the API or the command line.

    Widgets send floats and the CLI strings; a fraction is refused, never rounded (rounding 1.5
    to 2 once deleted the wrong image).
    """
    if image_id is None or (isinstance(image_id, str) and not image_id.strip()):
        raise UserError("No image selected; pick one in the gallery first.")
    value = _whole_number(image_id)
    if value is None or not 1 <= value <= MAX_IMAGE_ID:
        raise UserError(f"Image id must be a whole number ≥ 1, got {_shown(image_id)}")
    return value


def _whole_number(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        text = value.strip().removeprefix("#")
        # isdigit() alone accepts "²" and other digits int() refuses; isascii() keeps it honest.
        return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None
    return None


def _shown(value: object, limit: int = 40) -> str:
    """The refused value for a message: numbers as typed, text quoted, never 10 MB of it."""
    text = value if isinstance(value, str) else str(value)
    shown = repr(text[:limit]) if isinstance(value, str) else text[:limit]
    return shown if len(text) <= limit else f"{shown}… ({len(text)} characters)"


def default_version() -> str:
    """The ``Version`` written into PNGs we make, e.g. ``lorapg-0.1.0``."""
    return f"lorapg-{lorapg.__version__}"


@dataclass
class LoraUse:
    """One LoRA applied to an image, with the hash other tools use to find the same file."""

    name: str
    scale: float
    file_hash: str | None = None


@dataclass
class Img2ImgUse:
    """How an img2img / inpainting result was made from its init image (A1111's parameter names).

    The init image and mask themselves are files beside the result (``attachment_path``).
    """

    denoising_strength: float
    resize_mode: int = 0
    mask_blur: int | None = None  # None: no mask (plain img2img)
    masked_content: str | None = None  # "fill" or "original"
    only_masked: bool = False  # A1111's "Inpaint area: Only masked"
    only_masked_padding: int | None = None


@dataclass
class HiresUse:
    """How a txt2img result's hires fix ran (A1111's "Hires upscale / resize / steps / upscaler")."""

    upscaler: str
    denoising_strength: float | None = None  # None: the text had no "Denoising strength"
    scale: float | None = None  # "Hires upscale"; None when a target size was given instead
    resize_x: int = 0  # "Hires resize: WxH"
    resize_y: int = 0
    steps: int = 0  # "Hires steps"; 0 (not written) = the first pass's steps


@dataclass
class ControlNetUse:
    """One ControlNet unit of a result (A1111's ``ControlNet 0: "Module: canny, Model: NAME [hash], ..."``).

    The unit's image itself is a file beside the result (``control_attachment``).
    """

    module: str
    model: str  # the model's name, without its hash
    model_hash: str | None = None  # the first 8 hex digits of its weights file's SHA-256
    weight: float = 1.0
    resize_mode: str = "Crop and Resize"
    threshold_a: float | None = None  # canny's thresholds; None for preprocessors without them
    threshold_b: float | None = None
    guidance_start: float = 0.0
    guidance_end: float = 1.0


MAX_CONTROL_UNITS = 3  # lorapg.limits.CONTROL_UNITS (records import nothing from the engine side)

# The init image and mask of an img2img result are kept beside it, as NAME.init.png and NAME.mask.png,
# and each ControlNet unit's image as NAME.control0.png, NAME.control1.png, ...
ATTACHMENTS = ("init", "mask", *(f"control{index}" for index in range(MAX_CONTROL_UNITS)))


def control_attachment(index: int) -> str:
    return f"control{index}"


def attachment_path(image_path: Path, kind: str) -> Path:
    return image_path.with_name(f"{image_path.stem}.{kind}.png")


def is_attachment(path: Path) -> bool:
    return any(path.name.endswith(f".{kind}.png") for kind in ATTACHMENTS)


@dataclass
class ImageRecord:
    """One gallery image. ``id``, ``path`` and ``created_at`` are filled in by the store."""

    prompt: str
    negative_prompt: str = ""
    loras: list[LoraUse] = field(default_factory=list)
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    width: int | None = None
    height: int | None = None
    model_name: str | None = None
    model_hash: str | None = None
    job_id: str | None = None
    # True: guidance_scale is Flux dev's distilled guidance, written as Forge does ("CFG scale: 1",
    # "Distilled CFG Scale: 3.5"); read back from the text (no column of its own).
    distilled_guidance: bool = False
    clip_skip: int | None = None  # A1111's "Clip skip"; None or 1: the last layer (not written)
    # A1111's "Variation seed" / "Variation seed strength"; None: no variation (not written).
    variation_seed: int | None = None
    variation_strength: float | None = None
    created_at: datetime | None = None
    id: int | None = None
    path: Path | None = None
    starred: bool = False
    version: str = field(default_factory=default_version)
    img2img: Img2ImgUse | None = None  # None: txt2img
    hires: HiresUse | None = None  # None: no hires fix
    controlnet: list[ControlNetUse] = field(default_factory=list)  # empty: no ControlNet
    # A1111's Extras: ("Postprocess upscale by", "4"), ("Postprocess upscaler", NAME); written as given.
    postprocess: list[tuple[str, str]] = field(default_factory=list)


def distilled_fields(parsed: ParsedParameters) -> dict:
    """A Forge Flux dev text's "Distilled CFG Scale" is the guidance (its "CFG scale: 1" is not)."""
    if parsed.distilled_guidance is None:
        return {}
    return {"guidance_scale": parsed.distilled_guidance, "distilled_guidance": True}


def record_from_parsed(parsed: ParsedParameters) -> ImageRecord:
    """Turn parsed A1111 text into a record (used to import PNGs made elsewhere or orphaned)."""
    loras = [LoraUse(name=name, scale=scale, file_hash=parsed.lora_hashes.get(name)) for name, scale in parsed.loras]
    model_hash = parsed.model_hash
    if model_hash is not None and len(model_hash) > 10:
        # A full SHA-256 (Fooocus writes those) starts with the 10 characters A1111 uses.
        model_hash = model_hash[:10]
    record = ImageRecord(
        prompt=strip_lora_tags(parsed.prompt),
        negative_prompt=parsed.negative_prompt,
        loras=loras,
        seed=parsed.seed,
        steps=parsed.steps,
        guidance_scale=parsed.guidance_scale,
        sampler=parsed.sampler,
        width=parsed.width,
        height=parsed.height,
        model_name=parsed.model_name,
        model_hash=model_hash,
        clip_skip=parsed.clip_skip,
        variation_seed=parsed.variation_seed,
        variation_strength=parsed.variation_strength,
        version=parsed.version or default_version(),
        img2img=parsed.img2img,
        hires=parsed.hires,
        controlnet=list(parsed.controlnet),
    )
    return replace(record, **distilled_fields(parsed))
