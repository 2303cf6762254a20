"""The two Flux LoRA spellings diffusers 0.42 cannot read on every Flux transformer, made readable.

diffusers converts kohya sd-scripts, XLabs and ComfyUI Flux LoRAs itself, with two gaps:

- its kohya converter splits a single block's fused ``linear1`` (q, k, v and the MLP input) with FLUX.1's
  sizes written into the code (3072, 3072, 3072, 12288) and fails an assertion on any other width;
  here the split uses the loaded transformer's own sizes, and the other modules still go through
  diffusers' converter (``FluxPipeline.lora_state_dict``);
- ComfyUI's peft-style spelling (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``) loads
  with no effect: it is renamed to kohya's ``lora_down``/``lora_up``, which diffusers' ComfyUI path reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from lorapg.diffusion.lora_parts import plain_part, unsupported

_LINEAR1 = re.compile(r"^(?:lora_unet_single_blocks_|diffusion_model\.single_blocks\.)(\d+)[._]linear1\.(.+)$")
_COMFY_PEFT = re.compile(r"^(diffusion_model\..+)\.lora_([AB])\.weight$")
# kohya's and ComfyUI's module names (XLabs' ``double_blocks.…down.weight`` has its own parts).
_RENAMED_PREFIXES = ("lora_unet_", "lora_te", "diffusion_model.", "text_encoders.")


def needs_conversion(keys) -> bool:
    """Also for a key that is no plain LoRA part: ``convert`` names it instead of loading the file half-right."""
    return any(_LINEAR1.match(key) or _COMFY_PEFT.match(key) or _unsupported(key) for key in keys)


def convert(state: Mapping[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors in diffusers' peft layout (``transformer.…lora_A.weight``), ready for load_lora_weights."""
    from diffusers import FluxPipeline  # heavy import: only when a Flux LoRA needs it

    _check_plain_parts(state)
    renamed = {_kohya_spelling(key): tensor for key, tensor in state.items()}
    linear1: dict[int, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, tensor in renamed.items():
        match = _LINEAR1.match(key)
        if match:
            linear1.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        else:
            rest[key] = tensor
    out = dict(FluxPipeline.lora_state_dict(rest)) if rest else {}
    for block, parts in sorted(linear1.items()):
        out.update(_split_linear1(block, parts, transformer))
    return out


def _check_plain_parts(state: Mapping[str, torch.Tensor]) -> None:
    """UnsupportedPart for a DoRA magnitude, Tucker core, bias or LyCORIS factor: neither the linear1 split
    nor diffusers' converter would apply it, and the module's down/up alone are another LoRA."""
    for key in state:
        if _unsupported(key):
            raise unsupported(key, "Flux.1")


def _unsupported(key: str) -> bool:
    return key.startswith(_RENAMED_PREFIXES) and plain_part(key) is None


def _kohya_spelling(key: str) -> str:
    match = _COMFY_PEFT.match(key)
    if not match:
        return key
    return f"{match.group(1)}.lora_{'down' if match.group(2) == 'A' else 'up'}.weight"


def _split_linear1(block: int, parts: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict:
    """``linear1`` computes [q; k; v; mlp] in one matrix: its up rows split at the loaded model's sizes."""
    prefix = f"single_transformer_blocks.{block}"
    names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    sizes = [transformer.get_submodule(f"{prefix}.{name}").out_features for name in names]
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if up.shape[0] != sum(sizes):
        raise ValueError(f"single block {block} linear1 has {up.shape[0]} outputs, the model {sum(sizes)}")
    if "alpha" in parts:  # kohya scales by alpha / rank; the peft adapter diffusers builds here has scale 1
        down = down * (float(parts["alpha"]) / down.shape[0])
    out = {}
    for name, piece in zip(names, up.split(sizes, dim=0), strict=True):
        out[f"transformer.{prefix}.{name}.lora_A.weight"] = down.contiguous()
        out[f"transformer.{prefix}.{name}.lora_B.weight"] = piece.contiguous()
    return out
