"""SDXL LoRAs we write use sd-scripts' SGM module names, so AUTOMATIC1111 and Forge load every module.

sd-scripts trains SDXL on Stability's original UNet and writes ``lora_unet_input_blocks_4_1_…``,
``lora_te1_…`` and ``lora_te2_…``. A1111/Forge find a LoRA's modules by name in the original (SGM)
model: ``lora_unet_X`` must be ``diffusion_model.X`` there with "." as "_", ``lora_te1_text_model_X``
is looked up as the first embedder's ``transformer.text_model.X``, and ``lora_te2_…`` is converted to
OpenCLIP names (``self_attn`` -> ``attn``, ``mlp_fc1`` -> ``mlp_c_fc``, ``mlp_fc2`` -> ``mlp_c_proj``;
q/k/v fall back to the fused ``attn`` module). The original names come from ``tests.ldm_checkpoint``,
checked here against diffusers' own single-file converter.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_formats import peft_to_kohya
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.training.config import build_config
from lorapg.training.export import export_kohya, peft_state
from lorapg.training.trainer import CONV_TARGETS, TEXT_TARGETS, UNET_TARGETS, Trainer
from tests.ldm_checkpoint import (
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    clip_to_ldm,
    open_clip_to_ldm,
    unet_to_ldm,
)
from tests.tiny_models import save_diffusers_lora
from tests.training_data import write_images

# Real SDXL's block structure (3 levels, 2 resnets per down block, attention from level 1, deeper
# transformers further down) at tiny widths: the names must be those sd-scripts writes for SDXL.
SDXL_SHAPED_UNET = dict(
    block_out_channels=(4, 8, 16),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2, 3),
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=64,
    norm_num_groups=2,
)
# Names sd-scripts gives real SDXL modules (its SdxlUNet2DConditionModel's module paths).
SD_SCRIPTS_SDXL_NAMES = [
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # the first attention (level 1)
    "lora_unet_input_blocks_8_1_transformer_blocks_2_attn2_to_k",
    "lora_unet_middle_block_1_transformer_blocks_2_attn1_to_out_0",
    "lora_unet_output_blocks_0_1_transformer_blocks_2_attn2_to_v",
    "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_q",
    "lora_unet_input_blocks_1_0_in_layers_2",  # resnet convolutions (LoCon)
    "lora_unet_middle_block_2_out_layers_3",
    "lora_unet_output_blocks_8_0_out_layers_3",
]
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")  # A1111: q/k/v of a fused attention fall back to it


def _unet(kind: str, tiny_models: dict[str, Path]) -> UNet2DConditionModel:
    if kind == "tiny_sdxl":
        return UNet2DConditionModel.from_pretrained(str(tiny_models["sdxl"] / "unet"))
    torch.manual_seed(0)
    return UNet2DConditionModel(**SDXL_SHAPED_UNET)


def _with_random_lora(module: torch.nn.Module, targets: list[str], seed: int) -> torch.nn.Module:
    """Adapters as the trainer adds them, with non-zero random weights on both sides."""
    module.add_adapter(LoraConfig(r=4, lora_alpha=3, target_modules=targets, init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module


def _modules(kohya: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """kohya module name -> (lora_down, lora_up) for the keys starting with ``prefix``."""
    return {
        key.removesuffix(".lora_down.weight"): (tensor, kohya[key.replace(".lora_down.", ".lora_up.")])
        for key, tensor in kohya.items()
        if key.startswith(prefix) and key.endswith(".lora_down.weight")
    }


def _original_modules(ldm: dict[str, torch.Tensor], strip: str, prefix: str) -> dict[str, torch.Tensor | None]:
    """A1111's name for every module of an original checkpoint part (with all parents) -> its weight.

    Containers (a block, a transformer) have no weight of their own: None.

    A1111 names the modules of ``sd_model.model`` (so ``diffusion_model.…``) and of each SDXL
    embedder's wrapped model (``0_transformer.…``, ``1_model.…``), "." replaced by "_".
    """
    names: dict[str, torch.Tensor | None] = {}
    for key, tensor in ldm.items():
        parts = key.removeprefix(strip).split(".")
        for end in range(1, len(parts)):
            names.setdefault(prefix + "_".join(parts[:end]), None)
        module, param = ".".join(parts[:-1]), parts[-1]
        if param in ("weight", "in_proj_weight"):
            names[prefix + module.replace(".", "_")] = tensor
    return names


def _a1111_lookup(kohya_module: str, mapping: dict) -> str | None:
    """The module A1111 applies a kohya SDXL module to (its SGM/OpenCLIP lookup), or None."""
    te2 = re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", kohya_module)
    if te2:
        rest = te2[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        key = f"1_model_transformer_resblocks_{te2[1]}_{rest}"
        if key in mapping:
            return key
        fused = _X_PROJ.match(key)
        return fused[1] if fused and fused[1] in mapping else None
    for ours, theirs in (("lora_unet", "diffusion_model"), ("lora_te1_text_model", "0_transformer_text_model")):
        if kohya_module.startswith(ours + "_"):
            key = theirs + kohya_module.removeprefix(ours)
            return key if key in mapping else None
    return None


def _delta_shape(down: torch.Tensor, up: torch.Tensor) -> tuple[int, ...]:
    """The shape of up @ down: (out, in) for a Linear, (out, in, kh, kw) for a convolution."""
    return (up.shape[0], *down.shape[1:])


# --- (a) every module has its original name --------------------------------------------------


@pytest.mark.parametrize("kind", ["tiny_sdxl", "sdxl_shaped"])
def test_every_unet_module_is_an_original_module_a1111_finds(kind, tiny_models):
    unet = _unet(kind, tiny_models)
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    # The original layout is diffusers' own: its single-file converter reads it back to every weight.
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert set(back) == set(unet.state_dict())
    original = _original_modules(ldm, "model.", "")
    assert all(name.startswith("diffusion_model") for name in original)

    _with_random_lora(unet, UNET_TARGETS + CONV_TARGETS, seed=0)
    peft = peft_state({"unet": unet})
    modules = _modules(peft_to_kohya(peft, 3.0, "sdxl", unet.config), "lora_unet_")

    assert len(modules) == sum(key.endswith("lora_A.weight") for key in peft)  # no module lost or merged
    for name, (down, up) in modules.items():
        target = _a1111_lookup(name, original)
        assert target is not None, f"A1111 finds no module for {name}"
        assert target == "diffusion_model" + name.removeprefix("lora_unet")  # the SGM name, "." -> "_"
        assert original[target] is not None, f"{name} names a container, not a layer"
        assert tuple(original[target].shape) == _delta_shape(down, up), name
    if kind == "sdxl_shaped":
        assert set(SD_SCRIPTS_SDXL_NAMES) <= set(modules)


def test_text_encoder_modules_are_named_as_sd_scripts_names_them(tiny_models):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models["sdxl"]))
    original = _original_modules(clip_to_ldm(pipe.text_encoder, SDXL_CLIP_PREFIX), "conditioner.embedders.0.", "0_")
    open_clip = open_clip_to_ldm(pipe.text_encoder_2, SDXL_OPEN_CLIP_PREFIX)
    original |= _original_modules(open_clip, "conditioner.embedders.1.", "1_")
    te1 = _with_random_lora(pipe.text_encoder, TEXT_TARGETS, seed=1)
    te2 = _with_random_lora(pipe.text_encoder_2, TEXT_TARGETS, seed=2)
    peft = peft_state({"text_encoder": te1, "text_encoder_2": te2})
    kohya = peft_to_kohya(peft, 3.0, "sdxl", pipe.unet.config)

    modules = _modules(kohya, "lora_te")
    assert len(modules) == sum(key.endswith("lora_A.weight") for key in peft)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in modules
    for name, (down, up) in modules.items():
        target = _a1111_lookup(name, original)
        assert target is not None, f"A1111 finds no module for {name}"
        weight = original[target]
        assert weight is not None, f"{name} names a container, not a layer"
        if target.endswith("_attn"):  # OpenCLIP's fused q/k/v: each projection is a third of it
            assert (weight.shape[0] // 3, weight.shape[1]) == _delta_shape(down, up), name
        else:
            assert tuple(weight.shape) == _delta_shape(down, up), name


def test_sd1_keeps_the_diffusers_names_sd_scripts_writes_for_it(tiny_models):
    unet = _with_random_lora(UNet2DConditionModel.from_pretrained(str(tiny_models["sd15"] / "unet")), UNET_TARGETS, 0)
    names = _modules(peft_to_kohya(peft_state({"unet": unet}), 3.0, "sd1"), "lora_unet_")
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert not any("input_blocks" in name for name in names)


def test_an_sdxl_export_without_the_unet_config_is_refused():
    with pytest.raises(ValueError, match="UNet config"):
        peft_to_kohya({}, 3.0, "sdxl")


# --- (b) the file means the same in plain diffusers, and in the app ---------------------------


def _plain_diffusers_image(folder: Path, lora: Path | None, seed: int = 1) -> np.ndarray:
    """No lorapg code: diffusers loads the model and the LoRA file and generates at scale 1."""
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    image = pipe(
        prompt="zqx, a picture",
        num_inference_steps=3,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=[torch.Generator("cpu").manual_seed(seed)],
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_sgm_named_file_reaches_the_same_modules_as_the_diffusers_layout(tiny_models, tmp_path):
    """Strong random weights on every trained layer type: a misplaced module changes the image."""
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models["sdxl"]))
    _with_random_lora(pipe.unet, UNET_TARGETS + CONV_TARGETS, seed=3)
    _with_random_lora(pipe.text_encoder, TEXT_TARGETS, seed=4)
    _with_random_lora(pipe.text_encoder_2, TEXT_TARGETS, seed=5)
    state = peft_state({"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2})
    sgm = export_kohya(
        state,
        tmp_path / "sgm.safetensors",
        family="sdxl",
        alpha=3.0,
        metadata={"ss_network_alpha": "3.0"},
        save_precision="fp32",
        unet_config=pipe.unet.config,
    )
    assert any(key.startswith("lora_unet_input_blocks_") for key in load_file(str(sgm)))
    config = LoraConfig(r=4, lora_alpha=3, target_modules=UNET_TARGETS + CONV_TARGETS)
    reference = save_diffusers_lora(tmp_path / "diffusers.safetensors", pipe, state, config)

    base = _plain_diffusers_image(tiny_models["sdxl"], None)
    expected = _plain_diffusers_image(tiny_models["sdxl"], reference)
    got = _plain_diffusers_image(tiny_models["sdxl"], sgm)
    assert np.abs(expected - base).max() > 20  # the LoRA changes the image a lot
    assert np.abs(got - expected).max() <= 1


@pytest.fixture(scope="module")
def trained_sdxl(tiny_models, tmp_path_factory):
    """A real training run on the tiny SDXL: UNet attention + ResNet convolutions + both text encoders."""
    root = tmp_path_factory.mktemp("sgm_train")
    write_images(root / "images", 2)
    config = build_config(
        dict(
            name="zqx_xl",
            model=str(tiny_models["sdxl"]),
            images=str(root / "images"),
            trigger="zqx",
            rank=4,
            alpha=3,  # alpha != rank: a reader that assumes alpha = rank gets the wrong strength
            unet_lr=1e-1,
            text_encoder_lr=5e-2,
            max_steps=3,
            batch_size=1,
            sample_steps=0,
            gradient_checkpointing=False,
            save_precision="fp16",
            train_text_encoder=True,
            train_conv=True,
            seed=7,
        )
    )
    trainer = Trainer(config, lora_dir=root / "loras", work_dir=root / "work", device=torch.device("cpu"))
    return trainer.run(), root / "loras"


def test_trained_sdxl_lora_gives_the_same_image_in_plain_diffusers_as_in_the_app(trained_sdxl, tiny_models):
    result, loras = trained_sdxl
    engine = DiffusionEngine(LoraLibrary(loras), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sdxl"]))
    request = dict(prompt="zqx, a picture", steps=3, seed=1, sampler="Euler", guidance_scale=5.0)
    app = engine.generate(GenerationRequest(**request, loras=(LoraRequest("zqx_xl", 1.0),))).images[0]
    app_base = engine.generate(GenerationRequest(**request)).images[0]
    app, app_base = np.asarray(app, dtype=np.int16), np.asarray(app_base, dtype=np.int16)

    plain = _plain_diffusers_image(tiny_models["sdxl"], result.lora_path)
    assert np.abs(app - app_base).max() > 20  # the trained LoRA has a visible effect to compare
    # The app fuses the LoRA into the weights, plain diffusers runs it beside them: a level of rounding.
    assert np.abs(plain - app).max() <= 2


# --- (c) alpha ----------------------------------------------------------------------------------


def test_every_module_alpha_is_the_trained_network_alpha(trained_sdxl):
    result, _ = trained_sdxl
    with safe_open(str(result.lora_path), framework="pt") as handle:
        metadata = handle.metadata()
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
    network_alpha = float(metadata["ss_network_alpha"])
    assert network_alpha == 3.0 and metadata["ss_network_dim"] == "4"
    modules = {key.removesuffix(".lora_down.weight") for key in state if key.endswith(".lora_down.weight")}
    alphas = {key.removesuffix(".alpha"): tensor for key, tensor in state.items() if key.endswith(".alpha")}
    assert set(alphas) == modules
    assert {name.split("_", 2)[1] for name in modules} == {"unet", "te1", "te2"}
    assert any("_in_layers_2" in name for name in modules)  # the ResNet convolutions are there too
    for name, alpha in alphas.items():
        assert alpha.item() == pytest.approx(network_alpha, rel=1e-6), name
