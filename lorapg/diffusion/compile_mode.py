"""``--compile``: the UNet runs through ``torch.compile``, and changing LoRAs never recompiles it.

dynamo compiles a module's forward once and guards the graph on the module's structure: which
submodules exist and of what type. A peft adapter wraps every layer it targets (``Linear`` becomes
``lora.Linear``), so loading, fusing or removing one breaks the guards and recompiles the UNet (a minute
or more with inductor on SDXL). Parameters, by contrast, are graph *inputs*: changing their values in
place keeps every guard true.

So in compile mode every LoRA file is applied as a weight patch (``weight_patches``): ``scale · ΔW`` is
added to the weights in place and the exact originals are copied back when the selection changes;
no peft wrapper ever enters the compiled UNet. kohya-layout files (plain LoRA, LoCon, LyCORIS) are
patched as they are; diffusers/peft-layout files are renamed to kohya's names first
(``diffusers_lora_as_kohya``), their alpha taken from the adapter metadata diffusers saves.

diffusers' own answer, LoRA hotswap (``enable_lora_hotswap(target_rank=…)`` before compiling, then
``load_lora_weights(…, hotswap=True)``), was not used: it keeps the peft wrappers, so every step still
pays the adapters' extra matmuls (the per-step cost issue 16 removes); the first file fixes the set of
wrapped layers and the largest rank, so a later file that targets other layers or has a higher rank
cannot be swapped in; and it swaps one adapter, not a stack of files at their own scales, nor the
LyCORIS formats diffusers cannot load at all. Weight patches have no rank limit, no per-step cost,
stack any mix of formats, and keep scale 0 bit-exact.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "inductor"  # what the product uses; tests pass a cheap backend ("eager")
_PEFT_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


class LayoutError(ValueError):
    """A diffusers-layout file this mode cannot rename; the message names the key."""


def compile_unet(pipe: DiffusionPipeline, backend: str = DEFAULT_BACKEND) -> None:
    """Compile the UNet's forward in place; it is traced on the first generation.

    ``Module.compile`` keeps the module itself (no ``_orig_mod`` wrapper), so its config, its layer
    names (which weight patches resolve) and the residency manager's moves all stay as they were.
    """
    started = time.perf_counter()
    pipe.unet.compile(backend=backend)
    log.info("UNet set up for torch.compile (backend %s) in %.1f ms", backend, (time.perf_counter() - started) * 1000)


def diffusers_lora_as_kohya(pipe: DiffusionPipeline, path: str) -> dict[str, torch.Tensor]:
    """Read a diffusers/peft-layout LoRA file and rename it to kohya's layout, with one alpha per module.

    Raises LayoutError for keys that are not plain LoRA down/up weights (peft's DoRA magnitudes, LoRA
    biases): applying them partly would change the image wrongly.
    """
    state, network_alphas, metadata = type(pipe).lora_state_dict(path, return_lora_metadata=True)
    prefixes = _kohya_prefixes(pipe)
    converted: dict[str, torch.Tensor] = {}
    for component in sorted({key.split(".", 1)[0] for key in state}):
        if component not in prefixes:
            raise LayoutError(f"its keys start with {component!r}, which is no part of this pipeline")
        part = {key.split(".", 1)[1]: value for key, value in state.items() if key.startswith(component + ".")}
        part = convert_unet_state_dict_to_peft(part)  # older diffusers names (to_q_lora.down, lora.down)
        config = _component_config(metadata, component)
        for key, tensor in part.items():
            module, suffix = _split_suffix(key)
            kohya = f"{prefixes[component]}_{module.replace('.', '_')}"
            converted[f"{kohya}.{_PEFT_SUFFIX[suffix]}"] = tensor
            if suffix == "lora_A.weight":
                rank = tensor.shape[0]
                alpha = _module_alpha(config, network_alphas, f"{component}.{module}", module, rank)
                converted[f"{kohya}.alpha"] = torch.tensor(float(alpha))
    return converted


def _kohya_prefixes(pipe: DiffusionPipeline) -> dict[str, str]:
    # weight_patches.module_index knows lora_te for SD 1.x's encoder and lora_te1/lora_te2 for SDXL's.
    if getattr(pipe, "text_encoder_2", None) is not None:
        return {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    return {"unet": "lora_unet", "text_encoder": "lora_te"}


def _split_suffix(key: str) -> tuple[str, str]:
    for suffix in _PEFT_SUFFIX:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise LayoutError(f"its key {key!r} is not a plain LoRA weight (compile mode applies LoRA up/down weights only)")


def _component_config(metadata: Mapping | None, component: str) -> dict:
    """The peft LoraConfig diffusers saved for one component (``unet.lora_alpha`` …), or {}."""
    if not metadata:
        return {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    prefix = component + "."
    config = {key[len(prefix) :]: value for key, value in metadata.items() if key.startswith(prefix)}
    if config.get("use_dora"):
        raise LayoutError("it is a peft DoRA file, which compile mode cannot apply; use a kohya-layout DoRA file")
    return config


def _module_alpha(config: dict, network_alphas: Mapping | None, full_name: str, module: str, rank: int) -> float:
    """The kohya alpha that gives this module peft's scale (kohya's scale is alpha / rank)."""
    if network_alphas and f"{full_name}.alpha" in network_alphas:
        return float(network_alphas[f"{full_name}.alpha"])
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # peft's own pattern rule
            alpha = value
            break
    if alpha is None:
        return float(rank)  # no metadata: diffusers assumes alpha = rank (scale 1), and so does this
    if config.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r): the same scale as kohya's alpha' / r with alpha' = alpha · sqrt(r)
        return float(alpha) * math.sqrt(rank)
    return float(alpha)
