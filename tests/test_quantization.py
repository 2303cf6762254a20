"""--quantize none|fp8|nf4 for Flux.1 and SD 3.5, on CPU with the tiny pipelines built in code.

bitsandbytes 0.50 quantizes and runs NF4 on CPU, so nothing here needs a GPU (diffusers' own
bitsandbytes quantizer does refuse a machine without one; lorapg.diffusion.quantization converts the
layers itself for that reason). Tolerances: quantization changes the image by design, so a
quantized image is compared with the unquantized one by mean absolute difference per channel
(0-255): NF4 within 12 levels (2.5 measured on the tiny Flux and SD 3 models), fp8 within 4
(0.4-0.5 measured). A LoRA at scale 0 adds exactly zero, so it equals its quantized base exactly.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from lorapg.cli import main
from lorapg.config import load_settings
from lorapg.diffusion import quantization
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.quantization import FP8, NF4, NONE, QuantizePlan, parse_plan
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.errors import UserError
from tests.tiny_flux import build_flux_pipeline, build_sd3_pipeline, save_peft_transformer_lora
from tests.tiny_models import build_sd15_pipeline

NF4_MEAN_LEVELS = 12.0
FP8_MEAN_LEVELS = 4.0


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("quant")
    flux = build_flux_pipeline(root / "flux")
    save_peft_transformer_lora(root / "loras" / "flux_style.safetensors", flux, seed=1)
    # A faint LoRA (std 0.003, as trained LoRAs often are): float8's smallest step is 0.002.
    save_peft_transformer_lora(root / "loras" / "flux_faint.safetensors", flux, seed=2, strength=0.003)
    build_sd3_pipeline(root / "sd3")
    build_sd15_pipeline(root / "sd15")
    return {"root": root, "flux": root / "flux", "sd3": root / "sd3", "sd15": root / "sd15", "loras": root / "loras"}


def make_engine(files, plan: QuantizePlan, model: str = "flux") -> DiffusionEngine:
    engine = DiffusionEngine(LoraLibrary(files["loras"]), torch.device("cpu"), torch.float32, quantize=plan)
    engine.load_model(str(files[model]))
    return engine


def pixels(engine: DiffusionEngine, loras=()) -> np.ndarray:
    request = GenerationRequest(
        prompt="a red fox",
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        steps=3,
        seed=7,
        sampler="Euler",
        width=32,
        height=48,
    )
    images = engine.generate(request).images
    assert [image.size for image in images] == [(32, 48)]
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


@pytest.fixture(scope="module")
def reference(files) -> dict:
    """The unquantized images the quantized ones are compared with."""
    return {model: pixels(make_engine(files, QuantizePlan(), model)) for model in ("flux", "sd3")}


def mean_levels(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def linear_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


# --- the setting ------------------------------------------------------------------------------------


def test_plan_from_the_setting_and_per_component_overrides():
    assert parse_plan("nf4") == QuantizePlan(NF4, NF4)
    assert parse_plan(" FP8 ", "t5=none") == QuantizePlan(FP8, NONE)
    assert parse_plan("none", "transformer=nf4, t5=fp8") == QuantizePlan(NF4, FP8)
    assert not parse_plan(None).active
    with pytest.raises(UserError, match="Setting quantize: 'int4' is not one of none, fp8, nf4"):
        parse_plan("int4")
    with pytest.raises(UserError, match="Setting quantize_components: 'vae=nf4' is not COMPONENT=MODE"):
        parse_plan("none", "vae=nf4")
    with pytest.raises(UserError, match="Setting quantize_components: 'q4' is not one of"):
        parse_plan("none", "t5=q4")


def test_settings_and_cli_flags_reach_the_engine(files, tmp_path):
    from lorapg.cli import build_parser, settings_from_args

    args = build_parser().parse_args(
        ["generate", "--prompt", "x", "--out", "x.png", "--quantize", "nf4", "--quantize-components", "t5=fp8"]
    )
    settings = settings_from_args(args)
    assert (settings.quantize, settings.quantize_components) == ("nf4", "t5=fp8")
    assert load_settings(environ={"LORAPG_QUANTIZE": "fp8"}).quantize == "fp8"
    from lorapg.services.build import build_engine

    engine = build_engine(settings, LoraLibrary(files["loras"]), torch.device("cpu"))
    assert engine.quantize == QuantizePlan(NF4, FP8)


def test_cli_generates_with_a_quantized_flux(files, tmp_path):
    out = tmp_path / "fox.png"
    common = ["--model", str(files["flux"]), "--lora-dir", str(files["loras"]), "--outputs", str(tmp_path / "o")]
    code = main(
        ["generate", *common, "--quantize", "nf4", "--prompt", "a fox", "--steps", "2", "--width", "32"]
        + ["--height", "32", "--out", str(out), "--no-gallery"]
    )
    assert code == 0 and out.is_file()


# --- NF4 ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nf4_engine(files) -> DiffusionEngine:
    return make_engine(files, parse_plan(NF4))


def test_nf4_really_quantizes_transformer_and_t5(nf4_engine):
    import bitsandbytes as bnb

    pipe = nf4_engine.model.pipe
    transformer_linears = linear_layers(pipe.transformer)
    assert transformer_linears and all(isinstance(m, bnb.nn.Linear4bit) for m in transformer_linears)
    assert all(isinstance(m.weight, bnb.nn.Params4bit) and m.weight.dtype == torch.uint8 for m in transformer_linears)
    assert {m.weight.quant_state.quant_type for m in transformer_linears} == {"nf4"}
    t5 = {name: m for name, m in pipe.text_encoder_2.named_modules() if isinstance(m, torch.nn.Linear)}
    # T5 keeps its feed-forward output ("wo") unquantized, as transformers' bitsandbytes loading does.
    assert all(isinstance(m, bnb.nn.Linear4bit) == (not name.endswith(".wo")) for name, m in t5.items())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in pipe.text_encoder.modules())  # CLIP stays


def test_nf4_generates_close_to_the_unquantized_image(nf4_engine, reference):
    image = pixels(nf4_engine)
    assert mean_levels(image, reference["flux"]) < NF4_MEAN_LEVELS


def test_lora_on_nf4_base_scale_zero_is_the_quantized_base(nf4_engine):
    base = pixels(nf4_engine)
    assert np.array_equal(pixels(nf4_engine, [("flux_style", 0.0)]), base)
    assert mean_levels(pixels(nf4_engine, [("flux_style", 1.0)]), base) > 1.0
    assert np.array_equal(pixels(nf4_engine), base)  # switching the LoRA off gives the base back
    assert not nf4_engine.model.adapters.fuser.enabled  # merging into 4-bit weights would re-round them


def test_sd3_in_nf4(files, reference):
    import bitsandbytes as bnb

    engine = make_engine(files, parse_plan(NF4), "sd3")
    pipe = engine.model.pipe
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in linear_layers(pipe.transformer))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in pipe.text_encoder_3.modules())
    assert mean_levels(pixels(engine), reference["sd3"]) < NF4_MEAN_LEVELS


# --- fp8 ----------------------------------------------------------------------------------------------


def test_fp8_stores_float8_generates_close_and_takes_loras(files, reference):
    engine = make_engine(files, parse_plan(FP8))
    pipe = engine.model.pipe
    # Every attention and feed-forward weight is stored in float8; the norms (with their modulation
    # linears, diffusers' own skip list) stay in the compute dtype.
    blocks = pipe.transformer.transformer_blocks.named_modules()
    block_linears = [m for n, m in blocks if isinstance(m, torch.nn.Linear) and "norm" not in n]
    assert len(block_linears) > 8 and all(m.weight.dtype == torch.float8_e4m3fn for m in block_linears)
    assert all(p.dtype == torch.float32 for n, p in pipe.transformer.named_parameters() if "norm" in n)
    t5 = pipe.text_encoder_2
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert t5.shared.weight.dtype == torch.float32  # transformers reads the model's dtype from it
    base = pixels(engine)
    assert mean_levels(base, reference["flux"]) < FP8_MEAN_LEVELS
    assert np.array_equal(pixels(engine, [("flux_style", 0.0)]), base)
    assert mean_levels(pixels(engine, [("flux_style", 1.0)]), base) > 1.0
    # Storage stays float8 with a LoRA attached; the adapter itself computes in float32.
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert all(p.dtype == torch.float32 for n, p in to_q.named_parameters() if "lora_" in n)


def test_a_lora_on_an_fp8_base_keeps_its_values(files):
    """The adapter holds the file's values in the compute dtype, not rounded through float8 first."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from lorapg.diffusion.adapters import adapter_name

    engine = make_engine(files, parse_plan(FP8))
    pixels(engine, [("flux_faint", 1.0)])
    transformer = engine.model.pipe.transformer
    name = adapter_name(engine.library.resolve("flux_faint"))
    loaded = get_peft_model_state_dict(transformer, adapter_name=name)
    expected = {
        key.removeprefix("transformer."): value
        for key, value in load_file(files["loras"] / "flux_faint.safetensors").items()
    }
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == torch.float32, key
        # float32 to float32: the same numbers (float8 would zero ~30% of them and miss the rest by up to 6%).
        torch.testing.assert_close(loaded[key], value, rtol=1e-6, atol=0.0, msg=key)
    to_q = transformer.transformer_blocks[0].attn.to_q
    assert to_q.base_layer.weight.dtype == torch.float8_e4m3fn  # the base stays stored in float8


def test_sd3_in_fp8_and_mixed_components(files, reference):
    engine = make_engine(files, parse_plan("none", "transformer=fp8,t5=nf4"), "sd3")
    pipe = engine.model.pipe
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert type(pipe.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q).__name__ == "Linear4bit"
    assert mean_levels(pixels(engine), reference["sd3"]) < NF4_MEAN_LEVELS


# --- what cannot be done -------------------------------------------------------------------------------


def test_the_app_wide_setting_skips_sd15_and_still_quantizes_flux(files, caplog):
    """--quantize is app-wide: an SD 1.x model loads unquantized (logged once) instead of being refused."""
    import bitsandbytes as bnb

    from lorapg.diffusion import pipeline_loader

    pipeline_loader._note_app_wide_skip.cache_clear()  # "once" is per process; count from here
    engine = DiffusionEngine(LoraLibrary(files["loras"]), torch.device("cpu"), torch.float32, quantize=parse_plan(NF4))
    notes = []
    with caplog.at_level("INFO", logger="lorapg.diffusion.pipeline_loader"):
        engine.load_model(str(files["sd15"]), on_status=notes.append)
        assert engine.model.family == "sd1"
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in engine.model.pipe.unet.modules())
        pixels(engine)
        engine.load_model(str(files["flux"]))  # the same setting still quantizes Flux
        assert isinstance(engine.model.pipe.transformer.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)
        engine.load_model(str(files["sd15"]), on_status=notes.append)
    skipped = [r for r in caplog.records if "applies to Flux.1 and SD 3.5 models only" in r.getMessage()]
    assert len(skipped) == 1
    assert sum("SD 1.x loads unquantized" in note for note in notes) == 2  # the status says it on each load


def test_out_of_memory_while_quantizing_is_reported_as_such(files, monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setitem(quantization._CONVERTERS, NF4, out_of_memory)
    engine = DiffusionEngine(LoraLibrary(files["loras"]), torch.device("cpu"), torch.float32, quantize=parse_plan(NF4))
    with pytest.raises(UserError, match=r"^Out of GPU memory while storing the transformer as nf4\. Close") as caught:
        engine.load_model(str(files["flux"]))
    assert "other mode" not in str(caught.value)
    assert engine.model is None


def test_missing_bitsandbytes_says_what_to_install(files, monkeypatch):
    engine = DiffusionEngine(LoraLibrary(files["loras"]), torch.device("cpu"), torch.float32, quantize=parse_plan(NF4))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what a missing package looks like to import
    with pytest.raises(UserError, match=r"Setting quantize=nf4 needs bitsandbytes.*pip install.*fp8 or none"):
        engine.load_model(str(files["flux"]))
    assert engine.model is None
    monkeypatch.undo()  # bitsandbytes is back (the same module object, with its submodules)
    engine.load_model(str(files["flux"]))  # the same engine loads once bitsandbytes is back
    assert engine.model is not None


def test_fp8_without_float8_support_says_what_to_use(files, monkeypatch):
    monkeypatch.setattr(quantization, "FP8_STORAGE", None)
    engine = DiffusionEngine(LoraLibrary(files["loras"]), torch.device("cpu"), torch.float32, quantize=parse_plan(FP8))
    with pytest.raises(UserError, match=r"Setting quantize=fp8 needs float8 tensors.*use quantize=nf4 or none"):
        engine.load_model(str(files["flux"]))


# --- the documented memory ------------------------------------------------------------------------------

# Billions of parameters (counted in diffusers/transformers, as the README lists them): the transformer,
# its modulation Linears (fp8 keeps them in bf16: diffusers' "norm" skip pattern), CLIP + VAE.
TRANSFORMERS = {"Flux.1 dev": (11.90, 3.25, 0.12 + 0.08), "SD 3.5 Large": (8.06, 2.69, 0.81 + 0.08)}
TRANSFORMERS["SD 3.5 Medium"] = (2.24, 0.77, 0.81 + 0.08)
T5_TOTAL, T5_KEPT = 4.76, 1.01 + 0.13  # "wo" and the token embedding stay bf16 in both modes
BYTES = {"bf16": 2.0, "fp8": 1.0, "nf4": 0.53}


def estimate_gb(model: str, mode: str) -> float:
    total, modulation, rest = TRANSFORMERS[model]
    kept_in_transformer = modulation if mode == "fp8" else 0.0  # NF4 replaces every Linear
    transformer = (total - kept_in_transformer) * BYTES[mode] + kept_in_transformer * 2
    t5 = (T5_TOTAL - T5_KEPT) * BYTES[mode] + T5_KEPT * 2 if mode != "bf16" else T5_TOTAL * 2
    return transformer + t5 + rest * 2


def test_the_readme_memory_estimates_count_what_stays_in_bf16():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = {
        cells[0]: cells[1:4]
        for line in readme.splitlines()
        if (cells := [c.strip() for c in line.strip("|").split("|")])
    }
    checked = 0
    for model in TRANSFORMERS:
        for cell, mode in zip(rows[model], ("bf16", "fp8", "nf4"), strict=True):
            if not cell.endswith(" E"):
                continue  # a published figure, cited as it is
            assert abs(float(cell.removeprefix("~").removesuffix(" E")) - estimate_gb(model, mode)) < 0.2, (model, mode)
            checked += 1
    assert checked == 7
    import argparse

    from lorapg.cli import add_settings_arguments

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert "12-24 GB" not in help_text
    assert "~21 GB in fp8" in help_text
