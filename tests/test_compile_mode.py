"""``--compile``: the UNet is compiled once, and changing LoRAs (files, scales, none) never recompiles it.

On CPU the UNet is compiled with dynamo's ``eager`` backend: the same tracing and guards as inductor
(which decide whether a change recompiles), without inductor's code generation. The CUDA test at the
end uses inductor, what the product uses. Images are compared with an uncompiled engine, where LoRAs
are fused peft adapters: another code path, so within a stated tolerance.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch._dynamo
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from lorapg.cli import build_parser, settings_from_args
from lorapg.config import load_settings
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.errors import UserError
from tests.test_lycoris import loha

LEVELS = 2  # weight patches against fused peft adapters: the same ΔW, rounded in another order
# (max, mean) pixel levels between the two engines. bf16 keeps 8 mantissa bits: on the tiny random
# model either engine lies ~1-2 levels (mean) from fp32, with single pixels up to ~90 off (seen), while a
# LoRA moves the image by 10-30 levels (mean); so in bf16 the mean is what tells a wrong patch apart.
# fp16 (10 mantissa bits, seen on CPU): ~0.1-0.7 levels (mean), single pixels up to ~30 off, either engine.
FP32_TOLERANCE = (LEVELS, 0.5)
FP16_TOLERANCE = (64, 1.5)
BF16_TOLERANCE = (160, 2.5)
SEQUENCE = [  # A, B, A at another scale, a stack with a LyCORIS file, a diffusers/kohya pair, none
    [("style", 0.8)],
    [("other", 1.0)],
    [("style", 0.4)],
    [("loha", 0.7), ("other", 0.5)],
    [("style_kohya", 1.0), ("style", 0.5)],
    [],
]


@pytest.fixture(scope="module")
def lora_dir(tiny_models, tmp_path_factory):
    """The session's SD 1.x LoRAs (diffusers and kohya layouts) plus a LoHa file, which only patches can apply."""
    folder = tmp_path_factory.mktemp("compile_loras")
    for name in ("style", "style_kohya", "other"):
        shutil.copy(tiny_models["loras"] / f"{name}.safetensors", folder)
    engine = DiffusionEngine(LoraLibrary(folder), torch.device("cpu"), torch.float32)
    tensors, _ = loha(engine.load_model(str(tiny_models["sd15"])).pipe)
    save_file(tensors, str(folder / "loha.safetensors"))
    return folder


def make_engine(tiny_models, lora_dir, device="cpu", dtype=torch.float32, **compile_options) -> DiffusionEngine:
    engine = DiffusionEngine(LoraLibrary(lora_dir), torch.device(device), dtype, **compile_options)
    engine.load_model(str(tiny_models["sd15"]))
    return engine


def pixels(engine: DiffusionEngine, loras=()) -> np.ndarray:
    request = GenerationRequest(
        prompt="a red fox in the snow",
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        steps=3,
        seed=1234,
    )
    return np.stack([np.asarray(image, dtype=np.int16) for image in engine.generate(request).images])


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def within(a: np.ndarray, b: np.ndarray, tolerance: tuple[float, float]) -> bool:
    most, mean = tolerance
    return max_diff(a, b) <= most and float(np.abs(a - b).mean()) <= mean


@contextmanager
def recompiles_refused():
    """Any recompilation inside raises; also yields a function that counts the graphs compiled so far."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield lambda: counters["stats"]["unique_graphs"]


def peft_layers(engine: DiffusionEngine) -> list[str]:
    return [name for name, module in engine.model.pipe.unet.named_modules() if isinstance(module, BaseTunerLayer)]


def run_sequence_without_recompiling(
    compiled: DiffusionEngine, reference: DiffusionEngine, tolerance: tuple[float, float]
) -> None:
    torch._dynamo.reset()  # graphs other tests compiled must not hide or cause a recompile here
    first = pixels(compiled)  # traces and compiles the UNet once
    assert within(first, pixels(reference), tolerance)
    graphs_before = counters["stats"]["unique_graphs"]
    assert graphs_before >= 1, "the UNet was not compiled"
    with recompiles_refused() as graphs:
        for selection in SEQUENCE:
            image = pixels(compiled, selection)
            assert within(image, pixels(reference, selection), tolerance), selection
            if selection:
                assert np.abs(image - first).mean() > 2 * tolerance[1], f"{selection} changed nothing"
        assert graphs() == graphs_before
    assert peft_layers(compiled) == []  # no peft wrapper ever entered the compiled UNet
    assert max_diff(pixels(compiled), first) == 0  # the weights are the exact base weights again


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [
        pytest.param(torch.float32, FP32_TOLERANCE, id="fp32"),
        pytest.param(torch.bfloat16, BF16_TOLERANCE, id="bf16"),
    ],
)
def test_changing_loras_does_not_recompile_and_images_match_the_uncompiled_engine(
    tiny_models, lora_dir, dtype, tolerance
):
    compiled = make_engine(tiny_models, lora_dir, dtype=dtype, compile_unet=True, compile_backend="eager")
    reference = make_engine(tiny_models, lora_dir, dtype=dtype)
    run_sequence_without_recompiling(compiled, reference, tolerance)
    assert compiled.model.adapters.files_read == 4  # each file read once, however often it was selected


def test_sdxl_diffusers_lora_with_both_text_encoders_in_compile_mode(tiny_models):
    """An SDXL file in diffusers layout (unet, text_encoder, text_encoder_2) renamed to lora_unet/te1/te2."""
    folder = tiny_models["loras"] / "xl"
    compiled = DiffusionEngine(
        LoraLibrary(folder), torch.device("cpu"), torch.float32, compile_unet=True, compile_backend="eager"
    )
    compiled.load_model(str(tiny_models["sdxl"]))
    reference = DiffusionEngine(LoraLibrary(folder), torch.device("cpu"), torch.float32)
    reference.load_model(str(tiny_models["sdxl"]))
    torch._dynamo.reset()
    base = pixels(compiled)
    with recompiles_refused():
        for selection in ([("xl_style", 1.0)], [("xl_style", 0.5)], []):
            assert max_diff(pixels(compiled, selection), pixels(reference, selection)) <= LEVELS, selection
    assert max_diff(pixels(compiled, [("xl_style", 1.0)]), base) > 2 * LEVELS
    patched = {
        module.name.split("_")[1] for file in compiled.model.adapters.patches._files.values() for module in file.modules
    }
    assert patched == {"unet", "te1", "te2"}
    assert peft_layers(compiled) == []


@pytest.mark.gpu
def test_inductor_on_cuda_changing_loras_does_not_recompile(tiny_models, lora_dir):
    compiled = make_engine(tiny_models, lora_dir, "cuda", torch.float16, compile_unet=True)
    reference = make_engine(tiny_models, lora_dir, "cuda", torch.float16)
    assert compiled.compile_backend == "inductor"
    run_sequence_without_recompiling(compiled, reference, FP16_TOLERANCE)


def test_a_diffusers_file_in_compile_mode_keeps_its_alpha(tiny_models, lora_dir, tmp_path):
    """``style`` (diffusers layout, alpha 2, rank 4) and ``style_kohya`` (the same weights) give one image."""
    patching = make_engine(tiny_models, lora_dir)
    patching.model.adapters.patch_everything = True  # compile mode's LoRA path, without compiling (not tested here)
    renamed = pixels(patching, [("style", 1.0)])
    kohya = pixels(patching, [("style_kohya", 1.0)])
    assert max_diff(renamed, pixels(patching)) > 2 * LEVELS
    assert max_diff(renamed, kohya) <= 1


def test_a_peft_dora_file_is_refused_in_compile_mode_and_the_engine_keeps_serving(tiny_models, lora_dir, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(lora_dir / "style.safetensors", folder)
    state = load_file(str(lora_dir / "style.safetensors"))
    key = next(k for k in state if k.startswith("unet.") and k.endswith("lora_A.weight"))
    state[key.replace("lora_A.weight", "lora_magnitude_vector")] = torch.ones(state[key].shape[1])
    save_file(state, str(folder / "dora.safetensors"), metadata={"format": "pt"})
    patching = make_engine(tiny_models, folder)
    patching.model.adapters.patch_everything = True  # compile mode's LoRA path; the refusal comes before any step
    with pytest.raises(UserError, match=r"LoRA dora cannot be used with --compile: .*lora_magnitude_vector"):
        pixels(patching, [("dora", 1.0)])
    assert pixels(patching, [("style", 1.0)]).shape[0] == 1


def test_peft_metadata_alpha_pattern_and_rslora_give_the_scale_peft_gives(tiny_models, lora_dir, tmp_path):
    """The renamed file keeps peft's per-module scale: alpha_pattern overrides alpha, rsLoRA divides by √r."""
    from lorapg.diffusion.compile_mode import diffusers_lora_as_kohya

    engine = make_engine(tiny_models, lora_dir)
    state = load_file(str(lora_dir / "style.safetensors"))
    config = {"r": 4, "lora_alpha": 2.0, "alpha_pattern": {"attn1.to_q": 8.0}, "use_rslora": True}
    metadata = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()}), "format": "pt"}
    unet_only = {k: v for k, v in state.items() if k.startswith("unet.")}
    save_file(unet_only, str(tmp_path / "rs.safetensors"), metadata=metadata)
    converted = diffusers_lora_as_kohya(engine.model.pipe, str(tmp_path / "rs.safetensors"))
    alphas = {k: float(v) for k, v in converted.items() if k.endswith(".alpha")}
    assert len(alphas) == len(unet_only) // 2
    for name, alpha in alphas.items():
        expected = 8.0 if name.endswith("attn1_to_q.alpha") else 2.0
        # kohya's scale alpha' / r must equal rsLoRA's alpha / sqrt(r)
        assert alpha / 4 == pytest.approx(expected / 4**0.5), name


def test_compile_flag_setting_and_environment(tmp_path, monkeypatch):
    assert load_settings(environ={}).compile_unet is False
    assert load_settings(environ={"LORAPG_COMPILE_UNET": "true"}).compile_unet is True
    config = tmp_path / "settings.toml"
    config.write_text("compile_unet = true\n")
    assert load_settings(config, environ={}).compile_unet is True
    args = build_parser().parse_args(["generate", "--prompt", "x", "--out", str(tmp_path / "a.png"), "--compile"])
    monkeypatch.delenv("LORAPG_COMPILE_UNET", raising=False)
    assert settings_from_args(args).compile_unet is True


def test_the_services_build_a_compiling_engine_from_the_setting(tmp_path):
    from lorapg.services.build import build_services

    overrides = {
        "compile_unet": True,
        "outputs": str(tmp_path / "out"),
        "models_dir": str(tmp_path / "models"),
        "lora_dir": str(tmp_path),
        "device": "cpu",
        "threads": 1,
    }
    services = build_services(load_settings(overrides=overrides, environ={}))
    try:
        assert services.engine.compile_unet is True
        assert services.engine.compile_backend == "inductor"
    finally:
        services.jobs.close(timeout=10)
