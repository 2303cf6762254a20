"""AUTOMATIC1111's ``parameters`` text: the PNG metadata every SD tool can read.

Layout::

    <prompt, may span lines> <lora:name:0.7>
    Negative prompt: <negative prompt, may span lines>
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, ...

The writer follows A1111 exactly so civitai and PNG-info readers show our images correctly. The
reader is deliberately forgiving: texts come from many tools and versions, so a broken field is
reported in ``problems`` and left empty instead of failing the whole import.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lorapg.lora_tags import find_lora_tags

if TYPE_CHECKING:
    from lorapg.gallery.records import ControlNetUse, HiresUse, ImageRecord, Img2ImgUse

logger = logging.getLogger(__name__)

NEGATIVE_PREFIX = "Negative prompt:"

# Schedulers that older A1111 versions folded into the sampler name ("DPM++ 2M Karras"); A1111
# >= 1.8 writes them as a separate "Schedule type". We store the folded name users know.
_FOLDED_SCHEDULES = ("Karras", "Exponential")

# Forge's name for Flux dev's distilled guidance (modules/processing.py's extra generation parameters).
DISTILLED_CFG = "Distilled CFG Scale"

# txt2img's hires fix (lorapg.gallery.records.HiresUse): with one of these, "Denoising strength" is its own.
_HIRES_KEYS = ("hires upscale", "hires resize", "hires steps", "hires upscaler")

# Keys the parser understands, compared case-insensitively (Fooocus writes "Lora hashes", other
# tools "LoRA hashes"). Everything else is kept verbatim in ``extra``.
_KNOWN_KEYS = {
    "steps",
    "sampler",
    "schedule type",
    "cfg scale",
    "distilled cfg scale",  # Forge, Flux dev: the distilled guidance (with "CFG scale: 1")
    "seed",
    "size",
    "model hash",
    "model",
    "clip skip",
    "variation seed",
    "variation seed strength",
    "lora hashes",
    "lora weights",
    "version",
    # img2img and inpainting (lorapg.gallery.records.Img2ImgUse)
    "denoising strength",
    "resize mode",
    "mask blur",
    "masked content",
    "inpaint area",
    "masked area padding",
    *_HIRES_KEYS,
}
ONLY_MASKED, WHOLE_PICTURE = "Only masked", "Whole picture"  # A1111's "Inpaint area" values

# Tokenizer pieces for the "Key: value, Key: value" line. A key starts with a word character
# and may contain spaces, dashes and slashes ("Schedule type", "Hires upscale", "TI hashes").
_KEY_RE = re.compile(r"\s*(\w[\w \-/]*):\s*")
_QUOTED_VALUE_RE = re.compile(r'"(?:\\.|[^\\"])*"(?=\s*(?:,|$))')
_PLAIN_VALUE_RE = re.compile(r"[^,]*")
_SEPARATOR_RE = re.compile(r"\s*(?:,|$)")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[x×*]\s*(\d+)\s*$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{8,64}$")
_INT_RE = re.compile(r"^[+-]?\d+$")

MAX_SEED = 2**63 - 1  # what SQLite's INTEGER holds; A1111 seeds stay below 2**32 anyway


@dataclass
class ParsedParameters:
    """What could be read from a parameters text; a field that was missing or broken is None."""

    # Verbatim, <lora:...> tags included, so it pastes back into A1111 as is.
    prompt: str = ""
    negative_prompt: str = ""
    loras: list[tuple[str, float]] = field(default_factory=list)
    lora_hashes: dict[str, str] = field(default_factory=dict)
    steps: int | None = None
    # "DPM++ 2M" + "Schedule type: Karras" is stored as "DPM++ 2M Karras".
    sampler: str | None = None
    schedule_type: str | None = None  # as written, for display
    guidance_scale: float | None = None
    distilled_guidance: float | None = None  # Forge's "Distilled CFG Scale" (Flux dev)
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model_name: str | None = None
    model_hash: str | None = None
    clip_skip: int | None = None
    variation_seed: int | None = None
    variation_strength: float | None = None
    version: str | None = None
    img2img: Img2ImgUse | None = None  # present when the text has "Denoising strength" and no Hires field
    hires: HiresUse | None = None  # present when the text has a "Hires ..." field
    controlnet: list[ControlNetUse] = field(default_factory=list)  # "ControlNet 0", "ControlNet 1", ...
    extra: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Writing


def format_number(value: float) -> str:
    """Compact number text as A1111 writes it: 0.7, 1, 1.25, 7.5 (never 1.0 or 0.7000001)."""
    text = f"{round(float(value), 4):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def quote(value: str) -> str:
    """JSON-quote a value that would otherwise break the ``Key: value, ...`` line."""
    if any(ch in value for ch in ",:\n") or value.startswith('"'):
        return json.dumps(value, ensure_ascii=False)
    return value


def _tag_name(name: str) -> str:
    # ':' '<' '>' would end the tag early; ',' would split the "Lora hashes" list. A1111 strips
    # the same characters from the names it writes.
    return re.sub(r"[:,<>]", "", name).strip()


def _split_sampler(sampler: str) -> tuple[str, str | None]:
    """Split "DPM++ 2M Karras" into ("DPM++ 2M", "Karras"), as A1111 >= 1.8 writes it."""
    for schedule in _FOLDED_SCHEDULES:
        suffix = " " + schedule
        if sampler.endswith(suffix) and len(sampler) > len(suffix):
            return sampler[: -len(suffix)], schedule
    return sampler, None


def format_parameters(record: ImageRecord) -> str:
    """The A1111 ``parameters`` text for a record, as A1111 1.10 would write it.

    LoRAs at scale 0 are left out: they do not change the image, and A1111 would load them for
    nothing.
    """
    used = [lora for lora in record.loras if lora.scale != 0]
    prompt = record.prompt.strip()
    already_tagged = {tag.name for tag in find_lora_tags(prompt)}
    tags = [
        f"<lora:{_tag_name(lora.name)}:{format_number(lora.scale)}>"
        for lora in used
        if _tag_name(lora.name) not in already_tagged
    ]
    if tags:
        prompt = f"{prompt} {' '.join(tags)}" if prompt else " ".join(tags)

    pairs: list[tuple[str, str]] = []
    if record.steps is not None:
        pairs.append(("Steps", str(record.steps)))
    if record.sampler:
        sampler, schedule = _split_sampler(record.sampler)
        pairs.append(("Sampler", sampler))
        if schedule:
            pairs.append(("Schedule type", schedule))
    if record.guidance_scale is not None:
        # Forge writes Flux dev's distilled guidance apart, with CFG 1 (no classifier-free guidance).
        pairs.append(("CFG scale", "1" if record.distilled_guidance else format_number(record.guidance_scale)))
    if record.seed is not None:
        pairs.append(("Seed", str(record.seed)))
    if record.width and record.height:
        pairs.append(("Size", f"{record.width}x{record.height}"))
    if record.model_hash:
        pairs.append(("Model hash", record.model_hash))
    if record.model_name:
        pairs.append(("Model", record.model_name))
    if record.variation_strength and record.variation_seed is not None:  # A1111: only when the strength is over 0
        pairs.append(("Variation seed", str(record.variation_seed)))
        pairs.append(("Variation seed strength", format_number(record.variation_strength)))
    if record.img2img is not None:
        pairs.append(("Denoising strength", format_number(record.img2img.denoising_strength)))
        pairs.append(("Resize mode", str(record.img2img.resize_mode)))
    pairs += _hires_pairs(record.hires)
    if record.clip_skip and record.clip_skip > 1:  # A1111 writes it only when a layer is skipped
        pairs.append(("Clip skip", str(record.clip_skip)))
    if record.distilled_guidance and record.guidance_scale is not None:  # Forge: among its extra parameters
        pairs.append((DISTILLED_CFG, format_number(record.guidance_scale)))
    pairs += _mask_pairs(record.img2img)
    pairs += [(f"ControlNet {index}", _controlnet_value(use)) for index, use in enumerate(record.controlnet)]
    hashes = [f"{_tag_name(lora.name)}: {lora.file_hash}" for lora in used if lora.file_hash]
    if hashes:
        pairs.append(("Lora hashes", ", ".join(hashes)))
    pairs += record.postprocess  # an upscaled result's "Postprocess ..." fields
    if record.version:
        pairs.append(("Version", record.version))

    lines = [prompt] if prompt else []
    negative = record.negative_prompt.strip()
    if negative:
        lines.append(f"{NEGATIVE_PREFIX} {negative}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in pairs))
    return "\n".join(lines).strip()


def _hires_pairs(use: HiresUse | None) -> list[tuple[str, str]]:
    """The hires fix's fields as A1111 writes them: a target size replaces the factor, steps only when set."""
    if use is None:
        return []
    pairs = []
    if use.denoising_strength is not None:
        pairs.append(("Denoising strength", format_number(use.denoising_strength)))
    if use.resize_x or use.resize_y:
        pairs.append(("Hires resize", f"{use.resize_x}x{use.resize_y}"))
    elif use.scale is not None:
        pairs.append(("Hires upscale", format_number(use.scale)))
    if use.steps:
        pairs.append(("Hires steps", str(use.steps)))
    pairs.append(("Hires upscaler", use.upscaler))
    return pairs


def _mask_pairs(use: Img2ImgUse | None) -> list[tuple[str, str]]:
    """Inpainting's fields, with A1111's names and values; none for txt2img or plain img2img."""
    if use is None or use.mask_blur is None:
        return []
    pairs = [("Mask blur", str(use.mask_blur))]
    if use.masked_content:
        pairs.append(("Masked content", use.masked_content))
    pairs.append(("Inpaint area", ONLY_MASKED if use.only_masked else WHOLE_PICTURE))
    if use.only_masked and use.only_masked_padding is not None:
        pairs.append(("Masked area padding", str(use.only_masked_padding)))
    return pairs


def _controlnet_value(use: ControlNetUse) -> str:
    """One unit as the extension writes it: its own ``Key: value, ...`` list (quoted by the writer)."""
    model = f"{use.model} [{use.model_hash}]" if use.model_hash else use.model
    pairs = [("Module", use.module), ("Model", model), ("Weight", format_number(use.weight))]
    pairs.append(("Resize Mode", use.resize_mode))
    if use.threshold_a is not None:
        pairs.append(("Threshold A", format_number(use.threshold_a)))
    if use.threshold_b is not None:
        pairs.append(("Threshold B", format_number(use.threshold_b)))
    pairs += [("Guidance Start", format_number(use.guidance_start)), ("Guidance End", format_number(use.guidance_end))]
    return ", ".join(f"{key}: {value}" for key, value in pairs)


# --------------------------------------------------------------------------------------------
# Reading


def _unquote(raw: str) -> str:
    try:
        value = json.loads(raw)
    except ValueError:
        return raw[1:-1]
    return value if isinstance(value, str) else raw


def _read_value(line: str, pos: int) -> tuple[str, int]:
    """Read one value starting at ``pos``; return it and the position after its comma."""
    end: int | None = None
    value = ""
    if line.startswith('"', pos):
        match = _QUOTED_VALUE_RE.match(line, pos)
        if match:
            value, end = _unquote(match.group(0)), match.end()
    elif line.startswith(("{", "["), pos):
        # Unquoted JSON (civitai's "Hashes: {...}") contains commas; take the whole object.
        try:
            _, end = json.JSONDecoder().raw_decode(line, pos)
            value = line[pos:end]
            if not _SEPARATOR_RE.match(line, end):
                end = None
        except ValueError:
            end = None
    if end is None:
        match = _PLAIN_VALUE_RE.match(line, pos)
        assert match is not None  # [^,]* always matches
        value, end = match.group(0), match.end()
    sep = _SEPARATOR_RE.match(line, end)
    return value.strip(), sep.end() if sep else end


def tokenize_parameters_line(line: str) -> tuple[list[tuple[str, str]], bool]:
    """Split ``Key: value, Key: "quoted, value"`` into pairs.

    Returns the pairs and whether the whole line was made of pairs; text that is not a pair is
    skipped up to the next comma, so one odd field does not hide the others.
    """
    pairs: list[tuple[str, str]] = []
    complete = True
    pos = 0
    while pos < len(line):
        if not line[pos:].strip():
            break
        key_match = _KEY_RE.match(line, pos)
        if key_match is None:
            complete = False
            comma = line.find(",", pos)
            pos = len(line) if comma < 0 else comma + 1
            continue
        value, pos = _read_value(line, key_match.end())
        pairs.append((key_match.group(1).strip(), value))
    return pairs, complete


def _is_parameters_line(line: str) -> bool:
    # A negative prompt full of "word: word," is still a negative prompt.
    if line.strip().startswith(NEGATIVE_PREFIX):
        return False
    pairs, complete = tokenize_parameters_line(line)
    # A1111's own rule is "three or more pairs"; a short line of ours (only "Version: ...")
    # still counts when it is nothing but pairs with at least one key we know.
    if len(pairs) >= 3:
        return True
    return complete and any(key.casefold() in _KNOWN_KEYS for key, _ in pairs)


def _split_sections(text: str) -> tuple[str, str, str]:
    """(prompt, negative prompt, parameters line) of an A1111 text."""
    lines = text.split("\n")
    params_line = ""
    if lines and _is_parameters_line(lines[-1]):
        params_line = lines.pop()
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        stripped = line.strip()
        if not in_negative and stripped.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = stripped[len(NEGATIVE_PREFIX) :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    return (
        "\n".join(prompt_lines).strip(),
        "\n".join(negative_lines).strip(),
        params_line,
    )


def _parse_int(key: str, raw: str, problems: list[str], minimum: int, maximum: int) -> int | None:
    if not _INT_RE.match(raw.strip()):
        problems.append(f"{key} '{raw}' is not a whole number; it was left empty.")
        return None
    value = int(raw)
    if value < minimum:
        problems.append(f"{key} {value} is below {minimum}; it was left empty.")
        return None
    if value > maximum:
        problems.append(f"{key} {value} is larger than {maximum}; it was left empty.")
        return None
    return value


def _parse_float(key: str, raw: str, problems: list[str]) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        problems.append(f"{key} '{raw}' is not a number; it was left empty.")
        return None
    if not math.isfinite(value):
        problems.append(f"{key} '{raw}' is not a usable number; it was left empty.")
        return None
    return value


def _parse_size(raw: str, result: ParsedParameters) -> None:
    match = _SIZE_RE.match(raw)
    if not match or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        result.problems.append(
            f"Size '{raw}' is not WIDTHxHEIGHT (for example 512x768); width and height were left empty."
        )
        return
    result.width, result.height = int(match.group(1)), int(match.group(2))


def _parse_hash(key: str, raw: str, problems: list[str]) -> str | None:
    if not _HEX_RE.match(raw):
        problems.append(f"{key} '{raw}' is not a hexadecimal hash; it was left empty.")
        return None
    return raw.lower()


def _parse_lora_list(key: str, raw: str, problems: list[str]) -> list[tuple[str, str]]:
    """``"name: value, other: value"`` -> [(name, value), ...]; old Fooocus adds ``: weight``."""
    items: list[tuple[str, str]] = []
    for entry in raw.split(","):
        if not entry.strip():
            continue
        name, sep, rest = entry.partition(":")
        if not sep or not name.strip() or not rest.strip():
            problems.append(f"{key} entry '{entry.strip()}' is not 'name: value'; it was skipped.")
            continue
        items.append((name.strip(), rest.strip()))
    return items


def _parse_lora_tags(prompt: str, problems: list[str]) -> list[tuple[str, float]]:
    loras: list[tuple[str, float]] = []
    for tag in find_lora_tags(prompt):
        if tag.scale is None:
            problems.append(f"LoRA tag {tag.text} has scale '{tag.scale_text}', not a number; skipped.")
            continue
        loras.append((tag.name, tag.scale))
    return loras


def _apply_pairs(pairs: list[tuple[str, str]], result: ParsedParameters) -> None:
    problems = result.problems
    schedule: str | None = None
    lora_weights: list[tuple[str, str]] = []
    img2img_pairs: list[tuple[str, str]] = []
    for key, value in pairs:
        folded = key.casefold()
        if folded == "steps":
            result.steps = _parse_int("Steps", value, problems, 1, 10_000)
        elif folded == "sampler":
            result.sampler = value or None
        elif folded == "schedule type":
            schedule = value or None
        elif folded == "cfg scale":
            result.guidance_scale = _parse_float("CFG scale", value, problems)
        elif folded == "distilled cfg scale":
            result.distilled_guidance = _parse_float(DISTILLED_CFG, value, problems)
        elif folded == "seed":
            result.seed = _parse_int("Seed", value, problems, 0, MAX_SEED)
        elif folded == "size":
            _parse_size(value, result)
        elif folded == "model hash":
            result.model_hash = _parse_hash("Model hash", value, problems)
        elif folded == "model":
            result.model_name = value or None
        elif folded == "clip skip":
            result.clip_skip = _parse_int("Clip skip", value, problems, 1, 12)
        elif folded == "variation seed":
            result.variation_seed = _parse_int("Variation seed", value, problems, 0, MAX_SEED)
        elif folded == "variation seed strength":
            result.variation_strength = _parse_float("Variation seed strength", value, problems)
        elif folded == "lora hashes":
            for name, rest in _parse_lora_list(key, value, problems):
                file_hash = rest.split(":")[0].strip()
                if _HEX_RE.match(file_hash):
                    result.lora_hashes[name] = file_hash.lower()
                else:
                    problems.append(f"{key} for '{name}' is not a hexadecimal hash; skipped.")
                # Fooocus before 2.3 wrote "name: hash: weight" and no tags in the prompt.
                if rest.count(":") == 1:
                    lora_weights.append((name, rest.split(":")[1].strip()))
        elif folded == "lora weights":
            # Fooocus writes the weights here instead of tags in the prompt.
            lora_weights.extend(_parse_lora_list(key, value, problems))
        elif folded == "version":
            result.version = value or None
        elif folded in _IMG2IMG_KEYS or folded in _HIRES_KEYS:
            img2img_pairs.append((key, value))
        elif _CONTROLNET_KEY_RE.match(key):
            use = _controlnet_use(key, value, problems)
            if use is not None:
                result.controlnet.append(use)
        else:
            result.extra[key] = value
    values = {key.casefold(): value for key, value in img2img_pairs}
    # Any "Hires ..." field (A1111 also writes "Hires prompt", "Hires sampler", ...) means the hires fix ran.
    if any(key in values for key in _HIRES_KEYS) or any(key.casefold().startswith("hires") for key in result.extra):
        # A1111's hires fix writes its second pass's "Denoising strength" too: that is not img2img.
        result.hires = _hires_use(values, problems)
    else:
        result.img2img = _img2img_use({key.casefold(): value for key, value in img2img_pairs}, problems)
    result.schedule_type = schedule
    if result.sampler and schedule in _FOLDED_SCHEDULES and not result.sampler.endswith(schedule):
        result.sampler = f"{result.sampler} {schedule}"
    _add_lora_weights(lora_weights, result)


_IMG2IMG_KEYS = {
    "denoising strength",
    "resize mode",
    "mask blur",
    "masked content",
    "inpaint area",
    "masked area padding",
}


def _img2img_use(values: dict[str, str], problems: list[str]) -> Img2ImgUse | None:
    """The img2img fields read (casefolded keys); None without a usable "Denoising strength"."""
    from lorapg.gallery.records import Img2ImgUse

    raw = values.get("denoising strength")
    strength = _parse_float("Denoising strength", raw, problems) if raw is not None else None
    if strength is None:
        return None
    mode = values.get("resize mode")
    blur = values.get("mask blur")
    padding = values.get("masked area padding")
    content = (values.get("masked content") or "").strip().lower()
    return Img2ImgUse(
        denoising_strength=strength,
        resize_mode=(_parse_int("Resize mode", mode, problems, 0, 3) or 0) if mode is not None else 0,
        mask_blur=_parse_int("Mask blur", blur, problems, 0, 1000) if blur is not None else None,
        masked_content=content if content in ("fill", "original") else None,
        only_masked=(values.get("inpaint area") or "").strip().casefold() == ONLY_MASKED.casefold(),
        only_masked_padding=_parse_int("Masked area padding", padding, problems, 0, 10_000) if padding else None,
    )


def _hires_use(values: dict[str, str], problems: list[str]) -> HiresUse:
    """The hires fix's fields read (casefolded keys); "Denoising strength" is its second pass's."""
    from lorapg.gallery.records import HiresUse

    raw = {key: values.get(key) for key in ("denoising strength", "hires upscale", "hires steps", "hires resize")}
    use = HiresUse(upscaler=(values.get("hires upscaler") or "Latent").strip())
    if raw["denoising strength"] is not None:
        use.denoising_strength = _parse_float("Denoising strength", raw["denoising strength"], problems)
    if raw["hires upscale"] is not None:
        use.scale = _parse_float("Hires upscale", raw["hires upscale"], problems)
    if raw["hires steps"] is not None:
        use.steps = _parse_int("Hires steps", raw["hires steps"], problems, 0, 10_000) or 0
    if raw["hires resize"] is not None:
        match = _SIZE_RE.match(raw["hires resize"])
        if match:
            use.resize_x, use.resize_y = int(match.group(1)), int(match.group(2))
        else:
            problems.append(f"Hires resize '{raw['hires resize']}' is not WIDTHxHEIGHT; it was left empty.")
    return use


_CONTROLNET_KEY_RE = re.compile(r"^ControlNet(?: Unit)? \d+$", re.IGNORECASE)
_CONTROLNET_HASHED_RE = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{8,64})\]$")


def _controlnet_use(key: str, value: str, problems: list[str]) -> ControlNetUse | None:
    """One ``ControlNet N`` unit read from its inner ``Key: value, ...`` list; None without a model."""
    from lorapg.gallery.records import ControlNetUse

    inner = {name.casefold(): text for name, text in tokenize_parameters_line(value)[0]}
    model = (inner.get("model") or "").strip()
    if not model or model.casefold() == "none":
        problems.append(f"{key} names no model; it was skipped.")
        return None
    hashed = _CONTROLNET_HASHED_RE.match(model)
    use = ControlNetUse(
        module=(inner.get("module") or "none").strip(),
        model=hashed.group(1) if hashed else model,
        model_hash=hashed.group(2).lower() if hashed else None,
        resize_mode=(inner.get("resize mode") or "Crop and Resize").strip(),
    )
    for field_name, label, default in (
        ("weight", "Weight", 1.0),
        ("guidance_start", "Guidance Start", 0.0),
        ("guidance_end", "Guidance End", 1.0),
        ("threshold_a", "Threshold A", None),
        ("threshold_b", "Threshold B", None),
    ):
        raw = inner.get(label.casefold())
        number = _parse_float(f"{key} {label}", raw, problems) if raw is not None else None
        setattr(use, field_name, default if number is None else number)
    return use


def _add_lora_weights(weights: list[tuple[str, str]], result: ParsedParameters) -> None:
    tagged = {name for name, _ in result.loras}
    for name, raw in weights:
        if name in tagged:
            continue
        scale = _parse_float(f"LoRA weight for '{name}'", raw, result.problems)
        if scale is not None:
            result.loras.append((name, scale))
            tagged.add(name)


def _parse_fooocus_json(data: dict[str, object], result: ParsedParameters) -> None:
    """Fooocus' own scheme: a JSON object in the ``parameters`` chunk."""
    text = {key: "" if value is None else str(value) for key, value in data.items()}
    result.prompt = text.pop("prompt", "")
    result.negative_prompt = text.pop("negative_prompt", "")
    pairs: list[tuple[str, str]] = []
    for ours, theirs in (
        ("Steps", "steps"),
        ("Sampler", "sampler"),
        ("CFG scale", "guidance_scale"),
        ("Seed", "seed"),
        ("Model", "base_model"),
        ("Model hash", "base_model_hash"),
        ("Version", "version"),
    ):
        if text.get(theirs):
            pairs.append((ours, text.pop(theirs)))
    resolution = text.pop("resolution", "")
    if resolution:
        pairs.append(
            (
                "Size",
                "x".join(part.strip() for part in resolution.strip("()").split(",")),
            )
        )
    loras = data.get("loras")
    text.pop("loras", None)
    weights: list[tuple[str, str]] = []
    if isinstance(loras, list):
        for item in loras:
            if isinstance(item, list | tuple) and len(item) >= 2:
                weights.append((str(item[0]), str(item[1])))
                if len(item) >= 3 and _HEX_RE.match(str(item[2])):
                    result.lora_hashes[str(item[0])] = str(item[2]).lower()
    _apply_pairs(pairs, result)
    _add_lora_weights(weights, result)
    result.extra.update({key: value for key, value in text.items() if value})


def parse_parameters(text: str) -> ParsedParameters:
    """Read an A1111 parameters text (A1111, Forge, Fooocus, civitai). Never raises on content.

    Fields that are missing stay None; fields that are present but broken are listed in
    ``problems`` with a message a user can act on, and also stay None.
    """
    result = ParsedParameters()
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        result.problems.append("The image has no generation parameters.")
        return result
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            _parse_fooocus_json(data, result)
            return result
    result.prompt, result.negative_prompt, params_line = _split_sections(text)
    result.loras = _parse_lora_tags(result.prompt, result.problems)
    if not params_line:
        result.problems.append("No 'Steps: ..., Seed: ...' line was found; only the prompt could be read.")
    pairs, _ = tokenize_parameters_line(params_line)
    _apply_pairs(pairs, result)
    if result.problems:
        logger.debug("parameters read with problems: %s", result.problems)
    return result
