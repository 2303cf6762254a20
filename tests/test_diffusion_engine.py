"""The diffusion engine on tiny SD 1.x and SDXL models loaded through the user's code path."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from lorapg.diffusion.engine import DiffusionEngine, clip_skipped_embeddings
from lorapg.diffusion.families import SD1, SDXL
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.diffusion.samplers import SAMPLERS
from lorapg.errors import UserError
from tests.reproducibility import assert_batch_item_matches_alone, assert_same_bytes, assert_visibly_different


def make_engine(loras_dir) -> DiffusionEngine:
    return DiffusionEngine(LoraLibrary(loras_dir), torch.device("cpu"), torch.float32)


def pixels(engine: DiffusionEngine, loras=(), **overrides) -> np.ndarray:
    request = GenerationRequest(
        prompt=overrides.pop("prompt", "a red fox in the snow"),
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        steps=overrides.pop("steps", 3),
        seed=overrides.pop("seed", 1234),
        **overrides,
    )
    result = engine.generate(request)
    return np.stack([np.asarray(image, dtype=np.int16) for image in result.images])


@pytest.fixture(scope="module")
def sd15_engine(tiny_models):
    engine = make_engine(tiny_models["loras"])
    engine.load_model(str(tiny_models["sd15"]))
    return engine


def test_family_and_native_size_are_detected(tiny_models, sd15_engine):
    assert sd15_engine.model.family == SD1
    assert sd15_engine.model.native_size == 64  # UNet sample size 32 × VAE factor 2
    xl = make_engine(tiny_models["loras"])
    xl.load_model(str(tiny_models["sdxl"]))
    assert xl.model.family == SDXL
    result = xl.generate(GenerationRequest(prompt="a cat", steps=2, seed=7))
    assert result.images[0].size == (64, 64)  # width/height default to the native size


def test_same_seed_same_pixels_and_different_seed_differs(sd15_engine):
    first = pixels(sd15_engine)
    again = pixels(sd15_engine)
    other = pixels(sd15_engine, seed=1235)
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 10


def test_lora_scale_zero_equals_no_lora_and_scales_differ(sd15_engine):
    base = pixels(sd15_engine)
    zero = pixels(sd15_engine, loras=[("style", 0.0)])
    half = pixels(sd15_engine, loras=[("style", 0.5)])
    full = pixels(sd15_engine, loras=[("style", 1.2)])
    assert np.array_equal(base, zero)
    assert np.abs(half - base).max() > 10
    assert np.abs(full - half).max() > 10
    # Deselecting every LoRA gives the base image back.
    assert np.array_equal(pixels(sd15_engine), base)


def test_kohya_and_diffusers_layouts_give_the_same_pixels(sd15_engine):
    diffusers_layout = pixels(sd15_engine, loras=[("style", 0.8)])
    kohya_layout = pixels(sd15_engine, loras=[("style_kohya", 0.8)])
    assert np.abs(diffusers_layout - kohya_layout).max() <= 1


def test_two_loras_combine(sd15_engine):
    one = pixels(sd15_engine, loras=[("style", 0.7)])
    both = pixels(sd15_engine, loras=[("style", 0.7), ("other", 0.9)])
    assert np.abs(one - both).max() > 10


def test_selection_changes_do_not_touch_the_disk(tiny_models, tmp_path, monkeypatch):
    """LoRA files are read once: after the first use the files (and the base model) can vanish."""
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    model = tmp_path / "sd15"
    shutil.copytree(tiny_models["sd15"], model)
    engine = make_engine(loras)
    engine.load_model(str(model))
    first = pixels(engine, loras=[("style", 0.5), ("other", 1.0)])
    read_before = engine.model.adapters.files_read
    assert read_before == 2

    import safetensors.torch

    def no_reads(*args, **kwargs):
        raise AssertionError("a LoRA file was read again")

    monkeypatch.setattr(safetensors.torch, "load_file", no_reads)
    shutil.rmtree(model)  # a base-model reload would fail now
    pixels(engine, loras=[("other", 0.3)])
    pixels(engine, loras=[("style", 1.5), ("other", 0.1)])
    again = pixels(engine, loras=[("style", 0.5), ("other", 1.0)])
    assert np.array_equal(first, again)
    assert engine.model.adapters.files_read == read_before


def test_batch_uses_consecutive_seeds_each_reproducible(sd15_engine):
    request = GenerationRequest(prompt="a boat", steps=2, seed=40, batch_size=3)
    batch = sd15_engine.generate(request)
    assert batch.seeds == [40, 41, 42]
    for image, again in zip(batch.images, sd15_engine.generate(request).images, strict=True):
        assert_same_bytes(image, again)  # the same request: the same bytes
    # A batch runs other matrix kernels than one image: each item alone is within the stated bound.
    alone = [sd15_engine.generate(replace(request, seed=seed, batch_size=1)).images[0] for seed in batch.seeds]
    for image, single in zip(batch.images, alone, strict=True):
        assert_batch_item_matches_alone(image, single)
    assert_visibly_different(batch.images[1], alone[2])  # the bound cannot hide another seed


def test_random_seed_is_reported_and_reproduces(sd15_engine):
    result = sd15_engine.generate(GenerationRequest(prompt="a hill", steps=2, seed=-1))
    assert 0 <= result.seeds[0] < 2**32
    again = sd15_engine.generate(GenerationRequest(prompt="a hill", steps=2, seed=result.seeds[0]))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(again.images[0]))


# What each A1111 sampler name must run, written out here (not read from SAMPLERS) so a wrong mapping fails.
EXPECTED_SCHEDULERS = {
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DDIM": (DDIMScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {"use_karras_sigmas": False}),
    "Heun": (HeunDiscreteScheduler, {"use_karras_sigmas": False}),
    "LMS": (LMSDiscreteScheduler, {"use_karras_sigmas": False}),
}


def test_every_offered_sampler_has_an_expected_scheduler():
    assert set(EXPECTED_SCHEDULERS) == set(SAMPLERS)


# Karras first, then its plain namesake: a setting left over from the previous sampler would show.
@pytest.mark.parametrize(
    "sampler",
    [
        "DPM++ 2M Karras",
        "DPM++ 2M",
        "Euler a",
        "Euler",
        "DDIM",
        "DPM++ 2M SDE",
        "DPM++ 2M SDE Karras",
        "UniPC",
        "Heun",
        "LMS",
    ],
)
def test_every_sampler_runs_its_own_scheduler(sd15_engine, sampler):
    result = sd15_engine.generate(GenerationRequest(prompt="a tree", steps=3, seed=3, sampler=sampler))
    assert result.images[0].size == (64, 64)
    scheduler = sd15_engine.model.pipe.scheduler
    expected_class, expected_config = EXPECTED_SCHEDULERS[sampler]
    assert type(scheduler) is expected_class
    assert {key: scheduler.config.get(key) for key in expected_config} == expected_config
    # The rest comes from the model's own scheduler config (the tiny model trains on 1000 steps, scaled_linear).
    assert scheduler.config.num_train_timesteps == sd15_engine.model.base_scheduler_config["num_train_timesteps"]
    assert scheduler.config.beta_schedule == sd15_engine.model.base_scheduler_config["beta_schedule"]


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Heun", "UniPC"])  # schedulers that keep state between steps
def test_the_same_sampler_reuses_its_scheduler_with_the_same_image(sd15_engine, sampler):
    """Building a scheduler for every generation was waste; reusing it must not change a pixel,
    even after a run cancelled half-way left its step state behind."""
    pixels(sd15_engine, sampler="Euler")  # another sampler first: the next scheduler is a fresh one
    fresh = pixels(sd15_engine, sampler=sampler, steps=4)
    scheduler = sd15_engine.model.pipe.scheduler
    assert_same_bytes(pixels(sd15_engine, sampler=sampler, steps=4), fresh)
    assert sd15_engine.model.pipe.scheduler is scheduler  # not built again from the config
    request = GenerationRequest(prompt="a red fox in the snow", steps=4, seed=1234, sampler=sampler)
    assert sd15_engine.generate(request, should_cancel=lambda: True).cancelled  # stops after its first step
    assert sd15_engine.model.pipe.scheduler is scheduler
    assert_same_bytes(pixels(sd15_engine, sampler=sampler, steps=4), fresh)
    pixels(sd15_engine, sampler="Euler")
    assert type(sd15_engine.model.pipe.scheduler) is EulerDiscreteScheduler  # another sampler: its own scheduler


def test_samplers_give_different_images(sd15_engine):
    euler = pixels(sd15_engine, sampler="Euler")
    ddim = pixels(sd15_engine, sampler="DDIM")
    assert np.abs(euler - ddim).max() > 0


def test_cancel_stops_within_a_step(sd15_engine):
    steps_seen = []

    def on_step(step, total, preview):
        steps_seen.append(step)

    request = GenerationRequest(prompt="a cat", steps=20, seed=1, batch_size=2)
    result = sd15_engine.generate(request, on_step=on_step, should_cancel=lambda: len(steps_seen) >= 3)
    assert result.cancelled
    assert max(steps_seen) <= 4  # asked after step 3: at most the step in flight finishes
    # What it had is decoded and returned, as A1111's interrupt does: a partly denoised image per seed.
    assert [image.size for image in result.images] == [(64, 64)] * 2 and result.seeds == [1, 2]
    finished = sd15_engine.generate(request)
    assert not finished.cancelled
    assert_visibly_different(result.images[0], finished.images[0])


def test_clip_skip_2_changes_the_image_and_1_is_the_default(sd15_engine):
    default = pixels(sd15_engine)
    assert np.array_equal(pixels(sd15_engine, clip_skip=1), default)  # 1 = no skip: the same code path
    assert np.abs(pixels(sd15_engine, clip_skip=2) - default).max() > 10
    # A1111's "Clip skip: 2" reads the penultimate layer (then the final layer norm) for both prompts.
    model = sd15_engine.model
    request = GenerationRequest(prompt="a red fox", negative_prompt="blurry", clip_skip=2)
    embeds = clip_skipped_embeddings(model.pipe, request, 2)
    tokenizer, encoder = model.pipe.tokenizer, model.pipe.text_encoder
    for text, got in ((request.prompt, embeds["prompt_embeds"]), ("blurry", embeds["negative_prompt_embeds"])):
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            output = encoder(ids.input_ids, output_hidden_states=True)
            penultimate = encoder.final_layer_norm(output.hidden_states[1])  # 2 layers: [embeddings, 1, 2]
        assert torch.allclose(got, penultimate, atol=1e-5)
        assert not torch.allclose(got, output.last_hidden_state, atol=1e-3)


def test_clip_skip_is_checked_against_the_range_and_the_model(sd15_engine):
    with pytest.raises(UserError, match=r"Clip skip must be 1–12 \(1 = no skip\), got 0"):
        pixels(sd15_engine, clip_skip=0)
    with pytest.raises(UserError, match="Clip skip must be at most 2 for this model"):
        pixels(sd15_engine, clip_skip=3)  # the tiny text encoder has 2 layers


def test_previews_come_every_few_steps(sd15_engine):
    previews = []
    sd15_engine.generate(
        GenerationRequest(prompt="a cat", steps=11, seed=1),
        on_step=lambda step, total, preview: previews.append((step, preview)),
    )
    with_image = [step for step, preview in previews if preview is not None]
    assert with_image == [5, 10]
    assert [step for step, _ in previews] == list(range(1, 12))


def test_long_prompt_is_chunked_not_cut_and_not_warned_about(sd15_engine):
    """Past 75 tokens the prompt is encoded in chunks (tests/test_prompt_syntax.py checks the tail counts)."""
    prompt = "a very long prompt about a castle " * 5
    result = sd15_engine.generate(GenerationRequest(prompt=prompt, steps=2, seed=1))
    assert len(result.images) == 1
    assert result.warnings == []


def test_vae_tiling_turns_on_only_for_large_sizes(sd15_engine):
    sd15_engine.generate(GenerationRequest(prompt="x", steps=1, seed=1, width=64, height=64))
    assert not sd15_engine.model.pipe.vae.use_tiling
    sd15_engine.generate(GenerationRequest(prompt="x", steps=1, seed=1, width=128, height=64))
    assert sd15_engine.model.pipe.vae.use_tiling


def test_sdxl_lora_on_sd15_is_a_clear_error(sd15_engine):
    with pytest.raises(UserError, match="made for SDXL.*SD 1.x"):
        pixels(sd15_engine, loras=[("xl/xl_style", 1.0)])
    # The engine still works afterwards.
    assert pixels(sd15_engine).shape == (1, 64, 64, 3)


def test_lora_without_family_metadata_that_does_not_fit_is_a_clear_error(tiny_models):
    """An SD 1.x LoRA on SDXL says nothing about its family; the shape mismatch is reported."""
    engine = make_engine(tiny_models["loras"])
    engine.load_model(str(tiny_models["sdxl"]))
    with pytest.raises(UserError, match="does not fit the loaded SDXL model"):
        engine.generate(GenerationRequest(prompt="x", loras=(LoraRequest("style", 1.0),), steps=1, seed=1))
    assert engine.generate(GenerationRequest(prompt="x", steps=1, seed=1)).images


def test_sdxl_lora_changes_sdxl_images(tiny_models):
    engine = make_engine(tiny_models["loras"])
    engine.load_model(str(tiny_models["sdxl"]))
    base = pixels(engine, steps=2)
    styled = pixels(engine, loras=[("xl/xl_style", 1.0)], steps=2)
    zero = pixels(engine, loras=[("xl/xl_style", 0.0)], steps=2)
    assert np.abs(styled - base).max() > 10
    assert np.array_equal(zero, base)


def test_sdxl_ignores_clip_skip_as_a1111_does_and_says_so(tiny_models):
    engine = make_engine(tiny_models["loras"])
    engine.load_model(str(tiny_models["sdxl"]))
    request = GenerationRequest(prompt="a cat", steps=2, seed=3)
    skipped = engine.generate(replace(request, clip_skip=2))
    assert np.array_equal(np.asarray(skipped.images[0]), np.asarray(engine.generate(request).images[0]))
    assert any("Clip skip 2 applies to SD 1.x models only" in warning for warning in skipped.warnings)


def test_switching_models_keeps_serving(tiny_models):
    engine = make_engine(tiny_models["loras"])
    engine.load_model(str(tiny_models["sd15"]))
    engine.load_model(str(tiny_models["sdxl"]))
    assert engine.model.family == SDXL
    with pytest.raises(UserError, match="does not exist"):
        engine.load_model(str(tiny_models["root"] / "missing-model"))
    assert engine.model.family == SDXL  # a failed load leaves the current model in place


def test_lora_names_that_sanitise_alike_stay_distinct(tiny_models, tmp_path):
    """``a-b`` and ``a_b`` become the same peft-safe text; both must still apply."""
    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(tiny_models["loras"] / "style.safetensors", loras / "a-b.safetensors")
    shutil.copy(tiny_models["loras"] / "other.safetensors", loras / "a_b.safetensors")
    engine = make_engine(loras)
    engine.load_model(str(tiny_models["sd15"]))
    one = pixels(engine, loras=[("a-b", 0.8)])
    other = pixels(engine, loras=[("a_b", 0.8)])
    both = pixels(engine, loras=[("a-b", 0.8), ("a_b", 0.8)])
    assert engine.model.adapters.files_read == 2
    assert np.abs(one - both).max() > 10 and np.abs(other - both).max() > 10
    assert np.array_equal(pixels(engine, loras=[("a-b", 0.8)]), one)  # neither replaced the other
