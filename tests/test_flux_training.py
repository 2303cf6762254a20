"""LoRA training for Flux.1 and SD 3.5 (issue 17 item 5) on tiny pipelines built in code, on the CPU.

``python -m lorapg train`` trains the transformer with the flow-matching loss; the file is diffusers'
``transformer.…`` layout with modelspec metadata, loads in plain diffusers and in the app's Generate
path and changes the image (scale 0 is the base); a run stopped after epoch 1 and resumed reaches
the uninterrupted run's weights; the timestep sampler is the configured one; the families' presets
apply when the base model is one of them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors import safe_open
from safetensors.torch import load_file

from lorapg.cli import main
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.families import FLUX, SD3
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.errors import UserError
from lorapg.training.config import build_config
from lorapg.training.flow_matching import FlowTraining
from lorapg.training.presets import PRESETS_DIR, guess_family, load_preset
from lorapg.training.trainer import Trainer
from tests.tiny_flux import build_flux_pipeline, build_sd3_pipeline
from tests.training_data import write_images

ARCHITECTURES = {"flux": "flux-1-dev/lora", "sd3": "stable-diffusion-v3.5-large/lora"}
PIPELINES = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
# Few steps at a high rate: a tiny model moves visibly in 6 steps.
RUN = dict(rank=4, alpha=2.0, unet_lr=3e-2, epochs=2, save_precision="fp32", gradient_checkpointing=True, seed=5)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flow_bases")
    build_flux_pipeline(root / "flux")
    build_sd3_pipeline(root / "sd3")
    write_images(root / "images", 3)
    return {"flux": root / "flux", "sd3": root / "sd3", "images": root / "images"}


def _toml(values: dict) -> str:
    def text(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        return f'"{value}"' if isinstance(value, str) else repr(value)

    return "".join(f"{key} = {text(value)}\n" for key, value in values.items())


@pytest.fixture(scope="module", params=["flux", "sd3"])
def cli_run(request, bases, tmp_path_factory) -> dict:
    """One ``python -m lorapg train CONFIG`` run (in-process) per family: 2 epochs of 3 images, samples on."""
    family = request.param
    root = tmp_path_factory.mktemp(f"cli_{family}")
    config = root / "run.toml"
    config.write_text(_toml({**RUN, "sample_steps": 2, "work_dir": str(root / "work")}), encoding="utf-8")
    args = ["train", str(config), "--model", str(bases[family]), "--images", str(bases["images"])]
    args += ["--trigger", "zqx", "--name", f"zqx_{family}", "--out", str(root / "loras")]
    args += ["--threads", "1", "--device", "cpu", "--models-dir", str(root / "models")]
    assert main(args) == 0
    return {"family": family, "root": root, "lora": root / "loras" / f"zqx_{family}.safetensors"}


def test_cli_writes_a_diffusers_transformer_lora_with_metadata(cli_run):
    path, family = cli_run["lora"], cli_run["family"]
    with safe_open(str(path), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(key.startswith("transformer.") for key in keys)
    assert any(".attn.to_q.lora_A.weight" in key for key in keys)
    assert metadata["modelspec.architecture"] == ARCHITECTURES[family]
    assert metadata["modelspec.trigger_phrase"] == "zqx"
    assert metadata["ss_base_model_version"] == {"flux": "flux1", "sd3": "sd3"}[family]
    assert metadata["ss_timestep_sampling"] == "logit_normal"
    assert metadata.get("ss_guidance_scale") == {"flux": "1.0", "sd3": None}[family]
    # alpha ÷ rank is baked into lora_B: the file loads at the trained strength where alpha = rank is assumed.
    assert metadata["ss_network_alpha"] == "4" and metadata["lorapg.trained_alpha"] == "2.0"
    root = cli_run["root"]
    assert (root / "loras" / f"zqx_{family}_epochs" / f"zqx_{family}-e0001.safetensors").is_file()
    assert sorted(p.name for p in (root / "work" / "samples").glob("*.png")) == ["epoch-0001.png", "epoch-0002.png"]


def _diffusers_image(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(3)
    return pipe(
        "zqx, a picture",
        num_inference_steps=2,
        width=32,
        height=32,
        generator=generator,
        max_sequence_length=64,  # the tiny T5 tokenizer's length
        output_type="np",
        **kwargs,
    ).images[0]


def test_the_lora_loads_in_plain_diffusers_and_changes_the_image(cli_run, bases):
    family = cli_run["family"]
    pipe = PIPELINES[family].from_pretrained(str(bases[family]))
    pipe.set_progress_bar_config(disable=True)
    base = _diffusers_image(pipe)
    pipe.load_lora_weights(str(cli_run["lora"]), adapter_name="trained")
    styled = _diffusers_image(pipe)
    assert np.abs(styled - base).max() > 0.02
    pipe.set_adapters(["trained"], [0.0])
    np.testing.assert_allclose(_diffusers_image(pipe), base, atol=1e-5)


def test_the_app_generates_with_the_trained_lora(cli_run, bases):
    family = cli_run["family"]
    library = LoraLibrary(cli_run["lora"].parent)
    assert library.resolve(cli_run["lora"].stem).family == {"flux": FLUX, "sd3": SD3}[family]
    engine = DiffusionEngine(library, torch.device("cpu"), torch.float32)
    engine.load_model(str(bases[family]))

    def pixels(scale: float | None) -> np.ndarray:
        loras = () if scale is None else (LoraRequest(cli_run["lora"].stem, scale),)
        request = GenerationRequest(
            "zqx, a picture", steps=2, seed=3, width=32, height=32, sampler="Euler", loras=loras
        )
        return np.asarray(engine.generate(request).images[0], dtype=np.int16)

    base = pixels(None)
    assert np.abs(pixels(1.0) - base).max() > 5
    assert np.abs(pixels(0.0) - base).max() <= 1


# --- the training itself --------------------------------------------------------------------------


def _train(bases, root, family="flux", callbacks=None, **overrides):
    values = {**RUN, "sample_steps": 0, "name": f"zqx_{family}", "trigger": "zqx", **overrides}
    config = build_config({"model": str(bases[family]), "images": str(bases["images"]), **values})
    device = torch.device("cpu")
    return Trainer(config, lora_dir=root / "loras", work_dir=root / "work", device=device, **(callbacks or {}))


@pytest.fixture(scope="module")
def straight(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    return _train(bases, root).run()


def test_loss_is_finite_and_the_lora_moved_from_its_initial_weights(straight):
    assert straight.steps == 6 and len(straight.losses) == 6
    assert all(math.isfinite(loss) for _, loss in straight.losses)
    weights = load_file(str(straight.lora_path))
    # peft's gaussian init starts every lora_B at zero: a nonzero one was trained.
    ups = [tensor for key, tensor in weights.items() if ".lora_B." in key]
    assert ups and all(tensor.abs().max() > 0 for tensor in ups)


def test_a_run_stopped_after_epoch_1_resumes_to_the_uninterrupted_weights(bases, straight, tmp_path):
    steps: list[int] = []

    def on_progress(progress):
        if progress.phase == "train":
            steps.append(progress.step)

    # Epoch 1 is 3 steps: the run is stopped after its last one.
    first = _train(
        bases, tmp_path, callbacks={"on_progress": on_progress, "should_cancel": lambda: len(steps) >= 3}
    ).run()
    assert first.cancelled and first.steps == 3 and first.lora_path is None
    # As a checkpoint written before the flow-matching settings existed: they resume as their defaults.
    state_path = first.checkpoint / "state.pt"
    state = torch.load(state_path, weights_only=True)
    saved = json.loads(state["config"])
    for key in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale"):
        del saved[key]
    torch.save({**state, "config": json.dumps(saved)}, state_path)
    resumed = _train(bases, tmp_path).run()
    assert resumed.resumed_from == 3 and resumed.steps == 6
    expected, got = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose([v for _, v in resumed.losses], [v for _, v in straight.losses], atol=1e-6)


@pytest.mark.parametrize(("scheme", "diffusers_name"), [("mode", "mode"), ("uniform", "none")])
def test_timesteps_are_drawn_by_the_configured_sampler(bases, tmp_path, monkeypatch, scheme, diffusers_name):
    import diffusers.training_utils as training_utils

    real = training_utils.compute_density_for_timestep_sampling
    calls: list[dict] = []

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(training_utils, "compute_density_for_timestep_sampling", spy)
    _train(bases, tmp_path, "sd3", weighting_scheme=scheme, mode_scale=0.8, max_steps=2).run()
    assert len(calls) == 2  # one draw per sample (batch 1)
    assert {call["weighting_scheme"] for call in calls} == {diffusers_name}
    assert {call["mode_scale"] for call in calls} == {0.8}


def test_sigmas_come_from_the_scheduler_with_its_shift(bases):
    """Each drawn sigma is one of the FlowMatchEulerDiscreteScheduler's (shifted) sigmas, at its timestep."""
    pipe = FluxPipeline.from_pretrained(str(bases["flux"]))
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, shift=3.0, use_dynamic_shifting=False)
    flow = FlowTraining(pipe, FLUX, build_config({}))
    scheduler = flow.scheduler()
    for seed in range(20):
        _, timestep, sigma = flow.draw(scheduler, (4, 2, 2), seed)
        index = int((scheduler.timesteps == timestep).nonzero())
        assert float(sigma) == pytest.approx(float(scheduler.sigmas[index]))
        unshifted = (1000 - index) / 1000  # the schedule's i-th sigma before the shift
        assert float(sigma) == pytest.approx(3 * unshifted / (1 + 2 * unshifted), rel=1e-4)


def test_settings_the_family_cannot_use_are_refused_with_the_field_named(bases, tmp_path):
    # train_text_encoder trains (tests/test_flux_text_encoder_training.py); SD's LoCon has no transformer form.
    with pytest.raises(UserError, match="train_conv"):
        _train(bases, tmp_path, train_conv=True).run()
    # Real Flux.1: an 8x VAE and 2x2 packing make sides multiples of 16.
    pipe = FluxPipeline.from_pretrained(str(bases["flux"]))
    pipe.vae.register_to_config(block_out_channels=(128, 256, 512, 512))
    flow = FlowTraining(pipe, FLUX, build_config({}))
    assert flow.geometry(512) == (512, 64)
    with pytest.raises(UserError, match=r"Resolution 520 .* multiple of 16 \(try 512\)"):
        flow.geometry(520)


# --- presets --------------------------------------------------------------------------------------


def test_family_presets_apply_when_the_base_model_is_flux_or_sd3(bases):
    assert guess_family(str(bases["flux"])) == FLUX and guess_family(str(bases["sd3"])) == SD3
    assert guess_family("") is None
    sd = build_config({"preset": "character"})
    assert sd.train_text_encoder is True and sd.min_snr_gamma == 5.0
    for family in ("flux", "sd3"):
        config = build_config({"preset": "character", "model": str(bases[family])})
        assert config.train_text_encoder is False and config.min_snr_gamma == 0.0
        assert config.weighting_scheme == "logit_normal" and config.rank == 16
    # Every family preset is a complete, commented set (as the SD presets are).
    for family in ("flux", "sd3"):
        for name in ("character", "style", "concept"):
            preset = load_preset(name, family=family)
            assert preset.description.startswith({"flux": "Flux.1", "sd3": "SD 3.5"}[family])
            lines = (PRESETS_DIR / family / f"{name}.toml").read_text(encoding="utf-8").splitlines()
            assert all("#" in line for line in lines if "=" in line and not line.startswith("description"))


def test_the_train_tab_s_presets_follow_the_app_s_flux_model(bases, tmp_path):
    """The Train tab fills its fields from ``config_for({"preset": …})``: with a Flux.1 model as the app's
    model (no model named in the form) they are the Flux.1 preset's, and its description says so."""
    from lorapg.config import load_settings
    from lorapg.services.build import build_services

    overrides = {"model": str(bases["flux"]), "models_dir": str(tmp_path / "models"), "device": "cpu", "threads": 1}
    settings = load_settings(None, {**overrides, "lora_dir": str(tmp_path / "loras"), "outputs": str(tmp_path)})
    services = build_services(settings, prompts=False)
    try:
        config = services.training.config_for({"preset": "character"})
        assert config.train_text_encoder is False and config.weighting_scheme == "logit_normal"
        assert config.model == ""  # still "the app's model": only the preset's values followed it
        assert services.training.preset_description("character").startswith("Flux.1")
    finally:
        services.jobs.shutdown()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_aspect_ratio_buckets_train(bases, tmp_path, family):
    """Landscape and portrait buckets: Flux packs non-square latents (its image ids are rows × columns)."""
    images = tmp_path / "images"
    write_images(images, 3, sizes=[(288, 288), (400, 288), (288, 400)])
    config = build_config(
        {
            "model": str(bases[family]),
            "images": str(images),
            "name": "zqx_ar",
            "trigger": "zqx",
            **RUN,
            "sample_steps": 0,
        }
    )
    result = Trainer(config, lora_dir=tmp_path / "loras", work_dir=tmp_path / "work", device=torch.device("cpu")).run()
    assert result.steps == 6 and all(math.isfinite(loss) for _, loss in result.losses)


@pytest.mark.parametrize(
    "variation",
    [{"caption_dropout": 0.5}, {"shuffle_tags": True, "caption_dropout": 0.3}],
    ids=["dropout-cached", "shuffled-encoded-each-step"],
)
def test_caption_variation_trains(bases, tmp_path, variation):
    """Dropout alone adds the empty caption to the cache (the encoders still leave the device); shuffled
    tags cannot be listed in advance, so the encoders stay and encode each step."""
    result = _train(bases, tmp_path, max_steps=3, **variation).run()
    assert result.steps == 3 and all(math.isfinite(loss) for _, loss in result.losses)


# --- review fixes (issue 17 item 5): load dtype, placement, presets, pre-load checks, estimate -------


class _Loaded(Exception):
    """Raised by the load spy: the test needs the load's arguments, not the run."""


def test_a_bf16_run_loads_flux_in_bf16(bases, tmp_path, monkeypatch):
    """FLUX.1-dev in fp32 is ~67 GB of RAM: a bf16 run loads its training copy in bf16 (SD loads fp32)."""
    import lorapg.diffusion.pipeline_loader as pipeline_loader

    requested: list[torch.dtype] = []

    def spy(source, device, dtype, **kwargs):
        requested.append(dtype)
        raise _Loaded

    monkeypatch.setattr(pipeline_loader, "load_pipeline", spy)
    config = build_config({"model": str(bases["flux"]), "images": str(bases["images"]), "mixed_precision": "bf16"})
    # The requested CUDA device only decides the precision: the load stops before anything is placed.
    trainer = Trainer(config, lora_dir=tmp_path / "loras", work_dir=tmp_path / "work", device=torch.device("cuda"))
    with pytest.raises(_Loaded):
        trainer.run()
    assert requested == [torch.bfloat16]


def test_frozen_weights_reach_the_device_already_in_the_weight_dtype(bases, tmp_path, monkeypatch):
    """One ``.to(device, dtype=…)`` per frozen module: an fp32 copy never lands on the GPU first. The
    weight dtype is forced to bf16 on the CPU (the CPU path itself trains in fp32)."""
    trainer = _train(bases, tmp_path)
    run = trainer._load_models(0.0)
    real_accelerator = trainer._accelerator
    monkeypatch.setattr(trainer, "_accelerator", lambda run: (real_accelerator(run)[0], torch.bfloat16))
    moves: list[tuple[str, tuple, dict]] = []
    modules = {"transformer": run.unet, **{f"text_encoder_{i}": e for i, e in enumerate(run.text_encoders)}}
    for name, module in modules.items():
        real_to = module.to

        def to(*args, _name=name, _real=real_to, **kwargs):
            moves.append((_name, args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "to", to)
    trainer._place_models(run)
    assert {name for name, _, _ in moves} == set(modules)
    for name, args, kwargs in moves:
        assert kwargs.get("dtype") == torch.bfloat16 and args, f"{name} moved without its dtype: {args} {kwargs}"
    assert all(p.dtype == torch.bfloat16 for m in modules.values() for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in run.vae.parameters())  # the VAE encodes in fp32


@pytest.mark.parametrize("model", ["x" * 300, "~nosuchuser_lorapg/x", "x" * 5000, "a/" + "x" * 300])
def test_guess_family_of_an_unusable_model_is_unknown_not_a_traceback(model):
    assert guess_family(model) is None
    # The preset still applies (its SD version); the model itself is refused later, naming the field.
    assert build_config({"preset": "character", "model": model}).rank > 0


def test_a_cli_config_s_preset_follows_the_app_s_flux_model(bases, tmp_path):
    """``train cfg.toml`` with preset = character and no model: the app's model (Flux.1) trains, so the
    Flux.1 version of the preset applies (no text-encoder training)."""
    from lorapg.training.config import load_config

    path = tmp_path / "cfg.toml"
    path.write_text('preset = "character"\n', encoding="utf-8")
    config = load_config(path, preset_model=str(bases["flux"]))
    assert config.model == "" and config.train_text_encoder is False and config.min_snr_gamma == 0.0


@pytest.fixture()
def flux_services(bases, tmp_path):
    """The app's services with the tiny Flux.1 model as the app's model (not loaded)."""
    from lorapg.config import load_settings
    from lorapg.services.build import build_services

    overrides = {"model": str(bases["flux"]), "models_dir": str(tmp_path / "models"), "device": "cpu", "threads": 1}
    settings = load_settings(None, {**overrides, "lora_dir": str(tmp_path / "loras"), "outputs": str(tmp_path)})
    services = build_services(settings, prompts=False)
    try:
        yield services
    finally:
        services.jobs.shutdown()


@pytest.mark.parametrize(("setting", "model"), [("train_conv", "named"), ("train_conv", "the app's")])
def test_settings_flux_cannot_train_are_refused_before_loading(bases, flux_services, setting, model):
    values = {"name": "zqx_refused", "trigger": "zqx", "images": str(bases["images"]), setting: True}
    if model == "named":
        values["model"] = str(bases["flux"])
    with pytest.raises(UserError, match=setting):
        flux_services.training.prepare(build_config(values))


def test_the_estimate_plans_flux_steps_as_the_trainer_does(bases, flux_services, tmp_path):
    """Mixed aspect ratios, batch 2: the buckets are Flux's (native size, its multiple), not SD's 512 px."""
    images = tmp_path / "mixed"
    write_images(images, 6, sizes=[(288, 288), (330, 288), (400, 288), (288, 330), (288, 400), (300, 288)])
    service = flux_services.training
    values = {**RUN, "sample_steps": 0, "name": "zqx_est", "trigger": "zqx", "images": str(images)}
    config = service.prepare(build_config({**values, "batch_size": 2, "epochs": 1}))
    not_loaded = service.estimate(config)  # the family from model_index.json: Flux's 1024 px
    service.engine.load_model(str(bases["flux"]))  # the loaded model's own geometry
    loaded = service.estimate(config)

    totals: list[int] = []

    def first_step(update):
        if update.phase == "train":
            totals.append(update.total_steps)

    trainer = Trainer(
        config,
        lora_dir=tmp_path / "loras",
        work_dir=tmp_path / "work",
        device=torch.device("cpu"),
        on_progress=first_step,
        should_cancel=lambda: bool(totals),  # one step is enough to know its plan
    )
    result = trainer.run()
    # 5 buckets (square, 2 landscape, 2 portrait) of 2, 1, 1, 1, 1 images; SD's 512 px buckets make 3.
    assert result.total_steps == 5
    assert loaded.steps == result.total_steps and not_loaded.steps == result.total_steps


def test_train_cli_with_a_preset_and_the_app_s_flux_model_trains(bases, tmp_path, monkeypatch):
    """``python -m lorapg train cfg.toml``: preset = character, no model in the file, the app's model
    (LORAPG_MODEL) is Flux.1: the Flux.1 preset applies (its values, not SD's train_text_encoder = true)."""
    monkeypatch.setenv("LORAPG_MODEL", str(bases["flux"]))
    values = {"preset": "character", "name": "zqx_app", "trigger": "zqx", "images": str(bases["images"])}
    values.update(rank=4, alpha=2.0, epochs=1, max_steps=1, sample_steps=0, work_dir=str(tmp_path / "work"))
    config = tmp_path / "run.toml"
    config.write_text(_toml(values), encoding="utf-8")
    args = ["train", str(config), "--out", str(tmp_path / "loras"), "--threads", "1", "--device", "cpu"]
    assert main(args + ["--models-dir", str(tmp_path / "models")]) == 0
    assert (tmp_path / "loras" / "zqx_app.safetensors").is_file()


# --- the flow-matching CLI flags (issue 17 item 5) ------------------------------------------------

FLOW_FLAGS = ["--weighting-scheme", "mode", "--mode-scale", "0.5", "--logit-mean", "0.3", "--logit-std", "2"]


def _train_args(model, images, out, *extra) -> list[str]:
    args = ["train", "--model", str(model), "--images", str(images), "--trigger", "zqx", "--name", "flags"]
    args += ["--out", str(out / "loras"), "--max-steps", "1", "--threads", "1", "--device", "cpu"]
    return args + ["--models-dir", str(out / "models"), *extra]


def test_flow_matching_flags_reach_the_flux_run_and_its_metadata(bases, tmp_path):
    args = _train_args(bases["flux"], bases["images"], tmp_path, *FLOW_FLAGS, "--guidance-scale", "2.5")
    assert main(args) == 0
    with safe_open(str(tmp_path / "loras" / "flags.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_timestep_sampling"] == "mode"
    assert (metadata["ss_mode_scale"], metadata["ss_logit_mean"], metadata["ss_logit_std"]) == ("0.5", "0.3", "2.0")
    assert metadata["ss_guidance_scale"] == "2.5"


def test_weighting_scheme_none_is_diffusers_name_for_uniform_and_bad_values_name_the_flag(bases):
    from lorapg.cli import build_parser
    from lorapg.train_cli import train_overrides
    from lorapg.training.config import load_config

    parser = build_parser()
    args = parser.parse_args(["train", "--weighting-scheme", "none", "--guidance-scale", "4"])
    config = load_config(None, train_overrides(args), preset_model=str(bases["flux"]))
    assert (config.weighting_scheme, config.guidance_scale) == ("uniform", 4.0)
    for flag, value, field in (("--logit-std", "abc", "logit_std"), ("--mode-scale", "9", "mode_scale")):
        args = parser.parse_args(["train", flag, value])
        with pytest.raises(UserError, match=field):
            load_config(None, train_overrides(args), preset_model=str(bases["flux"]))
    with pytest.raises(SystemExit):  # argparse lists the choices
        parser.parse_args(["train", "--weighting-scheme", "gaussian"])


def test_an_sd_run_ignores_the_flow_flags_with_a_log_line(tmp_path, caplog):
    from tests.tiny_models import build_sd15_pipeline

    build_sd15_pipeline(tmp_path / "sd")
    write_images(tmp_path / "images", 2)
    args = _train_args(tmp_path / "sd", tmp_path / "images", tmp_path, "--guidance-scale", "2.5", "--logit-std", "2")
    with caplog.at_level("WARNING", logger="lorapg.training.flow_matching"):
        assert main(args) == 0
    ignored = [r.getMessage() for r in caplog.records if "ignored for SD" in r.getMessage()]
    assert len(ignored) == 2 and "--guidance-scale" in ignored[1] and "--logit-std" in ignored[0]
    assert (tmp_path / "loras" / "flags.safetensors").is_file()


def test_the_benchmark_s_re_encoding_switch_encodes_each_batch_to_the_cached_embeddings(bases, monkeypatch):
    """bench_flux compares cached embeddings with ``encode_every_step``: both must feed the same inputs."""
    pipe = FluxPipeline.from_pretrained(str(bases["flux"]))
    flow = FlowTraining(pipe, FLUX, build_config({"model": str(bases["flux"])}))
    captions = ["zqx, a fox", "zqx, a cat"]
    flow.cache_text(captions, torch.device("cpu"))
    cached = flow.embeddings(captions, torch.device("cpu"), torch.float32)
    calls: list[list[str]] = []
    encode = flow._encode
    monkeypatch.setattr(flow, "_encode", lambda batch, device: calls.append(batch) or encode(batch, device))
    monkeypatch.setattr(FlowTraining, "encode_every_step", True)
    flow.release_text_encoders()  # kept: the loop encodes with them
    encoded = flow.embeddings(captions, torch.device("cpu"), torch.float32)
    assert calls == [captions] and not flow.encoders_released
    for ours, theirs in zip(encoded, cached, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
