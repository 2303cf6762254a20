"""A1111's hires fix on a tiny SD 1.x model (32 px first pass, 64 px result, few steps): the engine,
the PNG parameters, Reuse, the CLI and the A1111 API over HTTP."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest
import requests
import torch
from gradio_client import Client
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from lorapg.cli import main
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.hires import HiresOptions
from lorapg.diffusion.img2img import Img2ImgOptions
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest, validate
from lorapg.errors import UserError
from lorapg.gallery.a1111 import format_parameters, parse_parameters
from lorapg.gallery.png import read_png_parameters as read_parameters
from lorapg.gallery.records import HiresUse
from lorapg.gallery.store import GalleryStore
from lorapg.outputs import image_record, record_in_gallery
from lorapg.services.gallery import GalleryService
from tests.app_server import running_app

BASE = 32  # the first pass; the tiny model is native 64
# The Generate tab's fields a gradio_client call must give (it has no defaults for them).
FORM = {"negative_prompt": "", "loras": "", "steps": 2, "cfg_scale": 7, "sampler": "Euler a", "batch_size": 1}
FORM["api_name"] = "/generate"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


@pytest.fixture(scope="module")
def engine(tiny_models):
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sd15"]))
    return engine


def request(hires: HiresOptions | None = None, **overrides) -> GenerationRequest:
    values = dict(prompt="a red fox", steps=4, seed=7, width=BASE, height=BASE, hires=hires)
    return GenerationRequest(**{**values, **overrides})


# --- the engine ------------------------------------------------------------------------------------


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest)", "None"])
def test_output_has_the_upscaled_size_and_progress_counts_both_passes(engine, upscaler):
    seen = []
    options = HiresOptions(scale=2, steps=6, strength=0.5, upscaler=upscaler)
    result = engine.generate(request(options, batch_size=2), on_step=lambda done, total, _: seen.append((done, total)))
    assert [image.size for image in result.images] == [(2 * BASE, 2 * BASE)] * 2
    # 4 first-pass steps, then int(6 × 0.5) = 3 second-pass steps, counted on from the first.
    assert seen == [(done, 7) for done in range(1, 8)]
    assert (result.request.width, result.request.steps) == (BASE, 4)  # A1111's Size and Steps: the first pass


def test_a_target_width_keeps_the_aspect_ratio(engine):
    result = engine.generate(request(HiresOptions(resize_x=64, steps=2, strength=0.5), height=48))
    assert result.images[0].size == (64, 96)


def test_cancel_in_the_first_pass_returns_its_images_and_in_the_second_the_upscaled_size(engine):
    first = engine.generate(request(HiresOptions(scale=2, strength=0.5)), should_cancel=lambda: True)
    assert first.cancelled and first.images[0].size == (BASE, BASE)  # the second pass never ran
    steps = []

    def cancel_in_second_pass() -> bool:
        return len(steps) > 0 and steps[-1] > 4  # after the first second-pass step

    second = engine.generate(
        request(HiresOptions(scale=2, strength=0.5)),
        on_step=lambda done, total, _: steps.append(done),
        should_cancel=cancel_in_second_pass,
    )
    assert second.cancelled and steps[-1] == 5 and second.images[0].size == (2 * BASE, 2 * BASE)


def test_strength_zero_keeps_the_first_pass_upscaled_and_more_strength_changes_more(engine):
    base = engine.generate(request()).images[0]
    kept = engine.generate(request(HiresOptions(scale=2, strength=0.0, upscaler="None"))).images[0]
    upscaled = base.resize(kept.size, resample=Image.Resampling.LANCZOS)
    assert np.abs(pixels(kept) - pixels(upscaled)).max() <= 1  # no second-pass step runs

    # With the latent upscaler: strength 0 decodes the upscaled latents; one low-noise step stays near
    # them, a strong second pass moves far away.
    def latent(strength: float) -> Image.Image:
        return engine.generate(request(HiresOptions(scale=2, steps=20, strength=strength))).images[0]

    still, light, strong = latent(0.0), latent(0.05), latent(0.9)
    assert distance(light, still) * 3 < distance(strong, still)


def test_loras_apply_in_the_second_pass(engine):
    # The "None" upscaler's second pass is an img2img of the Lanczos-upscaled first pass with the same
    # seed: the hires result equals that img2img with the LoRA, and not the one without it.
    lora = (LoraRequest("style", 1.0),)
    options = HiresOptions(scale=2, steps=6, strength=0.6, upscaler="None")
    hires = engine.generate(request(options, loras=lora)).images[0]
    first = engine.generate(request(loras=lora)).images[0].resize((64, 64), resample=Image.Resampling.LANCZOS)

    def refined(loras) -> Image.Image:
        init = Img2ImgOptions(first, strength=0.6)
        return engine.generate(request(steps=6, width=64, height=64, loras=loras, img2img=init)).images[0]

    with_lora, without = refined(lora), refined(())
    assert distance(hires, with_lora) < 1.0
    assert distance(hires, without) > 10 * max(distance(hires, with_lora), 0.1)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hires", "overrides", "message"),
    [
        (HiresOptions(scale=5), {}, "Hires upscale must be 1–4, got 5."),
        (HiresOptions(strength=1.5), {}, "Hires denoising strength must be 0–1, got 1.5."),
        (HiresOptions(steps=-1), {}, "Hires steps must be 0–50"),
        (HiresOptions(scale="two"), {}, "Hires upscale must be a number, got 'two'."),
        # Any other name is an upscaler model's, looked up in the folder later (tests/test_upscalers.py).
        (HiresOptions(upscaler="../4x.pth"), {}, 'pick one of "Latent", "Latent (nearest)", "None"'),
        (HiresOptions(scale=4), {"width": 1024}, "Hires fix would make 4096×128, over the 2048 px limit"),
        (HiresOptions(), {"img2img": Img2ImgOptions(Image.new("RGB", (32, 32)))}, "Hires fix applies to txt2img only"),
    ],
)
def test_bad_hires_input_is_refused_by_name(hires, overrides, message):
    with pytest.raises(UserError) as caught:
        validate(request(hires, **overrides), 64)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_hires_is_refused_past_max_image_pixels_and_on_transformer_families():
    with pytest.raises(UserError, match=r"over the limit of 0\.003 megapixels \(setting max_image_pixels\)"):
        validate(request(HiresOptions(scale=2)), 64, max_image_pixels=3000)
    for family in ("flux", "sd3"):
        with pytest.raises(UserError, match="Hires fix is built for SD 1.x and SDXL so far"):
            validate(request(HiresOptions()), 64, family=family)


# --- PNG parameters, the gallery and Reuse ------------------------------------------------------


def test_png_parameters_round_trip_through_the_gallery_and_reuse(engine, tmp_path):
    options = HiresOptions(scale=2, steps=10, strength=0.5, upscaler="Latent")
    result = engine.generate(request(options, steps=2))
    text = format_parameters(image_record(result, 0))
    assert "Size: 32x32" in text
    assert "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent" in text
    parsed = parse_parameters(text)
    assert parsed.hires == HiresUse("Latent", 0.5, 2.0, 0, 0, 10) and parsed.img2img is None and not parsed.extra

    store = GalleryStore(tmp_path / "gallery.sqlite3", tmp_path / "images", keep=0)
    gallery = GalleryService(store, LoraLibrary(tmp_path / "loras"))
    (saved,) = record_in_gallery(store, result)
    assert read_parameters(saved.path) == text and Image.open(saved.path).size == (64, 64)
    from_record = gallery.reuse_parameters(saved.id).to_request()
    from_png = gallery.reuse_parameters(gallery.png_info(saved.path.read_bytes())).to_request()
    for reused in (from_record, from_png):
        assert reused.hires == options and reused.img2img is None and (reused.width, reused.steps) == (32, 2)

    # A target size is written as A1111's "Hires resize"; an img2img text keeps its own strength.
    sized = parse_parameters(format_parameters(replace(image_record(result, 0), hires=HiresUse("None", 0.3, None, 96))))
    assert sized.hires == HiresUse("None", 0.3, None, 96, 0, 0)
    img2img = parse_parameters("a fox\nSteps: 20, Seed: 1, Denoising strength: 0.4, Resize mode: 1")
    assert img2img.hires is None and img2img.img2img.denoising_strength == 0.4


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_generate_with_hires(tiny_models, tmp_path, capsys):
    out = tmp_path / "hires.png"
    args = ["generate", "--model", str(tiny_models["sd15"]), "--lora-dir", str(tiny_models["loras"])]
    args += ["--outputs", str(tmp_path / "outputs"), "--threads", "1", "--prompt", "a fox", "--steps", "2"]
    args += ["--width", "32", "--height", "32", "--seed", "3", "--out", str(out)]
    hires = [
        "--hires-scale",
        "2",
        "--hires-steps",
        "4",
        "--hires-strength",
        "0.5",
        "--hires-upscaler",
        "latent (nearest)",
    ]
    assert main([*args, *hires]) == 0
    assert Image.open(out).size == (64, 64)
    assert "Hires upscale: 2, Hires steps: 4, Hires upscaler: Latent (nearest)" in read_parameters(out)

    assert main([*args, "--hires-scale", "2", "--hires-upscaler", "ESRGAN_4x"]) != 0
    error = capsys.readouterr().err
    assert 'Hires upscaler \'ESRGAN_4x\' is not available; pick one of "Latent", "Latent (nearest)", "None"' in error


# --- the A1111 API over HTTP -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hires-api")
    shutil.copytree(tiny_models["loras"], root / "loras")
    args = ["--api", "--model", str(tiny_models["sd15"]), "--lora-dir", str(root / "loras")]
    with running_app(*args, "--outputs", str(root / "outputs"), "--threads", "1") as url:
        yield url


def test_a1111_txt2img_with_enable_hr_and_the_upscaler_lists(app):
    app = app + "sdapi/v1"
    body = {"prompt": "a fox", "steps": 2, "width": 32, "height": 32, "seed": 5, "enable_hr": True}
    body |= {"hr_scale": 2, "hr_second_pass_steps": 4, "denoising_strength": 0.5, "hr_upscaler": "Latent"}
    reply = requests.post(f"{app}/txt2img", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    image = Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0])))
    assert image.size == (64, 64)
    info = json.loads(reply.json()["info"])
    assert (info["width"], info["denoising_strength"], info["hr_upscaler"]) == (32, 0.5, "Latent")
    assert "Hires upscale: 2, Hires steps: 4, Hires upscaler: Latent" in info["infotexts"][0]

    sized = requests.post(f"{app}/txt2img", json=body | {"hr_resize_x": 48, "hr_resize_y": 40}, timeout=120)
    assert Image.open(io.BytesIO(base64.b64decode(sized.json()["images"][0]))).size == (48, 40)

    refused = requests.post(f"{app}/txt2img", json=body | {"hr_upscaler": "4x-UltraSharp"}, timeout=120)
    assert refused.status_code in (400, 422) and "is not available; pick one of" in refused.text

    modes = requests.get(f"{app}/latent-upscale-modes", timeout=30).json()
    assert [mode["name"] for mode in modes] == ["Latent", "Latent (nearest)"]
    names = [item["name"] for item in requests.get(f"{app}/upscalers", timeout=30).json()]
    assert names == ["None", "Lanczos", "Nearest"]  # no models in this app's models/upscalers


def test_the_generate_tabs_hires_fields_and_reuse(app, tmp_path):
    client = Client(app, verbose=False)
    hires = {"enable_hr": True, "hr_upscaler": "None", "hr_scale": 1.5, "hr_second_pass_steps": 2}
    images, status, seed, _ = client.predict(prompt="a fox", seed=4, width=32, height=48, **FORM, **hires)
    assert Image.open(images[0]["image"]).size == (48, 72) and "seed 4" in status
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: None" in read_parameters(images[0]["image"])
    with pytest.raises(Exception, match="Hires upscale must be 1–4, got 9."):
        client.predict(prompt="a fox", seed=4, width=32, height=32, enable_hr=True, hr_scale=9, **FORM)

    # Reuse fills the tab's fields; a target size shows as the factor it means.
    store = GalleryStore(tmp_path / "gallery.sqlite3", tmp_path / "images", keep=0)
    gallery = GalleryService(store, LoraLibrary(tmp_path / "loras"))
    text = "a fox\nSteps: 2, Seed: 1, Size: 32x32, Denoising strength: 0.4, Hires resize: 64x64, Hires upscaler: None"
    form = gallery.reuse_parameters(gallery.png_info(png_with(text))).hires_form()
    assert form == {
        "enable_hr": True,
        "hr_upscaler": "None",
        "hr_scale": 2.0,
        "hr_second_pass_steps": 0,
        "hr_denoising_strength": 0.4,
    }
    assert gallery.reuse_parameters(gallery.png_info(png_with("a fox\nSteps: 2, Seed: 1"))).hires_form() == {
        "enable_hr": False
    }


def png_with(parameters: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_api_v1_generations_takes_a_hires_object(app):
    body = {"prompt": "a fox", "steps": 2, "width": 32, "height": 32, "seed": 6}
    hires = {"scale": 2, "steps": 4, "denoising_strength": 0.5, "upscaler": "Latent (nearest)"}
    reply = requests.post(f"{app}api/v1/generations", json=body | {"hires": hires}, timeout=60)
    assert reply.status_code == 202, reply.text
    job = wait_for(app, reply.json()["job_id"])
    assert (job["status"], job["step"], job["total"]) == ("done", 4, 4)  # 2 first-pass steps + int(4 × 0.5)
    image = Image.open(io.BytesIO(requests.get(app.rstrip("/") + job["images"][0], timeout=60).content))
    assert image.size == (64, 64) and "Hires upscaler: Latent (nearest)" in image.text["parameters"]

    refused = requests.post(f"{app}api/v1/generations", json=body | {"hires": {"upscaler": "SwinIR 4x"}}, timeout=60)
    assert refused.status_code in (400, 422) and "is not available; pick one of" in refused.text


def wait_for(app: str, job_id: str) -> dict:
    """The job's state once it has finished (polled; the generous deadline only guards a hang)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = requests.get(f"{app}api/v1/generations/{job_id}", timeout=60).json()
        if job["status"] in ("done", "error", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_sdxl_hires_with_a_lora(tiny_models):
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sdxl"]))
    seen = []
    options = HiresOptions(scale=2, steps=2, strength=0.5)
    result = engine.generate(
        request(options, steps=2, loras=(LoraRequest("xl/xl_style", 0.8),)),
        on_step=lambda done, total, _: seen.append((done, total)),
    )
    assert result.images[0].size == (64, 64) and seen[-1] == (3, 3)


def test_reuse_of_an_a1111_hires_png_with_an_upscaler_model_falls_back_to_latent_with_a_note(tmp_path):
    store = GalleryStore(tmp_path / "gallery.sqlite3", tmp_path / "images", keep=0)
    gallery = GalleryService(store, LoraLibrary(tmp_path / "loras"))
    text = (
        "a castle\nSteps: 20, Seed: 9, Size: 512x512, Denoising strength: 0.45, Hires upscale: 2, "
        "Hires steps: 80, Hires upscaler: R-ESRGAN 4x+"
    )
    reuse = gallery.reuse_parameters(gallery.png_info(png_with(text)))
    assert reuse.hires_options() == HiresOptions(scale=2.0, steps=50, strength=0.45, upscaler="Latent")
    assert any("'R-ESRGAN 4x+' is not available here; Latent is used instead" in note for note in reuse.notes)
    assert any("outside this app's ranges" in note for note in reuse.notes)


def test_reuse_keeps_a_hires_upscaler_model_that_is_in_the_upscalers_folder(tmp_path):
    """The gallery service build_services makes sees models/upscalers: a PNG naming a model that is
    there keeps it (spelled as the file is); one naming a missing model still falls back to Latent."""
    from lorapg.config import load_settings
    from lorapg.services.build import build_services
    from tests.test_upscalers import tiny_esrgan_state

    settings = load_settings(
        overrides={
            "models_dir": str(tmp_path / "models"),
            "outputs": str(tmp_path / "out"),
            "lora_dir": str(tmp_path / "loras"),
        },
        environ={},
    )
    (tmp_path / "models" / "upscalers").mkdir(parents=True)
    save_file(tiny_esrgan_state(), tmp_path / "models" / "upscalers" / "4x-Tiny.safetensors")
    gallery = build_services(settings, engines=False, prompts=False).gallery_service
    base = "a castle\nSteps: 20, Seed: 9, Size: 64x64, Denoising strength: 0.45, Hires upscale: 2, "

    reuse = gallery.reuse_parameters(gallery.png_info(png_with(base + "Hires upscaler: 4x-tiny")))
    assert reuse.hires_options() == HiresOptions(scale=2.0, steps=0, strength=0.45, upscaler="4x-Tiny")
    assert reuse.hires_form()["hr_upscaler"] == "4x-Tiny"
    assert not any("Hires upscaler" in note for note in reuse.notes), reuse.notes

    missing = gallery.reuse_parameters(gallery.png_info(png_with(base + "Hires upscaler: 4x-UltraSharp")))
    assert missing.hires_options().upscaler == "Latent"
    assert any("'4x-UltraSharp' is not available here; Latent is used instead" in n for n in missing.notes)
