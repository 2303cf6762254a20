"""QLoRA-style training (issue 17): a Flux.1 LoRA trained on an NF4-quantized frozen base, on the CPU.

The base's transformer and T5 load in NF4 (bitsandbytes' Linear4bit / Params4bit) through the user's
path; the LoRA on top trains in fp32. The loss is measured with fixed noise and timesteps (the
trainer's own flow-matching loss, same seeds for both) on the NF4 base without and with the trained
LoRA, so "lower" compares like with like. The exported file loads on the unquantized base in plain
diffusers and changes the image; at scale 0 it is that base (atol 1e-5: same computation).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from lorapg.diffusion.families import FLUX
from lorapg.diffusion.model_source import resolve_model_source
from lorapg.diffusion.pipeline_loader import load_pipeline
from lorapg.diffusion.quantization import parse_plan
from lorapg.errors import UserError
from lorapg.training import trainer as trainer_module
from lorapg.training.config import build_config
from lorapg.training.flow_matching import FlowTraining
from lorapg.training.trainer import Trainer, build_caption
from tests.tiny_flux import build_flux_pipeline
from tests.training_data import write_images

RUN = dict(rank=4, alpha=4.0, unet_lr=3e-2, epochs=4, save_precision="fp32", gradient_checkpointing=True, seed=5)
SEEDS = list(range(100, 124))  # the fixed draws (noise, timestep) the loss is measured with


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, request) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("qlora")
    build_flux_pipeline(root / "flux")
    write_images(root / "images", 3)
    config = build_config(
        {
            "model": str(root / "flux"),
            "images": str(root / "images"),
            "name": "zqx_nf4",
            "trigger": "zqx",
            "sample_steps": 0,
            "quantize": "nf4",
            **RUN,
        }
    )
    seen = {}
    original = trainer_module.FlowTraining

    def spy(pipe, family, cfg):  # the training copy of the base, as the trainer loaded it
        seen["pipe"] = pipe
        return original(pipe, family, cfg)

    patch = pytest.MonkeyPatch()
    patch.setattr(trainer_module, "FlowTraining", spy)
    try:
        trainer = Trainer(config, lora_dir=root / "loras", work_dir=root / "work", device=torch.device("cpu"))
        result = trainer.run()
    finally:
        patch.undo()
    return SimpleNamespace(root=root, config=config, result=result, pipe=seen["pipe"])


def test_the_frozen_base_is_nf4_and_the_lora_trains_in_fp32(qlora):
    import bitsandbytes as bnb

    to_q = qlora.pipe.transformer.transformer_blocks[0].attn.to_q
    base = to_q.get_base_layer()
    assert isinstance(base, bnb.nn.Linear4bit) and isinstance(base.weight, bnb.nn.Params4bit)
    assert base.weight.dtype == torch.uint8 and not base.weight.requires_grad
    lora = [p for n, p in to_q.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert type(qlora.pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q).__name__ == "Linear4bit"
    assert qlora.result.steps == 12 and qlora.result.lora_path.is_file()


def _latents(pipe, folder: Path, side: int = 32) -> torch.Tensor:
    """The training images as the trainer's latents: resized square, VAE mean, shifted and scaled."""
    images = []
    for path in sorted(folder.glob("*.png")):
        array = np.asarray(Image.open(path).convert("RGB").resize((side, side)), dtype=np.float32)
        images.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1)
    with torch.no_grad():
        latents = pipe.vae.encode(torch.stack(images)).latent_dist.mean
    shift = pipe.vae.config.shift_factor or 0.0
    return (latents - shift) * pipe.vae.config.scaling_factor


def _mean_loss(pipe, config, latents: torch.Tensor, captions: list[str]) -> float:
    flow = FlowTraining(pipe, FLUX, config)
    run = SimpleNamespace(noise_scheduler=flow.scheduler(), weight_dtype=torch.float32, unet=pipe.transformer)
    losses = []
    with torch.no_grad():
        for seed in SEEDS:
            index = seed % len(captions)
            losses.append(flow.loss(run, latents[index : index + 1], [captions[index]], [seed]).item())
    return float(np.mean(losses))


def test_training_on_the_nf4_base_lowers_its_loss(qlora):
    root = qlora.root
    pipe, _ = load_pipeline(
        resolve_model_source(str(root / "flux")), torch.device("cpu"), torch.float32, quantize=parse_plan("nf4")
    )
    latents = _latents(pipe, root / "images")
    captions = [build_caption("zqx", f"a picture, pattern {i}") for i in range(len(latents))]
    before = _mean_loss(pipe, qlora.config, latents, captions)
    pipe.load_lora_weights(str(qlora.result.lora_path), adapter_name="trained")
    after = _mean_loss(pipe, qlora.config, latents, captions)
    assert after < 0.95 * before, (before, after)


def _image(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(3)
    return pipe("zqx, a picture", num_inference_steps=2, height=32, width=32, generator=generator, output_type="np")[0][
        0
    ]


def test_the_lora_loads_on_the_unquantized_base_in_plain_diffusers(qlora):
    pipe = FluxPipeline.from_pretrained(str(qlora.root / "flux"))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    base = _image(pipe)
    pipe.load_lora_weights(str(qlora.result.lora_path), adapter_name="trained")
    assert np.abs(_image(pipe) - base).max() > 0.02
    pipe.set_adapters(["trained"], [0.0])
    np.testing.assert_allclose(_image(pipe), base, atol=1e-5)


def test_quantize_in_the_training_config_and_the_train_flag(tmp_path):
    with pytest.raises(UserError, match=r"Training setting 'quantize' is 'fp8'; use one of none, nf4"):
        build_config({"quantize": "fp8"})
    from lorapg.cli import build_parser
    from lorapg.train_cli import train_overrides

    args = build_parser().parse_args(["train", "--images", str(tmp_path), "--quantize", "nf4"])
    assert train_overrides(args)["quantize"] == "nf4"
    assert build_config({}).quantize == ""  # the app's setting
    # --quantize-components: the transformer's mode is the run's (training stores T5 alike).
    args = build_parser().parse_args(["train", "--images", str(tmp_path), "--quantize-components", "transformer=nf4"])
    assert train_overrides(args)["quantize"] == "nf4"
    args = build_parser().parse_args(["train", "--quantize-components", "transformer=nf4,t5=fp8"])
    with pytest.raises(UserError, match=r"Setting quantize_components: .* training stores both alike"):
        train_overrides(args)


def test_an_sd_base_with_quantize_is_refused_naming_it(tmp_path):
    from tests.tiny_models import build_sd15_pipeline

    build_sd15_pipeline(tmp_path / "sd15")
    write_images(tmp_path / "images", 1)
    config = build_config(
        {"model": str(tmp_path / "sd15"), "images": str(tmp_path / "images"), "name": "x", "quantize": "nf4"}
    )
    trainer = Trainer(config, lora_dir=tmp_path / "loras", work_dir=tmp_path / "work", device=torch.device("cpu"))
    with pytest.raises(UserError, match=r"Setting quantize .* applies to Flux.1 and SD 3.5 models only.*to none"):
        trainer.run()
    assert not (tmp_path / "loras").exists() or not any((tmp_path / "loras").iterdir())


def _spy_on_the_training_base(monkeypatch) -> dict:
    seen = {}
    original = trainer_module.FlowTraining

    def spy(pipe, family, cfg):
        seen["pipe"] = pipe
        return original(pipe, family, cfg)

    monkeypatch.setattr(trainer_module, "FlowTraining", spy)
    return seen


@pytest.mark.parametrize("setting", ["nf4", "fp8"])
def test_the_app_s_quantize_is_the_default_of_a_run_started_from_the_app(tmp_path, monkeypatch, caplog, setting):
    """Settings.quantize nf4: a Flux run whose config leaves quantize empty trains on an NF4 base;
    fp8 (not offered for training): it trains unquantized and says so."""
    from lorapg.config import load_settings
    from lorapg.services.build import build_services

    build_flux_pipeline(tmp_path / "flux")
    write_images(tmp_path / "images", 1)
    overrides = {"model": str(tmp_path / "flux"), "models_dir": str(tmp_path / "models"), "device": "cpu"}
    settings = load_settings(
        None,
        {**overrides, "threads": 1, "lora_dir": str(tmp_path / "loras"), "outputs": str(tmp_path), "quantize": setting},
    )
    seen = _spy_on_the_training_base(monkeypatch)
    services = build_services(settings, prompts=False)
    try:
        config = build_config(
            {
                "images": str(tmp_path / "images"),
                "name": "zqx_app",
                "trigger": "zqx",
                "sample_steps": 0,
                **RUN,
                "max_steps": 1,
            }
        )
        with caplog.at_level("INFO", logger="lorapg.training.trainer"):
            run = services.training.submit(config)
            run.job.wait()
        assert run.job.error is None and run.job.result.steps == 1
    finally:
        services.jobs.shutdown()
    to_q = seen["pipe"].transformer.transformer_blocks[0].attn.to_q.get_base_layer()
    assert (type(to_q).__name__ == "Linear4bit") == (setting == "nf4")
    note = "the app's quantize=fp8 does not apply to training"
    assert any(note in record.getMessage() for record in caplog.records) == (setting == "fp8")


def test_an_sd_run_skips_the_app_wide_setting(tmp_path):
    """The app's quantize applies to Flux.1 / SD 3.5: an SD 1.x run that leaves quantize empty trains."""
    from tests.tiny_models import build_sd15_pipeline

    build_sd15_pipeline(tmp_path / "sd15")
    write_images(tmp_path / "images", 1)
    values = {"model": str(tmp_path / "sd15"), "images": str(tmp_path / "images"), "name": "x", "max_steps": 1}
    trainer = Trainer(
        build_config({**values, "sample_steps": 0}),
        lora_dir=tmp_path / "loras",
        work_dir=tmp_path / "work",
        device=torch.device("cpu"),
        default_quantize="nf4",
    )
    assert trainer.run().steps == 1


def test_a_failed_conversion_in_a_run_names_the_run_s_setting(tmp_path, monkeypatch):
    from lorapg.diffusion import quantization

    def broken(*args):
        raise RuntimeError("no kernel for this layer")

    monkeypatch.setitem(quantization._CONVERTERS, "nf4", broken)
    build_flux_pipeline(tmp_path / "flux")
    write_images(tmp_path / "images", 1)
    config = build_config(
        {"model": str(tmp_path / "flux"), "images": str(tmp_path / "images"), "name": "x", "quantize": "nf4"}
    )
    trainer = Trainer(config, lora_dir=tmp_path / "loras", work_dir=tmp_path / "work", device=torch.device("cpu"))
    with pytest.raises(UserError, match=r"no kernel for this layer.*Set the run's quantize to none\.$") as caught:
        trainer.run()
    assert "other mode" not in str(caught.value)
