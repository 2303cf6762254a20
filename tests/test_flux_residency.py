"""Flux.1 / SD 3.5 components registered apart with the residency manager (CPU as the "device").

The manager's budget is set so the text encoders and the transformer + VAE fit one group at a time:
the order of moves is read from the manager's own history, where each module ran from forward hooks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorapg.diffusion import engine as engine_module
from lorapg.diffusion.engine import COMPONENT_PREFIX, RESIDENT_NAME, DiffusionEngine, module_bytes
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.quantization import NF4, parse_plan
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.residency import CPU, GPU, LOWVRAM, ResidencyManager
from tests.tiny_flux import build_flux_pipeline, build_sd3_pipeline, save_peft_transformer_lora

T5 = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}
ENCODERS = {"flux": ("text_encoder", "text_encoder_2"), "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("residency")
    flux = build_flux_pipeline(root / "flux")
    save_peft_transformer_lora(root / "loras" / "flux_style.safetensors", flux, seed=1)
    build_sd3_pipeline(root / "sd3")
    return {"flux": root / "flux", "sd3": root / "sd3", "loras": root / "loras"}


def load(folders: dict, family: str, manager: ResidencyManager | None) -> DiffusionEngine:
    engine = DiffusionEngine(LoraLibrary(folders["loras"]), torch.device("cpu"), torch.float32, residency=manager)
    engine.load_model(str(folders[family]))
    return engine


def pixels(engine: DiffusionEngine, family: str, loras=()) -> np.ndarray:
    request = GenerationRequest(
        prompt="a red fox",
        negative_prompt="blurry" if family == "sd3" else "",
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        steps=2,
        seed=7,
        batch_size=2,
        sampler="Euler",
    )
    return np.stack([np.asarray(image, dtype=np.int16) for image in engine.generate(request).images])


def tight_budget(engine: DiffusionEngine, family: str) -> int:
    """Room for the text encoders together or for the transformer + VAE together, never for all."""
    pipe = engine.model.pipe
    encoders = sum(module_bytes(getattr(pipe, attribute)) for attribute in ENCODERS[family])
    denoisers = module_bytes(pipe.transformer) + module_bytes(pipe.vae)
    return max(encoders, denoisers)


def watch(engine: DiffusionEngine, manager: ResidencyManager) -> list[tuple[str, str]]:
    """(component, where the manager had it) each time a component's forward ran."""
    ran: list[tuple[str, str]] = []
    for attribute, module in engine.model.pipe.components.items():
        if isinstance(module, torch.nn.Module):
            name = COMPONENT_PREFIX + attribute
            module.register_forward_pre_hook(
                lambda *args, attribute=attribute, name=name: ran.append((attribute, manager._models[name].location))
            )
    return ran


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_each_component_is_registered_with_its_own_size(folders, family):
    manager = ResidencyManager(budget_bytes=10**9)
    engine = load(folders, family, manager)
    modules = {a: m for a, m in engine.model.pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert {*ENCODERS[family], "transformer", "vae"} == modules.keys()
    assert {m.name: m.size_bytes for m in manager._models.values()} == {
        COMPONENT_PREFIX + attribute: module_bytes(module) for attribute, module in modules.items()
    }
    assert all(m.location == CPU for m in manager._models.values())  # placed on first use


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_t5_leaves_for_the_transformer_and_the_image_is_unchanged(folders, family):
    reference = pixels(load(folders, family, None), family)  # no residency: the pipeline encodes itself
    manager = ResidencyManager(budget_bytes=10**9)
    engine = load(folders, family, manager)
    manager.budget_bytes = tight_budget(engine, family)
    ran = watch(engine, manager)

    image = pixels(engine, family)

    assert np.abs(image - reference).max() <= 1
    assert ran and all(location == GPU for _, location in ran), ran  # every module ran while placed
    history = list(manager.history)
    t5, transformer = COMPONENT_PREFIX + T5[family], COMPONENT_PREFIX + "transformer"
    assert history[0] == (t5, GPU)  # encoders first, T5 the first of them
    placed_encoders = {name for name, where in history[: len(ENCODERS[family])] if where == GPU}
    assert placed_encoders == {COMPONENT_PREFIX + attribute for attribute in ENCODERS[family]}
    # T5 is the first to leave, and it leaves before the transformer is placed.
    first_eviction = next(entry for entry in history if entry[1] != GPU)
    assert first_eviction == (t5, CPU)
    assert history.index((t5, CPU)) < history.index((transformer, GPU))
    assert manager.used_bytes <= manager.budget_bytes


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_llm_and_the_trainer_claim_the_gpu_between_jobs_and_the_components_come_back(folders, family):
    manager = ResidencyManager(budget_bytes=10**9)
    engine = load(folders, family, manager)
    manager.budget_bytes = tight_budget(engine, family)
    first = pixels(engine, family)
    llm_moves: list[str] = []
    manager.register(
        "prompt LLM",
        manager.budget_bytes,
        to_gpu=lambda: llm_moves.append(GPU),
        to_cpu=lambda: llm_moves.append(CPU),
    )
    with manager.use("prompt LLM"):  # the LLM needs the whole budget: every component leaves
        assert [m.name for m in manager._models.values() if m.location == GPU] == ["prompt LLM"]
    pixels(engine, family)
    with manager.exclusive("LoRA training", manager.budget_bytes):  # the trainer holds the whole GPU
        assert all(m.location != GPU for m in manager._models.values())
    mark = len(manager.history)
    ran = watch(engine, manager)

    again = pixels(engine, family)

    assert np.abs(again - first).max() <= 1
    assert llm_moves == [GPU, CPU]
    back = [name for name, where in list(manager.history)[mark:] if where == GPU]
    assert set(back) == {COMPONENT_PREFIX + a for a in (*ENCODERS[family], "transformer", "vae")}
    assert back.index(COMPONENT_PREFIX + T5[family]) < back.index(COMPONENT_PREFIX + "transformer")
    assert all(location == GPU for _, location in ran), ran


def test_lowvram_releases_the_text_encoders_as_soon_as_the_prompt_is_encoded(folders):
    manager = ResidencyManager(budget_bytes=10**9, policy=LOWVRAM)
    engine = load(folders, "flux", manager)  # on a CPU "device" lowvram is the manager's, no diffusers offload
    pixels(engine, "flux")
    history = list(manager.history)
    last_encoder_out = max(history.index((COMPONENT_PREFIX + a, CPU)) for a in ENCODERS["flux"])
    assert last_encoder_out < history.index((COMPONENT_PREFIX + "transformer", GPU))


def test_loras_apply_the_same_with_components_apart(folders):
    """LoRAs are fused with the transformer and CLIP placed together, the rest off the "device": same image."""
    loras = (("flux_style", 0.8),)
    reference = pixels(load(folders, "flux", None), "flux", loras)
    manager = ResidencyManager(budget_bytes=10**9)
    engine = load(folders, "flux", manager)
    pipe = engine.model.pipe
    # The fuse needs the transformer and CLIP on the device together (the tiny CLIP is larger than its VAE).
    manager.budget_bytes = max(
        tight_budget(engine, "flux"), module_bytes(pipe.transformer) + module_bytes(pipe.text_encoder)
    )
    pixels(engine, "flux")  # leaves the transformer placed and the encoders off
    with_lora = pixels(engine, "flux", loras)
    assert np.abs(with_lora - reference).max() <= 1
    assert np.abs(with_lora - pixels(engine, "flux")).max() > 1  # the LoRA changes the image


def test_loras_are_fused_with_the_transformer_and_clip_placed_and_t5_left_where_it_is(folders):
    """The deltas are computed on the device that runs them (on a GPU, in its dtype), never wherever the
    transformer happened to be: the same request gives the same bytes whether it started evicted or not."""
    loras = (("flux_style", 0.8),)
    manager = ResidencyManager(budget_bytes=10**9)
    engine = load(folders, "flux", manager)
    transformer, clip, t5 = (COMPONENT_PREFIX + a for a in ("transformer", "text_encoder", T5["flux"]))
    during: list[dict] = []  # where each component was, and the moves so far, while the LoRA was fused
    activate = engine.model.adapters.activate

    def recording(selections):
        activate(selections)
        if selections:
            locations = {name: model.location for name, model in manager._models.items()}
            during.append({"at": locations, "moves": list(manager.history)})

    engine.model.adapters.activate = recording
    assert manager._models[transformer].location == CPU  # freshly loaded: the transformer starts evicted
    from_evicted = pixels(engine, "flux", loras)
    pixels(engine, "flux")  # no LoRA: unfused, and the transformer stays placed
    assert manager._models[transformer].location == GPU
    from_resident = pixels(engine, "flux", loras)

    assert len(during) == 2
    for record in during:
        assert record["at"][transformer] == GPU and record["at"][clip] == GPU
    first = during[0]
    assert first["moves"] == [(transformer, GPU), (clip, GPU)]  # placed for the fuse; T5 not moved for it
    assert first["at"][t5] == CPU
    assert np.abs(from_evicted - from_resident).max() <= 1


def test_a_load_that_fails_leaves_the_current_model_registered(folders, monkeypatch):
    manager = ResidencyManager(budget_bytes=10**9)
    engine = load(folders, "flux", manager)
    current, registered = engine.model, set(manager._models)
    reference = pixels(engine, "flux")

    def fails(pipe, family):
        raise RuntimeError("native size unreadable")

    monkeypatch.setattr(engine_module, "native_size", fails)  # a step after the new pipeline is built
    with pytest.raises(RuntimeError, match="native size"):
        engine.load_model(str(folders["sd3"]))

    assert engine.model is current
    assert set(manager._models) == registered  # Flux's components, not the failed SD 3.5 pipeline's
    ran = watch(engine, manager)
    assert np.abs(pixels(engine, "flux") - reference).max() <= 1
    assert ran and all(location == GPU for _, location in ran), ran  # each module ran while placed


def test_hold_pins_without_placing():
    manager = ResidencyManager(budget_bytes=10)
    moves: list[str] = []
    manager.register("a", 6, to_gpu=lambda: moves.append("+a"), to_cpu=lambda: moves.append("-a"))
    manager.register("b", 6, to_gpu=lambda: moves.append("+b"), to_cpu=lambda: moves.append("-b"))
    with manager.use("a"):
        pass
    with manager.hold("a", "b"):
        assert manager.free_all() == []  # held: "Free GPU memory now" leaves them where they are
        assert manager._models["b"].location == CPU
    assert moves == ["+a"]
    assert manager.free_all() == ["a"]


def test_sd_models_stay_registered_whole(tiny_models):
    manager = ResidencyManager(budget_bytes=10**9)
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32, residency=manager)
    engine.load_model(str(tiny_models["sd15"]))
    assert [m.name for m in manager._models.values()] == [RESIDENT_NAME]


def test_loading_another_model_unregisters_the_previous_components(folders, tiny_models):
    manager = ResidencyManager(budget_bytes=10**9)
    engine = load(folders, "flux", manager)
    engine.load_model(str(tiny_models["sd15"]))
    assert [m.name for m in manager._models.values()] == [RESIDENT_NAME]
    engine.load_model(str(folders["sd3"]))
    assert RESIDENT_NAME not in manager._models
    assert {m.name for m in manager._models.values()} == {
        COMPONENT_PREFIX + a for a in (*ENCODERS["sd3"], "transformer", "vae")
    }


# --- quantized components, and the real device ------------------------------------------------------


def quantized_engine(folders, family: str, manager, device: str = "cpu", dtype=torch.float32) -> DiffusionEngine:
    engine = DiffusionEngine(
        LoraLibrary(folders["loras"]),
        torch.device(device),
        dtype,
        residency=manager,
        quantize=parse_plan(NF4),
    )
    engine.load_model(str(folders[family]))
    return engine


def test_nf4_components_apart_give_the_nf4_image(folders):
    reference = pixels(quantized_engine(folders, "flux", None), "flux")
    manager = ResidencyManager(budget_bytes=10**9)
    engine = quantized_engine(folders, "flux", manager)
    manager.budget_bytes = tight_budget(engine, "flux")
    assert np.abs(pixels(engine, "flux") - reference).max() <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_on_cuda_nf4_components_move_and_come_back_with_the_same_image(folders, family):
    """The real moves: NF4 T5 and transformer run only on the GPU (bitsandbytes' CPU repacking trap), leave
    for another model and come back, and the image stays the one of a pipeline kept whole on the GPU."""
    reference = pixels(quantized_engine(folders, family, None, "cuda", torch.bfloat16), family)
    manager = ResidencyManager(budget_bytes=10**9, empty_cache=torch.cuda.empty_cache)
    engine = quantized_engine(folders, family, manager, "cuda", torch.bfloat16)
    manager.budget_bytes = tight_budget(engine, family)
    devices: list[str] = []
    for module in engine.model.pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.register_forward_pre_hook(lambda m, *args: devices.append(next(m.parameters()).device.type))
    first = pixels(engine, family)
    manager.register("prompt LLM", manager.budget_bytes, to_gpu=lambda: None, to_cpu=lambda: None)
    with manager.use("prompt LLM"):
        assert next(engine.model.pipe.transformer.parameters()).device.type == "cpu"
    again = pixels(engine, family)
    assert devices and set(devices) == {"cuda"}
    assert np.abs(first - reference).max() <= 1
    assert np.abs(again - first).max() <= 1
