"""A tiny Flux.1 pipeline built in code and saved the way a user's diffusers folder is saved.

The shapes follow diffusers' own Flux dummy components (tests/pipelines/flux). diffusers' tests
download ``hf-internal-testing/tiny-random-t5`` for the T5 tokenizer; here it is built with the
``tokenizers`` library (one token per character, a WordLevel model), so nothing leaves the machine.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from tests.tiny_models import _text_encoder_config, write_tiny_clip_tokenizer

FLUX_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """A character-level T5 tokenizer (a Unigram model, as T5's is): pad 0, eos 1, unk 2, then ASCII.

    transformers 5 rebuilds T5's tokenizer from a Unigram (piece, score) list when loading, so the
    model is a Unigram one here too; saved with ``save_pretrained`` (transformers names it T5Tokenizer).
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(code), -3.0) for code in range(33, 127)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
    tokenizer.model_max_length = 64
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _tiny_t5(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _tiny_flux_vae() -> AutoencoderKL:
    """One block (VAE scale 1), 4 latent channels, with a shift factor as Flux's and SD 3's VAEs have."""
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_flux_pipeline(folder: Path, *, guidance_embeds: bool = True) -> FluxPipeline:
    """A tiny Flux.1 pipeline saved as a diffusers folder; 32 px native.

    ``guidance_embeds``: True is dev-like (a distilled guidance input), False schnell-like.
    """
    clip_tokenizer = write_tiny_clip_tokenizer(folder / "_tokenizer_src")
    t5_tokenizer = build_t5_tokenizer(folder / "_t5_tokenizer_src")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_encoder_config(clip_tokenizer))
    torch.manual_seed(0)
    t5 = _tiny_t5(len(t5_tokenizer))
    torch.manual_seed(0)
    vae = _tiny_flux_vae()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
        vae=vae,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def save_peft_transformer_lora(
    path: Path, pipe: FluxPipeline, *, rank: int = 4, seed: int = 0, strength: float = 0.5
) -> Path:
    """A Flux or SD 3 LoRA in the diffusers/peft (ai-toolkit) layout: ``transformer.<module>.lora_A.weight``."""
    import copy

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=FLUX_LORA_TARGETS, init_lora_weights=False)
    clone = inject_adapter_in_model(config, copy.deepcopy(pipe.transformer), adapter_name="tmp")
    generator = torch.Generator().manual_seed(seed)
    state = {
        f"transformer.{key}": (torch.randn(tensor.shape, generator=generator) * strength).contiguous()
        for key, tensor in get_peft_model_state_dict(clone, adapter_name="tmp").items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def save_transformer_file(path: Path, pipe: FluxPipeline) -> Path:
    """The transformer alone as one .safetensors, as people download Flux fine-tunes (diffusers key names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file(state, str(path))
    return path


def build_sd3_pipeline(folder: Path) -> StableDiffusion3Pipeline:
    """A tiny SD 3.5 pipeline (two CLIP encoders with projection + T5, MMDiT) saved as a folder; 32 px native."""
    clip_tokenizer = write_tiny_clip_tokenizer(folder / "_tokenizer_src")
    t5_tokenizer = build_t5_tokenizer(folder / "_t5_tokenizer_src")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_text_encoder_config(clip_tokenizer, projection_dim=32))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(clip_tokenizer, projection_dim=32))
    torch.manual_seed(0)
    t5 = _tiny_t5(len(t5_tokenizer))
    torch.manual_seed(0)
    vae = _tiny_flux_vae()
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
        transformer=transformer,
        vae=vae,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
