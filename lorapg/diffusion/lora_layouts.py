"""What ``load_lora_weights`` reads for one LoRA file: the file itself, or its tensors renamed first.

diffusers reads most layouts itself. Two it does not, and they are renamed here: SD 3 LoRAs in Stability's
module names (kohya sd-scripts, ComfyUI: ``sd3_kohya``) and the Flux spellings its converter fails on for
some models (``flux_kohya``). Only the file's header is read to decide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lorapg.diffusion import flux_kohya, sd3_kohya
from lorapg.diffusion.families import FLUX, SD3
from lorapg.errors import UserError, shorten

log = logging.getLogger(__name__)

_NAMED_IN_WARNING = 3  # left-out modules named in the generation's warning (the log names them all)


@dataclass(frozen=True)
class ReadableLora:
    source: str | dict[str, torch.Tensor]  # what load_lora_weights reads: the path, or the renamed tensors
    left_out: tuple[str, ...] = ()  # the file's modules no module of the loaded model takes


def readable_lora(pipe: DiffusionPipeline, family: str, path: Path, name: str) -> ReadableLora:
    """The path when diffusers reads the file as it is, else the renamed tensors (diffusers accepts both).

    UserError when the file cannot be read (cut short, replaced, not safetensors): that is no question of
    which model it fits. UnsupportedPart (a ValueError) when it holds parts a renaming cannot carry.
    """
    keys = _read(path, name, lambda handle: list(handle.keys()))  # noqa: SIM118 (a handle is not iterable)
    if family == SD3 and sd3_kohya.has_stability_names(keys):
        return _sd3_from_stability_names(pipe, _read(path, name), name)
    if family == FLUX and flux_kohya.needs_conversion(keys):
        return ReadableLora(flux_kohya.convert(_read(path, name), pipe.transformer))
    return ReadableLora(str(path))


def left_out_warning(name: str, left_out: tuple[str, ...]) -> str:
    """The line the UI and the API show with each image made with this LoRA."""
    shown = ", ".join(left_out[:_NAMED_IN_WARNING]) + (", …" if len(left_out) > _NAMED_IN_WARNING else "")
    return f"LoRA {name}: {len(left_out)} modules left out, which the loaded model does not have ({shown})."


def _read(path: Path, name: str, header=None):
    """The file's tensors (or ``header(handle)``), with a read error said as such."""
    try:
        if header is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            return header(handle)
    except (SafetensorError, OSError) as exc:
        lines = str(exc).strip().splitlines()
        reason = shorten(lines[0], 200) if lines else type(exc).__name__
        raise UserError(f"LoRA file {name} could not be read ({reason}).") from None


def _sd3_from_stability_names(pipe: DiffusionPipeline, state: dict, name: str) -> ReadableLora:
    encoders = {
        component: _linear_modules(getattr(pipe, component, None)) for component in sd3_kohya.TEXT_ENCODERS.values()
    }
    converted = sd3_kohya.convert(state, pipe.transformer.config, encoders)
    if converted.ignored:
        # Not silently: a part of the LoRA the image will lack (T5 parts: diffusers' SD 3 loader takes none).
        log.warning(
            "LoRA %s: %d of its modules fit no module of the loaded SD 3.5 model and are left out: %s",
            name,
            len(converted.ignored),
            shorten(", ".join(converted.ignored), 600),
        )
    return ReadableLora(converted.state, tuple(converted.ignored))


def _linear_modules(model: torch.nn.Module | None) -> list[str]:
    if model is None:
        return []
    # A module that already holds a peft adapter wraps its Linear as ``<path>.base_layer``, beside the
    # adapters' own Linears (``<path>.lora_A.<adapter>``): the path is the wrapper's.
    paths = {
        path.removesuffix(".base_layer")
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".lora_" not in path
    }
    return sorted(paths)
