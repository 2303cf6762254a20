"""Conversion of LoRA state dicts between the diffusers/peft layout and kohya's layout.

kohya's layout (``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha``) is what AUTOMATIC1111, Forge, ComfyUI and diffusers all load, so it is the format the
product writes for users. For SD 1.x the module path is the diffusers one (sd-scripts trains SD 1.x
on a diffusers-layout UNet); for SDXL it is the original SGM path, as sd-scripts writes it
(``sgm_names``). Reading either layout is diffusers' job (``load_lora_weights``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lorapg.diffusion.sgm_names import UnetLayout, sgm_unet_module_name

# diffusers component prefix -> kohya prefix, per base family (SDXL numbers its text encoders).
_KOHYA_PREFIX = {
    "sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
_PEFT_TO_KOHYA_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def peft_to_kohya(
    state: dict[str, torch.Tensor], alpha: float, family: str, unet_config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Rename ``unet.<path>.lora_A.weight`` keys to kohya keys and add one ``.alpha`` per module.

    ``alpha`` is stored per module because kohya readers compute scale = alpha / rank from it;
    without it they assume alpha = rank and the LoRA comes out at the wrong strength. SDXL needs the
    UNet's config: the original block numbers follow from its block and layer counts.
    """
    prefixes = _KOHYA_PREFIX.get(family)
    if prefixes is None:
        raise ValueError(f"unknown base family {family!r}")
    layout = None
    if family == "sdxl":
        if unet_config is None:
            raise ValueError("an SDXL LoRA needs the UNet config to name its modules as sd-scripts does")
        layout = UnetLayout.from_config(unet_config)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        component, rest = key.split(".", 1)
        module_path, suffix = _split_lora_suffix(rest)
        if component == "unet" and layout is not None:
            module_path = sgm_unet_module_name(module_path, layout)
        if component.startswith("text_encoder") and not module_path.startswith("text_model."):
            # transformers 5 dropped CLIPTextModel's ``text_model`` level; kohya names (and so A1111,
            # Forge and ComfyUI) still spell it: lora_te_text_model_encoder_layers_0_….
            module_path = "text_model." + module_path
        kohya_module = f"{prefixes[component]}_{module_path.replace('.', '_')}"
        kohya_key = f"{kohya_module}.{_PEFT_TO_KOHYA_SUFFIX[suffix]}"
        if kohya_key in converted:  # two modules under one name would silently drop one of them
            raise ValueError(f"two LoRA modules map to the kohya key {kohya_key!r}")
        converted[kohya_key] = tensor.contiguous()
        converted.setdefault(f"{kohya_module}.alpha", torch.tensor(float(alpha)))
    return converted


def _split_lora_suffix(key: str) -> tuple[str, str]:
    for suffix in _PEFT_TO_KOHYA_SUFFIX:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise ValueError(f"not a LoRA weight key: {key!r}")
