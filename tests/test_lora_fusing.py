"""The active LoRA selection is fused into the weights, and unfused exactly when it changes.

Fused and unfused runs take different code paths (one matmul with W + ΔW against W·x + B·A·x),
so their images are compared within one pixel level; the same request on the same (fused) path
is compared exactly, as the README's reproducibility promise says.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from lorapg.diffusion.adapters import LoraSelection
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from tests.tiny_models import random_lora_state_dict, save_diffusers_lora

LEVELS = 1  # fused against unfused, fp32 on CPU: at most one 8-bit pixel level apart


def make_engine(tiny_models, model: str = "sd15", *, fusing: bool = True) -> DiffusionEngine:
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models[model]))
    engine.model.adapters.fuser.enabled = fusing  # off: the unfused reference, adapters run per step
    return engine


def pixels(engine: DiffusionEngine, loras=(), steps: int = 3) -> np.ndarray:
    request = GenerationRequest(
        prompt="a red fox in the snow",
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        steps=steps,
        seed=1234,
    )
    return np.stack([np.asarray(image, dtype=np.int16) for image in engine.generate(request).images])


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def count_adapter_calls(engine: DiffusionEngine) -> list[int]:
    """A counter of forward calls into any LoRA down-projection: the per-step cost fusing removes."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    pipe = engine.model.pipe
    for component in (pipe.unet, pipe.text_encoder):
        for module in component.modules():
            if isinstance(module, BaseTunerLayer):
                for down in module.lora_A.values():
                    down.register_forward_hook(hook)
    return calls


@pytest.fixture(scope="module")
def sd15(tiny_models):
    return make_engine(tiny_models)


@pytest.fixture(scope="module")
def unfused(tiny_models):
    return make_engine(tiny_models, fusing=False)


def test_an_active_selection_runs_fused_with_no_adapter_work_per_step(sd15, unfused):
    selection = [("style", 0.8), ("other", 0.5)]
    calls = count_adapter_calls(sd15)
    fused = pixels(sd15, selection)
    assert sd15.model.adapters.fuser.fused is not None
    assert calls[0] == 0, "a fused selection still ran the adapters' matmuls"
    assert max_diff(fused, pixels(unfused, selection)) <= LEVELS
    assert np.array_equal(pixels(sd15, selection), fused)  # the same request, the same bytes
    assert sd15.model.adapters.fuser.fuse_count == 1  # used again: nothing to redo


def test_the_reference_without_fusing_does_run_the_adapters(unfused):
    calls = count_adapter_calls(unfused)
    pixels(unfused, [("style", 0.8)])
    assert calls[0] > 0  # so the zero above means fused, not "hook never called"


@pytest.mark.parametrize(
    "change",
    [[("style", 0.3), ("other", 0.5)], [("style", 0.8)], [("other", 0.5), ("triggered", 1.0)]],
    ids=["scale", "fewer", "names"],
)
def test_a_changed_selection_refuses_and_equals_a_fresh_engine(tiny_models, sd15, unfused, change):
    selection = [("style", 0.8), ("other", 0.5)]
    pixels(sd15, selection)
    held = sd15.model.adapters.fuser.fused
    changed = pixels(sd15, change)
    assert sd15.model.adapters.fuser.fused not in (None, held)
    assert max_diff(changed, pixels(unfused, change)) <= LEVELS
    # Same path, different history: the unfuse restored the weights exactly, so the bytes match.
    assert np.array_equal(changed, pixels(make_engine(tiny_models), change))


def test_fuse_unfuse_then_no_lora_equals_never_fused(tiny_models, sd15):
    never_fused = pixels(make_engine(tiny_models))
    for selection in ([("style", 1.2), ("other", 0.9)], [("style", 0.0)]):
        pixels(sd15, selection)
        assert sd15.model.adapters.fuser.fused is not None
        after = pixels(sd15)
        assert sd15.model.adapters.fuser.fused is None
        assert max_diff(after, never_fused) <= LEVELS


def test_scale_zero_fused_equals_the_base(tiny_models, sd15):
    base = pixels(make_engine(tiny_models))
    zero = pixels(sd15, [("style", 0.0), ("other", 0.0)])
    assert sd15.model.adapters.fuser.fused is not None
    assert max_diff(zero, base) <= LEVELS


def test_sdxl_selection_is_fused_and_unfuses(tiny_models):
    engine = make_engine(tiny_models, "sdxl")
    reference = make_engine(tiny_models, "sdxl", fusing=False)
    base = pixels(engine, steps=2)
    fused = pixels(engine, [("xl/xl_style", 0.9)], steps=2)
    assert engine.model.adapters.fuser.fused is not None
    assert max_diff(fused, pixels(reference, [("xl/xl_style", 0.9)], steps=2)) <= LEVELS
    assert max_diff(fused, base) > 10  # the fused LoRA still has its effect
    assert max_diff(pixels(engine, steps=2), base) <= LEVELS
    assert engine.model.adapters.fuser.fused is None


def base_weights(pipe) -> dict[str, torch.Tensor]:
    """The UNet's own weights by their plain names (peft moves a wrapped layer's under ``base_layer``)."""
    return {
        name.replace(".base_layer", ""): p.detach().clone()
        for name, p in pipe.unet.named_parameters()
        if "lora_" not in name
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weights_come_back_bit_for_bit(tiny_models, dtype):
    """Subtracting ΔW again is not exact (in 16 bits not even close); the fuser restores its CPU copy."""
    engine = make_engine(tiny_models)
    pipe, adapters = engine.model.pipe, engine.model.adapters
    pipe.to(dtype=dtype)
    library = engine.library
    selections = [
        [LoraSelection(library.resolve("style"), 1.3), LoraSelection(library.resolve("other"), 0.7)],
        [LoraSelection(library.resolve("style"), 0.4)],
    ]
    adapters.activate(selections[0])
    adapters.activate([])
    before = base_weights(pipe)
    for _ in range(3):  # fuse/unfuse cycles must not drift
        for selection in selections:
            adapters.activate(selection)
            assert adapters.fuser.fused is not None
            changed = base_weights(pipe)
            assert any(not torch.equal(changed[n], before[n]) for n in before)  # ΔW is in the weights
        adapters.activate([])
        after = base_weights(pipe)
        assert all(torch.equal(after[n], before[n]) for n in before)


def test_a_layer_that_cannot_merge_leaves_the_selection_unfused(tiny_models, monkeypatch, caplog):
    engine = make_engine(tiny_models)
    reference = pixels(make_engine(tiny_models, fusing=False), [("style", 0.6)])

    def refuse(self, *args, **kwargs):
        raise ValueError("cannot merge this layer")

    monkeypatch.setattr(LoraLinear, "merge", refuse)
    image = pixels(engine, [("style", 0.6)])
    assert engine.model.adapters.fuser.fused is None
    assert "runs unfused" in caplog.text
    assert max_diff(image, reference) <= LEVELS
    # It is not retried on every request, and the weights were left as they were.
    assert np.array_equal(pixels(engine, [("style", 0.6)]), image)


def test_a_lora_file_replaced_while_fused_is_read_again_into_base_weights(tiny_models, tmp_path):
    """The file's new version loads into unfused weights; fused again, it equals a fresh engine's image."""
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    engine = DiffusionEngine(LoraLibrary(loras), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sd15"]))
    before = pixels(engine, [("style", 1.0)])
    shutil.copy(loras / "other.safetensors", loras / "style.safetensors")
    os.utime(loras / "style.safetensors", (1, 1))  # a new stamp even within the clock's resolution
    after = pixels(engine, [("style", 1.0)])
    assert engine.model.adapters.files_read == 2
    assert max_diff(after, before) > 10
    fresh = DiffusionEngine(LoraLibrary(loras), torch.device("cpu"), torch.float32)
    fresh.load_model(str(tiny_models["sd15"]))
    assert np.array_equal(after, pixels(fresh, [("style", 1.0)]))


def test_a_lora_that_wraps_more_layers_is_fused_everywhere(tiny_models, tmp_path):
    """A UNet-only LoRA first, then one that also wraps the text encoder: every new layer is fused too."""
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    engine = DiffusionEngine(LoraLibrary(loras), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sd15"]))
    state, config = random_lora_state_dict(engine.model.pipe, seed=5, text_encoder=False)
    save_diffusers_lora(loras / "unet_only.safetensors", engine.model.pipe, state, config)
    pixels(engine, [("unet_only", 1.0)])
    pixels(engine, [("unet_only", 1.0), ("style", 0.5)])
    calls = count_adapter_calls(engine)
    pixels(engine, [("unet_only", 1.0), ("style", 0.7)])
    assert calls[0] == 0, "layers wrapped by a later LoRA ran unfused"
