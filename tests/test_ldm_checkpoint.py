"""The tiny LDM single-file checkpoints load through diffusers' ``from_single_file`` unchanged.

This is what lets other tests stand in for a user's civitai/A1111 checkpoint: if the written file
round-trips to the very same weights and pixels, the app's single-file loading path is exercised
on a faithful (if tiny) copy of the real format.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    infer_diffusers_model_type,
    is_clip_model,
    is_clip_sdxl_model,
    is_open_clip_sdxl_model,
)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tests.ldm_checkpoint import (
    SD1_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    write_ldm_checkpoint,
)
from tests.tiny_models import build_sd15_pipeline, build_sdxl_pipeline

torch.set_num_threads(1)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHT_FILES = ("*.safetensors", "*.bin")


# --- helpers ------------------------------------------------------------------------------------


def _fingerprint(pipe: DiffusionPipeline, seed: int = 1) -> None:
    """Nudge every weight by seeded noise so that no two tensors are equal.

    Fresh norms are all ones/zeros and tiny_models seeds both SDXL encoders alike, so without
    this a swapped or mis-routed key would still compare equal. The nudge is small enough to keep
    the models' outputs finite and image-like.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in COMPONENTS:
            module = getattr(pipe, name, None)
            for param in module.parameters() if module is not None else ():
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)


def _with_width(config: CLIPTextConfig, width: int) -> CLIPTextConfig:
    config = copy.deepcopy(config)
    config.hidden_size = width
    return config


def _give_sdxl_encoders_distinct_widths(pipe: StableDiffusionXLPipeline) -> None:
    """Rebuild the two encoders 24 and 40 wide (still 64 together: the UNet's cross-attention).

    from_single_file routes checkpoint encoders to pipeline classes by width: a
    ``CLIPTextModelWithProjection`` as wide as ``conditioner.embedders.0`` is filled from that
    OpenAI-CLIP encoder instead of the OpenCLIP one, and its text_projection stays on the meta
    device, yet generation still runs, so the mix-up is silent. Real SDXL (768 / 1280) never meets
    this; tiny_models' SDXL (32 / 32) does. The pooled projection width is unchanged, so the UNet's
    add_embedding still fits. A no-op once the tiny encoders differ in width.
    """
    first, second = pipe.text_encoder.config, pipe.text_encoder_2.config
    if first.hidden_size != second.hidden_size:
        return
    narrow = 24
    wide = first.hidden_size + second.hidden_size - narrow
    assert narrow % first.num_attention_heads == 0 and wide % second.num_attention_heads == 0
    torch.manual_seed(0)
    pipe.register_modules(
        text_encoder=CLIPTextModel(_with_width(first, narrow)),
        text_encoder_2=CLIPTextModelWithProjection(_with_width(second, wide)),
    )


def _changed(config: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """A model config with ``changes`` applied.

    ``_use_default_values`` is dropped: from_config resets every key it lists to the class
    default, which would silently undo a change to such a key (the tiny VAE's layers_per_block).
    """
    base = {key: value for key, value in config.items() if key != "_use_default_values"}
    return {**base, **changes}


def _config_only_copy(folder: Path, dest: Path) -> Path:
    """The diffusers folder without weights, as the app ships it for ``config=``.

    from_single_file quietly loads a component from the config folder's weights when the
    checkpoint lacks it; with no weights there, every tensor must come from the checkpoint.
    """
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    return dest


def _load(cls: type[DiffusionPipeline], ckpt: Path, config: Path) -> DiffusionPipeline:
    return cls.from_single_file(str(ckpt), config=str(config), local_files_only=True)


def _assert_same_weights(original: DiffusionPipeline, loaded: DiffusionPipeline) -> None:
    for name in COMPONENTS:
        source = getattr(original, name, None)
        if source is None:
            continue
        expected, actual = source.state_dict(), getattr(loaded, name).state_dict()
        assert set(actual) == set(expected), name
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), f"{name}.{key}"


def _generate(pipe: DiffusionPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        "a red fox",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return result.images


def _assert_round_trip(pipe: DiffusionPipeline, folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Write, reload, compare weights and pixels; returns the written state dict."""
    ckpt = write_ldm_checkpoint(pipe, tmp_path / "model.safetensors")
    loaded = _load(type(pipe), ckpt, _config_only_copy(folder, tmp_path / "config"))
    _assert_same_weights(pipe, loaded)
    expected = _generate(pipe)
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(_generate(loaded), expected)
    return load_file(ckpt)


def _prefixes(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> set[str]:
    return {next(p for p in prefixes if key.startswith(p)) for key in state}


# --- tests --------------------------------------------------------------------------------------


def test_sd15_checkpoint_round_trips(tmp_path: Path) -> None:
    folder = tmp_path / "diffusers"
    pipe = build_sd15_pipeline(folder)
    _fingerprint(pipe)
    state = _assert_round_trip(pipe, folder, tmp_path)

    prefixes = (UNET_PREFIX, VAE_PREFIX, SD1_CLIP_PREFIX)
    assert _prefixes(state, prefixes) == set(prefixes)
    assert is_clip_model(state)
    # diffusers reads an upsampler from slot .1 or .2; real files put it after the attention (.2).
    assert UNET_PREFIX + "output_blocks.1.2.conv.weight" in state
    # "v1" is also infer_diffusers_model_type's fallback (its v1 marker, output_blocks.11, needs
    # SD's 4 UNet levels), but any misplaced SD2/SDXL/inpainting marker would change it.
    assert infer_diffusers_model_type(state) == "v1"


def test_sdxl_checkpoint_round_trips(tmp_path: Path) -> None:
    folder = tmp_path / "diffusers"
    pipe = build_sdxl_pipeline(folder)
    _give_sdxl_encoders_distinct_widths(pipe)
    pipe.save_pretrained(folder, safe_serialization=True)  # the config folder must match the widths
    _fingerprint(pipe)
    state = _assert_round_trip(pipe, folder, tmp_path)

    prefixes = (UNET_PREFIX, VAE_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX)
    assert _prefixes(state, prefixes) == set(prefixes)
    assert is_clip_sdxl_model(state) and is_open_clip_sdxl_model(state)
    assert UNET_PREFIX + "label_emb.0.0.weight" in state  # SDXL's text_time embedding
    assert SDXL_OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in state
    # infer_diffusers_model_type says "xl_base" only when OpenCLIP layer 9 exists (real SDXL has
    # 32); the tiny encoder has 2 layers, so it falls through to its "v1" default.
    marker = CHECKPOINT_KEY_NAMES["xl_base"]
    assert infer_diffusers_model_type(state) == ("xl_base" if marker in state else "v1")


def test_layout_follows_block_counts(tmp_path: Path) -> None:
    """Three levels and two resnets per block shift every LDM block index; both sides must agree.

    The UNet mixes attention and plain blocks on both paths (upsampler at slot .2 vs .1), and the
    VAE gets a third level, so the decoder's reversed level numbering is not symmetric by luck.
    """
    folder = tmp_path / "diffusers"
    pipe = build_sd15_pipeline(folder)
    unet = UNet2DConditionModel.from_config(
        _changed(
            pipe.unet.config,
            block_out_channels=(8, 16, 16),  # >= 8: diffusers' default of 8 heads per attention
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        )
    )
    vae = AutoencoderKL.from_config(
        _changed(
            pipe.vae.config,
            block_out_channels=(4, 8, 8),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
        )
    )
    # A new pipeline, not register_modules: the pipeline derives vae_scale_factor when built.
    pipe = StableDiffusionPipeline(**dict(pipe.components, unet=unet, vae=vae), requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    _fingerprint(pipe)
    state = _assert_round_trip(pipe, folder, tmp_path)

    # Up block 0 (attention) ends at output slot 2, up block 1 (no attention) at slot 5.
    assert UNET_PREFIX + "output_blocks.2.2.conv.weight" in state
    assert UNET_PREFIX + "output_blocks.5.1.conv.weight" in state
    assert UNET_PREFIX + "input_blocks.6.0.op.weight" in state  # level 1's downsampler
    assert VAE_PREFIX + "decoder.up.2.upsample.conv.weight" in state  # LDM's level 2 runs first
    assert VAE_PREFIX + "decoder.up.0.block.2.conv1.weight" in state
