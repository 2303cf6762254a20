"""ControlNet on tiny SD 1.x and SDXL models (32 px, 2-4 steps): tiny ControlNets made with
``ControlNetModel.from_unet`` and saved under a models/controlnet folder, loaded through the product
path; the engine, preprocessors, PNG parameters and Reuse, the CLI and the APIs over HTTP."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import webuiapi
from diffusers import ControlNetModel, UNet2DConditionModel
from gradio_client import Client, handle_file
from PIL import Image, ImageDraw

from lorapg.cli import main
from lorapg.diffusion.controlnet import ControlUnit, canny, check_units
from lorapg.diffusion.controlnet_models import ControlNetLibrary
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.hires import HiresOptions
from lorapg.diffusion.img2img import Img2ImgOptions
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest, validate
from lorapg.errors import UserError
from lorapg.gallery.a1111 import format_parameters, parse_parameters
from lorapg.gallery.png import read_png_parameters as read_parameters
from lorapg.gallery.records import attachment_path
from lorapg.gallery.store import GalleryStore
from lorapg.outputs import image_record, record_in_gallery
from lorapg.residency import ResidencyManager
from lorapg.services.gallery import GalleryService
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
    # from_unet initialises the conditioning embedding from torch's global generator: seed it, or the
    # model (and how far two control images pull apart) depends on which tests ran before in this worker.
    torch.manual_seed(seed)
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
    kwargs.setdefault("annotators_dir", models / "annotators")
    engine = DiffusionEngine(
        LoraLibrary(tiny_models["loras"]),
        torch.device("cpu"),
        torch.float32,
        controlnets=ControlNetLibrary(models / "controlnet"),
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


def test_img2img_and_inpainting_with_a_controlnet(engine):
    init = Image.new("RGB", (SIZE, SIZE), (90, 140, 200))
    img2img = Img2ImgOptions(image=init, strength=0.8)
    plain = engine.generate(request(img2img=img2img, steps=4)).images[0]
    steered = engine.generate(request(unit(), img2img=img2img, steps=4)).images[0]
    muted = engine.generate(request(unit(weight=0), img2img=img2img, steps=4)).images[0]
    assert distance(steered, plain) > 1 and distance(muted, plain) < 1

    # Inpainting: the ControlNet steers the masked half; the other half keeps the init image's pixels.
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, SIZE // 2 - 1, SIZE - 1), fill=255)
    inpaint = Img2ImgOptions(image=init, strength=0.8, mask=mask, mask_blur=0)
    painted = engine.generate(request(unit(), img2img=inpaint, steps=4)).images[0]
    assert np.array_equal(pixels(painted)[:, SIZE // 2 + 2 :], pixels(init)[:, SIZE // 2 + 2 :])
    with pytest.raises(UserError, match="ControlNet with inpainting works on the whole picture so far"):
        engine.generate(request(unit(), img2img=replace(inpaint, only_masked=True), steps=4))


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
    with pytest.raises(UserError, match="ControlNet runs without the hires fix so far"):
        validate(request(unit(), hires=HiresOptions()), 64)
    with pytest.raises(UserError, match="ControlNet is built for SD 1.x and SDXL so far"):
        validate(request(unit()), 64, family="flux")


def test_compile_mode_refuses_controlnet_with_one_line(tiny_models, models):
    compiled = make_engine(tiny_models, models, compile_unet=True, compile_backend="eager")
    with pytest.raises(UserError, match="ControlNet does not run with --compile yet"):
        compiled.generate(request(unit()))


def save_tiny_depth_model(folder: Path) -> Path:
    """A tiny Depth Anything (DINOv2 backbone) with its image processor, as ``hf download`` leaves one."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=28,
        patch_size=14,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8,
        head_hidden_size=8,
        patch_size=14,
    )
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False, ensure_multiple_of=14).save_pretrained(
        folder
    )
    return folder


def test_the_depth_preprocessor_reads_a_transformers_depth_model(tiny_models, models, tmp_path):
    save_tiny_depth_model(tmp_path / "annotators" / "depth")
    engine = make_engine(tiny_models, models, annotators_dir=tmp_path / "annotators")
    result = engine.generate(request(unit(module="depth_midas", image=shapes(48))))  # A1111's name for it
    depth = result.control_images[0]
    grey = np.asarray(depth.convert("L"))
    assert depth.size == (SIZE, SIZE) and depth.mode == "RGB" and (grey.min(), grey.max()) == (0, 255)  # normalised
    assert result.request.controlnet[0].module == "depth"


def test_the_depth_preprocessor_says_where_its_weights_go(engine, tmp_path):
    with pytest.raises(UserError) as caught:
        engine.generate(request(unit(module="depth_anything")))
    message = str(caught.value)
    assert "Preprocessor depth needs a depth-estimation model in" in message and "annotators/depth" in message
    assert "hf download depth-anything/Depth-Anything-V2-Small-hf" in message


# --- PNG parameters, the gallery and Reuse ---------------------------------------------------------


def test_png_parameters_name_each_unit_and_reuse_restores_them(engine, models, tmp_path):
    units = (unit(module="canny", weight=0.75, guidance_end=0.8), unit("edges2", image=shapes(flip=True)))
    result = engine.generate(request(*units))
    text = format_parameters(image_record(result, 0))
    digest = ControlNetLibrary(models / "controlnet").resolve("edges").short_hash
    assert len(digest) == 8
    assert (
        f'ControlNet 0: "Module: canny, Model: edges [{digest}], Weight: 0.75, Resize Mode: Crop and Resize, '
        'Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 0.8"'
    ) in text
    assert 'ControlNet 1: "Module: none, Model: edges2 [' in text
    parsed = parse_parameters(text)
    assert not parsed.problems and not parsed.extra
    assert [(use.module, use.model, use.model_hash, use.weight, use.guidance_end) for use in parsed.controlnet] == [
        ("canny", "edges", digest, 0.75, 0.8),
        ("none", "edges2", parsed.controlnet[1].model_hash, 1.0, 1.0),
    ]

    store = GalleryStore(tmp_path / "gallery.sqlite3", tmp_path / "images", keep=0)
    gallery = GalleryService(store, LoraLibrary(tmp_path / "loras"))
    (saved,) = record_in_gallery(store, result)
    assert read_parameters(saved.path) == text
    for index in (0, 1):
        kept = attachment_path(saved.path, f"control{index}")
        assert np.array_equal(pixels(Image.open(kept)), pixels(units[index].image))
    reused = gallery.reuse_parameters(saved.id)
    again = engine.generate(reused.to_request())
    assert [(u.model, u.module, u.weight, u.guidance_end) for u in again.request.controlnet] == [
        ("edges", "canny", 0.75, 0.8),
        ("edges2", "none", 1.0, 1.0),
    ]
    assert distance(again.images[0], result.images[0]) < 1  # the same image, made again from the gallery

    # A PNG alone carries no control image: Reuse says so and leaves the units out.
    from_png = gallery.reuse_parameters(gallery.png_info(saved.path.read_bytes()))
    assert from_png.to_request().controlnet == ()
    assert "ControlNet unit 0 (edges) has no control image here; it was left out." in from_png.notes
    # Deleting the image deletes its control images too.
    gallery.delete(saved.id)
    assert not attachment_path(saved.path, "control0").exists()


def test_an_a1111_controlnet_text_is_read(tmp_path):
    text = (
        "a house\nSteps: 20, Seed: 1, Size: 512x512, "
        'ControlNet 0: "Module: depth_midas, Model: control_v11f1p_sd15_depth [cfd03158], Weight: 1.2, '
        "Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, Guidance Start: 0.1, "
        'Guidance End: 0.9, Pixel Perfect: False, Control Mode: Balanced"'
    )
    (use,) = parse_parameters(text).controlnet
    assert (use.module, use.model, use.model_hash, use.weight) == (
        "depth_midas",
        "control_v11f1p_sd15_depth",
        "cfd03158",
        1.2,
    )
    assert (use.guidance_start, use.guidance_end, use.threshold_a) == (0.1, 0.9, None)


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_generate_with_two_controlnet_units(tiny_models, models, tmp_path, capsys):
    shapes().save(tmp_path / "control.png")
    shapes(flip=True).save(tmp_path / "other.png")
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(tiny_models["sd15"]), "--lora-dir", str(tiny_models["loras"])]
    args += ["--models-dir", str(models), "--outputs", str(tmp_path / "outputs"), "--threads", "1"]
    args += ["--prompt", "a fox", "--steps", "2", "--width", "32", "--height", "32", "--seed", "3", "--out", str(out)]
    units = ["--controlnet", "edges", "--control-image", str(tmp_path / "control.png")]
    units += ["--control-preprocessor", "canny", "--control-weight", "0.5", "--control-start", "0.1"]
    units += ["--controlnet", "edges2", "--control-image", str(tmp_path / "other.png")]
    assert main([*args, *units]) == 0
    text = read_parameters(out)
    assert 'ControlNet 0: "Module: canny, Model: edges [' in text and "Weight: 0.5," in text
    assert "Guidance Start: 0.1, Guidance End: 1" in text and 'ControlNet 1: "Module: none, Model: edges2' in text
    assert attachment_path(out, "control0").is_file() and attachment_path(out, "control1").is_file()

    capsys.readouterr()
    for extra, message in (
        (["--controlnet", "nowhere", "--control-image", str(tmp_path / "control.png")], "'nowhere' is not in"),
        ([*units[:4], "--control-weight", "5"], "ControlNet unit 0 weight must be 0–2, got 5."),
        (["--control-image", str(tmp_path / "control.png")], "--control-image needs --controlnet MODEL"),
        (["--controlnet", "edges"], "--controlnet edges needs a --control-image"),
        (["--controlnet", "edges", "--control-image", str(tmp_path / "none.png")], "ControlNet unit 0 image: no file"),
    ):
        assert main([*args, *extra]) != 0
        errors = [line for line in capsys.readouterr().err.split("\n") if "error:" in line]  # not tqdm's lines
        assert len(errors) == 1 and message in errors[0], errors


# --- the APIs over HTTP ------------------------------------------------------------------------------


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def app(tiny_models, models, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet-api")
    shutil.copytree(tiny_models["loras"], root / "loras")
    args = ["--api", "--model", str(tiny_models["sd15"]), "--lora-dir", str(root / "loras")]
    with running_app(*args, "--models-dir", str(models), "--outputs", str(root / "outputs"), "--threads", "1") as url:
        yield url


def test_a1111_txt2img_with_controlnet_units_from_webuiapi(app, models):
    api = webuiapi.WebUIApi(baseurl=app + "sdapi/v1", sampler="Euler a", steps=2)
    titles = api.controlnet_model_list()
    digest = ControlNetLibrary(models / "controlnet").resolve("edges").short_hash
    assert titles == [f"edges [{digest}]", titles[1], titles[2]] and titles[2].startswith("xl_edges [")
    assert api.controlnet_module_list() == ["none", "canny", "depth"]
    body = dict(prompt="a fox", seed=5, width=32, height=32, steps=2)
    plain = api.txt2img(**body).image
    unit = webuiapi.ControlNetUnit(image=shapes(), module="canny", model=titles[0], weight=1.5, threshold_a=100)
    steered = api.txt2img(**body, controlnet_units=[unit])
    assert distance(steered.image, plain) > 1
    text = steered.info["infotexts"][0]
    assert f'ControlNet 0: "Module: canny, Model: edges [{digest}], Weight: 1.5, Resize Mode: Resize and Fill' in text

    # The same through plain requests: a disabled unit is skipped, a bad one is refused by name.
    url = app + "sdapi/v1/txt2img"
    disabled = {"alwayson_scripts": {"controlnet": {"args": [{"enabled": False, "model": "edges"}]}}}
    reply = requests.post(url, json=body | disabled, timeout=120)
    assert reply.status_code == 200, reply.text
    assert "ControlNet" not in json.loads(reply.json()["info"])["infotexts"][0]
    for arg, message in (
        ({"model": "edges", "image": b64(shapes()), "weight": 3}, "ControlNet unit 0 weight must be 0–2, got 3."),
        ({"model": "missing", "image": b64(shapes())}, "ControlNet model 'missing' is not in"),
        ({"model": "xl_edges", "image": b64(shapes())}, "ControlNet model xl_edges is made for SDXL"),
        ({"model": "edges", "image": "bm90IGFuIGltYWdl"}, "ControlNet unit 0 image is not an image"),
        ({"model": "edges", "image": b64(shapes()), "control_mode": 2}, "control_mode 2 is not available here"),
    ):
        scripts = {"alwayson_scripts": {"controlnet": {"args": [arg]}}}
        refused = requests.post(url, json=body | scripts, timeout=120)
        assert refused.status_code in (400, 422) and message in refused.text, refused.text


def test_api_v1_generations_takes_a_controlnet_list(app):
    body = {"prompt": "a fox", "steps": 2, "width": 32, "height": 32, "seed": 6}
    units = [{"model": "edges", "image": b64(shapes()), "module": "canny", "guidance_end": 0.5}]
    reply = requests.post(f"{app}api/v1/generations", json=body | {"controlnet": units}, timeout=60)
    assert reply.status_code == 202, reply.text
    job = wait_for(app, reply.json()["job_id"])
    assert job["status"] == "done", job
    image = Image.open(io.BytesIO(requests.get(app.rstrip("/") + job["images"][0], timeout=60).content))
    assert 'ControlNet 0: "Module: canny, Model: edges [' in image.text["parameters"]
    assert "Guidance End: 0.5" in image.text["parameters"]

    bad = [{"model": "edges", "image": b64(shapes()), "weight": -1}]
    refused = requests.post(f"{app}api/v1/generations", json=body | {"controlnet": bad}, timeout=60)
    assert refused.status_code in (400, 422) and "ControlNet unit 0 weight must be 0–2, got -1." in refused.text


def wait_for(app: str, job_id: str) -> dict:
    """The job's state once it has finished (polled; the generous deadline only guards a hang)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = requests.get(f"{app}api/v1/generations/{job_id}", timeout=60).json()
        if job["status"] in ("done", "error", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


# --- the Generate tab ---------------------------------------------------------------------------------

# The Generate tab's fields a gradio_client call must give (it has no defaults for them).
FORM = {"negative_prompt": "", "loras": "", "steps": 2, "cfg_scale": 7, "sampler": "Euler a", "batch_size": 1}


def test_the_generate_tabs_controlnet_fields_and_reuse(app, tmp_path):
    shapes().save(tmp_path / "control.png")
    client = Client(app, verbose=False)
    unit = {"controlnet_model": "edges", "controlnet_image": handle_file(str(tmp_path / "control.png"))}
    unit |= {"controlnet_module": "canny", "controlnet_weight": 0.6, "controlnet_guidance_end": 0.7}
    unit |= {"controlnet_resize_mode": "Just Resize", "controlnet_threshold_a": 50, "controlnet_threshold_b": 150}
    images, status, _, _ = client.predict(
        prompt="a fox", seed=4, width=32, height=32, **FORM, **unit, api_name="/generate"
    )
    made = Path(images[0]["image"])
    text = read_parameters(made)
    assert "seed 4" in status and 'ControlNet 0: "Module: canny, Model: edges [' in text
    assert "Weight: 0.6, Resize Mode: Just Resize, Threshold A: 50, Threshold B: 150," in text
    assert "Guidance End: 0.7" in text
    with pytest.raises(Exception, match="ControlNet unit 0 weight must be 0–2, got 2.5."):
        bad = unit | {"controlnet_weight": 2.5}
        client.predict(prompt="a fox", seed=4, width=32, height=32, **FORM, **bad, api_name="/generate")

    # Reuse of the gallery image fills the tab's ControlNet fields, its control image included.
    newest = client.predict("", "", api_name="/gallery_list")[0][0]["caption"].split()[0].lstrip("#")
    reused = client.predict(int(newest), None, api_name="/gallery_reuse")
    model, image, module, weight, start, end, resize_mode, low, high = reused[-9:]
    assert (model, module, weight, start, end) == ("edges", "canny", 0.6, 0.0, 0.7)
    assert (resize_mode, low, high) == ("Just Resize", 50, 150)
    assert np.array_equal(pixels(Image.open(image)), pixels(shapes()))


def test_single_files_are_listed_with_their_family_and_pickles_need_the_flag(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "controlnet"
    folder.mkdir()
    tensor = torch.zeros(2)
    # The original (A1111) layout: SDXL ControlNets carry the added-conditions embedding ("label_emb").
    save_file({"control_model.input_blocks.0.0.weight": tensor}, str(folder / "sd15_canny.safetensors"))
    save_file({"control_model.label_emb.0.0.weight": tensor}, str(folder / "xl_canny.safetensors"))
    (folder / "old_depth.pth").write_bytes(b"pickled")
    library = ControlNetLibrary(folder)
    assert [(info.name, info.family) for info in library.scan()] == [("sd15_canny", "sd1"), ("xl_canny", "sdxl")]
    with pytest.raises(
        UserError, match="ControlNet model xl_canny is made for SDXL, but the loaded base model is SD 1"
    ):
        library.check_family(library.resolve("xl_canny"), "sd1")
    with pytest.raises(UserError, match="old_depth is a pickled file; .* pass --allow-pickle"):
        library.resolve("old_depth")
    assert "old_depth" in ControlNetLibrary(folder, allow_pickle=True).names()
    # A file diffusers cannot read as a ControlNet: one line saying what to use instead.
    with pytest.raises(UserError) as caught:
        library.load(library.resolve("sd15_canny"), torch.float32)
    assert "ControlNet model sd15_canny could not be loaded" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["../outside", "../../outside", "sub/../../outside", "..\\outside"])
def test_a_model_name_with_a_path_says_nothing_about_files_outside_the_folder(tmp_path, name):
    """``root/../outside.pth`` exists: the answer must be the plain "not in the folder", as for a missing name."""
    folder = tmp_path / "models" / "controlnet"
    folder.mkdir(parents=True)
    (folder.parent / "outside.pth").write_bytes(b"pickled")
    (tmp_path / "outside.pth").write_bytes(b"pickled")
    library = ControlNetLibrary(folder)
    with pytest.raises(UserError) as caught:
        library.resolve(name)
    assert "is not in" in str(caught.value) and "pickled" not in str(caught.value)
