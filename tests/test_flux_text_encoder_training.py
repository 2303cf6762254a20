"""The optional CLIP text-encoder LoRA for Flux.1 and SD 3.5 (issue 17 item 5), on tiny pipelines, on the CPU.

With ``train_text_encoder`` a Flux.1 run also trains a LoRA on CLIP-L's attention projections, an SD 3.5
run on both CLIP encoders' (T5 is never trained): the loss on the training images goes down, the text
encoders' LoRA weights move, the file carries ``text_encoder.`` (and ``text_encoder_2.``) keys beside the
``transformer.`` ones, plain diffusers and the app's Generate path apply that part (the text encoder's
output and the image change), sample images use the trained encoder, and a resumed run restores it.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.families import FLUX, SD3
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.training import trainer as trainer_module
from lorapg.training.config import build_config
from lorapg.training.flow_matching import FlowTraining
from lorapg.training.trainer import Trainer, build_caption, make_optimizer
from tests.tiny_flux import build_flux_pipeline, build_sd3_pipeline
from tests.training_data import write_images

FAMILIES = {"flux": FLUX, "sd3": SD3}
PIPELINES = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
TEXT_PREFIXES = {"flux": ("text_encoder.",), "sd3": ("text_encoder.", "text_encoder_2.")}
# A tiny model moves visibly in 6 steps at these rates; one sample step per epoch exercises the samples.
# The two rates differ: a text encoder in the transformer's optimizer group would show.
RUN = dict(
    rank=4,
    alpha=2.0,
    unet_lr=3e-2,
    text_encoder_lr=2e-2,
    train_text_encoder=True,
    epochs=2,
    save_precision="fp32",
    gradient_checkpointing=True,
    sample_steps=1,
    seed=5,
)
PROMPT = "zqx, a picture"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("te_bases")
    build_flux_pipeline(root / "flux")
    build_sd3_pipeline(root / "sd3")
    write_images(root / "images", 3)
    return {"flux": root / "flux", "sd3": root / "sd3", "images": root / "images"}


def _trainer(bases, root: Path, family: str, **callbacks) -> Trainer:
    values = {
        **RUN,
        "name": f"te_{family}",
        "trigger": "zqx",
        "model": str(bases[family]),
        "images": str(bases["images"]),
    }
    config = build_config(values)
    return Trainer(config, lora_dir=root / "loras", work_dir=root / "work", device=torch.device("cpu"), **callbacks)


@pytest.fixture(scope="module", params=["flux", "sd3"])
def te_run(request, bases, tmp_path_factory) -> dict:
    """One uninterrupted run per family; what each sample's prompt embeddings were, beside the cached ones;
    the optimizer's groups (rate, parameter ids) as made and the trained encoders' LoRA parameter ids."""
    family = request.param
    root = tmp_path_factory.mktemp(f"te_{family}")
    samples: list[dict] = []
    groups: list[tuple[float, set[int]]] = []
    encoder_params: set[int] = set()
    real_draw, real_use = FlowTraining.draw_sample, FlowTraining.use_trained_text_encoders

    def spy(self, transformer, prompt, steps, size, generator, device, encoders=None):
        hidden, pooled = self.embeddings([prompt], device, torch.float32, encoders)
        cached_hidden, cached_pooled = self.text_cache[prompt]
        samples.append(
            {
                "grad": torch.is_grad_enabled(),
                "trained": sorted(self.trained_encoders if encoders is None else encoders),
                "pooled_moved": float((pooled[0] - cached_pooled).abs().max()),
                "hidden_moved": float((hidden[0] - cached_hidden).abs().max()),
            }
        )
        return real_draw(self, transformer, prompt, steps, size, generator, device, encoders)

    def optimizer_spy(choice, param_groups, device):
        optimizer, name = make_optimizer(choice, param_groups, device)
        groups.extend((group["lr"], {id(p) for p in group["params"]}) for group in optimizer.param_groups)
        return optimizer, name

    def use_spy(self, encoders):
        encoder_params.update(id(p) for e in encoders.values() for p in e.parameters() if p.requires_grad)
        return real_use(self, encoders)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FlowTraining, "draw_sample", spy)
        patch.setattr(FlowTraining, "use_trained_text_encoders", use_spy)
        patch.setattr(trainer_module, "make_optimizer", optimizer_spy)
        result = _trainer(bases, root, family).run()
    return {
        "family": family,
        "result": result,
        "root": root,
        "samples": samples,
        "groups": groups,
        "encoder_params": encoder_params,
    }


# --- the CLIP part is what the pipeline computes --------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_per_step_clip_part_equals_the_pipeline_s_own_encoding(bases, family):
    """Untrained, the recomputed CLIP part (hidden tokens and pooled) is the cached encode_prompt output:
    the trained encoder replaces exactly the part the pipeline takes from it."""
    pipe = PIPELINES[family].from_pretrained(str(bases[family]))
    if family == "sd3":
        # The pipeline pads both CLIP tokenizers to its tokenizer_max_length (the first one's), not each
        # to its own model_max_length: the recomputed part must too.
        pipe.tokenizer_2.model_max_length = pipe.tokenizer_max_length // 2
    flow = FlowTraining(pipe, FAMILIES[family], build_config({"train_text_encoder": True}))
    captions = ["zqx, a fox", "zqx, a much longer caption about a cat"]
    cpu = torch.device("cpu")
    flow.cache_text(captions, cpu)
    cached = flow.embeddings(captions, cpu, torch.float32)
    assert set(flow.trainable_text_encoders()) == set(prefix.rstrip(".") for prefix in TEXT_PREFIXES[family])
    flow.use_trained_text_encoders(flow.trainable_text_encoders())
    calls: list[int] = []
    hook = pipe.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    recomputed = flow.embeddings(captions, cpu, torch.float32)
    hook.remove()
    assert calls  # the encoder ran: the CLIP part did not come from the cache
    for ours, theirs in zip(recomputed, cached, strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_caption_the_cache_lacks_runs_each_clip_encoder_once(bases, family):
    """Shuffled tags miss the cache: with trained CLIP encoders only T5 encodes the frozen part (the
    CLIP encoders run once, for their trained part), and the result is still the pipeline's encoding."""
    pipe = PIPELINES[family].from_pretrained(str(bases[family]))
    flow = FlowTraining(pipe, FAMILIES[family], build_config({"train_text_encoder": True, "shuffle_tags": True}))
    captions = ["zqx, a fox, red", "zqx, red, a fox"]
    cpu = torch.device("cpu")
    expected = flow.embeddings(captions, cpu, torch.float32)  # no trained encoders yet: encode_prompt
    flow.use_trained_text_encoders(flow.trainable_text_encoders())
    names = [*flow.trainable_text_encoders(), "text_encoder_2" if family == "flux" else "text_encoder_3"]
    calls = dict.fromkeys(names, 0)
    hooks = [
        getattr(pipe, name).register_forward_hook(lambda *args, _name=name: calls.__setitem__(_name, calls[_name] + 1))
        for name in names
    ]
    try:
        got = flow.embeddings(captions, cpu, torch.float32)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == dict.fromkeys(names, 1)  # each CLIP encoder once (with its LoRA), T5 once
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_t5_leaves_the_device_and_the_trained_clip_stays(bases):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(bases["sd3"]))
    flow = FlowTraining(pipe, SD3, build_config({"train_text_encoder": True}))
    moved: list[str] = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name)
        real_to = encoder.to
        encoder.to = lambda *args, _name=name, _to=real_to, **kwargs: moved.append(_name) or _to(*args, **kwargs)
    flow.release_text_encoders()
    assert moved == ["text_encoder_3"] and flow.encoders_released


# --- the run --------------------------------------------------------------------------------------


def _image_latents(pipe, images: Path, side: int = 32) -> tuple[torch.Tensor, list[str]]:
    """The training images' latents (square, ``side`` px) and their training captions."""
    pixels, captions = [], []
    for path in sorted(images.glob("*.png")):
        image = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        captions.append(build_caption("zqx", path.with_suffix(".txt").read_text(encoding="utf-8")))
    with torch.no_grad():
        latents = pipe.vae.encode(torch.stack(pixels)).latent_dist.mean
    config = pipe.vae.config
    return (latents - (config.shift_factor or 0.0)) * config.scaling_factor, captions


@torch.no_grad()
def _mean_flow_loss(pipe, family: str, images: Path, draws: int = 12) -> float:
    """The flow-matching loss on the training images over fixed draws (the same for every pipeline)."""
    flow = FlowTraining(pipe, FAMILIES[family], build_config({}))
    run = SimpleNamespace(noise_scheduler=flow.scheduler(), weight_dtype=torch.float32, unet=pipe.transformer)
    latents, captions = _image_latents(pipe, images)
    losses = [
        flow.loss(run, latents, captions, [1000 * draw + i for i in range(len(captions))]) for draw in range(draws)
    ]
    return float(torch.stack(losses).mean())


def test_the_run_trains_and_the_text_encoder_lora_moved(te_run, bases):
    result, family = te_run["result"], te_run["family"]
    assert result.steps == 6 and all(math.isfinite(loss) for _, loss in result.losses)
    weights = load_file(str(result.lora_path))
    for prefix in TEXT_PREFIXES[family]:
        ups = [t for key, t in weights.items() if key.startswith(prefix) and ".lora_B." in key]
        # peft's gaussian init starts every lora_B at zero: nonzero ones were trained. 4 projections × 2 layers.
        assert len(ups) == 8 and all(t.abs().max() > 0 for t in ups), prefix
        downs = [key for key in weights if key.startswith(prefix) and ".lora_A." in key]
        assert all(
            any(f".self_attn.{proj}." in key for proj in ("q_proj", "k_proj", "v_proj", "out_proj")) for key in downs
        )
    assert not any(key.startswith("text_encoder_3.") for key in weights)  # T5 is never trained
    # The loss on the training images, over fixed draws, is lower with the trained LoRA than without. Its
    # text-encoder part alone changes it (it reaches the transformer's input); whether that part alone
    # lowers the loss depends on how the two parts share the work, so only the change is asserted.
    pipe = PIPELINES[family].from_pretrained(str(bases[family]))
    base = _mean_flow_loss(pipe, family, bases["images"])
    pipe.load_lora_weights(str(_text_only_file(te_run)), adapter_name="text_only")
    text_only = _mean_flow_loss(pipe, family, bases["images"])
    pipe.load_lora_weights(str(result.lora_path), adapter_name="trained")
    pipe.set_adapters(["trained"], [1.0])
    assert _mean_flow_loss(pipe, family, bases["images"]) < base
    assert abs(text_only - base) > 1e-3 * base  # observed 5-8 %


def test_the_text_encoders_train_in_their_own_group_at_text_encoder_lr(te_run):
    """Two groups: the trained CLIP encoders' LoRA parameters, all of them and nothing else, at
    text_encoder_lr; the transformer's at unet_lr (the rates differ in RUN)."""
    groups, encoder_params = te_run["groups"], te_run["encoder_params"]
    assert encoder_params and len(groups) == 2
    (unet_lr, unet_params), (te_lr, te_params) = groups
    assert te_params == encoder_params and not unet_params & encoder_params
    assert math.isclose(te_lr, RUN["text_encoder_lr"]) and math.isclose(unet_lr, RUN["unet_lr"])


def test_the_samples_use_the_trained_text_encoder(te_run):
    samples, family = te_run["samples"], te_run["family"]
    assert len(samples) == 2  # one per epoch
    for sample in samples:
        assert not sample["grad"]
        assert sample["trained"] == sorted(prefix.rstrip(".") for prefix in TEXT_PREFIXES[family])
        assert sample["pooled_moved"] > 1e-4
        # Flux's hidden states are T5's (cached, unchanged); SD 3's start with the CLIP tokens.
        assert (sample["hidden_moved"] > 1e-4) == (family == "sd3")


def test_the_file_keeps_its_metadata_and_says_the_text_encoder_trained(te_run):
    with safe_open(str(te_run["result"].lora_path), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    prefixes = ("transformer.", *TEXT_PREFIXES[te_run["family"]])
    assert all(key.startswith(prefixes) for key in keys)
    assert all(any(key.startswith(p) for key in keys) for p in prefixes)
    architecture = {"flux": "flux-1-dev/lora", "sd3": "stable-diffusion-v3.5-large/lora"}[te_run["family"]]
    assert metadata["modelspec.architecture"] == architecture and metadata["modelspec.trigger_phrase"] == "zqx"
    # kohya's fields for it: sd-scripts writes ss_text_encoder_lr and ss_network_train_unet_only.
    assert metadata["ss_network_train_unet_only"] == "False" and metadata["ss_text_encoder_lr"] == "0.02"


def _text_only_file(te_run) -> Path:
    """The trained file's text-encoder part alone (its metadata kept): what it does is the encoder's doing."""
    source = te_run["result"].lora_path
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
        names = [key for key in handle.keys() if not key.startswith("transformer.")]  # noqa: SIM118 (no __iter__)
        tensors = {key: handle.get_tensor(key) for key in names}
    path = te_run["root"] / "text_only" / f"{source.stem}_te.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _diffusers_image(pipe) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(3)
    return pipe(
        PROMPT,
        num_inference_steps=2,
        width=32,
        height=32,
        generator=generator,
        max_sequence_length=64,
        output_type="np",
    ).images[0]


def _encoded(pipe, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, pooled) of PROMPT as the pipeline encodes it."""
    with torch.no_grad():
        if family == "flux":
            hidden, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=64)
        else:
            hidden, _, pooled, _ = pipe.encode_prompt(
                PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False, max_sequence_length=64
            )
    return hidden, pooled


def test_plain_diffusers_applies_the_text_encoder_part(te_run, bases):
    family = te_run["family"]
    pipe = PIPELINES[family].from_pretrained(str(bases[family]))
    pipe.set_progress_bar_config(disable=True)
    base_image, (base_hidden, base_pooled) = _diffusers_image(pipe), _encoded(pipe, family)
    pipe.load_lora_weights(str(_text_only_file(te_run)), adapter_name="text_only")
    assert "text_only" in pipe.get_list_adapters().get("text_encoder", [])
    hidden, pooled = _encoded(pipe, family)
    assert (pooled - base_pooled).abs().max() > 1e-3
    if family == "sd3":
        assert "text_only" in pipe.get_list_adapters().get("text_encoder_2", [])
        assert (hidden - base_hidden).abs().max() > 1e-3
    assert np.abs(_diffusers_image(pipe) - base_image).max() > 0.01
    # The whole file (transformer and text encoders) loads beside it and changes the image too.
    pipe.load_lora_weights(str(te_run["result"].lora_path), adapter_name="trained")
    pipe.set_adapters(["trained"], [1.0])
    assert np.abs(_diffusers_image(pipe) - base_image).max() > 0.02


def test_the_app_generates_with_the_text_encoder_part(te_run, bases):
    family = te_run["family"]
    path = _text_only_file(te_run)
    library = LoraLibrary(path.parent)
    assert library.resolve(path.stem).family == FAMILIES[family]
    engine = DiffusionEngine(library, torch.device("cpu"), torch.float32)
    engine.load_model(str(bases[family]))

    def pixels(scale: float | None) -> np.ndarray:
        loras = () if scale is None else (LoraRequest(path.stem, scale),)
        request = GenerationRequest(PROMPT, steps=2, seed=3, width=32, height=32, sampler="Euler", loras=loras)
        return np.asarray(engine.generate(request).images[0], dtype=np.int16)

    base = pixels(None)
    assert np.abs(pixels(1.0) - base).max() > 5
    assert np.abs(pixels(0.0) - base).max() <= 1


def test_a_resumed_run_restores_the_text_encoder_lora(te_run, bases, tmp_path):
    family, straight = te_run["family"], te_run["result"]
    steps: list[int] = []

    def on_progress(progress):
        if progress.phase == "train":
            steps.append(progress.step)

    # Epoch 1 is 3 steps: stopped after its last one, the checkpoint holds the text encoders' LoRA too.
    first = _trainer(bases, tmp_path, family, on_progress=on_progress, should_cancel=lambda: len(steps) >= 3).run()
    assert first.cancelled and first.steps == 3
    saved = load_file(str(next(first.checkpoint.glob("*.safetensors"))))
    for prefix in TEXT_PREFIXES[family]:
        assert any(key.startswith(prefix) and "lora_B" in key for key in saved), prefix
    resumed = _trainer(bases, tmp_path, family).run()
    assert resumed.resumed_from == 3 and resumed.steps == 6
    expected, got = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)


# --- the Train tab / REST form (TrainingService) and the CLI pass it for Flux.1 and SD 3.5 --------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_training_service_accepts_it_for_the_app_s_model(bases, tmp_path, family):
    """The Train tab and the REST API build their config with ``config_for`` and queue it through
    ``prepare``: with a Flux.1 / SD 3.5 app model the checkbox's value survives (no refusal), and the
    family preset's text_encoder_lr is a usable rate."""
    from lorapg.config import load_settings
    from lorapg.services.build import build_services

    overrides = {"model": str(bases[family]), "models_dir": str(tmp_path / "models"), "device": "cpu", "threads": 1}
    settings = load_settings(None, {**overrides, "lora_dir": str(tmp_path / "loras"), "outputs": str(tmp_path)})
    services = build_services(settings, prompts=False)
    try:
        values = {"preset": "character", "train_text_encoder": True, "name": "te_tab", "trigger": "zqx"}
        config = services.training.config_for({**values, "images": str(bases["images"])})
        prepared = services.training.prepare(config)
        assert prepared.train_text_encoder is True and prepared.text_encoder_lr == 5e-6
    finally:
        services.jobs.shutdown()


def test_the_cli_trains_it_from_a_config_file(bases, tmp_path):
    from lorapg.cli import main

    config = tmp_path / "run.toml"
    config.write_text("train_text_encoder = true\nrank = 4\nmax_steps = 1\nsample_steps = 0\n", encoding="utf-8")
    args = ["train", str(config), "--model", str(bases["sd3"]), "--images", str(bases["images"]), "--trigger", "zqx"]
    args += ["--name", "te_cli", "--out", str(tmp_path / "loras"), "--threads", "1", "--device", "cpu"]
    assert main(args + ["--models-dir", str(tmp_path / "models")]) == 0
    with safe_open(str(tmp_path / "loras" / "te_cli.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert {key.split(".")[0] for key in keys} == {"transformer", "text_encoder", "text_encoder_2"}


# --- two processes (accelerate launch, gloo) ------------------------------------------------------


def test_two_processes_train_it_with_samples_and_end_their_group(bases, tmp_path):
    """``accelerate launch --num_processes 2`` with sample images: the main process alone draws them while
    the other waits in a barrier, so they must not run the encoders through their DDP wrappers (whose
    forward broadcasts buffers to every process: a collective the waiting one never joins). At the end no
    reference to a wrapper may outlive the group (``end_process_group``): no gloo thread is left."""
    from tests import gloo_probe
    from tests.test_training_distributed import train, write_config

    images = tmp_path / "images"
    write_images(images, 4)  # batch 1 × 2 processes: 2 steps an epoch; the tiny model trains at 32 px
    values = dict(RUN, name="te_ddp", trigger="zqx", model=str(bases["flux"]), batch_size=1)
    values.update(min_snr_gamma=0, noise_offset=0.0, caption_dropout=0.0, cache_latents=True)
    values.update(out=str(tmp_path / "out"), work_dir=str(tmp_path / "work"))
    config = write_config(tmp_path / "ddp.toml", None, images, **values)
    proc = train(tmp_path, config, processes=2, module="tests.gloo_probe", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [line.split("\t")[1] for line in proc.stdout.splitlines() if line.strip()] == ["steps=4"]
    with safe_open(str(tmp_path / "out" / "te_ddp.safetensors"), "pt") as handle:
        assert {key.split(".")[0] for key in handle.keys()} == {"transformer", "text_encoder"}  # noqa: SIM118
    samples = sorted(path.name for path in (tmp_path / "work" / "samples").iterdir())
    assert samples == ["epoch-0001.png", "epoch-0002.png"]  # one per epoch, by the main process
    prefix = gloo_probe.PREFIX
    probes = [line[line.index(prefix) :] for line in proc.stderr.splitlines() if prefix in line]
    assert probes == [f"{prefix} []"] * 2, proc.stderr[-3000:]
