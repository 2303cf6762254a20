"""SD 3.5 LoRAs in Stability's module names (kohya sd-scripts, ComfyUI) through the app's LoRA path.

The kohya file is made here from a diffusers-layout LoRA with random weights, renamed with Stability's
module names as diffusers' single-file converter (convert_sd3_transformer_checkpoint_to_diffusers) reads
them: this inverse mapping is written independently of lorapg.diffusion.sd3_kohya. The tiny MMDiT has two
blocks (the last one's context stream is pre-only) and a dual-attention first block, as SD 3.5 Medium has.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from lorapg.diffusion import lora_layouts, sd3_kohya
from lorapg.diffusion.adapters import LoraSelection
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.families import SD3
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.lora_parts import UnsupportedPart
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.errors import UserError
from tests.tiny_flux import build_sd3_pipeline, save_peft_transformer_lora

RANK = 4
TRANSFORMER_TARGETS = [
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder", "pos_embed.proj",
    "timestep_embedder.linear_1", "timestep_embedder.linear_2", "text_embedder.linear_1", "text_embedder.linear_2",
]  # fmt: skip
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# diffusers module (regex) -> Stability module; ``{i}`` is the block number.
_BLOCK_NAMES = [
    (r"attn\.to_[qkv]", "x_block.attn.qkv"),
    (r"attn\.add_[qkv]_proj", "context_block.attn.qkv"),
    (r"attn\.to_out\.0", "x_block.attn.proj"),
    (r"attn\.to_add_out", "context_block.attn.proj"),
    (r"attn2\.to_[qkv]", "x_block.attn2.qkv"),
    (r"attn2\.to_out\.0", "x_block.attn2.proj"),
    (r"ff\.net\.0\.proj", "x_block.mlp.fc1"),
    (r"ff\.net\.2", "x_block.mlp.fc2"),
    (r"ff_context\.net\.0\.proj", "context_block.mlp.fc1"),
    (r"ff_context\.net\.2", "context_block.mlp.fc2"),
    (r"norm1\.linear", "x_block.adaLN_modulation.1"),
    (r"norm1_context\.linear", "context_block.adaLN_modulation.1"),
]
_GLOBAL_NAMES = {
    "pos_embed.proj": "x_embedder.proj",
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_QKV_ORDER = {"q": 0, "k": 1, "v": 2}
COMFY_TEXT_ENCODERS = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
}


def stability_module(module: str, num_layers: int) -> tuple[str, int | None, bool]:
    """(Stability module, position in a fused qkv or None, whether its up rows are (scale, shift) in diffusers)."""
    if module in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[module], None, module == "norm_out.linear"
    block, rest = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module).groups()
    for pattern, name in _BLOCK_NAMES:
        if re.fullmatch(pattern, rest):
            fused = re.search(r"(?:to_|add_)([qkv])(?:_proj)?$", rest) if name.endswith("qkv") else None
            swapped = rest == "norm1_context.linear" and int(block) == num_layers - 1  # a pre-only context block
            return f"joint_blocks.{block}.{name}", (_QKV_ORDER[fused.group(1)] if fused else None), swapped
    raise AssertionError(f"no Stability name for {module}")


def diffusers_lora(pipe, seed: int) -> dict[str, torch.Tensor]:
    """Random LoRA weights on every module the mapping covers, in diffusers' layout (alpha = rank: scale 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for component, targets in (
        ("transformer", TRANSFORMER_TARGETS),
        ("text_encoder", TEXT_TARGETS),
        ("text_encoder_2", TEXT_TARGETS),
    ):
        config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights=False)
        clone = inject_adapter_in_model(config, copy.deepcopy(getattr(pipe, component)), adapter_name="tmp")
        for key, tensor in get_peft_model_state_dict(clone, adapter_name="tmp").items():
            state[f"{component}.{key}"] = torch.randn(tensor.shape, generator=generator) * 0.15
    return state


def as_kohya(state: dict[str, torch.Tensor], num_layers: int, *, comfy: bool = False) -> dict[str, torch.Tensor]:
    """The same LoRA as sd-scripts writes it (or ComfyUI, ``comfy``), with alpha = rank / 2.

    A fused qkv's three LoRAs become one of rank 3r: downs stacked, ups block-diagonal, so the product is exact.
    """
    alpha = RANK / 2  # kohya applies alpha / rank: the ups carry the inverse so the product is unchanged
    modules: dict[str, dict] = {}
    for key, tensor in state.items():
        component, rest = key.split(".", 1)
        module, part = re.fullmatch(r"(.+)\.lora_([AB])\.weight", rest).groups()
        if component == "transformer":
            name, position, swapped = stability_module(module, num_layers)
            stem = f"diffusion_model.{name}" if comfy else "lora_unet_" + name.replace(".", "_")
        elif comfy:  # ComfyUI's CLIP module paths, dotted, under its own encoder names
            position, swapped = None, False
            stem = COMFY_TEXT_ENCODERS[component] + module
        else:
            position, swapped = None, False
            stem = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component] + module.replace(".", "_")
        if part == "B" and swapped:
            tensor = torch.cat(tensor.chunk(2)[::-1])
        modules.setdefault(stem, {}).setdefault(part, {})[position] = tensor
    out = {}
    down_key, up_key = ("lora_A.weight", "lora_B.weight") if comfy else ("lora_down.weight", "lora_up.weight")
    for stem, parts in modules.items():
        downs = [parts["A"][p] for p in sorted(parts["A"], key=lambda p: -1 if p is None else p)]
        ups = [parts["B"][p] for p in sorted(parts["B"], key=lambda p: -1 if p is None else p)]
        out[f"{stem}.{down_key}"] = torch.cat(downs).contiguous()
        up = torch.block_diag(*ups) if len(ups) > 1 else ups[0]  # a conv's up is (out, r, 1, 1)
        out[f"{stem}.{up_key}"] = (up * (RANK / alpha)).contiguous()
        out[f"{stem}.alpha"] = torch.tensor(alpha * len(downs))  # alpha / rank stays 1/2 at rank 3r
    return out


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sd3kohya")
    pipe = build_sd3_pipeline(root / "sd3")
    # Two blocks (the last one pre-only) and MMDiT-X's second attention in block 0, with qk norms (SD 3.5 Medium).
    torch.manual_seed(1)
    pipe.transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )  # fmt: skip
    pipe.transformer.save_pretrained(root / "sd3" / "transformer", safe_serialization=True)
    loras = root / "loras"
    loras.mkdir()
    state = diffusers_lora(pipe, seed=3)
    save_file(state, str(loras / "peft.safetensors"))
    save_file(as_kohya(state, 2), str(loras / "kohya.safetensors"))
    # ComfyUI's spelling covers the transformer (its text encoder keys are named otherwise).
    transformer_only = {key: tensor for key, tensor in state.items() if key.startswith("transformer.")}
    save_file(transformer_only, str(loras / "peft_transformer.safetensors"))
    save_file(as_kohya(transformer_only, 2, comfy=True), str(loras / "comfy.safetensors"))
    save_file(as_kohya(state, 2, comfy=True), str(loras / "comfy_with_clip.safetensors"))
    # An fp16 file (as most shared LoRAs are) on the fp32 tiny model.
    save_file({k: v.half() for k, v in as_kohya(state, 2).items()}, str(loras / "kohya_fp16.safetensors"))
    save_peft_transformer_lora(loras / "second.safetensors", pipe, seed=4, strength=0.3)
    engine = DiffusionEngine(LoraLibrary(loras), torch.device("cpu"), torch.float32)
    engine.load_model(str(root / "sd3"))
    return {"engine": engine, "loras": loras, "state": state}


def request(loras=()) -> GenerationRequest:
    return GenerationRequest(
        prompt="a red fox",
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        steps=3,
        seed=7,
        sampler="Euler",
    )


def pixels(engine: DiffusionEngine, loras=()) -> np.ndarray:
    return np.asarray(engine.generate(request(loras)).images[0], dtype=np.int16)


def test_the_inverse_mapping_covers_every_module_of_the_tiny_model(sd3):
    """Every LoRA module the peft file holds has a Stability name: the comparison below leaves nothing out."""
    kohya = as_kohya(sd3["state"], 2)
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in kohya
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight" in kohya
    assert "lora_unet_joint_blocks_1_context_block_attn_proj.lora_up.weight" not in kohya  # pre-only: no such module
    assert any(key.startswith("lora_te2_text_model_encoder_layers_0_") for key in kohya)


def test_kohya_and_comfy_files_give_the_diffusers_file_s_image(sd3):
    engine = sd3["engine"]
    library = LoraLibrary(sd3["loras"])
    assert library.resolve("kohya").family == SD3 and library.resolve("comfy").family == SD3
    # diffusers' layout with the second CLIP encoder's keys: SD 3 (a transformer), not SDXL (a UNet).
    assert library.resolve("peft").family == SD3
    base = pixels(engine)
    from_peft = pixels(engine, [("peft", 1.0)])
    assert np.abs(from_peft - base).max() > 10  # the LoRA does something visible
    # The same product of matrices, computed in another grouping (rank 3r, alpha folded): a tolerance.
    assert np.abs(pixels(engine, [("kohya", 1.0)]) - from_peft).max() <= 2
    transformer_only = pixels(engine, [("peft_transformer", 1.0)])
    assert np.abs(pixels(engine, [("comfy", 1.0)]) - transformer_only).max() <= 2
    half = pixels(engine, [("kohya", 0.5)])
    assert np.abs(half - pixels(engine, [("peft", 0.5)])).max() <= 2


def test_text_encoder_parts_are_loaded(sd3):
    adapters = sd3["engine"].model.adapters
    pixels(sd3["engine"], [("kohya", 1.0)])
    loaded = adapters.pipe.get_list_adapters()
    name = next(n for n in loaded["transformer"] if n.startswith("lora_kohya_"))
    assert name in loaded["text_encoder"] and name in loaded["text_encoder_2"]


def test_scale_zero_is_the_base_and_stacking_works(sd3):
    engine = sd3["engine"]
    base = pixels(engine)
    assert np.array_equal(pixels(engine, [("kohya", 0.0)]), base)
    second = pixels(engine, [("second", 1.0)])
    stacked = pixels(engine, [("kohya", 1.0), ("second", 1.0)])
    assert np.abs(stacked - second).max() > 10 and np.abs(stacked - pixels(engine, [("kohya", 1.0)])).max() > 10
    assert np.abs(stacked - pixels(engine, [("peft", 1.0), ("second", 1.0)])).max() <= 2
    assert np.array_equal(pixels(engine), base)


def test_a_module_the_converter_does_not_know_is_named_in_a_warning(sd3, caplog):
    state = load_file(str(sd3["loras"] / "kohya.safetensors"))
    state["lora_unet_joint_blocks_7_x_block_attn_qkv.lora_down.weight"] = torch.zeros(RANK, 32)
    state["lora_unet_joint_blocks_7_x_block_attn_qkv.lora_up.weight"] = torch.zeros(96, RANK)
    state["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(RANK, 32)
    state["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(32, RANK)
    save_file(state, str(sd3["loras"] / "extra.safetensors"))
    with caplog.at_level(logging.WARNING, logger="lorapg.diffusion.lora_layouts"):
        result = sd3["engine"].generate(request([("extra", 1.0)]))
    text = " ".join(record.getMessage() for record in caplog.records)
    assert "lora_unet_joint_blocks_7_x_block_attn_qkv" in text
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in text
    with_extra = np.asarray(result.images[0], dtype=np.int16)
    assert np.abs(with_extra - pixels(sd3["engine"], [("kohya", 1.0)])).max() <= 2  # the known parts still apply
    # The UI and the API show the generation's warnings: the user learns the LoRA applied only in part.
    (warning,) = [w for w in result.warnings if w.startswith("LoRA extra:")]
    assert "2 modules left out" in warning and "lora_unet_joint_blocks_7_x_block_attn_qkv" in warning
    assert not any("left out" in w for w in sd3["engine"].generate(request([("kohya", 1.0)])).warnings)
    assert not any("left out" in w for w in sd3["engine"].generate(request([("extra", 0.0)])).warnings)


def test_a_kohya_file_for_another_sd3_size_is_refused(sd3, tmp_path):
    """A file whose shapes do not fit (SD 3.5 Large's width on Medium) says so; it does not load half."""
    state = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(RANK, 64),
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(192, RANK),
    }
    save_file(state, str(sd3["loras"] / "wide.safetensors"))
    with pytest.raises(UserError, match="does not fit the loaded SD 3.5 model"):
        pixels(sd3["engine"], [("wide", 1.0)])


def test_comfy_text_encoder_keys_are_loaded_like_kohya_s(sd3):
    """ComfyUI spells the CLIP encoders ``text_encoders.clip_l.transformer.…``/``clip_g``: applied, not left out."""
    engine = sd3["engine"]
    result = engine.generate(request([("comfy_with_clip", 1.0)]))
    assert not any("left out" in w for w in result.warnings)
    loaded = engine.model.adapters.pipe.get_list_adapters()
    name = next(n for n in loaded["transformer"] if n.startswith("lora_comfy_with_clip_"))
    assert name in loaded["text_encoder"] and name in loaded["text_encoder_2"]
    image = np.asarray(result.images[0], dtype=np.int16)
    assert np.abs(image - pixels(engine, [("peft", 1.0)])).max() <= 2


def test_an_fp16_kohya_file_converts_in_fp16_and_gives_the_fp32_file_s_image(sd3):
    state = load_file(str(sd3["loras"] / "kohya_fp16.safetensors"))
    pipe = sd3["engine"].model.pipe
    encoders = {c: lora_layouts._linear_modules(getattr(pipe, c)) for c in ("text_encoder", "text_encoder_2")}
    converted = sd3_kohya.convert(state, pipe.transformer.config, encoders)
    assert not converted.ignored and {t.dtype for t in converted.state.values()} == {torch.float16}
    # fp16 weights round the product a little: a tolerance against the fp32 file's image.
    assert np.abs(pixels(sd3["engine"], [("kohya_fp16", 1.0)]) - pixels(sd3["engine"], [("kohya", 1.0)])).max() <= 2


@pytest.mark.parametrize(
    ("extra", "tensor", "what"),
    [
        ("diffusion_model.joint_blocks.0.x_block.attn.proj.lora_magnitude_vector", torch.ones(32), "DoRA"),
        ("diffusion_model.joint_blocks.0.x_block.attn.proj.lora_B.bias", torch.ones(32), "bias"),
        ("diffusion_model.joint_blocks.0.x_block.attn.proj.lora_mid.weight", torch.ones(RANK, RANK, 1, 1), "Tucker"),
        ("lora_unet_joint_blocks_0_x_block_attn_proj.dora_scale", torch.ones(1, 32), "DoRA"),
    ],
)
def test_a_part_the_renaming_cannot_carry_is_named_not_dropped(sd3, extra, tensor, what):
    """Down/up converted without the magnitude, bias or core beside them would be another LoRA: refused."""
    state = dict(as_kohya({k: v for k, v in sd3["state"].items() if k.startswith("transformer.")}, 2, comfy=True))
    state[extra] = tensor
    with pytest.raises(UnsupportedPart, match=re.escape(extra)) as caught:
        sd3_kohya.convert(state, sd3["engine"].model.pipe.transformer.config, {})
    assert what in str(caught.value)
    if extra.startswith("diffusion_model."):  # through the app: the message names the file and the key
        save_file(state, str(sd3["loras"] / "with_extra.safetensors"))
        with pytest.raises(UserError, match=rf"^LoRA with_extra: its key {re.escape(extra)} is .*{what}"):
            pixels(sd3["engine"], [("with_extra", 1.0)])


@pytest.mark.parametrize(
    ("name", "keys", "label"),
    [
        ("sd3_loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa"),
        ("sd3_lokr", ("lokr_w1", "lokr_w2"), "LoKr"),
        ("sd3_dora", ("lora_down.weight", "lora_up.weight", "dora_scale"), "DoRA"),
    ],
)
def test_a_kohya_lycoris_file_is_refused_by_format(sd3, name, keys, label):
    """LyCORIS/DoRA files take the weight-patch path, which knows only UNet names: a message, not a crash."""
    shapes = {
        "hada_w1_a": (32, 2), "hada_w1_b": (2, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 32),
        "lokr_w1": (4, 4), "lokr_w2": (8, 8), "lora_down.weight": (RANK, 32), "lora_up.weight": (32, RANK),
        "dora_scale": (1, 32),
    }  # fmt: skip
    module = "lora_unet_joint_blocks_0_x_block_attn_proj"
    save_file({f"{module}.{key}": torch.ones(shapes[key]) for key in keys}, str(sd3["loras"] / f"{name}.safetensors"))
    assert LoraLibrary(sd3["loras"]).resolve(name).format == label
    with pytest.raises(UserError, match=rf"^LoRA {name} is a {label} file; LyCORIS .* not supported for SD 3\.5"):
        pixels(sd3["engine"], [(name, 1.0)])
    assert np.array_equal(pixels(sd3["engine"]), pixels(sd3["engine"], [("kohya", 0.0)]))  # the app goes on


def test_a_file_cut_short_after_listing_is_reported_as_unreadable(sd3):
    """Read once listed, cut short before loading (a copy still running): "could not be read", not "another model"."""
    path = sd3["loras"] / "cut.safetensors"
    shutil.copy(sd3["loras"] / "kohya.safetensors", path)
    info = LoraLibrary(sd3["loras"]).resolve("cut")
    os.truncate(path, path.stat().st_size // 2)
    adapters = sd3["engine"].model.adapters
    with pytest.raises(UserError, match=r"^LoRA file cut could not be read \("):
        adapters.activate([LoraSelection(info, 1.0)])
