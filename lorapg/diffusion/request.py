"""A generation request, checked before it reaches the GPU queue."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace

from lorapg.diffusion.samplers import DEFAULT_SAMPLER, get_sampler
from lorapg.errors import UserError

MAX_SEED = 2**32 - 1
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 1, 50, 30
MIN_SIZE, MAX_SIZE = 32, 2048  # 32: the bundled demo model is native 32 px
MAX_BATCH = 4
MAX_GUIDANCE = 30.0


@dataclass(frozen=True)
class LoraRequest:
    name: str  # library name, or a path to a file inside the LoRA folder
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    loras: tuple[LoraRequest, ...] = ()
    steps: int = DEFAULT_STEPS
    guidance_scale: float = 7.0
    sampler: str = DEFAULT_SAMPLER
    width: int | None = None  # None: the model's native size
    height: int | None = None
    seed: int | None = None  # None or -1: pick one at random (the one used is reported)
    batch_size: int = 1
    extra: dict = field(default_factory=dict, compare=False)


def parse_seed(value: object) -> int | None:
    """Accept ints, numeric strings, floats with no fraction; -1, None or "" mean random."""
    if value is None or (isinstance(value, str) and value.strip() in {"", "-1", "random"}):
        return None
    try:
        number = float(value) if isinstance(value, str) else value
        seed = int(number)
        if seed != number:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"Seed {value!r} is not a whole number; use 0–{MAX_SEED} or -1 for random.") from None
    if seed == -1:
        return None
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"Seed {seed} is outside 0–{MAX_SEED}; use -1 for a random seed.")
    return seed


def _whole(name: str, value: object) -> int:
    try:
        number = float(value)
        if number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{name} must be a whole number, got {value!r}.") from None


def validate(request: GenerationRequest, native_size: int) -> GenerationRequest:
    """Return the request with defaults filled in and a concrete seed, or raise UserError."""
    steps = _whole("Steps", request.steps)
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise UserError(f"Steps must be {MIN_STEPS}–{MAX_STEPS}, got {steps}.")
    width = native_size if request.width in (None, 0) else _whole("Width", request.width)
    height = native_size if request.height in (None, 0) else _whole("Height", request.height)
    for label, size in (("Width", width), ("Height", height)):
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise UserError(f"{label} must be {MIN_SIZE}–{MAX_SIZE} pixels, got {size}.")
        if size % 8:
            raise UserError(f"{label} must be a multiple of 8, got {size} (try {round(size / 8) * 8}).")
    batch = _whole("Batch size", request.batch_size)
    if not 1 <= batch <= MAX_BATCH:
        raise UserError(f"Batch size must be 1–{MAX_BATCH}, got {batch}.")
    try:
        guidance = float(request.guidance_scale)
    except (TypeError, ValueError):
        raise UserError(f"CFG scale must be a number, got {request.guidance_scale!r}.") from None
    if not 0.0 <= guidance <= MAX_GUIDANCE:
        raise UserError(f"CFG scale must be 0–{MAX_GUIDANCE:g}, got {guidance:g}.")
    get_sampler(request.sampler)
    seed = parse_seed(request.seed)
    if seed is None:
        # Leave room for the batch's seed + i so every image's seed stays in range.
        seed = random.randint(0, MAX_SEED - MAX_BATCH)
    if seed + batch - 1 > MAX_SEED:
        raise UserError(f"Seed {seed} + batch {batch} runs past {MAX_SEED}; pick a smaller seed.")
    if not isinstance(request.prompt, str):
        raise UserError("Prompt must be text.")
    return replace(
        request,
        steps=steps,
        width=width,
        height=height,
        batch_size=batch,
        guidance_scale=guidance,
        seed=seed,
        negative_prompt=request.negative_prompt or "",
    )


_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>", re.IGNORECASE)


def extract_lora_tags(prompt: str) -> tuple[str, tuple[LoraRequest, ...]]:
    """Split AUTOMATIC1111-style ``<lora:name:0.7>`` tags out of a prompt.

    Users coming from A1111 type LoRAs into the prompt; the tags are not words for the text
    encoder, so they are removed from the text and returned as LoRA requests.
    """
    loras = []
    for match in _LORA_TAG.finditer(prompt):
        name, scale = match.group(1).strip(), (match.group(2) or "1").strip()
        try:
            loras.append(LoraRequest(name, float(scale)))
        except ValueError:
            raise UserError(f"LoRA tag {match.group(0)}: scale {scale!r} is not a number.") from None
    text = _LORA_TAG.sub("", prompt)
    text = re.sub(r"\s+,", ",", re.sub(r"[ \t]{2,}", " ", text)).strip(" ,")
    return text, tuple(loras)


def parse_lora_list(spec: str) -> tuple[LoraRequest, ...]:
    """``"name:0.7, other"`` (scale defaults to 1) — the CLI's and the API's way to list LoRAs."""
    result = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, scale = item.rpartition(":")
        if not sep or not _looks_numeric(scale):
            name, scale = item, "1"
        try:
            result.append(LoraRequest(name.strip(), float(scale)))
        except ValueError:
            raise UserError(f"LoRA {item!r}: scale {scale!r} is not a number.") from None
    return tuple(result)


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", text))
