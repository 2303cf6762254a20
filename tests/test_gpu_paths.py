"""Half-precision LoRA fusing: after any number of fuse → unfuse cycles, the base model is exact again.

In fp16/bf16 ``W + ΔW - ΔW`` is not ``W`` (each operation rounds), so an unfuse that subtracts the
delta again would leave images drifting with the history of selections. The fuser restores exact CPU
copies instead: the weights must equal the never-fused ones bit for bit, and scale 0 or no LoRA must
give exactly the never-fused image (the same computation on the same weights, so exact equality holds).

The dtype tests run on CUDA where a GPU is lent (marker ``gpu``), and on CPU here: torch's CPU kernels
run the tiny model in bf16 and fp16 in a fraction of a second per image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest

DEVICES_AND_DTYPES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu),
]
# Several selections, several cycles: diffusers and kohya layouts, stacked, at several scales and zero.
CYCLE = [
    [("style", 0.8)],
    [("style", 0.8), ("other", 0.5)],
    [("other", 1.0)],
    [("style_kohya", 1.2), ("other", 0.3)],
    [("style", 0.0)],
    [("style", 1.5)],
]
CYCLES = 3


def make_engine(tiny_models, device: str, dtype: torch.dtype) -> DiffusionEngine:
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device(device), dtype)
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


def base_weights(engine: DiffusionEngine) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """Every UNet and text encoder parameter with an exact CPU copy, taken before any LoRA is loaded.

    peft wraps layers later but keeps their parameter objects, so the same objects are compared then.
    """
    pipe = engine.model.pipe
    return [
        (f"{component}.{name}", param, param.detach().to("cpu", copy=True))
        for component in ("unet", "text_encoder")
        for name, param in getattr(pipe, component).named_parameters()
    ]


def changed_weights(snapshot) -> list[str]:
    # Compared as raw bits: equal values with another bit pattern (-0.0, NaN payloads) count as changed.
    return [name for name, param, copy in snapshot if not torch.equal(bits(param.detach().cpu()), bits(copy))]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


@pytest.mark.parametrize(("device", "dtype"), DEVICES_AND_DTYPES)
def test_half_precision_fuse_unfuse_cycles_give_the_never_fused_base_exactly(tiny_models, device, dtype):
    engine = make_engine(tiny_models, device, dtype)
    snapshot = base_weights(engine)
    never_fused = pixels(engine)

    fused_images = []
    for _ in range(CYCLES):
        for selection in CYCLE:
            fused_images.append(pixels(engine, selection))
    adapters = engine.model.adapters
    assert adapters.fuser.fuse_count >= CYCLES * len(CYCLE)  # every change of selection fused again
    assert engine.model.pipe.unet.dtype == dtype
    # The LoRAs did something in this dtype: otherwise "exact afterwards" would prove nothing.
    assert int(np.abs(fused_images[0] - never_fused).max()) > 2

    at_zero = pixels(engine, [("style", 0.0), ("other", 0.0)])
    assert adapters.fuser.fused is not None  # scale 0 ran fused too (a zero delta merged)
    assert np.array_equal(at_zero, never_fused)
    assert changed_weights(snapshot) == []

    without = pixels(engine)
    assert np.array_equal(without, never_fused)
    assert changed_weights(snapshot) == []


@pytest.mark.parametrize(("device", "dtype"), DEVICES_AND_DTYPES)
def test_half_precision_weights_are_exact_after_each_unfuse(tiny_models, device, dtype):
    """Not only at the end: every selection change starts from the exact base weights."""
    engine = make_engine(tiny_models, device, dtype)
    snapshot = base_weights(engine)
    adapters = engine.model.adapters
    selections = engine.resolve_loras
    for selection in CYCLE * 2:
        request = GenerationRequest(prompt="x", loras=tuple(LoraRequest(n, s) for n, s in selection))
        adapters.activate(selections(request))
        adapters.fuser.unfuse()
        adapters.patches.remove()
        assert changed_weights(snapshot) == [], f"unfusing {selection} left the weights changed"
