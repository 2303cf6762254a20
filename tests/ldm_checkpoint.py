"""Write a diffusers SD 1.x / SDXL pipeline as one original-layout (CompVis/LDM) checkpoint.

Users bring base models as a single ``.safetensors`` file in the layout civitai and A1111 use, and
the app loads them with ``from_single_file``. Tests cannot download such a file, so this module
produces one from a tiny pipeline: it is the inverse of the key mapping in
``diffusers.loaders.single_file_utils`` (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``).
Block counts are read from each model's config, so any layers_per_block / block count works.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# Layers whose LDM name is a fixed rename of the diffusers name (no block index arithmetic).
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's text_time embedding and a class embedding both live under label_emb in LDM.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {
    "conv_norm_out": "norm_out",
}
_VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _split(key: str, prefix: str) -> str | None:
    """The rest of ``key`` after ``prefix`` (which must end a dotted component), else None."""
    return key[len(prefix) :] if key.startswith(prefix) else None


def _rename_parts(rest: str, parts: Mapping[str, str]) -> str:
    """Rename the leading sub-module of ``rest`` (e.g. ``norm1.weight``) using ``parts``."""
    for old, new in parts.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


# --- UNet ---------------------------------------------------------------------------------------


def _unet_down_key(rest: str, layers_per_block: int) -> str:
    """``down_blocks.B.…`` -> ``input_blocks.I.…``; each block spans layers_per_block + 1 slots.

    LDM counts the conv_in as input block 0, then per down block one slot per resnet (holding the
    resnet at .0 and its attention at .1) and a final slot for the downsampler (``.0.op``).
    """
    block, kind, index, tail = _block_parts(rest)
    base = 1 + block * (layers_per_block + 1)
    if kind == "resnets":
        return f"input_blocks.{base + index}.0.{_rename_parts(tail, _UNET_RESNET_PARTS)}"
    if kind == "attentions":
        return f"input_blocks.{base + index}.1.{tail}"
    if kind == "downsamplers":
        return f"input_blocks.{base + layers_per_block}.0.op.{tail.removeprefix('conv.')}"
    raise KeyError(f"unexpected UNet down-block key: {rest}")


def _unet_up_key(rest: str, layers_per_block: int, has_attention: set[int]) -> str:
    """``up_blocks.B.…`` -> ``output_blocks.I.…``; each up block has layers_per_block + 1 resnets.

    The upsampler sits after the last resnet's attention, so at ``.2`` when the block has
    attentions and at ``.1`` otherwise (diffusers' reader accepts both, real files use this).
    """
    block, kind, index, tail = _block_parts(rest)
    base = block * (layers_per_block + 1)
    if kind == "resnets":
        return f"output_blocks.{base + index}.0.{_rename_parts(tail, _UNET_RESNET_PARTS)}"
    if kind == "attentions":
        return f"output_blocks.{base + index}.1.{tail}"
    if kind == "upsamplers":
        slot = 2 if block in has_attention else 1
        return f"output_blocks.{base + layers_per_block}.{slot}.{tail}"
    raise KeyError(f"unexpected UNet up-block key: {rest}")


def _unet_mid_key(rest: str) -> str:
    """LDM's middle block is [resnet 0, attention, resnet 1] at indices 0, 1, 2."""
    kind, index, tail = rest.split(".", 2)
    if kind == "resnets":
        return f"middle_block.{2 * int(index)}.{_rename_parts(tail, _UNET_RESNET_PARTS)}"
    if kind == "attentions":
        return f"middle_block.{int(index) + 1}.{tail}"
    raise KeyError(f"unexpected UNet mid-block key: {rest}")


def _block_parts(rest: str) -> tuple[int, str, int, str]:
    """``1.resnets.0.conv1.weight`` -> (1, "resnets", 0, "conv1.weight")."""
    block, kind, index, tail = rest.split(".", 3)
    return int(block), kind, int(index), tail


def _unet_key(key: str, layers_per_block: int, has_attention: set[int]) -> str:
    module, _, param = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{param}"
    if (rest := _split(key, "down_blocks.")) is not None:
        return _unet_down_key(rest, layers_per_block)
    if (rest := _split(key, "up_blocks.")) is not None:
        return _unet_up_key(rest, layers_per_block, has_attention)
    if (rest := _split(key, "mid_block.")) is not None:
        return _unet_mid_key(rest)
    raise KeyError(f"no LDM name for UNet key: {key}")


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""
    layers_per_block = config["layers_per_block"]
    if not isinstance(layers_per_block, int):
        # diffusers' reader indexes input/output blocks with one int, so per-block counts can't load.
        raise TypeError("per-block layers_per_block has no single-file LDM layout")
    has_attention = {i for i, name in enumerate(config["up_block_types"]) if "CrossAttn" in name}
    return {UNET_PREFIX + _unet_key(key, layers_per_block, has_attention): tensor for key, tensor in state.items()}


# --- VAE ----------------------------------------------------------------------------------------


def _vae_resnet(tail: str) -> str:
    return _rename_parts(tail, {"conv_shortcut": "nin_shortcut"})


def _vae_attention(tail: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """LDM's VAE attention uses 1x1 convolutions, so linear weights gain two trailing dims."""
    name = _rename_parts(tail, _VAE_ATTENTION_PARTS)
    if tensor.ndim == 2:
        tensor = tensor[:, :, None, None]
    return name, tensor


def _vae_coder_key(rest: str, num_blocks: int, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Map a key inside ``encoder.`` / ``decoder.`` (``rest`` excludes that prefix)."""
    module, _, param = rest.rpartition(".")
    if module in _VAE_FIXED:
        return f"{_VAE_FIXED[module]}.{param}", tensor
    if (sub := _split(rest, "mid_block.")) is not None:
        kind, index, tail = sub.split(".", 2)
        if kind == "resnets":
            return f"mid.block_{int(index) + 1}.{_vae_resnet(tail)}", tensor
        name, tensor = _vae_attention(tail, tensor)
        return f"mid.attn_{int(index) + 1}.{name}", tensor
    if (sub := _split(rest, "down_blocks.")) is not None:
        block, kind, index, tail = _block_parts(sub)
        if kind == "downsamplers":
            return f"down.{block}.downsample.{tail}", tensor
        return f"down.{block}.block.{index}.{_vae_resnet(tail)}", tensor
    if (sub := _split(rest, "up_blocks.")) is not None:
        # LDM numbers decoder levels by resolution (0 = full size), diffusers in execution order.
        block, kind, index, tail = _block_parts(sub)
        level = num_blocks - 1 - block
        if kind == "upsamplers":
            return f"up.{level}.upsample.{tail}", tensor
        return f"up.{level}.block.{index}.{_vae_resnet(tail)}", tensor
    return rest, tensor  # conv_in / conv_out keep their names


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """AutoencoderKL state dict -> ``first_stage_model.*`` keys."""
    out: StateDict = {}
    for key, tensor in state.items():
        side, _, rest = key.partition(".")
        if side in ("encoder", "decoder"):
            num_blocks = len(config["down_block_types" if side == "encoder" else "up_block_types"])
            name, tensor = _vae_coder_key(rest, num_blocks, tensor)
            out[f"{VAE_PREFIX}{side}.{name}"] = tensor
        else:  # quant_conv / post_quant_conv
            out[VAE_PREFIX + key] = tensor
    return out


# --- Text encoders ------------------------------------------------------------------------------


def _text_model_state(encoder: torch.nn.Module) -> StateDict:
    """State dict with the ``text_model.`` prefix, which LDM files always carry.

    transformers >= 5.6 flattened ``CLIPTextModel`` (keys lose ``text_model.``) while
    ``CLIPTextModelWithProjection`` still wraps it, so normalise both to the wrapped form.
    """
    state = encoder.state_dict()
    if hasattr(encoder, "text_model"):
        return dict(state)
    return {f"text_model.{key}": tensor for key, tensor in state.items()}


def clip_to_ldm(encoder: torch.nn.Module, prefix: str) -> StateDict:
    """OpenAI CLIP text encoder: LDM keeps the transformers names under ``prefix``."""
    return {
        prefix + key: tensor
        for key, tensor in _text_model_state(encoder).items()
        if not key.startswith("text_projection")  # SDXL's first encoder has no projection
    }


def _open_clip_layer(state: Mapping[str, torch.Tensor], layer: int) -> StateDict:
    """One encoder layer; OpenCLIP fuses q/k/v into ``attn.in_proj_*`` (stacked on dim 0)."""
    src = f"text_model.encoder.layers.{layer}."
    dst = f"transformer.resblocks.{layer}."
    out: StateDict = {}
    for param in ("weight", "bias"):
        qkv = [state[f"{src}self_attn.{proj}_proj.{param}"] for proj in ("q", "k", "v")]
        out[f"{dst}attn.in_proj_{param}"] = torch.cat(qkv)
        for diffusers_name, ldm_name in _OPEN_CLIP_LAYER_PARTS.items():
            out[f"{dst}{ldm_name}.{param}"] = state[f"{src}{diffusers_name}.{param}"]
    return out


def open_clip_to_ldm(encoder: torch.nn.Module, prefix: str) -> StateDict:
    """CLIPTextModelWithProjection -> OpenCLIP layout (SDXL's second encoder)."""
    state = _text_model_state(encoder)
    out: StateDict = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        # OpenCLIP computes ``x @ text_projection``; a Linear computes ``x @ weight.T``.
        "text_projection": state["text_projection.weight"].T,
    }
    for layer in range(encoder.config.num_hidden_layers):
        out.update(_open_clip_layer(state, layer))
    return {prefix + key: tensor for key, tensor in out.items()}


# --- Whole pipeline -----------------------------------------------------------------------------


def ldm_state_dict(pipe: Any) -> StateDict:
    """The LDM single-file state dict of an SD 1.x or SDXL pipeline (SDXL: has text_encoder_2)."""
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update(clip_to_ldm(pipe.text_encoder, SDXL_CLIP_PREFIX))
        state.update(open_clip_to_ldm(pipe.text_encoder_2, SDXL_OPEN_CLIP_PREFIX))
    else:
        state.update(clip_to_ldm(pipe.text_encoder, SD1_CLIP_PREFIX))
    return state


def write_ldm_checkpoint(pipe: Any, path: Path) -> Path:
    """Save ``pipe``'s UNet, VAE and text encoder(s) as one LDM-layout ``.safetensors`` file."""
    state = ldm_state_dict(pipe)
    # safetensors refuses views sharing storage (e.g. the sliced/transposed tensors); copy each.
    tensors = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
