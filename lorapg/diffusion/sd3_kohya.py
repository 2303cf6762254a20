"""SD 3.x LoRAs in Stability's module names (kohya sd-scripts, ComfyUI) renamed to diffusers' peft layout.

diffusers 0.42 reads SD 3 LoRAs only in its own layout (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``);
a file sd-scripts writes (``lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight``) loads with no effect.
Which Stability module becomes which diffusers module follows diffusers' single-file converter
(``convert_sd3_transformer_checkpoint_to_diffusers``): a fused qkv becomes to_q/to_k/to_v (the up rows split
in three, the down matrix shared), and the adaLN modulations that diffusers' AdaLayerNormContinuous reads as
(scale, shift) instead of (shift, scale) get their up rows' halves swapped. kohya's ``alpha`` is folded into the
down matrix (scale = alpha / rank), since diffusers' SD 3 loader takes no per-module alphas.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lorapg.diffusion.lora_parts import plain_part, unsupported

KOHYA_UNET, COMFY_UNET = "lora_unet_", "diffusion_model."
# kohya's text encoder prefixes for SD 3 -> diffusers' component; lora_te3_ (T5) has no diffusers loader.
TEXT_ENCODERS = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# ComfyUI's spelling of the same encoders: its module path, dotted (``text_encoders.t5xxl.`` is left out too).
COMFY_TEXT_ENCODERS = {
    "text_encoders.clip_l.transformer.": "text_encoder",
    "text_encoders.clip_g.transformer.": "text_encoder_2",
}
STABILITY_PREFIXES = (KOHYA_UNET, COMFY_UNET, "lora_te1_", "lora_te2_", "lora_te3_", "text_encoders.")
PLAIN, SPLIT_QKV, SWAP_HALVES = "plain", "split_qkv", "swap_halves"


@dataclass(frozen=True)
class Target:
    modules: tuple[str, ...]  # diffusers module paths, without the component prefix
    how: str = PLAIN


@dataclass
class Converted:
    state: dict[str, torch.Tensor]  # diffusers/peft keys: transformer.… / text_encoder.… / text_encoder_2.…
    ignored: list[str]  # module names in the file that no loaded module takes


def has_stability_names(keys) -> bool:
    """True when an SD 3 LoRA needs this conversion: diffusers reads only ``transformer.``/``text_encoder…`` keys."""
    return any(key.startswith(STABILITY_PREFIXES) for key in keys)


def transformer_targets(config: Mapping[str, Any]) -> dict[str, Target]:
    """Stability module path -> diffusers modules, for an SD3Transformer2DModel with this config."""
    num_layers = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    targets = {
        "x_embedder.proj": Target(("pos_embed.proj",)),
        "context_embedder": Target(("context_embedder",)),
        "t_embedder.mlp.0": Target(("time_text_embed.timestep_embedder.linear_1",)),
        "t_embedder.mlp.2": Target(("time_text_embed.timestep_embedder.linear_2",)),
        "y_embedder.mlp.0": Target(("time_text_embed.text_embedder.linear_1",)),
        "y_embedder.mlp.2": Target(("time_text_embed.text_embedder.linear_2",)),
        "final_layer.linear": Target(("proj_out",)),
        "final_layer.adaLN_modulation.1": Target(("norm_out.linear",), SWAP_HALVES),
    }
    for i in range(num_layers):
        targets.update(_block_targets(i, last=i == num_layers - 1, dual=i in dual))
    return targets


def _block_targets(i: int, *, last: bool, dual: bool) -> dict[str, Target]:
    x, c, d = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
    targets = {
        f"{x}.attn.qkv": Target((f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), SPLIT_QKV),
        f"{x}.attn.proj": Target((f"{d}.attn.to_out.0",)),
        f"{x}.mlp.fc1": Target((f"{d}.ff.net.0.proj",)),
        f"{x}.mlp.fc2": Target((f"{d}.ff.net.2",)),
        f"{x}.adaLN_modulation.1": Target((f"{d}.norm1.linear",)),
        f"{c}.attn.qkv": Target((f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"), SPLIT_QKV),
        # The last block's context stream only feeds the joint attention: an AdaLayerNormContinuous, (scale, shift).
        f"{c}.adaLN_modulation.1": Target((f"{d}.norm1_context.linear",), SWAP_HALVES if last else PLAIN),
    }
    if not last:
        targets[f"{c}.attn.proj"] = Target((f"{d}.attn.to_add_out",))
        targets[f"{c}.mlp.fc1"] = Target((f"{d}.ff_context.net.0.proj",))
        targets[f"{c}.mlp.fc2"] = Target((f"{d}.ff_context.net.2",))
    if dual:  # SD 3.5 Medium's MMDiT-X: a second self-attention on the image stream
        targets[f"{x}.attn2.qkv"] = Target((f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"), SPLIT_QKV)
        targets[f"{x}.attn2.proj"] = Target((f"{d}.attn2.to_out.0",))
    return targets


def text_encoder_targets(prefix: str, modules: list[str], *, dotted: bool = False) -> dict[str, str]:
    """kohya module name (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``) -> module path in the encoder;
    ``dotted``: ComfyUI's name (``text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj``).

    transformers 5 may or may not keep CLIP's ``text_model`` level; kohya and ComfyUI names always spell it.
    """
    table = {}
    for path in modules:
        spelled = path if path.startswith("text_model.") else f"text_model.{path}"
        table[prefix + (spelled if dotted else spelled.replace(".", "_"))] = path
    return table


def convert(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], text_encoders: Mapping[str, list[str]]
) -> Converted:
    """Rename a Stability-named SD 3 LoRA. ``text_encoders``: diffusers component -> its Linear module paths."""
    by_name = _transformer_names(config)
    spellings = [(prefix, component, False) for prefix, component in TEXT_ENCODERS.items()]
    spellings += [(prefix, component, True) for prefix, component in COMFY_TEXT_ENCODERS.items()]
    for prefix, component, dotted in spellings:
        for name, path in text_encoder_targets(prefix, text_encoders.get(component, []), dotted=dotted).items():
            by_name[name] = (component, Target((path,)))
    out: dict[str, torch.Tensor] = {}
    ignored = []
    for name, parts in sorted(_group(state).items()):
        target = by_name.get(name)
        if target is None or "down" not in parts or "up" not in parts:
            ignored.append(name)
            continue
        component, where = target
        out.update(_convert_module(component, where, parts))
    return Converted(out, ignored)


def _transformer_names(config: Mapping[str, Any]) -> dict[str, tuple[str, Target]]:
    """Both spellings: kohya's ``lora_unet_joint_blocks_0_…`` and ComfyUI's ``diffusion_model.joint_blocks.0.…``."""
    names = {}
    for path, target in transformer_targets(config).items():
        names[KOHYA_UNET + path.replace(".", "_")] = ("transformer", target)
        names[COMFY_UNET + path] = ("transformer", target)
    return names


def _group(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {"down", "up", "alpha"}.

    Any other key (``dora_scale``, ``lora_mid``, ``lora_B.bias``, ``hada_…``) raises UnsupportedPart: converting
    the module's down/up without it would apply another LoRA than the file holds.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        found = plain_part(key)
        if found is None:
            raise unsupported(key, "SD 3.5")
        module, part = found
        modules.setdefault(module, {})[part] = tensor
    return modules


def _convert_module(component: str, target: Target, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    down, up = parts["down"].float(), parts["up"].float()
    rank = down.shape[0]
    if "alpha" in parts:  # kohya scales by alpha / rank in the forward pass; peft's adapter here has scale 1
        down = down * (float(parts["alpha"]) / rank)
    if target.how == SWAP_HALVES:
        shift, scale = up.chunk(2, dim=0)
        up = torch.cat([scale, shift], dim=0)
    ups = up.chunk(3, dim=0) if target.how == SPLIT_QKV else (up,)
    dtype = parts["up"].dtype
    out = {}
    for module, module_up in zip(target.modules, ups, strict=True):
        out[f"{component}.{module}.lora_A.weight"] = down.to(dtype).contiguous()
        out[f"{component}.{module}.lora_B.weight"] = module_up.to(dtype).contiguous()
    return out
