"""One range per parameter: the UI's widgets, the API, validation and Reuse all take lorapg.limits.

The app is built in this process on the tiny model and driven through gradio_client, like a browser
or an API client would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import urllib.request

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lorapg.limits import BATCH_SIZE, CFG_SCALE, LORA_SCALE, RANDOM_SEED, SEED, SIZE, STEPS, TRAINING
from lorapg.services.gallery import GalleryService
from lorapg.training.config import RANGES, TrainConfig
from tests.app_server import free_port
from tests.tiny_models import tiny_runtime

# Generate-tab widget label -> the range it must offer.
WIDGET_RANGES = {"Steps": STEPS, "CFG scale": CFG_SCALE, "Width": SIZE, "Height": SIZE, "Batch size": BATCH_SIZE}
GENERATE_ORDER = (
    "prompt",
    "negative_prompt",
    "loras",
    "steps",
    "cfg_scale",
    "sampler",
    "width",
    "height",
    "seed",
    "batch_size",
    "clip_skip",
    "variation_seed",
    "variation_strength",
    # img2img (a raw HTTP call sends every input; gradio_client fills the defaults itself)
    "init_image",
    "mask",
    "denoising_strength",
    "resize_mode",
    "mask_blur",
    "masked_content",
    "mask_invert",
    "only_masked",
    "only_masked_padding",
    # the hires fix (off)
    "enable_hr",
    "hr_upscaler",
    "hr_scale",
    "hr_second_pass_steps",
    "hr_denoising_strength",
    # ControlNet (no model)
    "controlnet_model",
    "controlnet_image",
    "controlnet_module",
    "controlnet_weight",
    "controlnet_guidance_start",
    "controlnet_guidance_end",
    "controlnet_resize_mode",
    "controlnet_threshold_a",
    "controlnet_threshold_b",
)
GENERATE = {
    "negative_prompt": "",
    "loras": "",
    "steps": 2,
    "cfg_scale": 7,
    "sampler": "Euler a",
    "width": 64,
    "height": 64,
    "seed": 5,
    "batch_size": 1,
    "clip_skip": 1,
    "variation_seed": -1,
    "variation_strength": 0,
}
# What the raw call sends for img2img's inputs: no init image (txt2img) and the widgets' defaults.
RAW_IMG2IMG = {
    "init_image": None,
    "mask": None,
    "denoising_strength": 0.75,
    "resize_mode": 0,
    "mask_blur": 4,
    "masked_content": "original",
    "mask_invert": False,
    "only_masked": False,
    "only_masked_padding": 32,
    # and the hires fix's widgets, off
    "enable_hr": False,
    "hr_upscaler": "Latent",
    "hr_scale": 2,
    "hr_second_pass_steps": 0,
    "hr_denoising_strength": 0.7,
    # and ControlNet's, with no model
    "controlnet_model": "None",
    "controlnet_image": None,
    "controlnet_module": "none",
    "controlnet_weight": 1,
    "controlnet_guidance_start": 0,
    "controlnet_guidance_end": 1,
    "controlnet_resize_mode": "Crop and Resize",
    "controlnet_threshold_a": 100,
    "controlnet_threshold_b": 200,
}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    from lorapg.ui.app_ui import build_ui

    runtime = tiny_runtime(tmp_path_factory.mktemp("limits"))
    gallery = GalleryService(runtime.gallery, runtime.library)
    demo = build_ui(runtime.service, gallery)
    _, url, _ = demo.queue().launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True
    )
    try:
        yield demo, Client(url, verbose=False), runtime.settings, gallery
    finally:
        demo.close()


def test_every_generate_widget_offers_exactly_the_validated_range(app) -> None:
    demo, *_ = app
    numeric = [b for b in demo.blocks.values() if isinstance(b, gr.Slider | gr.Number) and b.label in WIDGET_RANGES]
    assert sorted(b.label for b in numeric) == sorted(WIDGET_RANGES)
    for block in numeric:
        expected = WIDGET_RANGES[block.label]
        assert (block.minimum, block.maximum, block.step) == (expected.minimum, expected.maximum, expected.step), (
            block.label
        )
    (seed,) = [b for b in demo.blocks.values() if isinstance(b, gr.Number) and str(b.label).startswith("Seed (")]
    assert (seed.minimum, seed.maximum, seed.value) == (RANDOM_SEED, SEED.maximum, RANDOM_SEED)


def test_lora_scale_sliders_offer_the_validated_range(app) -> None:
    """The per-LoRA sliders are drawn by a gr.render when LoRAs are picked: draw them here."""
    demo, *_ = app
    (render,) = [r for r in demo.renderables if r.fn.__name__ == "render_scale_sliders"]
    with gr.Blocks() as drawn:
        render.fn(["style"], {})
    (slider,) = [b for b in drawn.blocks.values() if isinstance(b, gr.Slider)]
    assert (slider.minimum, slider.maximum, slider.step, slider.value) == (
        LORA_SCALE.minimum,
        LORA_SCALE.maximum,
        LORA_SCALE.step,
        LORA_SCALE.default,
    )


def test_training_ranges_come_from_limits_and_hold_the_defaults() -> None:
    assert {key: (r.minimum, r.maximum) for key, r in TRAINING.items()} == RANGES
    defaults = TrainConfig()
    for key, limits in TRAINING.items():
        assert getattr(defaults, key) in limits and getattr(defaults, key) == limits.default, key
    assert (TRAINING["seed"].minimum, TRAINING["seed"].maximum) == (SEED.minimum, SEED.maximum)


def a1111_png(path, *, steps, cfg, seed, size, scale) -> str:
    text = (
        f"a fox <lora:style:{scale:g}>\nNegative prompt: blurry\nSteps: {steps}, Sampler: Euler a, "
        f"CFG scale: {cfg:g}, Seed: {seed}, Size: {size}x{size}, Model: tiny-sd15"
    )
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8), "white").save(path, pnginfo=info)
    return str(path)


@pytest.mark.parametrize(
    "values",
    [
        # The reported case: A1111's CFG 25, past the old slider's 20.
        {"steps": 30, "cfg": 25.0, "seed": 7, "size": 512, "scale": 0.7},
        {
            "steps": STEPS.maximum,
            "cfg": CFG_SCALE.maximum,
            "seed": SEED.maximum,
            "size": SIZE.maximum,
            "scale": LORA_SCALE.maximum,
        },
        {
            "steps": STEPS.minimum,
            "cfg": CFG_SCALE.minimum,
            "seed": SEED.minimum,
            "size": SIZE.minimum,
            "scale": LORA_SCALE.minimum,
        },
    ],
)
def test_reuse_puts_every_value_back_within_the_widgets_bounds(app, tmp_path, values) -> None:
    demo, client, settings, gallery = app
    png = a1111_png(tmp_path / "made-elsewhere.png", **values)
    outputs = client.predict(handle_file(png), settings.model, api_name="/png_info_send")
    prompt, negative, _, steps, cfg, sampler, width, height, seed, batch, clip_skip, _, strength, notes, *_ = outputs
    assert (prompt, negative, sampler, batch, clip_skip, strength, notes) == ("a fox", "blurry", "Euler a", 1, 1, 0, "")
    assert (steps, seed, width, height) == (values["steps"], values["seed"], values["size"], values["size"])
    assert math.isclose(cfg, values["cfg"])
    # The LoRA scales go to a gr.State, which the API does not return: ask the service Reuse calls.
    (scale,) = [s for name, s in gallery.reuse_parameters(gallery.png_info(png)).loras if name == "style"]
    assert math.isclose(scale, values["scale"])
    # What Reuse puts in a widget, the widget can hold (a browser clamps to its bounds).
    widgets = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Slider | gr.Number)}
    for label, value in (("Steps", steps), ("CFG scale", cfg), ("Width", width), ("Height", height)):
        assert widgets[label].minimum <= value <= widgets[label].maximum, label
    assert LORA_SCALE.minimum <= scale <= LORA_SCALE.maximum


def test_generate_endpoint_takes_the_range_maximum(app) -> None:
    """... and the API takes it back: Gradio's slider bounds once refused CFG 25 that validation allows."""
    _, client, *_ = app
    for cfg in (25, CFG_SCALE.maximum):
        *_, seed_used, _ = client.predict(
            "a fox", **{**GENERATE, "cfg_scale": cfg, "batch_size": BATCH_SIZE.maximum}, api_name="/generate"
        )
        assert seed_used == GENERATE["seed"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", math.nan, "Steps must be a whole number, got nan"),
        ("steps", "many", "Steps must be a whole number, got 'many'"),
        ("cfg_scale", math.nan, "CFG scale must be a number, got nan"),
        ("cfg_scale", "high", "CFG scale must be a number, got 'high'"),
        ("cfg_scale", 31, "CFG scale must be 0–30, got 31"),
        ("width", "wide", "Width must be a whole number, got 'wide'"),
        ("height", math.inf, "Height must be a whole number, got inf"),
        ("batch_size", [2], r"Batch size must be a whole number, got \[2\]"),
        ("seed", "x" * 100, r"Seed 'x+… \(\d+ characters\) is not a whole number"),
        ("prompt", None, "Prompt must be text, got null"),
        ("prompt", ["a", "fox"], "Prompt must be text, got list"),
        ("prompt", "a \ud800 fox", "Prompt contains a lone UTF-16 surrogate .U.D800. at position 2"),
        ("prompt", "a\x00fox", r"Prompt contains a null character .U\+0000. at position 1"),
        ("negative_prompt", ["blurry"], "Negative prompt must be text, got list"),
        (
            "prompt",
            "fox " * 2001,
            "Prompt is 8,004 characters, over the limit of 8,000 .setting max_prompt_chars.",
        ),
        ("negative_prompt", "n" * 8001, "Negative prompt is 8,001 characters, over the limit of 8,000"),
    ],
)
def test_bad_generate_input_names_the_field_and_the_app_keeps_serving(app, field, value, message) -> None:
    _, client, settings, _ = app
    assert settings.max_prompt_chars == 8000
    arguments = {"prompt": "a fox", **GENERATE, **RAW_IMG2IMG, field: value}
    error = call_raw(client.src, "generate", [arguments[name] for name in GENERATE_ORDER])
    assert re.search(message, error), error
    assert "preprocess" not in error
    assert client.predict("a fox", **GENERATE, api_name="/generate")[2] == GENERATE["seed"]


def call_raw(url: str, api_name: str, data: list) -> str:
    """Call an endpoint over Gradio's HTTP API and return its error message.

    gradio_client cannot send NaN, infinity or a lone surrogate; Python's json module writes them as
    ``NaN``, ``Infinity`` and ``"\\ud800"``, which the server reads back as those values.
    """
    base = url.rstrip("/") + f"/gradio_api/call/{api_name}"
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(base, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{base}/{event_id}", timeout=120) as response:
        stream = response.read().decode()
    assert "event: error" in stream, stream
    data = stream.split("event: error", 1)[1].split("data:", 1)[1].strip().splitlines()[0]
    return json.loads(data)["error"]


def test_ranges_describe_themselves_in_full() -> None:
    assert SEED.describe() == "0–4294967295" and CFG_SCALE.describe() == "0–30" and LORA_SCALE.describe() == "0–1.5"
    assert CFG_SCALE.clamp(31) == 30 and 25 in CFG_SCALE and 30.5 not in CFG_SCALE
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG_SCALE.maximum = 20  # type: ignore[misc]


def test_cli_help_states_the_same_ranges(capsys) -> None:
    from lorapg.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in (STEPS, CFG_SCALE, SIZE, BATCH_SIZE, LORA_SCALE, SEED):
        assert expected.describe() in text
    # Left out, steps and CFG come from the loaded model's family; the help states SD's default beside it.
    assert f"CFG scale, {CFG_SCALE.describe()}; Flux dev: its distilled guidance" in text
    assert f"(default: the model family's; SD {CFG_SCALE.default:g})" in text
    assert f"{STEPS.describe()} (default: the model family's; SD {STEPS.default:g})" in text
