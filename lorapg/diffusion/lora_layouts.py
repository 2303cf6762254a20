"""What ``load_lora_weights`` reads for one LoRA file: the file itself, or its tensors renamed first.

diffusers reads most layouts itself. Two it does not, and they are renamed here: SD 3 LoRAs in Stability's
module names (kohya sd-scripts, ComfyUI: ``sd3_kohya``) and the Flux spellings its converter fails on for
some models (``flux_kohya``). Only the file's header is read to decide.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from lorapg.diffusion import flux_kohya, sd3_kohya
from lorapg.diffusion.families import FLUX, SD3
from lorapg.errors import shorten

log = logging.getLogger(__name__)


def readable_lora(pipe: DiffusionPipeline, family: str, path: Path, name: str) -> str | dict[str, torch.Tensor]:
    """The path when diffusers reads the file as it is, else the renamed tensors (diffusers accepts both)."""
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())  # noqa: SIM118 (a safetensors handle is not iterable)
    if family == SD3 and sd3_kohya.has_stability_names(keys):
        return _sd3_from_stability_names(pipe, load_file(str(path)), name)
    if family == FLUX and flux_kohya.needs_conversion(keys):
        return flux_kohya.convert(load_file(str(path)), pipe.transformer)
    return str(path)


def _sd3_from_stability_names(pipe: DiffusionPipeline, state: dict, name: str) -> dict[str, torch.Tensor]:
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
    return converted.state


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
