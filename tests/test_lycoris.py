"""LyCORIS formats, DoRA and diffs load as weight patches with AUTOMATIC1111's mathematics.

Every file is built here from random factors, and the ΔW it should mean is computed here from the
format's definition (einsum and kron written for this test, independent of ``lorapg.diffusion.lycoris``).
A second engine gets that ΔW added to its weights by hand and generates with no LoRA; the product's
engine generates with the file selected. Both run the same code path on weights that differ only by
float rounding, so their images agree within ``LEVELS``; an unpatched image must differ by far more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.errors import UserError
from lorapg.services.library import lora_summary

LEVELS = 2  # weights patched by the product against by hand: the same ΔW, summed in another order
VISIBLE = 6  # a patch that "does nothing" would leave the image within a level or two of the base
SCALE = 0.7

# kohya module name -> (pipeline component, module path) in the tiny SD 1.x model
LINEAR = ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "unet",
          "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")  # fmt: skip
CROSS = ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", "unet",
         "mid_block.attentions.0.transformer_blocks.0.attn2.to_k")  # fmt: skip
FF = ("lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj", "unet",
      "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj")  # fmt: skip
OUT = ("lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0", "unet",
       "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0")  # fmt: skip
CONV = ("lora_unet_mid_block_resnets_0_conv1", "unet", "mid_block.resnets.0.conv1")
CONV_WIDE = ("lora_unet_up_blocks_0_resnets_0_conv1", "unet", "up_blocks.0.resnets.0.conv1")
TEXT = ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder", "encoder.layers.0.self_attn.q_proj")
LAYER_NORM = ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_norm1", "unet",
              "down_blocks.1.attentions.0.transformer_blocks.0.norm1")  # fmt: skip
GROUP_NORM = ("lora_unet_mid_block_resnets_0_norm1", "unet", "mid_block.resnets.0.norm1")

_gen = torch.Generator().manual_seed(7)


def rand(*shape: int, std: float = 0.4) -> torch.Tensor:
    return torch.randn(shape, generator=_gen) * std


def layer(pipe, target):
    _, component, path = target
    return getattr(pipe, component).get_submodule(path)


def tucker(core, out_factor, in_factor):
    """W[o,i,k,l] = Σ core[a,b,k,l] · out_factor[a,o] · in_factor[b,i] (LyCORIS stores factors as [rank, n])."""
    return torch.einsum("abkl,ao,bi->oikl", core, out_factor, in_factor)


# --- the formats, each: (tensors for the file, {target: (ΔW, Δbias)} at multiplier 1) -----------


def loha(pipe):
    tensors, expected = {}, {}
    for target, rank, alpha in ((LINEAR, 4, 2.0), (CONV, 2, 1.0), (TEXT, 4, 4.0)):
        weight = layer(pipe, target).weight
        out, fan_in = weight.shape[0], weight[0].numel()
        w1a, w1b, w2a, w2b = rand(out, rank), rand(rank, fan_in), rand(out, rank), rand(rank, fan_in)
        tensors |= _named(target, hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b, alpha=alpha)
        expected[target] = (((w1a @ w1b) * (w2a @ w2b)).reshape(weight.shape) * alpha / rank, None)
    return tensors, expected


def loha_tucker(pipe):
    rank, alpha = 3, 1.5
    tensors, expected = {}, {}
    for target in (CONV, CONV_WIDE):
        out, fan_in, k, _ = layer(pipe, target).weight.shape
        t1, t2 = rand(rank, rank, k, k), rand(rank, rank, k, k)
        w1a, w1b, w2a, w2b = rand(rank, out), rand(rank, fan_in), rand(rank, out), rand(rank, fan_in)
        tensors |= _named(
            target, hada_t1=t1, hada_t2=t2, hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b, alpha=alpha
        )
        expected[target] = (tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b) * alpha / rank, None)
    return tensors, expected


def lokr(pipe):
    """Full factors (alpha is then ignored: scale 1), factorised ones (alpha / rank) and a Tucker w2."""
    tensors, expected = {}, {}
    w1, w2 = rand(2, 2), rand(4, 4)  # LINEAR is 8×8
    tensors |= _named(LINEAR, lokr_w1=w1, lokr_w2=w2, alpha=1.0)
    expected[LINEAR] = (torch.kron(w1, w2), None)
    # FF is 64×8 = (8·8)×(2·4): both factors low-rank, rank 1 and 2
    w1a, w1b, w2a, w2b = rand(8, 1), rand(1, 2), rand(8, 2), rand(2, 4)
    tensors |= _named(FF, lokr_w1_a=w1a, lokr_w1_b=w1b, lokr_w2_a=w2a, lokr_w2_b=w2b, alpha=1.0)
    expected[FF] = (torch.kron(w1a @ w1b, w2a @ w2b) * 1.0 / 2, None)
    # CONV is 8×8×3×3 = (2·4)×(2·4)×3×3: w2 a Tucker product with its kernel, rank 2
    w1, t2, w2a, w2b = rand(2, 2), rand(2, 2, 3, 3), rand(2, 4), rand(2, 4)
    tensors |= _named(CONV, lokr_w1=w1, lokr_t2=t2, lokr_w2_a=w2a, lokr_w2_b=w2b, alpha=3.0)
    expected[CONV] = (torch.kron(w1[:, :, None, None], tucker(t2, w2a, w2b).contiguous()) * 3.0 / 2, None)
    return tensors, expected


def locon_mid(pipe):
    rank, alpha = 2, 1.0
    out, fan_in, k, _ = layer(pipe, CONV_WIDE).weight.shape
    down, mid, up = rand(rank, fan_in, 1, 1), rand(rank, rank, k, k), rand(out, rank, 1, 1)
    tensors = _named(CONV_WIDE, **{"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}, alpha=alpha)
    conv = torch.einsum("oa,abkl,bi->oikl", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * alpha / rank
    # a plain module beside it, in the same file
    lin_down, lin_up = rand(4, 8), rand(8, 4)
    tensors |= _named(LINEAR, **{"lora_down.weight": lin_down, "lora_up.weight": lin_up}, alpha=4.0)
    return tensors, {CONV_WIDE: (conv, None), LINEAR: (lin_up @ lin_down, None)}


def dora(pipe):
    """kohya/A1111 magnitudes per input column on a linear and a conv; LyCORIS's per output row on one."""
    tensors, expected = {}, {}
    for target, per_input in ((LINEAR, True), (CONV, True), (CROSS, False)):
        original = layer(pipe, target).weight.detach().clone()
        out, fan_in = original.shape[0], original[0].numel()
        rank, alpha = 2, 1.0
        down, up = rand(rank, fan_in), rand(out, rank)
        merged = original + (up @ down).reshape(original.shape) * alpha / rank
        if per_input:
            column_norms = merged.transpose(0, 1).reshape(original.shape[1], -1).norm(dim=1)
            magnitude = column_norms * (1.5 + rand(original.shape[1], std=0.3))
            norm_shape = (1, original.shape[1]) + (1,) * (original.dim() - 2)
            scaled = merged * (magnitude.reshape(norm_shape) / column_norms.reshape(norm_shape))
            stored = magnitude.reshape(1, -1)
        else:
            row_norms = merged.reshape(out, -1).norm(dim=1)
            magnitude = row_norms * (1.5 + rand(out, std=0.3))
            scaled = merged * (magnitude / row_norms).reshape(out, *([1] * (original.dim() - 1)))
            stored = magnitude.reshape(out, 1)
        weights = {"lora_down.weight": down.reshape(rank, *original.shape[1:]), "lora_up.weight": up}
        tensors |= _named(target, **weights, alpha=alpha, dora_scale=stored)
        expected[target] = (scaled - original, None)
    return tensors, expected


def full_diff(pipe):
    tensors, expected = {}, {}
    for target in (OUT, CONV, TEXT):
        module = layer(pipe, target)
        diff, diff_b = rand(*module.weight.shape, std=0.2), rand(*module.bias.shape, std=0.2)
        tensors |= _named(target, diff=diff, diff_b=diff_b)
        expected[target] = (diff, diff_b)
    return tensors, expected


def norm_diff(pipe):
    tensors, expected = {}, {}
    for target in (LAYER_NORM, GROUP_NORM):
        module = layer(pipe, target)
        w_norm, b_norm = rand(*module.weight.shape, std=0.8), rand(*module.bias.shape, std=0.8)
        tensors |= _named(target, w_norm=w_norm, b_norm=b_norm)
        expected[target] = (w_norm, b_norm)
    return tensors, expected


def ia3(pipe):
    """One factor per output row (on_input False) and one per input column (on_input True)."""
    tensors, expected = {}, {}
    for target, on_input in ((LINEAR, False), (FF, True), (CONV, False)):
        original = layer(pipe, target).weight.detach().clone()
        axis = 1 if on_input else 0
        factors = rand(original.shape[axis], std=0.8)
        shape = [1] * original.dim()
        shape[axis] = -1
        tensors |= _named(target, weight=factors, on_input=torch.tensor(on_input))
        expected[target] = (original * factors.reshape(shape), None)
    return tensors, expected


FORMATS = {
    "loha": (loha, "LoHa"),
    "loha_tucker": (loha_tucker, "LoHa"),
    "lokr": (lokr, "LoKr"),
    "locon_mid": (locon_mid, "LoCon"),
    "dora": (dora, "DoRA"),
    "full_diff": (full_diff, "Full diff"),
    "norm_diff": (norm_diff, "Norm diff"),
    "ia3": (ia3, "IA3"),
}


def _named(target, **tensors) -> dict[str, torch.Tensor]:
    name = target[0]
    return {
        f"{name}.{suffix}": (value if isinstance(value, torch.Tensor) else torch.tensor(value)).float().contiguous()
        for suffix, value in tensors.items()
    }


def plain_lora_delta(path, paths: dict[str, str]) -> dict:
    """ΔW of a kohya LoRA by hand (up @ down · alpha / rank); ``paths``: kohya name -> module path."""
    state = load_file(str(path))
    expected = {}
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        down, up = state[key], state[f"{name}.lora_up.weight"]
        alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else down.shape[0]
        component = "text_encoder" if name.startswith("lora_te_") else "unet"
        expected[(name, component, paths[name])] = ((up @ down) * alpha / down.shape[0], None)
    return expected


# --- engines ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(tiny_models, tmp_path_factory):
    """One file per format plus a plain kohya LoRA, built against the tiny SD 1.x model's weights."""
    folder = tmp_path_factory.mktemp("lycoris")
    base = (
        DiffusionEngine(LoraLibrary(folder), torch.device("cpu"), torch.float32)
        .load_model(str(tiny_models["sd15"]))
        .pipe
    )
    paths = {}  # kohya name -> module path, written out for the plain LoRA's modules
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for path, _ in getattr(base, component).named_modules():
            paths[prefix + path.replace(".", "_")] = path
    expected = {}
    for name, (build, _) in FORMATS.items():
        tensors, expected[name] = build(base)
        save_file(tensors, str(folder / f"{name}.safetensors"))
    plain = folder / "plain.safetensors"
    plain.write_bytes((tiny_models["loras"] / "style_kohya.safetensors").read_bytes())
    expected["plain"] = plain_lora_delta(plain, paths)
    return folder, expected


@pytest.fixture(scope="module")
def engine(tiny_models, lora_dir):
    engine = DiffusionEngine(LoraLibrary(lora_dir[0]), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sd15"]))
    return engine


@pytest.fixture(scope="module")
def by_hand(tiny_models, lora_dir):
    """An engine whose weights the test patches itself, and restores from its own copy afterwards."""
    engine = DiffusionEngine(LoraLibrary(lora_dir[0]), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sd15"]))
    return engine


@pytest.fixture(scope="module")
def base(by_hand) -> np.ndarray:
    return pixels(by_hand)


def pixels(engine: DiffusionEngine, loras=()) -> np.ndarray:
    request = GenerationRequest(
        prompt="a red fox in the snow",
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        steps=2,
        seed=1234,
        width=64,
        height=64,
    )
    return np.stack([np.asarray(image, dtype=np.int16) for image in engine.generate(request).images])


def patched_by_hand(engine: DiffusionEngine, deltas: list[tuple[dict, float]]) -> np.ndarray:
    """The image of ``engine`` with ``scale · ΔW`` of each expected set added to its weights by the test."""
    pipe = engine.model.pipe
    saved = {}
    with torch.no_grad():
        for expected, scale in deltas:
            for target, (delta_weight, delta_bias) in expected.items():
                module = layer(pipe, target)
                for param, change in ((module.weight, delta_weight), (module.bias, delta_bias)):
                    if change is not None:
                        saved.setdefault(param, param.detach().clone())
                        param.add_(change.reshape(param.shape) * scale)
    try:
        return pixels(engine)
    finally:
        with torch.no_grad():
            for param, original in saved.items():
                param.copy_(original)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


# --- tests -------------------------------------------------------------------------------------------


def test_the_library_names_each_files_format(lora_dir):
    infos, problems = LoraLibrary(lora_dir[0]).scan()
    by_name = {info.name: info for info in infos}
    assert problems == []
    for name, (_, label) in FORMATS.items():
        assert (by_name[name].format, by_name[name].weight_patches) == (label, True), name
    assert (by_name["plain"].format, by_name["plain"].weight_patches) == ("LoRA", False)
    summary = lora_summary(by_name["loha"])
    assert (summary["format"], summary["layout"]) == ("LoHa", "kohya")
    # The Generate tab's LoRA list names every format but plain LoRA (whose label stays as it was).
    from lorapg.services.generation import LoraListing
    from lorapg.ui.generate_tab import _choices

    labels = {value: label for label, value in _choices(LoraListing(infos, []))}
    assert (labels["loha"], labels["dora"], labels["plain"]) == ("loha (LoHa)", "dora (DoRA)", "plain")


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_gives_the_image_of_weights_patched_by_hand(engine, by_hand, base, lora_dir, name):
    expected = patched_by_hand(by_hand, [(lora_dir[1][name], SCALE)])
    got = pixels(engine, [(name, SCALE)])
    assert max_diff(got, expected) <= LEVELS
    assert max_diff(got, base) > VISIBLE  # the file has its effect (and the reference is not the base)
    assert engine.model.adapters.patches.applied is not None


def test_scale_zero_is_the_base_image_and_switching_away_restores_it(engine, base):
    assert np.array_equal(pixels(engine, [("dora", 0.0), ("loha", 0.0)]), base)
    pixels(engine, [("dora", 1.0), ("norm_diff", 0.5), ("plain", 0.8)])
    assert np.array_equal(pixels(engine), base)  # the originals came back bit for bit
    assert engine.model.adapters.patches.applied is None


def test_stacked_with_a_plain_lora_each_at_its_own_scale(engine, by_hand, lora_dir):
    """DoRA on layers the plain LoRA also changes: the DoRA patch is computed from the original weights."""
    expected_sets = lora_dir[1]
    selection = [("dora", 0.8), ("plain", 0.6), ("lokr", 0.4)]
    expected = patched_by_hand(by_hand, [(expected_sets[name], scale) for name, scale in selection])
    got = pixels(engine, selection)
    adapters = engine.model.adapters
    assert adapters.fuser.fused is not None  # the plain LoRA took diffusers' peft path and was fused
    assert any(adapters.pipe.get_list_adapters().values())
    assert max_diff(got, expected) <= LEVELS
    other = pixels(engine, [("dora", 0.8), ("plain", 0.2), ("lokr", 0.4)])
    assert max_diff(other, got) > VISIBLE  # each file follows its own scale


def test_the_same_selection_twice_does_no_work(engine):
    selection = [("loha", 0.5), ("plain", 0.5)]
    first = pixels(engine, selection)
    patches = engine.model.adapters.patches
    applied, read = patches.apply_count, engine.model.adapters.files_read
    assert np.array_equal(pixels(engine, selection), first)
    assert (patches.apply_count, engine.model.adapters.files_read) == (applied, read)


def test_a_changed_selection_equals_a_fresh_engine(tiny_models, engine, lora_dir):
    pixels(engine, [("loha_tucker", 1.0), ("plain", 1.0)])
    changed = pixels(engine, [("locon_mid", 0.9)])
    fresh = DiffusionEngine(LoraLibrary(lora_dir[0]), torch.device("cpu"), torch.float32)
    fresh.load_model(str(tiny_models["sd15"]))
    assert np.array_equal(changed, pixels(fresh, [("locon_mid", 0.9)]))


# --- SDXL with the SGM names sd-scripts writes ----------------------------------------------------------

# SGM name -> diffusers path in the tiny SDXL UNet (layers_per_block 1; up block 0 has 2 transformer layers)
SGM = {
    "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",  # noqa: E501
    "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "lora_unet_middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
    "lora_unet_middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
    "lora_unet_output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "lora_unet_output_blocks_1_1_transformer_blocks_1_attn2_to_k": "up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_k",  # noqa: E501
    "lora_unet_output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
    "lora_unet_output_blocks_3_0_out_layers_3": "up_blocks.1.resnets.1.conv2",
}  # fmt: skip
# transformers 5 dropped CLIPTextModel's text_model level but CLIPTextModelWithProjection keeps it
SDXL_TEXT = {
    "lora_te1_text_model_encoder_layers_1_mlp_fc1": ("text_encoder", "encoder.layers.1.mlp.fc1"),
    "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": (
        "text_encoder_2",
        "text_model.encoder.layers.0.self_attn.v_proj",
    ),  # noqa: E501
}


def test_an_sdxl_loha_with_sgm_names(tiny_models, tmp_path):
    reference = DiffusionEngine(LoraLibrary(tmp_path), torch.device("cpu"), torch.float32)
    reference.load_model(str(tiny_models["sdxl"]))
    targets = {name: (name, "unet", path) for name, path in SGM.items()}
    targets |= {name: (name, component, path) for name, (component, path) in SDXL_TEXT.items()}
    tensors, expected = {}, {}
    for target in targets.values():
        weight = layer(reference.model.pipe, target).weight
        out, fan_in = weight.shape[0], weight[0].numel()
        w1a, w1b, w2a, w2b = rand(out, 2), rand(2, fan_in), rand(out, 2), rand(2, fan_in)
        tensors |= _named(target, hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b, alpha=2.0)
        expected[target] = (((w1a @ w1b) * (w2a @ w2b)).reshape(weight.shape), None)
    save_file(tensors, str(tmp_path / "xl_loha.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    engine = DiffusionEngine(LoraLibrary(tmp_path), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sdxl"]))
    base = pixels(reference)
    got = pixels(engine, [("xl_loha", 0.9)])
    assert max_diff(got, patched_by_hand(reference, [(expected, 0.9)])) <= LEVELS
    assert max_diff(got, base) > VISIBLE
    assert engine.model.adapters.patches.applied is not None


# --- bad input ------------------------------------------------------------------------------------------


def _write(folder, name: str, tensors: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def bad_files(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_lycoris")
    name = LINEAR[0]
    loha_keys = {f"{name}.hada_w1_a": rand(8, 2), f"{name}.hada_w1_b": rand(2, 8)}
    loha_keys |= {f"{name}.hada_w2_a": rand(8, 2), f"{name}.hada_w2_b": rand(2, 8)}
    _write(folder, "unknown_keys", {f"{name}.lora_sideways.weight": rand(2, 8)})
    _write(folder, "mixed", {**loha_keys, f"{name}.lora_down.weight": rand(2, 8), f"{name}.lora_up.weight": rand(8, 2)})
    wrong = dict(loha_keys, **{f"{name}.hada_w1_b": rand(2, 16), f"{name}.hada_w2_b": rand(2, 16)})
    _write(folder, "wrong_shape", wrong)
    _write(folder, "no_such_layer", {k.replace("down_blocks_1", "down_blocks_7"): v for k, v in loha_keys.items()})
    _write(folder, "glora", {f"{name}.a1.weight": rand(2, 8), f"{name}.a2.weight": rand(8, 2)})
    _write(folder, "oft", {f"{name}.oft_blocks": rand(2, 4, 4), f"{name}.alpha": torch.tensor(1.0)})
    _write(folder, "good", loha_keys)
    engine = DiffusionEngine(LoraLibrary(folder), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sd15"]))
    return folder, engine


def test_files_of_no_known_format_are_listed_as_problems(bad_files):
    infos, problems = LoraLibrary(bad_files[0]).scan()
    assert {info.name for info in infos} == {"wrong_shape", "no_such_layer", "glora", "oft", "good"}
    assert {info.name: info.format for info in infos}["oft"] == "OFT"
    assert len(problems) == 2 and all("\n" not in p for p in problems)
    unknown = next(p for p in problems if "unknown_keys" in p)
    assert "unknown key" in unknown and "lora_sideways" in unknown
    mixed = next(p for p in problems if "mixed.safetensors" in p)
    assert "mixes LoHa and LoRA" in mixed


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("unknown_keys", "unknown key"),
        ("mixed", "cannot be combined"),
        ("wrong_shape", "shape"),
        ("no_such_layer", "no layer of the loaded model"),
        ("glora", "GLoRA"),
        ("oft", "OFT"),
    ],
)
def test_bad_files_are_refused_in_one_line_and_the_engine_keeps_serving(bad_files, name, says):
    engine = bad_files[1]
    base = pixels(engine)
    with pytest.raises(UserError) as refused:
        pixels(engine, [(name, 0.8), ("good", 0.5)])
    message = str(refused.value)
    assert name in message and says in message and "\n" not in message
    assert np.array_equal(pixels(engine), base)  # nothing of the refused selection stayed in the weights
    assert max_diff(pixels(engine, [("good", 1.0)]), base) > 0


def test_factors_that_do_not_fit_together_are_refused_every_time(bad_files):
    """A LoHa whose w1_a/w1_b inner sizes differ fails inside torch; a second try must not find the
    selection marked as applied (it once returned early and made an image without the LoRA)."""
    folder, engine = bad_files
    name = LINEAR[0]
    inner = {f"{name}.hada_w1_a": rand(8, 2), f"{name}.hada_w1_b": rand(3, 8)}
    inner |= {f"{name}.hada_w2_a": rand(8, 2), f"{name}.hada_w2_b": rand(2, 8)}
    _write(folder, "inner_mismatch", inner)
    base = pixels(engine)
    for _ in range(2):
        with pytest.raises(UserError) as refused:
            pixels(engine, [("inner_mismatch", 0.8), ("good", 0.5)])
        assert "inner_mismatch" in str(refused.value) and "\n" not in str(refused.value)
    assert np.array_equal(pixels(engine), base)


def test_a_lora_removed_after_the_request_was_checked_is_named(bad_files):
    folder, engine = bad_files
    base = pixels(engine)
    _write(folder, "short_lived", load_file(str(folder / "good.safetensors")))
    request_loras = engine.resolve_loras(GenerationRequest("x", loras=(LoraRequest("short_lived", 1.0),)))
    (folder / "short_lived.safetensors").unlink()  # the LoRA manager moved it to the trash meanwhile
    with pytest.raises(UserError, match="short_lived is no longer in the LoRA folder"):
        engine.model.adapters.activate(request_loras)
    assert np.array_equal(pixels(engine), base)  # still serving, with nothing of it in the weights


# Real SD 1.x and SDXL UNet layouts (on the meta device: no weights, no memory), with SGM names as
# sd-scripts writes them and the layers they mean, written out by hand from the two architectures.
_REAL_UNETS = {
    "sdxl": (
        {
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (5, 10, 20),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "transformer_layers_per_block": (1, 2, 10),
            "projection_class_embeddings_input_dim": 2816,
            "cross_attention_dim": 2048,
        },
        {
            "input_blocks_0_0": "conv_in",
            "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
            "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",  # noqa: E501
            "input_blocks_7_0_emb_layers_1": "down_blocks.2.resnets.0.time_emb_proj",
            "input_blocks_8_1_transformer_blocks_9_attn2_to_out_0": "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",  # noqa: E501
            "middle_block_1_transformer_blocks_9_ff_net_2": "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
            "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
            "output_blocks_0_0_out_layers_3": "up_blocks.0.resnets.0.conv2",
            "output_blocks_1_1_proj_out": "up_blocks.0.attentions.1.proj_out",
            "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
            "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
            "output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
            "label_emb_0_0": "add_embedding.linear_1",
            "time_embed_2": "time_embedding.linear_2",
            "out_2": "conv_out",
        },
    ),
    "sd1": (
        {
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
        },
        {
            "input_blocks_1_1_transformer_blocks_0_attn2_to_k": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",  # noqa: E501
            "input_blocks_11_0_in_layers_2": "down_blocks.3.resnets.1.conv1",
            "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",  # a block without attentions
            "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
            "output_blocks_11_1_proj_in": "up_blocks.3.attentions.2.proj_in",
            "input_blocks_10_0_emb_layers_1": "down_blocks.3.resnets.0.time_emb_proj",  # 10 and 11 beside 1
            "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        },
    ),
}


@pytest.mark.parametrize("family", list(_REAL_UNETS))
def test_sgm_names_find_their_layers_in_a_real_unet_layout(family):
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from lorapg.diffusion.weight_patches import resolve_modules

    config, names = _REAL_UNETS[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel(layers_per_block=2, **config)
    found = resolve_modules(SimpleNamespace(unet=unet, text_encoder=None), [f"lora_unet_{n}" for n in names])
    for name, path in names.items():
        assert found[f"lora_unet_{name}"] is unet.get_submodule(path), name


def test_labels_and_routing_from_the_header_alone():
    from lorapg.diffusion.families import SD1, SDXL
    from lorapg.diffusion.lora_library import describe_format, detect_lora_family

    to_k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    loha_keys = {f"{to_k}.hada_w{i}_{ab}": (4, 768) for i in (1, 2) for ab in "ab"}
    assert describe_format(loha_keys) == ("LoHa", True)
    assert describe_format({**loha_keys, f"{to_k}.dora_scale": (1, 768)}) == ("LoHa (DoRA)", True)
    assert detect_lora_family({}, loha_keys) == SD1
    assert detect_lora_family({}, {f"{to_k}.diff": (640, 2048)}) == SDXL
    plain = {f"{to_k}.lora_down.weight": (4, 768), f"{to_k}.lora_up.weight": (320, 4), f"{to_k}.alpha": ()}
    assert describe_format(plain) == ("LoRA", False)  # diffusers' peft path, unchanged
    norm = "lora_unet_mid_block_attentions_0_norm"
    # a plain LoRA with norm diffs beside it: diffusers would refuse the norm keys, so patches
    assert describe_format({**plain, f"{norm}.w_norm": (320,), f"{norm}.b_norm": (320,)}) == ("LoRA", True)
    assert describe_format({"unet.a.lora_A.weight": (4, 8), "unet.a.lora_B.weight": (8, 4)}) == ("LoRA", False)
