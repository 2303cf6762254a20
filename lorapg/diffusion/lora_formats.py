"""Conversion of LoRA state dicts between the diffusers/peft layout and kohya's layout.

kohya's layout (``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha``) is what AUTOMATIC1111, Forge, ComfyUI and diffusers all load, so it is the format the
product writes for users. Reading either layout is diffusers' job (``load_lora_weights``).
"""

from __future__ import annotations

import torch

# diffusers component prefix -> kohya prefix, per base family (SDXL numbers its text encoders).
_KOHYA_PREFIX = {
    "sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
_PEFT_TO_KOHYA_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def peft_to_kohya(state: dict[str, torch.Tensor], alpha: float, family: str) -> dict[str, torch.Tensor]:
    """Rename ``unet.<path>.lora_A.weight`` keys to kohya keys and add one ``.alpha`` per module.

    ``alpha`` is stored per module because kohya readers compute scale = alpha / rank from it;
    without it they assume alpha = rank and the LoRA comes out at the wrong strength.
    """
    prefixes = _KOHYA_PREFIX.get(family)
    if prefixes is None:
        raise ValueError(f"unknown base family {family!r}")
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        component, rest = key.split(".", 1)
        module_path, suffix = _split_lora_suffix(rest)
        if component.startswith("text_encoder") and not module_path.startswith("text_model."):
            # transformers 5 dropped CLIPTextModel's ``text_model`` level; kohya names (and so A1111,
            # Forge and ComfyUI) still spell it: lora_te_text_model_encoder_layers_0_….
            module_path = "text_model." + module_path
        kohya_module = f"{prefixes[component]}_{module_path.replace('.', '_')}"
        converted[f"{kohya_module}.{_PEFT_TO_KOHYA_SUFFIX[suffix]}"] = tensor.contiguous()
        converted.setdefault(f"{kohya_module}.alpha", torch.tensor(float(alpha)))
    return converted


def _split_lora_suffix(key: str) -> tuple[str, str]:
    for suffix in _PEFT_TO_KOHYA_SUFFIX:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise ValueError(f"not a LoRA weight key: {key!r}")
