"""img2img and inpainting on a tiny SD 1.x model loaded through the user's code path (64 px, few steps)."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import requests
import torch
import webuiapi
from PIL import Image, ImageDraw

from lorapg.diffusion import inpaint_mask
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.img2img import Img2ImgOptions, check_options
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.diffusion.resize_modes import resize_image
from lorapg.errors import UserError

SIZE = 64


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def gradient(width: int = SIZE, height: int = SIZE, seed: int = 0) -> Image.Image:
    """A smooth, seeded test picture (not noise: resizing it keeps it recognisable)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6, size=3)
    channels = [127 + 120 * np.sin(xs / (7 + 3 * c) + ys / (11 + c) + phase[c]) for c in range(3)]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


def box_mask(size=(SIZE, SIZE), box=(16, 16, 40, 40)) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


@pytest.fixture(scope="module")
def engine(tiny_models):
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sd15"]))
    return engine


def run(engine, options: Img2ImgOptions, *, loras=(), **overrides):
    request = GenerationRequest(
        prompt=overrides.pop("prompt", "a red fox"),
        steps=overrides.pop("steps", 4),
        seed=overrides.pop("seed", 7),
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        img2img=options,
        **overrides,
    )
    return engine.generate(request)


# --- img2img --------------------------------------------------------------------------------------


def test_strength_zero_returns_the_init_image_and_strength_one_hardly_depends_on_it(engine):
    init, other = gradient(seed=1), gradient(seed=2)
    kept = run(engine, Img2ImgOptions(init, strength=0.0)).images[0]
    assert np.array_equal(pixels(kept), pixels(init))  # no step runs: the init image itself
    # Strength 1 starts from (almost) pure noise, as diffusers defines it: two very different init
    # images give close results, far closer than at strength 0.5.
    full = [pixels(run(engine, Img2ImgOptions(image, strength=1.0)).images[0]) for image in (init, other)]
    half = [pixels(run(engine, Img2ImgOptions(image, strength=0.5)).images[0]) for image in (init, other)]
    assert np.abs(full[0] - full[1]).mean() * 3 < np.abs(half[0] - half[1]).mean()


def test_the_lower_the_strength_the_more_the_init_image_shows(engine):
    # The tiny VAE is random (it does not reconstruct pictures), so "shows" is measured as how much
    # two different init images still tell the results apart.
    first, second = gradient(seed=3), gradient(seed=13)

    def spread(strength: float) -> float:
        a, b = (pixels(run(engine, Img2ImgOptions(image, strength=strength)).images[0]) for image in (first, second))
        return float(np.abs(a - b).mean())

    assert spread(0.3) > spread(0.9)
    low = pixels(run(engine, Img2ImgOptions(first, strength=0.3)).images[0])
    again = pixels(run(engine, Img2ImgOptions(first, strength=0.3)).images[0])
    assert np.array_equal(low, again)  # the same computation: the same bytes


def test_progress_counts_the_steps_that_run(engine):
    seen = []
    request = GenerationRequest(prompt="a cat", steps=10, seed=1, img2img=Img2ImgOptions(gradient(), strength=0.5))
    engine.generate(request, on_step=lambda step, total, preview: seen.append((step, total)))
    assert seen == [(step, 5) for step in range(1, 6)]  # int(10 × 0.5) steps, as diffusers runs


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_every_resize_mode_gives_the_request_size(engine, mode):
    init = gradient(96, 48, seed=4)  # another size and aspect ratio than the request
    result = run(engine, Img2ImgOptions(init, strength=0.5, resize_mode=mode), width=64, height=32)
    assert result.images[0].size == (64, 32)


def test_resize_modes_crop_and_fill_as_a1111_describes():
    wide = Image.new("RGB", (80, 40), (255, 0, 0))
    ImageDraw.Draw(wide).rectangle((0, 0, 19, 39), fill=(0, 0, 255))  # a blue band on the left quarter
    stretched = resize_image(0, wide, 40, 40)
    cropped = resize_image(1, wide, 40, 40)
    filled = resize_image(2, wide, 40, 40)
    assert stretched.size == cropped.size == filled.size == (40, 40)
    # Crop and resize: scaled to 80x40 is already the height; the centre 40 columns are kept, the
    # blue band (left 20 columns) is cut away.
    assert pixels(cropped)[:, :, 2].max() < 30
    # Resize and fill: scaled to 40x20 in the middle; the bars repeat its top and bottom rows.
    filled_px = pixels(filled)
    assert np.abs(filled_px[0] - filled_px[10]).max() <= 2 and np.abs(filled_px[39] - filled_px[29]).max() <= 2
    # Just resize keeps the band, squeezed to the left 10 columns.
    assert pixels(stretched)[:, :8, 2].min() > 200


def test_lora_applies_in_img2img(engine):
    init = gradient(seed=5)
    options = Img2ImgOptions(init, strength=0.8)
    plain = pixels(run(engine, options).images[0])
    styled = pixels(run(engine, options, loras=[("style", 1.0)]).images[0])
    zero = pixels(run(engine, options, loras=[("style", 0.0)]).images[0])
    assert np.abs(styled - plain).max() > 10
    assert np.abs(zero - plain).max() <= 2  # weight 0 is another code path than none: a tolerance


def test_img2img_shares_the_loaded_modules_and_reads_no_lora_again(engine):
    options = Img2ImgOptions(gradient(seed=23), strength=0.6)
    run(engine, Img2ImgOptions(gradient(), strength=0.6, mask=box_mask()), loras=[("style", 0.7)])
    read = engine.model.adapters.files_read
    run(engine, options, loras=[("style", 0.7)])
    engine.generate(GenerationRequest(prompt="a fox", steps=2, seed=1, loras=(LoraRequest("style", 0.7),)))
    assert engine.model.adapters.files_read == read  # no LoRA file read again, no model reloaded
    for derived in engine.model.derived.values():
        assert derived.unet is engine.model.pipe.unet and derived.vae is engine.model.pipe.vae


def test_batch_images_use_consecutive_seeds(engine):
    options = Img2ImgOptions(gradient(seed=6), strength=0.7)
    batch = run(engine, options, batch_size=2, seed=20)
    alone = run(engine, options, seed=21)
    assert batch.seeds == [20, 21]
    # A batch of 2 and a single image are different matrix shapes: a stated tolerance.
    assert np.abs(pixels(batch.images[1]) - pixels(alone.images[0])).max() <= 2


# --- inpainting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("only_masked", [False, True])
def test_inpainting_keeps_every_unmasked_pixel(engine, only_masked):
    init, mask = gradient(seed=8), box_mask()
    options = Img2ImgOptions(init, strength=1.0, mask=mask, mask_blur=0, only_masked=only_masked, only_masked_padding=4)
    result = run(engine, options).images[0]
    assert result.size == init.size
    keep = pixels(mask) == 0
    assert np.abs(pixels(result) - pixels(init))[keep].max() <= 1
    repaint = ~keep
    assert np.abs(pixels(result) - pixels(init))[repaint].mean() > 10  # and the masked part did change


def test_inverted_mask_repaints_the_outside(engine):
    init, mask = gradient(seed=9), box_mask()
    result = pixels(run(engine, Img2ImgOptions(init, strength=1.0, mask=mask, mask_blur=0, mask_invert=True)).images[0])
    inside = pixels(mask) > 0
    assert np.array_equal(result[inside], pixels(init)[inside])
    assert np.abs(result - pixels(init))[~inside].mean() > 10


def test_mask_blur_softens_the_edge_but_far_pixels_stay(engine):
    init, mask = gradient(seed=10), box_mask()
    result = pixels(
        run(engine, Img2ImgOptions(init, strength=1.0, mask=mask, mask_blur=4, inpainting_fill=0)).images[0]
    )
    far = np.ones((SIZE, SIZE), dtype=bool)
    far[4:52, 4:52] = False  # beyond 3 sigma of the blurred edge
    assert np.array_equal(result[far], pixels(init)[far])
    just_outside = (slice(14, 16), slice(20, 36))  # inside the blur, outside the painted box
    assert np.abs(result[just_outside] - pixels(init)[just_outside]).max() > 0


def test_a_painted_rgba_layer_counts_by_its_alpha():
    layer = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((2, 2, 5, 5), fill=(255, 0, 0, 255))  # red strokes, not white
    mask = inpaint_mask.binary_mask(layer)
    assert mask.getbbox() == (2, 2, 6, 6)


def test_only_masked_region_grows_to_the_output_aspect_ratio():
    mask = box_mask((100, 100), (40, 45, 50, 55))  # a 10x10 box
    box = inpaint_mask.crop_region(mask, 5, 64, 32)  # padded to 20x20, then 2:1
    left, top, right, bottom = box
    assert (right - left, bottom - top) == (40, 20)
    assert left <= 35 and right >= 55 and top <= 40 and bottom >= 60 - 0


# --- bad input ----------------------------------------------------------------------------------


def test_a_mask_of_another_size_is_refused_naming_the_field():
    with pytest.raises(UserError, match=r"Mask is 32×32 but the init image is 64×64"):
        check_options(Img2ImgOptions(gradient(), mask=Image.new("L", (32, 32))))


@pytest.mark.parametrize("strength", [-0.1, 1.5, "lots", float("nan")])
def test_strength_out_of_range_is_refused(strength):
    with pytest.raises(UserError, match="Denoising strength"):
        check_options(Img2ImgOptions(gradient(), strength=strength))


def test_non_image_bytes_and_missing_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="Init image is not an image"):
        check_options(Img2ImgOptions(b"this is not a PNG"))
    with pytest.raises(UserError, match="Init image: no file"):
        check_options(Img2ImgOptions(tmp_path / "missing.png"))
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(UserError, match="Mask is not an image"):
        check_options(Img2ImgOptions(gradient(), mask=tmp_path / "notes.png"))


def test_an_oversized_image_is_refused_before_it_is_decoded(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(UserError, match=r"Init image is 300×200 .*max_image_pixels"):
        check_options(Img2ImgOptions(path), max_pixels=50_000)
    assert check_options(Img2ImgOptions(path), max_pixels=60_000).image.size == (300, 200)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("resize_mode", 7, "Resize mode must be one of 0 Just resize"),
        ("mask_blur", 500, "Mask blur must be"),
        ("inpainting_fill", 2, "Masked content"),
        ("only_masked_padding", -1, "Only masked padding"),
    ],
)
def test_other_fields_out_of_range_name_themselves(field, value, words):
    with pytest.raises(UserError, match=words):
        check_options(Img2ImgOptions(gradient(), mask=box_mask(), **{field: value}))


def test_latent_resize_with_a_mask_is_refused():
    with pytest.raises(UserError, match="Resize mode 3"):
        check_options(Img2ImgOptions(gradient(), mask=box_mask(), resize_mode=3))


# --- CLI --------------------------------------------------------------------------------------------


def cli_args(tiny_models, tmp_path) -> list[str]:
    return [
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(tiny_models["loras"]),
        "--outputs",
        str(tmp_path / "outputs"),
        "--threads",
        "1",
    ]


def test_cli_inpaints_end_to_end_and_keeps_the_unmasked_pixels(tiny_models, tmp_path):
    from tests.test_cli import run_cli

    init, mask = gradient(seed=11), box_mask()
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "result.png"
    done = run_cli(
        "generate", *cli_args(tiny_models, tmp_path), "--prompt", "a red fox <lora:style:0.8>", "--steps", "4",
        "--seed", "5", "--init-image", str(tmp_path / "init.png"), "--strength", "0.9", "--mask",
        str(tmp_path / "mask.png"), "--mask-blur", "0", "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{out}\tseed=5" in done.stdout
    result = Image.open(out)
    text = result.text["parameters"]
    assert "Denoising strength: 0.9, Resize mode: 0" in text
    assert "Mask blur: 0, Masked content: original, Inpaint area: Whole picture" in text
    keep = pixels(mask) == 0
    assert result.size == init.size
    assert np.abs(pixels(result) - pixels(init))[keep].max() <= 1
    assert np.abs(pixels(result) - pixels(init))[~keep].mean() > 10
    # The init image and mask are kept beside the result, as the gallery keeps them (and the control images).
    assert np.array_equal(pixels(Image.open(tmp_path / "result.init.png")), pixels(init))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "result.mask.png")), np.asarray(mask))


def test_out_folder_keeps_every_image_of_a_batch_and_the_shared_inputs_once(engine, tmp_path):
    from lorapg.outputs import write_result_pngs

    # A batch of variations: every image has the one seed, so SEED.png alone would name them all.
    request = GenerationRequest(prompt="a red fox", steps=2, seed=7, batch_size=4, variation_strength=0.3)
    varied = engine.generate(request)
    assert set(varied.seeds) == {7}
    paths = write_result_pngs(varied, tmp_path / "varied")
    assert len(set(paths)) == 4
    for path, image in zip(paths, varied.images, strict=True):
        assert np.array_equal(pixels(Image.open(path)), pixels(image))
    # An inpainting batch: its init image and mask are the batch's, written once beside its name.
    made = run(engine, Img2ImgOptions(gradient(seed=3), strength=0.5, mask=box_mask()), steps=2, batch_size=2)
    out = tmp_path / "inpainted"
    paths = write_result_pngs(made, out)
    shared = [f"{paths[0].stem}.init.png", f"{paths[0].stem}.mask.png"]
    assert sorted(path.name for path in out.iterdir()) == sorted([path.name for path in paths] + shared)
    assert np.array_equal(pixels(Image.open(out / shared[0])), pixels(gradient(seed=3)))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mask", "m.png"], "--mask needs --init-image"),
        (["--init-image", "init.png", "--strength", "2"], "Denoising strength must be 0–1, got 2"),
        (["--init-image", "init.png", "--resize-mode", "9"], "Resize mode must be one of"),
        (["--init-image", "missing.png"], "Init image: no file"),
        (["--init-image", "init.png", "--mask", "small.png"], "Mask is 32×32 but the init image is 64×64"),
    ],
)
def test_cli_bad_img2img_input_is_one_line_and_exit_2(tiny_models, tmp_path, monkeypatch, capsys, extra, message):
    from lorapg.cli import main

    monkeypatch.chdir(tmp_path)
    gradient().save(tmp_path / "init.png")
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    argv = ["generate", *cli_args(tiny_models, tmp_path), "--prompt", "x", "--steps", "2", *extra, "--out", "x.png"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# --- A1111 API (a real app on 127.0.0.1) --------------------------------------------------------


@pytest.fixture(scope="module")
def sdapi(tiny_models, tmp_path_factory):
    from tests.app_server import running_app

    root = tmp_path_factory.mktemp("img2img-api")
    args = ["--api", "--model", str(tiny_models["sd15"]), "--lora-dir", str(tiny_models["loras"])]
    args += ["--outputs", str(root / "outputs"), "--models-dir", str(root / "models"), "--threads", "1"]
    # 20,000 pixels: the 64x64 test images pass, a 200x200 one is refused.
    with running_app(*args, env={"LORAPG_MAX_IMAGE_PIXELS": "20000"}) as url:
        client = webuiapi.WebUIApi(baseurl=url + "sdapi/v1", sampler="Euler a", steps=4)
        yield {"base": url + "sdapi/v1", "client": client}


def sdapi_post(sdapi, body: dict):
    return requests.post(f"{sdapi['base']}/img2img", json=body, timeout=120)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_sdapi_img2img_inpaints_keeping_unmasked_pixels(sdapi):
    init, mask = gradient(seed=12), box_mask()
    result = sdapi["client"].img2img(
        images=[init], mask_image=mask, mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
        denoising_strength=1.0, prompt="a red fox <lora:style:0.8>", seed=3, width=64, height=64,
    )  # fmt: skip
    keep = pixels(mask) == 0
    assert result.image.size == (64, 64)
    assert np.abs(pixels(result.image) - pixels(init))[keep].max() <= 1
    assert np.abs(pixels(result.image) - pixels(init))[~keep].mean() > 10
    assert result.info["denoising_strength"] == 1.0 and result.info["all_seeds"] == [3]
    assert "init_images" not in result.parameters  # A1111 echoes them only with include_init_images


def test_sdapi_img2img_with_webuiapi_defaults_only_masked_and_fill(sdapi):
    # webuiapi's defaults are A1111's: inpaint_full_res (only masked) with padding 0, masked content "fill", blur 4.
    init, mask = gradient(seed=24), box_mask()
    result = sdapi["client"].img2img(
        images=[init], mask_image=mask, denoising_strength=0.9, seed=5, width=64, height=64
    )
    far = np.ones((SIZE, SIZE), dtype=bool)
    far[4:52, 4:52] = False  # beyond the blur
    assert np.array_equal(pixels(result.image)[far], pixels(init)[far])
    assert np.abs(pixels(result.image) - pixels(init))[20:36, 20:36].mean() > 10
    assert "Inpaint area: Only masked, Masked area padding: 0" in result.info["infotexts"][0]


def test_sdapi_img2img_without_mask_follows_the_init_image(sdapi):
    client = sdapi["client"]
    first, second = gradient(seed=14), gradient(seed=15)
    # A low strength (2 of 8 steps, near the end of the schedule): the init image dominates.
    same = [client.img2img(images=[first], denoising_strength=0.25, seed=4, steps=8, width=64, height=64)]
    same.append(client.img2img(images=[first], denoising_strength=0.25, seed=4, steps=8, width=64, height=64))
    other = client.img2img(images=[second], denoising_strength=0.25, seed=4, steps=8, width=64, height=64)
    assert np.array_equal(pixels(same[0].image), pixels(same[1].image))
    assert np.abs(pixels(same[0].image) - pixels(other.image)).max() > 20  # the tiny VAE blurs: max, not mean


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"mask": "SMALL_MASK"}, "Mask is 32×32 but the init image is 64×64"),
        ({"init_images": ["aGVsbG8gd29ybGQ="]}, "init_images[0] is not an image"),
        ({"init_images": ["BIG_IMAGE"]}, "init_images[0] is 200×200"),
        ({"denoising_strength": 1.5}, "Denoising strength must be 0–1, got 1.5"),
        ({"init_images": []}, "init_images: send exactly one image"),
        ({"inpainting_fill": 2, "mask": "MASK"}, "Masked content (inpainting_fill)"),
    ],
)
def test_sdapi_img2img_bad_input_is_a_4xx_naming_the_field(sdapi, change, words):
    values = {"SMALL_MASK": png_base64(Image.new("L", (32, 32))), "MASK": png_base64(box_mask())}
    values["BIG_IMAGE"] = png_base64(Image.new("RGB", (200, 200)))
    body = {"init_images": [png_base64(gradient())], "steps": 2, "width": 64, "height": 64}
    for key, value in change.items():
        body[key] = [values.get(v, v) for v in value] if isinstance(value, list) else values.get(value, value)
    reply = sdapi_post(sdapi, body)
    assert 400 <= reply.status_code < 500
    assert words in reply.json()["errors"]


# --- PNG parameters, gallery and Reuse ---------------------------------------------------------------


def test_parameters_text_round_trip():
    from lorapg.gallery.a1111 import format_parameters, parse_parameters
    from lorapg.gallery.records import ImageRecord, Img2ImgUse

    use = Img2ImgUse(0.65, resize_mode=2, mask_blur=6, masked_content="fill", only_masked=True, only_masked_padding=24)
    text = format_parameters(ImageRecord(prompt="a fox", seed=3, steps=20, img2img=use))
    assert "Denoising strength: 0.65, Resize mode: 2" in text
    assert "Mask blur: 6, Masked content: fill, Inpaint area: Only masked, Masked area padding: 24" in text
    parsed = parse_parameters(text)
    assert parsed.img2img == use and not parsed.problems and not parsed.extra
    plain = parse_parameters(format_parameters(ImageRecord(prompt="a fox", seed=3, img2img=Img2ImgUse(0.5))))
    assert plain.img2img == Img2ImgUse(0.5) and "Mask blur" not in format_parameters(
        ImageRecord(prompt="x", img2img=Img2ImgUse(0.5))
    )
    # A1111's hires fix writes "Denoising strength" for its second pass: that is not img2img.
    hires = parse_parameters("a fox\nSteps: 20, Seed: 1, Denoising strength: 0.7, Hires upscale: 2")
    assert hires.img2img is None and hires.hires.denoising_strength == 0.7 and not hires.extra


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    from tests.tiny_models import tiny_runtime

    services = tiny_runtime(tmp_path_factory.mktemp("img2img-gallery"))
    yield services
    services.jobs.close()


def test_gallery_keeps_init_and_mask_and_reuse_makes_the_same_image(runtime, tmp_path):
    init, mask = gradient(seed=16), box_mask()
    options = Img2ImgOptions(init, strength=0.8, mask=mask, mask_blur=2, only_masked=True, only_masked_padding=8)
    request = GenerationRequest(prompt="a fox <lora:style:0.5>", steps=4, seed=9, width=64, height=64, img2img=options)
    result = runtime.service.generate(request)
    (record,) = result.saved
    assert record.img2img.denoising_strength == 0.8 and record.img2img.only_masked
    stored = runtime.gallery.get(record.id)
    assert stored.img2img == record.img2img  # read back from the row's parameters text
    init_file, mask_file = (record.path.with_name(f"{record.path.stem}.{kind}.png") for kind in ("init", "mask"))
    assert np.array_equal(pixels(Image.open(init_file)), pixels(init))
    assert np.array_equal(np.asarray(Image.open(mask_file)), np.asarray(mask))

    reuse = runtime.gallery_service.reuse_parameters(record.id)
    assert (reuse.init_image, reuse.mask_image) == (init_file, mask_file)
    again = runtime.service.generate(reuse.to_request())
    # The same computation on the same (losslessly saved) inputs: the same bytes.
    assert np.array_equal(pixels(again.images[0]), pixels(result.images[0]))

    runtime.gallery_service.delete(record.id)
    assert not init_file.exists() and not mask_file.exists()


def test_an_inverted_mask_is_kept_as_used(runtime):
    mask = box_mask()
    options = Img2ImgOptions(gradient(seed=17), strength=0.5, mask=mask, mask_blur=0, mask_invert=True)
    (record,) = runtime.service.generate(GenerationRequest(prompt="x", steps=2, seed=1, img2img=options)).saved
    kept = np.asarray(Image.open(record.path.with_name(f"{record.path.stem}.mask.png")))
    assert np.array_equal(kept, 255 - np.asarray(mask))
    assert runtime.gallery_service.reuse_parameters(record.id).to_request().img2img.mask_invert is False


def test_attachments_are_never_imported_as_gallery_images(runtime):
    options = Img2ImgOptions(gradient(seed=18), strength=0.5)
    runtime.service.generate(GenerationRequest(prompt="x", steps=2, seed=2, img2img=options))
    before = len(runtime.gallery.list(limit=None))
    assert not any("Imported" in line for line in runtime.gallery.reconcile())
    assert len(runtime.gallery.list(limit=None)) == before


# --- UI (the app served for real, called through gradio_client) ---------------------------------------


@pytest.fixture(scope="module")
def ui(runtime):
    from gradio_client import Client

    from lorapg.services.gallery import GalleryService
    from lorapg.ui.app_ui import build_ui
    from lorapg.working_state import WorkingState

    settings = runtime.settings
    demo = build_ui(
        runtime.service,
        GalleryService(runtime.gallery, runtime.library),
        WorkingState(settings.outputs / "working_state.json"),
    )
    _, url, _ = demo.queue().launch(
        prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, allowed_paths=[str(settings.outputs)]
    )
    try:
        yield Client(url, verbose=False), demo, settings
    finally:
        demo.close()


def test_ui_inpaints_with_painted_strokes_and_reuse_restores_init_and_mask(ui, tmp_path):
    from gradio_client import handle_file

    client, demo, settings = ui
    init = gradient(seed=19)
    init.save(tmp_path / "init.png")
    strokes = Image.new("RGBA", init.size, (0, 0, 0, 0))  # what the editor's brush layer holds
    ImageDraw.Draw(strokes).rectangle((16, 16, 39, 39), fill=(255, 255, 255, 255))
    strokes.save(tmp_path / "strokes.png")
    editor = {
        "background": handle_file(str(tmp_path / "init.png")),
        "layers": [handle_file(str(tmp_path / "strokes.png"))],
    }
    editor["composite"] = None
    pictures, status, seed, _ = client.predict(
        prompt="a fox", negative_prompt="", loras="", steps=4, cfg_scale=7, sampler="Euler a", width=64, height=64,
        seed=31, batch_size=1, init_image=editor, denoising_strength=1.0, mask_blur=0, api_name="/generate",
    )  # fmt: skip
    assert seed == 31 and status.startswith("Done")
    result = Image.open(pictures[0]["image"])
    keep = pixels(box_mask()) == 0
    assert np.abs(pixels(result) - pixels(init))[keep].max() <= 1
    assert np.abs(pixels(result) - pixels(init))[~keep].mean() > 10

    # Reuse (the handler itself: Gradio state is not part of the API) puts the init image and mask back.
    from lorapg.ui.gallery_tab import IMG2IMG_TARGETS, REUSE_TARGETS

    newest = client.predict("", "", api_name="/gallery_list")[0][0]["caption"].split()[0].lstrip("#")
    reuse = next(fn for fn in demo.fns.values() if fn.api_name == "gallery_reuse")
    updates = reuse.fn(int(newest), None, None)
    first_img2img = len(REUSE_TARGETS) + 3
    restored = {key: updates[reuse.outputs[first_img2img + i]] for i, key in enumerate(IMG2IMG_TARGETS)}
    assert np.array_equal(pixels(Image.open(restored["img2img_init_image"])), pixels(init))
    assert np.array_equal(np.asarray(Image.open(restored["img2img_mask"])), np.asarray(box_mask()))
    assert restored["img2img_denoising_strength"] == 1.0 and restored["img2img_mask_blur"] == 0


def test_ui_send_to_img2img_sets_the_init_image(ui, runtime):
    client, _, _ = ui
    (record,) = runtime.service.generate(GenerationRequest(prompt="a hill", steps=2, seed=8)).saved
    editor, mask = client.predict(record.id, api_name="/gallery_send_to_img2img")
    assert np.array_equal(pixels(Image.open(editor["background"])), pixels(Image.open(record.path)))
    assert mask is None


def test_form_inputs_painted_strokes_or_an_uploaded_mask():
    from lorapg.services.img2img_inputs import options_from_form, painted_mask

    init = gradient()
    stroke = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(stroke).rectangle((16, 16, 39, 39), fill=(255, 0, 0, 40))  # any colour, any opacity
    assert np.array_equal(np.asarray(painted_mask([stroke], init.size)), np.asarray(box_mask()))
    assert painted_mask([Image.new("RGBA", (SIZE, SIZE))], init.size) is None  # nothing painted: img2img
    uploaded = box_mask(box=(0, 0, 8, 8))
    assert options_from_form(init, painted=[stroke], mask=uploaded).mask is uploaded  # the upload wins
    assert options_from_form(None) is None  # no init image: txt2img
    with pytest.raises(UserError, match="Mask: add an init image first"):
        options_from_form(None, mask=uploaded)


# --- other families and inpainting checkpoints -------------------------------------------------------


def test_sdxl_img2img_and_inpainting(tiny_models):
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sdxl"]))
    init, mask = gradient(seed=20), box_mask()
    plain = run(engine, Img2ImgOptions(init, strength=0.6), steps=3).images[0]
    assert plain.size == (SIZE, SIZE)
    inpainted = run(engine, Img2ImgOptions(init, strength=1.0, mask=mask, mask_blur=0), steps=3).images[0]
    keep = pixels(mask) == 0
    assert np.abs(pixels(inpainted) - pixels(init))[keep].max() <= 1
    assert np.abs(pixels(inpainted) - pixels(init))[~keep].mean() > 10


@pytest.fixture(scope="module")
def inpainting_checkpoint(tmp_path_factory):
    """A tiny SD 1.x inpainting model: its UNet takes 9 channels (latents, mask, masked-image latents)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from tests.tiny_models import build_sd15_pipeline

    root = tmp_path_factory.mktemp("inpainting")
    base = build_sd15_pipeline(root / "base")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**base.unet.config, "in_channels": 9})
    components = {**base.components, "unet": unet}
    StableDiffusionPipeline(**components).save_pretrained(root / "inpaint", safe_serialization=True)
    return root / "inpaint"


def test_an_inpainting_checkpoint_runs_the_inpaint_pipeline(tiny_models, inpainting_checkpoint):
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32)
    engine.load_model(str(inpainting_checkpoint))
    init, mask = gradient(seed=21), box_mask()
    inpainted = run(engine, Img2ImgOptions(init, strength=1.0, mask=mask, mask_blur=0)).images[0]
    keep = pixels(mask) == 0
    assert np.abs(pixels(inpainted) - pixels(init))[keep].max() <= 1
    assert np.abs(pixels(inpainted) - pixels(init))[~keep].mean() > 10
    # Plain img2img on it: the inpaint pipeline with the whole image masked.
    assert run(engine, Img2ImgOptions(init, strength=0.5)).images[0].size == (SIZE, SIZE)
    assert set(engine.model.derived) == {"inpaint"}


# --- the app's own API: /api/v1/generations ----------------------------------------------------------


def test_api_v1_generation_inpaints_and_saves_to_the_gallery(sdapi):
    root = sdapi["base"].removesuffix("sdapi/v1")
    init, mask = gradient(seed=22), box_mask()
    body = {"prompt": "a fox", "steps": 4, "seed": 6, "width": 64, "height": 64}
    body["img2img"] = {"init_image": png_base64(init), "mask": png_base64(mask), "denoising_strength": 1.0}
    body["img2img"]["mask_blur"] = 0
    reply = requests.post(root + "api/v1/generations", json=body, timeout=120)
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    state = reply.json()
    for _ in range(3000):  # the job finishes in seconds; the loop only bounds a hang (5 min)
        state = requests.get(f"{root}api/v1/generations/{job_id}", timeout=30).json()
        if state["status"] in ("done", "error", "cancelled"):
            break
        time.sleep(0.1)
    assert state["status"] == "done", state
    image = Image.open(io.BytesIO(requests.get(root + state["images"][0].lstrip("/"), timeout=30).content))
    keep = pixels(mask) == 0
    assert np.abs(pixels(image) - pixels(init))[keep].max() <= 1
    assert "Denoising strength: 1" in image.text["parameters"]


@pytest.mark.parametrize(
    ("img2img", "status", "words"),
    [
        ({"init_image": "aGVsbG8=", "mask": None}, 400, "img2img.init_image is not an image"),
        ({"init_image": "INIT", "mask": "SMALL"}, 400, "Mask is 32×32 but the init image is 64×64"),
        ({"init_image": "INIT", "masked_content": "noise"}, 400, "Masked content must be one of original, fill"),
        ({"init_image": "INIT", "strength": 0.5}, 422, "strength"),  # our own API: a misspelt field is an error
    ],
)
def test_api_v1_bad_img2img_input_is_refused_naming_the_field(sdapi, img2img, status, words):
    root = sdapi["base"].removesuffix("sdapi/v1")
    values = {"INIT": png_base64(gradient()), "SMALL": png_base64(Image.new("L", (32, 32)))}
    fields = {key: values.get(value, value) for key, value in img2img.items()}
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "img2img": fields}
    reply = requests.post(root + "api/v1/generations", json=body, timeout=120)
    assert reply.status_code == status, reply.text
    assert words in reply.text
