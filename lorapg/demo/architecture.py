"""The demo model's components: exactly Stable Diffusion 1.x's classes, scaled down.

32×32 images, a VAE with three blocks (8×8×4 latents), a UNet with cross-attention at the two
higher resolutions, and a 2-layer CLIP text encoder 64 wide. Anything that loads, runs, trains or
exports an SD 1.x model handles this one through the same code.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lorapg.demo.shapes import SIZE

TEXT_WIDTH = 64
LATENT_SIZE = SIZE // 4  # three VAE blocks downsample twice

# Stable Diffusion's noise schedule, so samplers configured for SD behave the same here.
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def build_vae() -> AutoencoderKL:
    blocks = (32, 64, 64)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=TEXT_WIDTH * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def inference_scheduler() -> EulerAncestralDiscreteScheduler:
    """Saved with the model: the app replaces it with the sampler the user picks."""
    return EulerAncestralDiscreteScheduler(**SCHEDULE, steps_offset=1)
