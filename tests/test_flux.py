"""Flux.1 and SD 3.5 through the user's path: tiny pipelines (CLIP + T5 with tokenizers made in code),
loaded from a diffusers folder and from a transformer-only file, generating through the engine and the
service, with LoRAs in the diffusers/peft (ai-toolkit) layout.

The kohya, XLabs and ComfyUI Flux layouts are loaded in test_flux_lora_layouts.py (diffusers' kohya Flux
converter hard-codes FLUX.1's sizes for ``single_blocks_N_linear1``: lorapg.diffusion.flux_kohya splits it);
here only their family detection (tensor names) is tested.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError
from PIL import Image
from safetensors.torch import load_file, save_file

from lorapg.diffusion import pipeline_loader
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.families import FLUX, SD1, SD3
from lorapg.diffusion.flux import FLUX_DEV, FLUX_SCHNELL, SD35_LARGE, family_defaults
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.model_source import FOLDER, SINGLE_FILE, resolve_model_source
from lorapg.diffusion.request import GenerationRequest, LoraRequest, validate
from lorapg.diffusion.samplers import FLOW_SAMPLERS, SAMPLERS
from lorapg.errors import UserError
from tests.tiny_flux import build_flux_pipeline, build_sd3_pipeline, save_peft_transformer_lora, save_transformer_file
from tests.tiny_models import build_sd15_pipeline, random_lora_state_dict, save_diffusers_lora


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flux")
    pipe = build_flux_pipeline(root / "flux")
    loras = root / "loras"
    save_peft_transformer_lora(loras / "flux_style.safetensors", pipe, seed=1)
    sd15 = build_sd15_pipeline(root / "sd15")
    state, config = random_lora_state_dict(sd15, seed=2)
    path = save_diffusers_lora(loras / "sd_style.safetensors", sd15, state, config)
    # A kohya SD 1.x LoRA says its family in its metadata, as sd-scripts writes it.
    save_file(load_file(str(path)), str(loras / "sd_tagged.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    save_transformer_file(root / "flux-transformer.safetensors", pipe)
    sd3 = build_sd3_pipeline(root / "sd3")
    save_transformer_file(root / "sd3-transformer.safetensors", sd3)
    # diffusers' SD 3 layout names no family; the modelspec metadata (as trainers write it) does.
    save_peft_transformer_lora(loras / "sd3_style.safetensors", sd3, seed=3)
    save_file(
        load_file(str(loras / "sd3_style.safetensors")),
        str(loras / "sd3_tagged.safetensors"),
        metadata={"modelspec.architecture": "stable-diffusion-v3-medium/lora"},
    )
    return {"root": root, "flux": root / "flux", "sd15": root / "sd15", "sd3": root / "sd3", "loras": loras}


@pytest.fixture(scope="module")
def engine(flux_files) -> DiffusionEngine:
    engine = DiffusionEngine(LoraLibrary(flux_files["loras"]), torch.device("cpu"), torch.float32, preview_every=1)
    engine.load_model(str(flux_files["flux"]))
    return engine


def pixels(engine: DiffusionEngine, loras=(), **overrides) -> np.ndarray:
    request = GenerationRequest(
        prompt=overrides.pop("prompt", "a red fox"),
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        steps=overrides.pop("steps", 3),
        seed=overrides.pop("seed", 7),
        sampler=overrides.pop("sampler", "Euler"),
        **overrides,
    )
    return np.stack([np.asarray(image, dtype=np.int16) for image in engine.generate(request).images])


# --- family and loading ---------------------------------------------------------------------------


def test_folder_is_detected_as_flux(flux_files, engine):
    assert resolve_model_source(str(flux_files["flux"])).kind == FOLDER
    assert engine.model.family == FLUX
    assert engine.model.native_size == 32  # the tiny VAE's sample size (FLUX.1's VAE says 1024)
    assert family_defaults(FLUX, engine.model.pipe) == FLUX_DEV  # a guidance embedding: dev, not schnell


def test_schnell_takes_no_guidance(flux_files):
    engine = DiffusionEngine(LoraLibrary(flux_files["loras"]), torch.device("cpu"), torch.float32)
    folder = flux_files["root"] / "schnell"
    build_flux_pipeline(folder, guidance_embeds=False)
    engine.load_model(str(folder))
    assert family_defaults(FLUX, engine.model.pipe) == FLUX_SCHNELL
    result = engine.generate(GenerationRequest("a fox", steps=2, seed=1, guidance_scale=3.5, sampler="Euler"))
    assert result.request.guidance_scale == 0 and any("takes no guidance" in w for w in result.warnings)


def test_transformer_file_loads_with_model_config(flux_files, engine):
    path = flux_files["root"] / "flux-transformer.safetensors"
    source = resolve_model_source(str(path))
    assert (source.kind, source.family) == (SINGLE_FILE, FLUX)
    single = DiffusionEngine(
        LoraLibrary(flux_files["loras"]), torch.device("cpu"), torch.float32, single_file_config=str(flux_files["flux"])
    )
    single.load_model(str(path))
    assert single.model.family == FLUX
    # The same weights and the same computation: the images agree (a level of tolerance for kernels).
    assert np.abs(pixels(single) - pixels(engine)).max() <= 1


def test_transformer_file_offline_without_model_config_says_what_to_pass(flux_files, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    single = DiffusionEngine(LoraLibrary(flux_files["loras"]), torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="--model-config") as caught:
        single.load_model(str(flux_files["root"] / "flux-transformer.safetensors"))
    assert "\n" not in str(caught.value)


def test_gated_repo_says_how_to_accept_the_licence(monkeypatch):
    import httpx

    def gated(*args, **kwargs):  # what huggingface_hub raises for a gated repo without a token
        response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))
        raise GatedRepoError("Access to model black-forest-labs/FLUX.1-dev is restricted.", response=response)

    monkeypatch.setattr(pipeline_loader.DiffusionPipeline, "download", gated)
    with pytest.raises(UserError, match="licence") as caught:
        pipeline_loader.download_from_hub("black-forest-labs/FLUX.1-dev", torch.device("cpu"))
    assert "hf auth login" in str(caught.value) and "https://huggingface.co/black-forest-labs/FLUX.1-dev" in str(
        caught.value
    )


# --- generating ------------------------------------------------------------------------------------


def test_size_seed_and_previews(engine):
    previews: list[Image.Image | None] = []
    request = GenerationRequest(prompt="a red fox", steps=3, seed=11, sampler="Euler")
    result = engine.generate(request, on_step=lambda step, total, preview: previews.append(preview))
    assert result.images[0].size == (32, 32)  # the native size by default
    assert [p is not None for p in previews] == [True, True, False]  # every step but the last (preview_every=1)
    assert previews[0].size == (32, 32)  # packed latents unpacked, then decoded
    again = engine.generate(request)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(again.images[0]))  # same seed, same bytes
    assert np.abs(pixels(engine, seed=11) - pixels(engine, seed=12)).max() > 10
    assert engine.generate(GenerationRequest("a fox", steps=2, seed=1, width=48, height=32)).images[0].size == (48, 32)


def test_cancel_stops_after_the_step(engine):
    steps: list[int] = []
    result = engine.generate(
        GenerationRequest("a fox", steps=5, seed=1, sampler="Euler"),
        on_step=lambda step, total, preview: steps.append(step),
        should_cancel=lambda: len(steps) >= 2,
    )
    assert result.cancelled and steps == [1, 2]


def test_sd_only_settings_are_ignored_with_a_warning_or_refused(engine):
    result = engine.generate(
        GenerationRequest("a fox", negative_prompt="blurry", clip_skip=2, steps=2, seed=1, sampler="DPM++ 2M Karras")
    )
    text = " ".join(result.warnings)
    assert "negative prompt" in text and "Clip skip" in text and "DPM++ 2M Karras" in text
    assert result.request.sampler == "Euler" and result.request.negative_prompt == ""  # what the PNG will say
    with pytest.raises(UserError, match="Width must be a multiple of 16"):
        engine.generate(GenerationRequest("a fox", steps=2, seed=1, width=40, height=32))
    with pytest.raises(UserError, match="Variation strength"):
        engine.generate(GenerationRequest("a fox", steps=2, seed=1, variation_strength=0.3))
    from lorapg.diffusion.img2img import Img2ImgOptions

    init = Img2ImgOptions(image=Image.new("RGB", (32, 32), "gray"))
    with pytest.raises(UserError, match="img2img and inpainting are built for SD 1.x and SDXL"):
        engine.generate(GenerationRequest("a fox", steps=2, seed=1, width=32, height=32, img2img=init))


def test_sampler_list_is_the_family_s(engine, flux_files):
    for name in FLOW_SAMPLERS:
        assert pixels(engine, steps=2, sampler=name).shape == (1, 32, 32, 3)
    assert "Euler Beta" not in SAMPLERS
    with pytest.raises(UserError, match="does not apply to SD 1.x"):
        validate(GenerationRequest("a fox", sampler="Euler Beta"), 64, family=SD1)


# --- LoRAs -----------------------------------------------------------------------------------------


def test_lora_scale_zero_is_base_and_switching_back_restores_it(engine):
    base = pixels(engine)
    assert np.array_equal(pixels(engine, loras=[("flux_style", 0.0)]), base)
    styled = pixels(engine, loras=[("flux_style", 1.0)])
    assert np.abs(styled - base).max() > 10
    assert np.array_equal(pixels(engine), base)  # unfused: the exact base weights again
    reads = engine.model.adapters.files_read
    assert np.array_equal(pixels(engine, loras=[("flux_style", 1.0)]), styled)
    assert engine.model.adapters.files_read == reads  # switched without reading the file (or the base) again


def test_lora_families_are_detected_and_cross_family_refused(flux_files, engine):
    library = LoraLibrary(flux_files["loras"])
    assert library.resolve("flux_style").family == FLUX
    with pytest.raises(UserError, match="made for SD 1.x, but the loaded base model is Flux.1"):
        engine.generate(GenerationRequest("a fox", steps=2, seed=1, loras=(LoraRequest("sd_tagged", 1.0),)))
    sd = DiffusionEngine(library, torch.device("cpu"), torch.float32)
    sd.load_model(str(flux_files["sd15"]))
    with pytest.raises(UserError, match="made for Flux.1, but the loaded base model is SD 1.x"):
        sd.generate(GenerationRequest("a fox", steps=2, seed=1, loras=(LoraRequest("flux_style", 1.0),)))


@pytest.mark.parametrize(
    "key",
    [
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight",  # kohya sd-scripts
        "lora_unet_single_blocks_3_linear1.lora_down.weight",
        "double_blocks.0.processor.proj_lora1.down.weight",  # XLabs
        "diffusion_model.single_blocks.0.linear1.lora_A.weight",  # ComfyUI
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",  # diffusers / ai-toolkit
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight",  # kohya SD 3
    ],
)
def test_transformer_lora_layouts_are_recognised_from_their_names(tmp_path, key):
    up = key.replace("lora_down", "lora_up").replace("lora_A", "lora_B").replace(".down.", ".up.")
    save_file({key: torch.zeros(4, 8), up: torch.zeros(8, 4)}, str(tmp_path / "x.safetensors"))
    assert LoraLibrary(tmp_path).resolve("x").family == (SD3 if "joint_blocks" in key else FLUX)


# --- SD 3.5 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_engine(flux_files) -> DiffusionEngine:
    engine = DiffusionEngine(LoraLibrary(flux_files["loras"]), torch.device("cpu"), torch.float32, preview_every=1)
    engine.load_model(str(flux_files["sd3"]))
    return engine


def test_sd3_folder_and_transformer_file(flux_files, sd3_engine):
    assert (sd3_engine.model.family, sd3_engine.model.native_size) == (SD3, 32)
    assert family_defaults(SD3, sd3_engine.model.pipe) == SD35_LARGE
    path = flux_files["root"] / "sd3-transformer.safetensors"
    assert resolve_model_source(str(path)).family == SD3
    single = DiffusionEngine(
        LoraLibrary(flux_files["loras"]), torch.device("cpu"), torch.float32, single_file_config=str(flux_files["sd3"])
    )
    single.load_model(str(path))
    assert np.abs(pixels(single) - pixels(sd3_engine)).max() <= 1


def test_sd3_reads_the_negative_prompt_and_shows_previews(sd3_engine):
    previews: list = []
    result = sd3_engine.generate(
        GenerationRequest("a red fox", negative_prompt="blurry", steps=3, seed=7, sampler="Euler"),
        on_step=lambda step, total, preview: previews.append(preview),
    )
    assert result.warnings == [] and result.request.negative_prompt == "blurry"
    assert previews[0].size == (32, 32)
    without = pixels(sd3_engine)
    assert np.abs(np.asarray(result.images[0], dtype=np.int16) - without[0]).max() > 10  # real CFG with it
    for name in FLOW_SAMPLERS:
        assert pixels(sd3_engine, steps=2, sampler=name).shape == (1, 32, 32, 3)


def test_sd3_loras_scale_zero_and_cross_family(sd3_engine, engine):
    base = pixels(sd3_engine)
    assert np.array_equal(pixels(sd3_engine, loras=[("sd3_style", 0.0)]), base)
    assert np.abs(pixels(sd3_engine, loras=[("sd3_style", 1.0)]) - base).max() > 10
    assert np.array_equal(pixels(sd3_engine), base)
    with pytest.raises(UserError, match="made for Flux.1, but the loaded base model is SD 3.5"):
        pixels(sd3_engine, loras=[("flux_style", 1.0)])
    with pytest.raises(UserError, match="made for SD 3.5, but the loaded base model is Flux.1"):
        pixels(engine, loras=[("sd3_tagged", 1.0)])


# --- the service -----------------------------------------------------------------------------------


def test_service_generates_records_and_reuses(flux_files):
    from lorapg.config import load_settings
    from lorapg.services.build import build_services

    root = flux_files["root"]
    settings = load_settings(
        None,
        {
            "model": str(flux_files["flux"]),
            "lora_dir": str(flux_files["loras"]),
            "outputs": str(root / "outputs"),
            "models_dir": str(root / "models"),
            "device": "cpu",
            "threads": 1,
            "gallery_keep": 0,
        },
    )
    services = build_services(settings, prompts=False)
    try:
        service = services.service
        service.load_model()
        assert service.sampler_names() == list(FLOW_SAMPLERS)
        assert service.generation_defaults().steps == FLUX_DEV.steps
        request = GenerationRequest("a fox <lora:flux_style:0.8>", steps=2, seed=5, sampler="Euler Beta")
        result = service.generate(request)
        assert result.images[0].size == (32, 32) and result.family == FLUX
        record = services.gallery_service.list()[0]
        parameters = Image.open(services.gallery_service.image_path(record.id)).text["parameters"]
        assert "Sampler: Euler Beta" in parameters and "<lora:flux_style:0.8>" in parameters
        reuse = services.gallery_service.reuse_parameters(record.id)
        assert reuse.sampler == "Euler Beta" and reuse.seed == 5 and reuse.notes == []
    finally:
        services.jobs.shutdown()
