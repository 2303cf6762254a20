"""Grid axes, ``KIND=V1,V2,...``: parsed and range-checked here, before anything is queued.

Kinds follow A1111's X/Y/Z plot: ``lora:NAME`` (that LoRA's scale), ``lora-file`` (LoRA names),
``lora-scale`` (the scale of the lora-file axis' LoRA: epochs × scales after training),
``seed``, ``steps``, ``cfg``, ``sampler``, ``checkpoint`` and ``prompt-sr`` (Prompt S/R: the first
value is the text searched for in the prompts, each value replaces it; the first cell keeps it).
Values are comma-separated; a value holding a comma is quoted, as in a CSV line.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path

from lorapg.coercion import CoercionError, to_float, to_int
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.diffusion.samplers import FLOW_SAMPLERS, SAMPLERS
from lorapg.errors import UserError, shorten
from lorapg.limits import CFG_SCALE, LORA_SCALE, SEED, STEPS, Range

LORA_PREFIX = "lora:"
KINDS = ("lora:NAME", "lora-file", "lora-scale", "seed", "steps", "cfg", "sampler", "checkpoint", "prompt-sr")
AXIS_LABELS = ("X axis", "Y axis", "Z axis")
DEFAULT_MAX_CELLS = 64  # Settings.max_grid_cells; A1111 users rarely compare more at once
TITLES = {
    "lora-file": "LoRA",
    "lora-scale": "LoRA scale",
    "seed": "Seed",
    "steps": "Steps",
    "cfg": "CFG scale",
    "sampler": "Sampler",
    "checkpoint": "Checkpoint",
    "prompt-sr": "Prompt S/R",
}


@dataclass(frozen=True)
class Axis:
    kind: str  # a KINDS entry; "lora" for lora:NAME
    values: tuple  # parsed: int, float or str
    lora: str | None = None  # NAME of lora:NAME

    @property
    def title(self) -> str:
        return f"{LORA_PREFIX}{self.lora}" if self.kind == "lora" else TITLES[self.kind]

    def labels(self) -> list[str]:
        if self.kind == "checkpoint":
            return [Path(value).name or value for value in self.values]
        if self.kind == "lora-file":
            return [value.rsplit("/", 1)[-1] for value in self.values]  # a per-epoch file: its own name
        if self.kind in ("cfg", "lora", "lora-scale"):
            return [f"{value:g}" for value in self.values]
        return [str(value) for value in self.values]


def parse_axis(text: str | None, label: str = "X axis", max_chars: int = 0) -> Axis | None:
    """``KIND=V1,V2,...`` as an Axis; None for an empty or missing axis. ``max_chars``: Settings.max_prompt_chars."""
    if text is None or not str(text).strip():
        return None
    text = str(text)
    if max_chars and len(text) > max_chars:
        raise UserError(f"{label} is {len(text)} characters long; it can be at most {max_chars} (max_prompt_chars).")
    kind, sep, rest = text.partition("=")
    kind = kind.strip()
    if not sep:
        raise UserError(f"{label} must look like KIND=V1,V2,… (e.g. seed=1,2,3), got {shorten(text, 40)!r}.")
    lora = None
    if kind.lower().startswith(LORA_PREFIX):
        lora, kind = kind[len(LORA_PREFIX) :].strip(), "lora"
        if not lora:
            raise UserError(f"{label}: lora:NAME needs the LoRA's name, e.g. lora:style=0,0.5,1.")
    else:
        kind = kind.lower()
        if kind not in TITLES:
            raise UserError(f"{label}: unknown kind {shorten(kind, 40)!r}; use one of {', '.join(KINDS)}.")
    raw = _split_values(rest, label)
    return Axis(kind, tuple(_parse_value(kind, value, label) for value in raw), lora)


def _split_values(text: str, label: str) -> list[str]:
    try:
        rows = list(csv.reader([text], skipinitialspace=True))
    except csv.Error as exc:
        raise UserError(f"{label}: the values could not be read ({exc}); quote a value that holds a comma.") from None
    values = [value.strip() for value in rows[0]] if rows else []
    if not values or any(not value for value in values):
        raise UserError(f"{label}: every value must be non-empty; list them as V1,V2,… (got {shorten(text, 40)!r}).")
    return values


def _parse_value(kind: str, value: str, label: str):
    if kind == "seed":
        return _in_range(label, "seed", _whole(label, value), SEED)
    if kind == "steps":
        return _in_range(label, "steps", _whole(label, value), STEPS)
    if kind == "cfg":
        return _in_range(label, "CFG scale", _number(label, value), CFG_SCALE)
    if kind in ("lora", "lora-scale"):
        return _in_range(label, "a LoRA scale", _number(label, value), LORA_SCALE)
    if kind == "sampler" and value not in SAMPLERS and value not in FLOW_SAMPLERS:  # the model checks its family's
        raise UserError(f"{label}: unknown sampler {shorten(value, 40)!r}; choose from {', '.join(SAMPLERS)}.")
    return value  # lora-file, checkpoint: checked against the files when the grid is planned


def _whole(label: str, value: str) -> int:
    try:
        return to_int(value)
    except CoercionError:
        raise UserError(f"{label}: {shorten(value, 40)!r} is not a whole number.") from None


def _number(label: str, value: str) -> float:
    try:
        number = to_float(value)
    except CoercionError:
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"{label}: {shorten(value, 40)!r} is not a number.")
    return number


def _in_range(label: str, name: str, value, limit: Range):
    if value not in limit:
        raise UserError(f"{label}: {value:g} is out of range; {name} must be {limit.describe()}.")
    return value


def parse_axes(x: str | None, y: str | None = None, z: str | None = None, max_chars: int = 0) -> list[Axis | None]:
    """[X, Y, Z] (missing ones None); X is required and one kind may be on one axis only."""
    axes = [parse_axis(text, label, max_chars) for text, label in zip((x, y, z), AXIS_LABELS, strict=True)]
    if axes[0] is None:
        raise UserError("X axis is required; give it as KIND=V1,V2,… (e.g. seed=1,2,3).")
    titles = [axis.title for axis in axes if axis is not None]
    for title in titles:
        if titles.count(title) > 1:
            raise UserError(f"{title} is on more than one axis; put each kind on one axis.")
    kinds = [axis.kind if axis is not None else None for axis in axes]
    if "lora-scale" in kinds and "lora-file" not in kinds:
        label = AXIS_LABELS[kinds.index("lora-scale")]
        raise UserError(f"{label} (lora-scale) scales the lora-file axis' LoRA; add a lora-file axis.")
    return axes


def axis_text(kind: str | None, values: str | None) -> str | None:
    """``KIND=VALUES`` from a kind and its values typed apart (the UI's fields); None when either is empty."""
    if not kind or not str(kind).strip() or values is None or not str(values).strip():
        return None
    return f"{str(kind).strip()}={values}"


def cell_count(axes: list[Axis | None], max_cells: int = DEFAULT_MAX_CELLS) -> int:
    """Cells in the whole grid (all Z values); more than ``max_cells`` (0 = no limit) is refused with the count."""
    sizes = [len(axis.values) for axis in axes if axis is not None]
    count = math.prod(sizes)
    if max_cells and count > max_cells:
        shape = " × ".join(str(size) for size in sizes)
        raise UserError(
            f"The grid has {shape} = {count} cells; at most {max_cells} are allowed "
            "(setting max_grid_cells): use fewer axis values."
        )
    return count


def apply_values(picked: list[tuple[Axis, object]], base: GenerationRequest) -> GenerationRequest:
    """One cell's request: ``base`` with each (axis, value) applied. lora-scale comes last: it
    scales the LoRA the lora-file axis put in this cell."""
    files = [value for axis, value in picked if axis.kind == "lora-file"]
    request = base
    for axis, value in sorted(picked, key=lambda pair: pair[0].kind == "lora-scale"):
        if axis.kind == "lora-scale":
            request = replace(request, loras=_with_lora(request.loras, files[0], value))
        else:
            request = apply_value(axis, value, request, (base.prompt, base.negative_prompt))
    return request


def apply_value(axis: Axis, value, request: GenerationRequest, base_prompt: tuple[str, str]) -> GenerationRequest:
    """``request`` with ``axis`` set to ``value`` (checkpoint: unchanged, the cell's model is chosen apart).

    ``base_prompt``: (prompt, negative) before any axis changed them, where Prompt S/R searches.
    """
    if axis.kind == "seed":
        return replace(request, seed=value)
    if axis.kind == "steps":
        return replace(request, steps=value)
    if axis.kind == "cfg":
        return replace(request, guidance_scale=value)
    if axis.kind == "sampler":
        return replace(request, sampler=value)
    if axis.kind == "lora":
        return replace(request, loras=_with_lora(request.loras, axis.lora, value))
    if axis.kind == "lora-file":
        # Added at the scale the base request gives it, else at the default scale.
        return replace(request, loras=_with_lora(request.loras, value, None))
    if axis.kind == "prompt-sr":
        search = axis.values[0]
        return replace(
            request,
            prompt=request.prompt.replace(search, value),
            negative_prompt=(request.negative_prompt.replace(search, value)),
        )
    return request


def _with_lora(loras: tuple[LoraRequest, ...], name: str, scale: float | None) -> tuple[LoraRequest, ...]:
    existing = next((lora for lora in loras if lora.name == name), None)
    scale = scale if scale is not None else existing.scale if existing else LORA_SCALE.default
    if existing is None:
        return (*loras, LoraRequest(name, scale))
    return tuple(LoraRequest(name, scale) if lora.name == name else lora for lora in loras)


def check_prompt_sr(axes: list[Axis | None], request: GenerationRequest) -> None:
    """Prompt S/R's search text must be in the prompt or the negative prompt, or every cell is the same."""
    for axis, label in zip(axes, AXIS_LABELS, strict=True):
        if axis is not None and axis.kind == "prompt-sr":
            search = axis.values[0]
            if search not in request.prompt and search not in request.negative_prompt:
                raise UserError(
                    f"{label} (prompt-sr): {shorten(search, 40)!r} is not in the prompt; "
                    "the first value is the text each value replaces."
                )
