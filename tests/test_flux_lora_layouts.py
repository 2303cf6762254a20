"""Flux LoRAs in the layouts people download (kohya sd-scripts, XLabs, ComfyUI) on the tiny Flux model.

Each file is made here from a diffusers-layout (peft) LoRA with random weights, renamed with Black Forest
Labs' module names as each tool writes them; loading it through the app's LoRA path gives the peft file's
image. Fused modules (qkv, a single block's linear1) hold the separate LoRAs as one of a larger rank: downs
stacked, ups block-diagonal, so the product is exact.

diffusers 0.42's kohya converter splits ``single_blocks_N_linear1`` with FLUX.1's sizes written into the code
(3072, 3072, 3072, 12288) and fails an assertion on the tiny model (width 32); a tiny model 3072 wide would
not be tiny, so ``lorapg.diffusion.flux_kohya`` splits linear1 at the loaded model's sizes instead.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.families import FLUX
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from tests.tiny_flux import build_flux_pipeline

RANK = 4
TARGETS = [
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear", "proj_mlp", "single_transformer_blocks.0.proj_out", "norm.linear",
]  # fmt: skip
XLABS_MODULES = r"transformer_blocks\.0\.attn\..*|single_transformer_blocks\.0\.(attn\..*|proj_out)"

# diffusers module (regex) -> (BFL module, its fused parts in order); kohya spells it with underscores.
_BFL = [
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", "double_blocks.{0}.img_attn.qkv", "qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", "double_blocks.{0}.txt_attn.qkv", "qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks.{0}.img_attn.proj", ""),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "double_blocks.{0}.txt_attn.proj", ""),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "double_blocks.{0}.img_mlp.0", ""),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "double_blocks.{0}.img_mlp.2", ""),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "double_blocks.{0}.txt_mlp.0", ""),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "double_blocks.{0}.txt_mlp.2", ""),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "double_blocks.{0}.img_mod.lin", ""),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "double_blocks.{0}.txt_mod.lin", ""),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])", "single_blocks.{0}.linear1", "qkvm"),
    (r"single_transformer_blocks\.(\d+)\.proj_(mlp)", "single_blocks.{0}.linear1", "qkvm"),
    (r"single_transformer_blocks\.(\d+)\.proj_out", "single_blocks.{0}.linear2", ""),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", "single_blocks.{0}.modulation.lin", ""),
]
# XLabs' attention processors: lora1 is the image stream, lora2 the text stream.
_XLABS = [
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", "double_blocks.{0}.processor.qkv_lora1", "qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", "double_blocks.{0}.processor.qkv_lora2", "qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks.{0}.processor.proj_lora1", ""),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "double_blocks.{0}.processor.proj_lora2", ""),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])", "single_blocks.{0}.processor.qkv_lora", "qkv"),
    (r"single_transformer_blocks\.(\d+)\.proj_out", "single_blocks.{0}.processor.proj_lora", ""),
]


def peft_lora(pipe, seed: int) -> dict[str, torch.Tensor]:
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=False)
    clone = inject_adapter_in_model(config, copy.deepcopy(pipe.transformer), adapter_name="tmp")
    generator = torch.Generator().manual_seed(seed)
    return {
        f"transformer.{key}": torch.randn(tensor.shape, generator=generator) * 0.2
        for key, tensor in get_peft_model_state_dict(clone, adapter_name="tmp").items()
    }


def renamed(state: dict[str, torch.Tensor], table, spell) -> dict[str, torch.Tensor]:
    """Group the peft modules by the fused module they belong to; ``spell(stem, down, up, n)`` writes one."""
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key, tensor in state.items():
        module, part = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key).groups()
        for pattern, stem, order in table:
            match = re.fullmatch(pattern, module)
            if match:
                position = order.index(match.group(2)[0]) if order else 0
                groups.setdefault(stem.format(match.group(1)), {}).setdefault(part, {})[position] = tensor
                break
        else:
            raise AssertionError(f"no name for {module}")
    out = {}
    for stem, parts in groups.items():
        downs = [parts["A"][i] for i in sorted(parts["A"])]
        ups = [parts["B"][i] for i in sorted(parts["B"])]
        out.update(spell(stem, torch.cat(downs), torch.block_diag(*ups), len(downs)))
    return out


def kohya(stem, down, up, n, *, prefix="lora_unet_", names=("lora_down", "lora_up")):
    """sd-scripts' spelling: ``lora_unet_`` and the BFL path with underscores; alpha = rank / 2."""
    name = prefix + stem.replace(".", "_") if prefix == "lora_unet_" else prefix + stem
    alpha = RANK / 2  # alpha / rank = 1/2 at every rank: the ups carry the inverse
    return {
        f"{name}.{names[0]}.weight": down.contiguous(),
        f"{name}.{names[1]}.weight": (up * 2).contiguous(),
        f"{name}.alpha": torch.tensor(alpha * n),
    }


def comfy(stem, down, up, n):
    """ComfyUI's peft-style spelling: BFL's dotted path under ``diffusion_model.``, lora_A/lora_B."""
    return kohya(stem, down, up, n, prefix="diffusion_model.", names=("lora_A", "lora_B"))


def xlabs(stem, down, up, n):
    return {f"{stem}.down.weight": down.contiguous(), f"{stem}.up.weight": up.contiguous()}


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fluxlayouts")
    pipe = build_flux_pipeline(root / "flux")
    loras = root / "loras"
    loras.mkdir()
    state = peft_lora(pipe, seed=5)
    attention = {k: v for k, v in state.items() if re.fullmatch(XLABS_MODULES, k.split(".", 1)[1].rsplit(".", 2)[0])}
    files = {
        "peft": state,
        "peft_attention": attention,
        "kohya": renamed(state, _BFL, kohya),
        "comfy": renamed(state, _BFL, comfy),
        "xlabs": renamed(attention, _XLABS, xlabs),
    }
    for name, tensors in files.items():
        save_file(tensors, str(loras / f"{name}.safetensors"))
    engine = DiffusionEngine(LoraLibrary(loras), torch.device("cpu"), torch.float32)
    engine.load_model(str(root / "flux"))
    return {"engine": engine, "files": files, "loras": loras}


def pixels(engine: DiffusionEngine, loras=()) -> np.ndarray:
    request = GenerationRequest(
        prompt="a red fox", loras=tuple(LoraRequest(n, s) for n, s in loras), steps=3, seed=7, sampler="Euler"
    )
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def test_the_files_are_spelled_as_each_tool_writes_them(flux):
    files = flux["files"]
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in files["kohya"]
    assert "lora_unet_double_blocks_0_img_attn_qkv.alpha" in files["kohya"]
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in files["comfy"]
    assert "diffusion_model.double_blocks.0.txt_mod.lin.lora_B.weight" in files["comfy"]
    assert "diffusion_model.single_blocks.0.modulation.lin.lora_A.weight" in files["comfy"]
    assert "double_blocks.0.processor.qkv_lora1.down.weight" in files["xlabs"]
    assert files["kohya"]["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (32 * 3 + 128, 4 * RANK)
    library = LoraLibrary(flux["loras"])
    assert {library.resolve(name).family for name in ("kohya", "comfy", "xlabs")} == {FLUX}


def test_diffusers_own_kohya_converter_fails_on_the_tiny_width(flux):
    """Why flux_kohya splits linear1 itself: if this starts passing, diffusers handles other widths."""
    with pytest.raises(AssertionError):
        FluxPipeline.lora_state_dict(dict(flux["files"]["kohya"]))


@pytest.mark.parametrize(("layout", "reference"), [("kohya", "peft"), ("comfy", "peft"), ("xlabs", "peft_attention")])
def test_each_layout_gives_the_peft_file_s_image(flux, layout, reference):
    engine = flux["engine"]
    base = pixels(engine)
    expected = pixels(engine, [(reference, 1.0)])
    assert np.abs(expected - base).max() > 10  # the LoRA does something visible
    # The same products of matrices, grouped otherwise (a larger rank, alpha folded in): a tolerance.
    assert np.abs(pixels(engine, [(layout, 1.0)]) - expected).max() <= 2
    assert np.array_equal(pixels(engine, [(layout, 0.0)]), base)
    assert np.array_equal(pixels(engine), base)
