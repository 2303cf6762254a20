"""The trainer on tiny SD 1.x / SDXL models: loss, export, Generate uses it, resume, cancel, caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.families import SD1, SDXL
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.training import checkpoints
from lorapg.training.config import build_config
from lorapg.training.trainer import Trainer, make_buckets
from tests.training_data import write_images

SIZES = [(288, 288), (288, 288), (400, 288), (288, 400)]  # two square images, one landscape, one portrait


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_images")
    write_images(folder, 4, sizes=SIZES)
    return folder


def make_config(model, images, **overrides):
    values = dict(
        name="zqx_test",
        model=str(model),
        images=str(images),
        trigger="zqx",
        rank=4,
        alpha=4,
        unet_lr=3e-2,
        text_encoder_lr=1e-2,
        epochs=2,
        batch_size=1,
        sample_steps=0,
        gradient_checkpointing=False,
        save_precision="fp32",
        seed=7,
    )
    values.update(overrides)
    return build_config(values)


def train(tmp_path, config, **kwargs):
    return Trainer(
        config, lora_dir=tmp_path / "loras", work_dir=tmp_path / "work", device=torch.device("cpu"), **kwargs
    ).run()


@pytest.fixture(scope="module")
def sd15_run(tiny_models, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd15_run")
    config = make_config(
        tiny_models["sd15"],
        images,
        epochs=8,
        batch_size=4,
        train_text_encoder=True,
        sample_steps=2,
        gradient_checkpointing=True,
    )
    updates = []
    result = train(out, config, on_progress=updates.append)
    return result, updates, out


def test_loss_falls_and_progress_is_reported(sd15_run):
    result, updates, _ = sd15_run
    assert result.steps == result.total_steps == 24  # 3 buckets → 3 batches of ≤4 per epoch × 8 epochs
    losses = [loss for _, loss in result.losses]
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.02, losses
    train_updates = [u for u in updates if u.phase == "train"]
    assert [u.step for u in train_updates] == list(range(1, 25))
    last = train_updates[-1]
    assert last.epoch == 8 and last.steps_per_s > 0 and last.eta_s == 0
    assert "epoch 8/8, step 24/24, loss" in last.describe()
    assert sum(u.sample is not None for u in updates) == 8  # one sample per epoch
    assert len(result.samples) == 8 and all(p.is_file() for p in result.samples)


def test_export_is_kohya_with_metadata_and_listed_with_trigger(sd15_run):
    result, _, out = sd15_run
    keys = load_file(str(result.lora_path)).keys()
    modules = {k.rsplit(".", 2)[0] if "lora_" in k.rsplit(".", 2)[-2] else k.rsplit(".", 1)[0] for k in keys}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    for module in modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(keys)
    # Every attention projection of the tiny UNet (4 transformer blocks: down, mid, 2 up; × 2
    # attentions × q/k/v/out) and of the text encoder (2 layers × q/k/v/out) is trained.
    assert sum(m.startswith("lora_unet_") for m in modules) == 32
    assert sum(m.startswith("lora_te_") for m in modules) == 8
    # kohya's names, which A1111/Forge/ComfyUI match on, keep CLIP's ``text_model`` level.
    assert all(m.startswith("lora_te_text_model_encoder_layers_") for m in modules if m.startswith("lora_te_"))
    with safe_open(str(result.lora_path), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "zqx_test" and meta["ss_num_epochs"] == "8"
    assert meta["ss_num_train_images"] == "4" and meta["ss_resolution"] == "(64, 64)"
    assert json.loads(meta["ss_tag_frequency"]) == {
        "1_zqx": {"zqx": 4, "a picture": 4, "pattern 0": 1, "pattern 1": 1, "pattern 2": 1, "pattern 3": 1}
    }
    assert int(meta["ss_training_started_at"]) > 1_700_000_000
    assert meta["modelspec.trigger_phrase"] == "zqx" and meta["modelspec.title"] == "zqx_test"
    info = LoraLibrary(out / "loras").resolve("zqx_test")
    assert info.family == SD1 and info.trigger_words == ("zqx",)
    names = [i.name for i in LoraLibrary(out / "loras").scan()[0]]
    assert "zqx_test" in names and "zqx_test_epochs/zqx_test-e0007" in names  # per-epoch files to compare
    assert not list((out / "loras").rglob("*.tmp"))


def test_generate_uses_the_trained_lora(sd15_run, tiny_models):
    _, _, out = sd15_run
    engine = DiffusionEngine(LoraLibrary(out / "loras"), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sd15"]))

    def pixels(*loras):
        request = GenerationRequest(
            prompt="zqx, a picture", steps=3, seed=5, loras=tuple(LoraRequest(n, s) for n, s in loras)
        )
        return np.asarray(engine.generate(request).images[0], dtype=np.int16)

    base = pixels()
    assert np.array_equal(pixels(("zqx_test", 0.0)), base)
    assert np.abs(pixels(("zqx_test", 1.0)) - base).max() > 5


def test_checkpoints_every_epoch_keep_the_newest(sd15_run):
    _, _, out = sd15_run
    kept = checkpoints.list_checkpoints(out / "work")
    assert [p.name for p in kept] == ["step-0000021", "step-0000024"]  # keep_checkpoints = 2
    assert (out / "work" / "config.toml").is_file()


def test_cancel_keeps_a_checkpoint_and_resume_matches_an_uninterrupted_run(tiny_models, images, tmp_path):
    config = make_config(
        tiny_models["sd15"],
        images,
        max_steps=6,
        min_snr_gamma=5,
        noise_offset=0.05,
        train_text_encoder=True,
        lr_scheduler="cosine",
    )
    straight = train(tmp_path / "a", config)
    assert straight.steps == 6

    steps_seen = []
    cancelled = train(
        tmp_path / "b",
        config,
        on_progress=lambda p: steps_seen.append(p.step) if p.phase == "train" else None,
        should_cancel=lambda: len(steps_seen) >= 3,
    )
    assert cancelled.cancelled and cancelled.steps == 3 and steps_seen == [1, 2, 3]  # stopped within a step
    assert cancelled.lora_path is None and not (tmp_path / "b" / "loras" / "zqx_test.safetensors").exists()
    assert cancelled.checkpoint.name == "step-0000003"

    resumed = train(tmp_path / "b", config)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    expected, got = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert [s for s, _ in resumed.losses] == list(range(1, 7))


def test_a_crash_resumes_from_the_last_epoch_checkpoint(tiny_models, images, tmp_path):
    config = make_config(tiny_models["sd15"], images, max_steps=6)
    straight = train(tmp_path / "a", config)

    def crash(progress):
        if progress.phase == "train" and progress.step == 5:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train(tmp_path / "b", config, on_progress=crash)
    assert checkpoints.latest_checkpoint(tmp_path / "b" / "work").name == "step-0000004"  # the epoch boundary
    resumed = train(tmp_path / "b", config)
    assert resumed.resumed_from == 4
    expected, got = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_cached_latents_give_the_same_training_as_encoding_each_step(tiny_models, images, tmp_path):
    config = make_config(tiny_models["sd15"], images, max_steps=3)
    cached = train(tmp_path / "a", config)
    assert list((images / ".lorapg-cache").glob("latents-64b-*.safetensors"))
    uncached = train(tmp_path / "b", build_config({**config.__dict__, "cache_latents": False}))
    assert np.allclose([v for _, v in cached.losses], [v for _, v in uncached.losses], atol=1e-5)


def test_sample_images_do_not_change_what_is_trained(tiny_models, images, tmp_path):
    """Samples draw from their own generator and put the modules back in training mode, so a run without
    them trains the same LoRA (tests/test_demo_model.py turns the demo preset's samples off on this)."""
    config = make_config(tiny_models["sd15"], images, epochs=2, batch_size=2, train_text_encoder=True)
    without = train(tmp_path / "a", config)
    sampled = train(tmp_path / "b", build_config({**config.__dict__, "sample_steps": 2}))
    assert len(sampled.samples) == 2 and not without.samples  # one after each epoch: one before epoch 2's steps
    expected, got = load_file(str(without.lora_path)), load_file(str(sampled.lora_path))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_sdxl_smoke(tiny_models, images, tmp_path):
    config = make_config(tiny_models["sdxl"], images, max_steps=2, train_text_encoder=True, sample_steps=1)
    result = train(tmp_path, config)
    assert result.family == SDXL and result.steps == 2 and len(result.samples) == 1
    keys = load_file(str(result.lora_path)).keys()
    assert any(k.startswith("lora_te1_text_model_encoder_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_") for k in keys)
    info = LoraLibrary(tmp_path / "loras").resolve("zqx_test")
    assert info.family == SDXL and info.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    engine = DiffusionEngine(LoraLibrary(tmp_path / "loras"), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sdxl"]))
    result = engine.generate(GenerationRequest(prompt="zqx", steps=2, seed=1, loras=(LoraRequest("zqx_test", 1.0),)))
    assert result.images[0].size == (64, 64)


def test_buckets_cover_aspect_ratios():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)


def test_conv_lora_exports_kohya_locon_keys_that_the_engine_loads(tiny_models, images, tmp_path):
    """train_conv adds the ResNet 3×3 convolutions (kohya's LoCon); Generate loads and applies them."""
    result = train(tmp_path, make_config(tiny_models["sd15"], images, name="zqx_conv", train_conv=True, epochs=1))
    state = load_file(str(result.lora_path))
    conv_downs = {k: v for k, v in state.items() if "_resnets_" in k and k.endswith("_conv1.lora_down.weight")}
    assert conv_downs and all(v.ndim == 4 and v.shape[2:] == (3, 3) for v in conv_downs.values())
    ups = [state[k.replace("lora_down", "lora_up")] for k in conv_downs]
    assert all(v.ndim == 4 and v.shape[2:] == (1, 1) for v in ups)
    engine = DiffusionEngine(LoraLibrary(tmp_path / "loras"), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sd15"]))
    request = GenerationRequest("zqx", steps=3, seed=1)
    base = np.asarray(engine.generate(request).images[0], dtype=np.int16)
    with_lora = engine.generate(GenerationRequest("zqx", steps=3, seed=1, loras=(LoraRequest("zqx_conv", 1.0),)))
    unet = engine.model.pipe.unet
    assert any(name.endswith("conv1.lora_A") for name, _ in unet.named_modules())  # the conv layers were loaded
    assert np.abs(np.asarray(with_lora.images[0], dtype=np.int16) - base).max() > 0
