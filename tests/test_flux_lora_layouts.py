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

from lorapg.diffusion import flux_kohya
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.families import FLUX
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.lora_parts import UnsupportedPart
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.errors import UserError
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


# --- FLUX.1's own widths, without FLUX.1's weights ------------------------------------------------------------

FLUX1_HIDDEN, FLUX1_MLP = 3072, 12288
# BFL module -> (input width, output width) at FLUX.1's sizes (hidden 3072, MLP 12288, 6 or 3 modulations).
FLUX1_MODULES = {
    "double_blocks_0_img_attn_qkv": (FLUX1_HIDDEN, 3 * FLUX1_HIDDEN),
    "double_blocks_0_img_attn_proj": (FLUX1_HIDDEN, FLUX1_HIDDEN),
    "double_blocks_0_img_mlp_0": (FLUX1_HIDDEN, FLUX1_MLP),
    "double_blocks_0_img_mlp_2": (FLUX1_MLP, FLUX1_HIDDEN),
    "double_blocks_0_img_mod_lin": (FLUX1_HIDDEN, 6 * FLUX1_HIDDEN),
    "double_blocks_0_txt_attn_qkv": (FLUX1_HIDDEN, 3 * FLUX1_HIDDEN),
    "double_blocks_0_txt_mlp_2": (FLUX1_MLP, FLUX1_HIDDEN),
    "single_blocks_0_linear1": (FLUX1_HIDDEN, 3 * FLUX1_HIDDEN + FLUX1_MLP),
    "single_blocks_0_linear2": (FLUX1_HIDDEN + FLUX1_MLP, FLUX1_HIDDEN),
    "single_blocks_0_modulation_lin": (FLUX1_HIDDEN, 3 * FLUX1_HIDDEN),
    "single_blocks_1_linear1": (FLUX1_HIDDEN, 3 * FLUX1_HIDDEN + FLUX1_MLP),
}


def flux1_sized_transformer():
    """FLUX.1 dev's transformer with two single blocks and one double block, on the meta device: no memory."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        )  # fmt: skip


def products(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> up @ down (the ΔW a LoRA adds at scale 1) for a diffusers-layout state dict."""
    return {
        key.removesuffix(".lora_A.weight"): state[key.replace("lora_A", "lora_B")].float() @ tensor.float()
        for key, tensor in state.items()
        if key.endswith(".lora_A.weight")
    }


def test_at_flux1_widths_the_split_gives_diffusers_own_conversion():
    """diffusers' converter knows FLUX.1's sizes: on a file at those sizes both give the same ΔW per module."""
    generator = torch.Generator().manual_seed(11)
    state = {}
    for module, (inputs, outputs) in FLUX1_MODULES.items():
        state[f"lora_unet_{module}.lora_down.weight"] = torch.randn(2, inputs, generator=generator)
        state[f"lora_unet_{module}.lora_up.weight"] = torch.randn(outputs, 2, generator=generator) * 0.1
        state[f"lora_unet_{module}.alpha"] = torch.tensor(1.0)  # alpha / rank = 1/2
    transformer = flux1_sized_transformer()
    assert transformer.single_transformer_blocks[0].proj_mlp.out_features == FLUX1_MLP
    ours = products(flux_kohya.convert(state, transformer))
    theirs = products(dict(FluxPipeline.lora_state_dict(dict(state))))
    assert set(ours) == set(theirs)
    assert "transformer.single_transformer_blocks.1.proj_mlp" in ours  # linear1's MLP rows
    for module, delta in theirs.items():
        # The same matrices scaled in another order (diffusers splits alpha / rank between down and up).
        torch.testing.assert_close(ours[module], delta, rtol=1e-5, atol=1e-6, msg=module)


def test_a_part_a_flux_renaming_cannot_carry_is_named_not_dropped(flux):
    kohya_file = dict(flux["files"]["kohya"])
    for extra, tensor in (
        ("lora_unet_single_blocks_0_linear1.dora_scale", torch.ones(1, 32)),
        ("lora_unet_double_blocks_0_img_attn_proj.lora_mid.weight", torch.ones(RANK, RANK, 1, 1)),
        ("diffusion_model.single_blocks.0.linear2.lora_B.bias", torch.ones(32)),
    ):
        with pytest.raises(UnsupportedPart, match=re.escape(extra)):
            flux_kohya.convert(dict(kohya_file, **{extra: tensor}), flux["engine"].model.pipe.transformer)
    # Through the app: a ComfyUI DoRA (peft's magnitude vector beside lora_A/lora_B) says which key it cannot apply.
    comfy = dict(flux["files"]["comfy"])
    comfy["diffusion_model.double_blocks.0.img_attn.proj.lora_magnitude_vector"] = torch.ones(32)
    save_file(comfy, str(flux["loras"] / "comfy_dora.safetensors"))
    with pytest.raises(UserError, match=r"^LoRA comfy_dora: its key diffusion_model\.double_blocks\.0\.img_attn"):
        pixels(flux["engine"], [("comfy_dora", 1.0)])


@pytest.mark.parametrize(
    ("name", "parts", "label"),
    [
        ("flux_lokr", {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}, "LoKr"),
        ("flux_loha", {f"hada_w{i}_{ab}": (32, 2) if ab == "a" else (2, 32) for i in (1, 2) for ab in "ab"}, "LoHa"),
        ("flux_dora", {"lora_down.weight": (RANK, 32), "lora_up.weight": (32, RANK), "dora_scale": (1, 32)}, "DoRA"),
    ],
)
def test_a_kohya_lycoris_file_is_refused_by_format(flux, name, parts, label):
    """LyCORIS/DoRA files take the weight-patch path, which knows only UNet names: a message, not a crash."""
    module = "lora_unet_double_blocks_0_img_attn_proj"
    tensors = {f"{module}.{key}": torch.ones(shape) for key, shape in parts.items()}
    save_file(tensors, str(flux["loras"] / f"{name}.safetensors"))
    assert LoraLibrary(flux["loras"]).resolve(name).format == label
    with pytest.raises(UserError, match=rf"^LoRA {name} is a {label} file; LyCORIS .* not supported for Flux\.1"):
        pixels(flux["engine"], [(name, 1.0)])
