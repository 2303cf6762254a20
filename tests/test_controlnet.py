"""ControlNet on tiny SD 1.x and SDXL models (32 px, 2-4 steps): tiny ControlNets made with
``ControlNetModel.from_unet`` and saved under a models/controlnet folder, loaded through the product
path; the engine, preprocessors, PNG parameters and Reuse, the CLI and the APIs over HTTP."""

from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image, ImageDraw

from lorapg.cli import main
from lorapg.diffusion.controlnet import ControlUnit, canny, check_units
from lorapg.diffusion.controlnet_models import ControlNetLibrary
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.img2img import Img2ImgOptions
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest, validate
from lorapg.errors import UserError
from lorapg.residency import ResidencyManager
from tests.app_server import running_app

SIZE = 32


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def save_tiny_controlnet(pipeline_folder: Path, out: Path, seed: int) -> Path:
    """A ControlNet built from the tiny UNet; its zero-initialised output convolutions get random
    weights, so the control image visibly steers the result (a fresh one would change nothing)."""
    unet = UNet2DConditionModel.from_pretrained(pipeline_folder / "unet")
    # The tiny VAE downsamples by 2: the conditioning embedding must too (one stride-2 step).
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    generator = torch.Generator().manual_seed(seed)
    zero_modules = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zero_modules.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for module in zero_modules:
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> Path:
    """A models folder with controlnet/{edges, edges2} (SD 1.x) and controlnet/xl_edges (SDXL)."""
    root = tmp_path_factory.mktemp("controlnet-models")
    save_tiny_controlnet(tiny_models["sd15"], root / "controlnet" / "edges", seed=1)
    save_tiny_controlnet(tiny_models["sd15"], root / "controlnet" / "edges2", seed=2)
    save_tiny_controlnet(tiny_models["sdxl"], root / "controlnet" / "xl_edges", seed=3)
    return root


def make_engine(tiny_models, models: Path, base: str = "sd15", **kwargs) -> DiffusionEngine:
    engine = DiffusionEngine(
        LoraLibrary(tiny_models["loras"]),
        torch.device("cpu"),
        torch.float32,
        controlnets=ControlNetLibrary(models / "controlnet"),
        annotators_dir=models / "annotators",
        **kwargs,
    )
    engine.load_model(str(tiny_models[base]))
    return engine


@pytest.fixture(scope="module")
def engine(tiny_models, models):
    return make_engine(tiny_models, models)


def shapes(size: int = SIZE, flip: bool = False) -> Image.Image:
    """A control image with hard edges (a white square and a bar on black)."""
    image = Image.new("RGB", (size, size), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 4, 18, 18) if not flip else (14, 14, 28, 28), fill="white")
    draw.rectangle((0, 24, size - 1, 27), fill=(200, 60, 60))
    return image


def request(*units: ControlUnit, **overrides) -> GenerationRequest:
    values = dict(prompt="a red fox", steps=3, seed=7, width=SIZE, height=SIZE, controlnet=tuple(units))
    return GenerationRequest(**{**values, **overrides})


def unit(model: str = "edges", **overrides) -> ControlUnit:
    return ControlUnit(**{"model": model, "image": shapes(), **overrides})


# --- the engine ----------------------------------------------------------------------------------


def test_the_control_image_steers_the_result_and_weight_zero_is_plain_txt2img(engine):
    plain = engine.generate(request()).images[0]
    steered = engine.generate(request(unit()))
    other_image = engine.generate(request(unit(image=shapes(flip=True)))).images[0]
    assert distance(steered.images[0], plain) > 2 and distance(steered.images[0], other_image) > 1
    assert steered.control_images[0].size == (SIZE, SIZE)
    # Weight 0 multiplies every residual by 0: the plain image, up to the other pipeline's float order.
    assert distance(engine.generate(request(unit(weight=0))).images[0], plain) < 1


def test_a_guidance_window_past_every_step_has_no_effect(engine):
    plain = engine.generate(request(steps=4)).images[0]
    # 4 steps: step i runs at i/4 (0, .25, .5, .75); a window from 0.9 holds none of them.
    late = engine.generate(request(unit(guidance_start=0.9, guidance_end=1.0), steps=4)).images[0]
    early = engine.generate(request(unit(guidance_start=0.0, guidance_end=0.5), steps=4)).images[0]
    assert distance(late, plain) < 1
    assert distance(early, plain) > 1


def test_loras_still_apply_with_a_controlnet(engine):
    without = engine.generate(request(unit())).images[0]
    styled = engine.generate(request(unit(), loras=(LoraRequest("style", 1.0),))).images[0]
    assert distance(styled, without) > 1


def test_two_units_run_as_one_multi_controlnet(engine):
    one = engine.generate(request(unit())).images[0]
    two = engine.generate(request(unit(), unit("edges2", image=shapes(flip=True), weight=0.8)))
    assert len(two.control_images) == 2 and distance(two.images[0], one) > 1
    # The second unit at weight 0 leaves the first one's image.
    muted = engine.generate(request(unit(), unit("edges2", image=shapes(flip=True), weight=0))).images[0]
    assert distance(muted, one) < 1


def test_canny_preprocessor_makes_an_edge_map(engine):
    edges = canny(shapes(), 100, 200)
    grey = np.asarray(edges.convert("L"))
    assert set(np.unique(grey)) <= {0, 255} and grey[11, 11] == 0 and grey[3:6, 11].max() == 255  # the top side
    result = engine.generate(request(unit(module="canny")))
    assert np.array_equal(np.asarray(result.control_images[0]), np.asarray(edges))


def test_sdxl_controlnet_and_the_family_check(tiny_models, models):
    xl = make_engine(tiny_models, models, base="sdxl")
    plain = xl.generate(request()).images[0]
    steered = xl.generate(request(unit("xl_edges"), loras=(LoraRequest("xl/xl_style", 0.8),))).images[0]
    assert steered.size == (SIZE, SIZE) and distance(steered, plain) > 1
    with pytest.raises(UserError, match="ControlNet model edges is made for SD 1.x, but the loaded base model is SDXL"):
        xl.generate(request(unit("edges")))


def test_a_controlnet_is_loaded_once_and_counted_by_the_residency_manager(tiny_models, models):
    residency = ResidencyManager(10 * 1024**3)
    managed = make_engine(tiny_models, models, residency=residency)
    managed.generate(request(unit()))
    managed.generate(request(unit(weight=0.5)))
    names = [row["name"] for row in residency.status()]
    assert "controlnet edges" in names and "diffusion pipeline" in names
    assert len(managed.controlnets._loaded) == 1


def test_bad_units_are_refused_by_name(engine, tmp_path):
    cases = [
        (unit("missing"), "ControlNet model 'missing' is not in"),
        (unit(weight=3), "ControlNet unit 0 weight must be 0–2, got 3."),
        (unit(guidance_start=0.5, guidance_end=0.5), "ControlNet unit 0 guidance start (0.5) must be below"),
        (unit(image=b"not an image"), "ControlNet unit 0 image is not an image this app can read"),
        (unit(image=None), "ControlNet unit 0 has no image"),
        (unit(module="openpose"), "ControlNet unit 0 preprocessor 'openpose' is not available; pick one of none"),
        (unit(model=""), "ControlNet unit 0 model is missing"),
    ]
    for bad, message in cases:
        with pytest.raises(UserError, match=None) as caught:
            engine.generate(request(bad))
        assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UserError, match="at most 3 units"):
        check_units([unit()] * 4)
    with pytest.raises(UserError, match="ControlNet runs with txt2img so far"):
        validate(request(unit(), img2img=Img2ImgOptions(image=shapes())), 64)
    with pytest.raises(UserError, match="ControlNet is built for SD 1.x and SDXL so far"):
        validate(request(unit()), 64, family="flux")


def test_compile_mode_refuses_controlnet_with_one_line(tiny_models, models):
    compiled = make_engine(tiny_models, models, compile_unet=True, compile_backend="eager")
    with pytest.raises(UserError, match="ControlNet does not run with --compile yet"):
        compiled.generate(request(unit()))


def test_the_depth_preprocessor_says_where_its_weights_go(engine, tmp_path):
    with pytest.raises(UserError) as caught:
        engine.generate(request(unit(module="depth_anything")))
    message = str(caught.value)
    assert "Preprocessor depth needs a depth-estimation model in" in message and "annotators/depth" in message
    assert "hf download depth-anything/Depth-Anything-V2-Small-hf" in message
