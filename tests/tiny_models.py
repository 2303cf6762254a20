"""Tiny Stable Diffusion models built in code, saved the way a user's model is saved.

Tests and benchmarks load these through the product's own loading code, so the path a user's
model takes is the path under test. The shapes follow diffusers' own dummy components: small
enough to run a step in milliseconds on one CPU thread, real enough to exercise every layer type
(cross-attention, resnets, the VAE decoder, CLIP text encoders) that LoRAs touch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, get_peft_model_state_dict
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from lorapg.demo.vocabulary import byte_alphabet

# CLIP's byte-level alphabet: every byte maps to one printable unicode character. A vocabulary of
# these characters (plus their end-of-word forms) tokenizes any text, one token per character,
# which keeps the tokenizer tiny while counting tokens the way the real one does (one per unit).
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def write_tiny_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write vocab.json + merges.txt and load them the way transformers 5 reads them.

    transformers 5 ignores ``vocab_file=``/``merges_file=`` kwargs (a 2-token vocabulary results),
    so the tokenizer is always loaded with ``from_pretrained`` on the folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [_BOS, _EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": _BOS, "eos_token": _EOS, "pad_token": _EOS, "unk_token": _EOS}),
        encoding="utf-8",
    )
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def _text_encoder_config(
    tokenizer: CLIPTokenizer, projection_dim: int | None = None, hidden_size: int = 32
) -> CLIPTextConfig:
    kwargs = {}
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        **kwargs,
    )


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64,
    )


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )


def build_sd15_pipeline(folder: Path) -> StableDiffusionPipeline:
    """A tiny SD 1.x pipeline (native size 64 px) saved as a diffusers folder."""
    tokenizer = write_tiny_clip_tokenizer(folder / "_tokenizer_src")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    vae = _tiny_vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_encoder_config(tokenizer))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_sdxl_pipeline(folder: Path) -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline (two text encoders, time-ids conditioning) saved as a folder."""
    tokenizer = write_tiny_clip_tokenizer(folder / "_tokenizer_src")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + the pooled text embedding (32)
        cross_attention_dim=64,  # the two text encoders' hidden states concatenated
        norm_num_groups=2,
    )
    vae = _tiny_vae()
    # Two different widths (24 + 40 = the UNet's 64): diffusers' single-file loader tells the
    # encoders apart by width, as it does for real SDXL (768 / 1280).
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_encoder_config(tokenizer, hidden_size=24))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(tokenizer, projection_dim=32, hidden_size=40))
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


# --- LoRAs --------------------------------------------------------------------------------------

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def random_lora_state_dict(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
    *,
    rank: int = 4,
    alpha: float = 4.0,
    seed: int = 0,
    strength: float = 0.5,
    text_encoder: bool = True,
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """A LoRA in diffusers/peft layout with non-zero up weights, so it visibly changes images.

    Returns the state dict (keys ``unet.…lora_A.weight``, ``text_encoder.…``) and the UNet's
    LoraConfig, whose ``to_dict()`` must be saved as metadata or alpha is lost on reload.
    """
    from peft import inject_adapter_in_model

    unet_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=False)
    text_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS, init_lora_weights=False)
    state: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    parts: list[tuple[str, torch.nn.Module, LoraConfig]] = [("unet", pipe.unet, unet_config)]
    if text_encoder:
        parts.append(("text_encoder", pipe.text_encoder, text_config))
        if getattr(pipe, "text_encoder_2", None) is not None:
            parts.append(("text_encoder_2", pipe.text_encoder_2, text_config))
    import copy

    for prefix, module, config in parts:
        clone = inject_adapter_in_model(config, copy.deepcopy(module), adapter_name="tmp")
        for key, tensor in get_peft_model_state_dict(clone, adapter_name="tmp").items():
            noise = torch.randn(tensor.shape, generator=generator) * strength
            state[f"{prefix}.{key}"] = noise.contiguous()
    return state, unet_config


def save_diffusers_lora(
    path: Path,
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
    state: dict[str, torch.Tensor],
    config: LoraConfig,
) -> Path:
    """Save in the diffusers/peft layout through diffusers' own saver, with the adapter config."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        prefix, rest = key.split(".", 1)
        layers.setdefault(prefix, {})[rest] = tensor
    text_config = dict(config.to_dict(), target_modules=TEXT_TARGETS)
    kwargs = {"unet_lora_layers": layers["unet"], "unet_lora_adapter_metadata": config.to_dict()}
    for prefix in ("text_encoder", "text_encoder_2"):
        if prefix in layers:
            kwargs[f"{prefix}_lora_layers"] = layers[prefix]
            kwargs[f"{prefix}_lora_adapter_metadata"] = text_config
    type(pipe).save_lora_weights(str(path.parent), weight_name=path.name, **kwargs)
    return path


def tiny_runtime(root: Path):
    """A full runtime (engine, services, gallery) on a tiny SD 1.x model with one LoRA, ``style``.

    The gallery keeps everything, so tests that count images are not surprised by pruning.
    """
    from lorapg.config import load_settings
    from lorapg.services.build import build_services

    torch.set_num_threads(1)
    pipe = build_sd15_pipeline(root / "tiny-sd15")
    state, config = random_lora_state_dict(pipe, seed=1)
    save_diffusers_lora(root / "loras" / "style.safetensors", pipe, state, config)
    settings = load_settings(
        None,
        {
            "model": str(root / "tiny-sd15"),
            "lora_dir": str(root / "loras"),
            "outputs": str(root / "outputs"),
            "models_dir": str(root / "models"),
            "device": "cpu",
            "threads": 1,
            "gallery_keep": 0,
        },
    )
    return build_services(settings)
