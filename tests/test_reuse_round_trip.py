"""Issue 18, item 7: every result's settings come back from the gallery, field by field.

For each family of fields (img2img and inpainting, hires fix, variation, ControlNet) a result is made
through the real service on a tiny SD 1.x model, then Reuse (by gallery id, init image, mask and
control images included) turns it back into a request, which must equal the checked request that made
the image: every field compared, images by their pixels. A PNG alone (PNG Info) carries no images, so
there the comparison is over every field its text holds, and the missing images are named in notes.
"""

from __future__ import annotations

import io
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lorapg.diffusion.controlnet import ControlUnit
from lorapg.diffusion.hires import HiresOptions, target_size
from lorapg.diffusion.img2img import FILL, Img2ImgOptions
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.ui.hires_section import HIRES_INPUTS
from tests.test_controlnet import save_tiny_controlnet

SIZE = 64
# Settings that say nothing about how the image looks: the batch (Reuse makes one image) and extras.
NOT_SETTINGS = {"batch_size", "extra"}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    from tests.tiny_models import tiny_runtime

    root = tmp_path_factory.mktemp("reuse-round-trip")
    services = tiny_runtime(root)
    save_tiny_controlnet(Path(services.settings.model), root / "models" / "controlnet" / "edges", seed=1)
    save_tiny_controlnet(Path(services.settings.model), root / "models" / "controlnet" / "edges2", seed=2)
    yield services
    services.jobs.close()


def picture(seed: int) -> Image.Image:
    """A seeded picture with edges (canny finds some) and smooth parts."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 30, 30), fill="white")
    draw.rectangle((0, 40, SIZE - 1, 44), fill=(200, 60, 60))
    return image


def box_mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 39, 39), fill=255)
    return mask


def as_pixels(image) -> np.ndarray:
    opened = Image.open(image) if isinstance(image, str | Path) else image
    return np.asarray(opened, dtype=np.int16)


def differences(made, reused, where: str = "request") -> list[str]:
    """Every field of ``made`` that ``reused`` does not hold the same (images compared by pixels)."""
    if is_dataclass(made) and is_dataclass(reused):
        found = []
        for item in fields(made):
            if where == "request" and item.name in NOT_SETTINGS:
                continue
            found += differences(getattr(made, item.name), getattr(reused, item.name), f"{where}.{item.name}")
        return found
    if isinstance(made, tuple | list) and isinstance(reused, tuple | list):
        if len(made) != len(reused):
            return [f"{where}: {len(made)} items made, {len(reused)} reused"]
        return [
            line
            for index, pair in enumerate(zip(made, reused, strict=True))
            for line in differences(*pair, f"{where}[{index}]")
        ]
    if isinstance(made, Image.Image) or isinstance(reused, Image.Image):
        if made is None or reused is None:
            return [f"{where}: {made!r} made, {reused!r} reused"]
        same = np.array_equal(as_pixels(made), as_pixels(reused))
        return [] if same else [f"{where}: the pixels differ"]
    if isinstance(made, float) or isinstance(reused, float):
        # Written with 4 decimals in the A1111 text; every value here has at most 2.
        same = made is not None and reused is not None and abs(made - reused) < 1e-6
        return [] if same else [f"{where}: {made!r} made, {reused!r} reused"]
    return [] if made == reused else [f"{where}: {made!r} made, {reused!r} reused"]


def made_and_reused(runtime, request: GenerationRequest):
    """The checked request that made the image, and Reuse's by gallery id and by the PNG alone."""
    result = runtime.service.generate(request)
    (record,) = result.saved
    gallery = runtime.gallery_service
    by_id = gallery.reuse_parameters(record.id)
    by_png = gallery.reuse_parameters(gallery.png_info(str(record.path)))
    return result.request, by_id, by_png


def base(**overrides) -> GenerationRequest:
    values = dict(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        loras=(LoraRequest("style", 0.75),),
        steps=3,
        guidance_scale=6.5,
        sampler="DPM++ 2M Karras",
        width=SIZE,
        height=SIZE,
        seed=4242,
        clip_skip=2,
    )
    return GenerationRequest(**{**values, **overrides})


def test_inpainting_settings_init_image_and_mask_come_back(runtime):
    options = Img2ImgOptions(
        picture(1),
        strength=0.65,
        resize_mode=2,
        mask=box_mask(),
        mask_blur=3,
        inpainting_fill=FILL,
        only_masked=True,
        only_masked_padding=12,
    )
    made, by_id, by_png = made_and_reused(runtime, base(img2img=options))
    assert differences(made, by_id.to_request()) == []
    # The PNG alone: txt2img with the rest as made, a note for the init image, and the Generate tab's
    # img2img settings as made, without the images a PNG cannot hold.
    assert differences(base(), by_png.to_request()) == []
    assert [note for note in by_png.notes if note.startswith("Init image:")], by_png.notes
    form = by_png.img2img_form()
    assert (form["image"], form["mask"]) == (None, None)
    assert differences(replace(made.img2img, image=None, mask=None), Img2ImgOptions(**form)) == []
    # The UI's form by id holds the images themselves.
    assert differences(made.img2img, Img2ImgOptions(**by_id.img2img_form())) == []


def test_an_img2img_result_whose_mask_is_gone_says_so(runtime):
    options = Img2ImgOptions(picture(5), strength=0.5, mask=box_mask(), mask_blur=2)
    result = runtime.service.generate(base(img2img=options))
    (record,) = result.saved
    record.path.with_name(f"{record.path.stem}.mask.png").unlink()
    reused = runtime.gallery_service.reuse_parameters(record.id)
    assert reused.to_request().img2img.mask is None  # plain img2img from the init image, as the note says
    assert [note for note in reused.notes if note.startswith("Mask:")], reused.notes


def test_plain_img2img_settings_and_init_image_come_back(runtime):
    options = Img2ImgOptions(picture(2), strength=0.45, resize_mode=1)
    made, by_id, _ = made_and_reused(runtime, base(img2img=options))
    assert made.img2img.mask is None
    assert differences(made, by_id.to_request()) == []


@pytest.mark.parametrize(
    "hires",
    [
        HiresOptions(scale=1.5, steps=2, strength=0.55, upscaler="Latent (nearest)"),
        HiresOptions(resize_x=96, resize_y=96, steps=0, strength=0.35, upscaler="None"),
    ],
    ids=["scale", "resize"],
)
def test_hires_fix_settings_come_back(runtime, hires):
    made, by_id, by_png = made_and_reused(runtime, base(hires=hires))
    assert differences(made, by_id.to_request()) == []
    assert differences(made, by_png.to_request()) == []  # all of it is in the text
    # The Generate tab's form, as its generate handler reads it back (a target size as its factor).
    form = by_id.hires_form()
    from_form = runtime.service.hires_options(*(form[key] for key in HIRES_INPUTS))
    assert target_size(from_form, SIZE, SIZE) == target_size(made.hires, SIZE, SIZE)
    assert differences(replace(made.hires, scale=0.0, resize_x=0, resize_y=0), replace(from_form, scale=0.0)) == []
    assert by_id.form_notes() == []


def test_a_hires_target_the_tabs_factor_cannot_give_is_noted(runtime):
    made, by_id, _ = made_and_reused(runtime, base(hires=HiresOptions(resize_x=96, resize_y=80, steps=1)))
    assert differences(made, by_id.to_request()) == []
    assert by_id.form_notes() == [
        "Hires fix: this image was upscaled to 96×80; the Generate form's factor gives 96×96, "
        "make it through the API (hr_resize_x, hr_resize_y) for the same size."
    ]


def test_variation_settings_come_back(runtime):
    made, by_id, by_png = made_and_reused(runtime, base(variation_seed=31, variation_strength=0.3))
    assert (made.variation_seed, made.variation_strength) == (31, 0.3)
    assert differences(made, by_id.to_request()) == []
    assert differences(made, by_png.to_request()) == []


def test_controlnet_units_with_their_images_come_back(runtime):
    units = (
        ControlUnit(
            "edges",
            picture(3),
            module="canny",
            weight=0.75,
            guidance_start=0.1,
            guidance_end=0.8,
            resize_mode=0,
            threshold_a=50,
            threshold_b=150,
        ),
        ControlUnit("edges2", picture(4), weight=1.25, guidance_start=0.2, guidance_end=0.9, resize_mode=2),
    )
    made, by_id, by_png = made_and_reused(runtime, base(controlnet=units))
    assert differences(made, by_id.to_request()) == []
    # The PNG alone: every other setting, and a note per unit for its missing image.
    assert differences(base(), by_png.to_request()) == []
    assert len([note for note in by_png.notes if "no control image here" in note]) == 2
    # The Generate tab's form holds one unit, all of it; Reuse says that the second one is left out there.
    form = {key.removeprefix("controlnet_"): value for key, value in by_id.controlnet_form().items()}
    from_form = runtime.service.controlnet_units(
        form.pop("model"), Path(form.pop("image")), resize_mode=form.pop("resize_mode"), **form
    )
    assert differences(made.controlnet[:1], checked_units(from_form)) == []
    assert len(by_id.form_notes()) == 1 and "2 units" in by_id.form_notes()[0]
    assert by_png.form_notes() == []  # nothing restorable, nothing to say beyond the notes above


def checked_units(units) -> tuple:
    """The units as the request checks them (the resize mode's name as its number, images decoded)."""
    from lorapg.diffusion.controlnet import check_units

    return check_units(units)


# --- the API: GET /api/v1/gallery/{id}/reuse, then POST /api/v1/generations --------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {
            "img2img": Img2ImgOptions(picture(6), strength=0.7, resize_mode=1, mask=box_mask(), mask_blur=1),
            "controlnet": (ControlUnit("edges", picture(7), module="canny", weight=0.5, threshold_a=60),),
        },
        {
            "hires": HiresOptions(resize_x=96, resize_y=80, steps=1, strength=0.4, upscaler="None"),
            "variation_seed": 8,
            "variation_strength": 0.2,
        },
    ],
    ids=["inpainting-controlnet", "hires-variation"],
)
def test_the_apis_reuse_body_makes_the_same_image(runtime, overrides):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lorapg.api.auth import ApiAccess
    from lorapg.api.gallery_reuse import gallery_reuse_router
    from lorapg.api.generations import GenerationCreate, generation_jobs

    made = runtime.service.generate(base(**overrides))
    app = FastAPI()
    app.include_router(gallery_reuse_router(runtime.gallery_service, ApiAccess(enabled=True)))
    reply = TestClient(app).get(f"/api/v1/gallery/{made.saved[0].id}/reuse")
    assert reply.status_code == 200, reply.text
    assert reply.json()["notes"] == []
    # What POST /api/v1/generations does with the body.
    state = generation_jobs(runtime.service).submit(GenerationCreate.model_validate(reply.json()["request"]).params())
    job = runtime.service.jobs.get(state.job_id)
    while not job.wait(1):
        pass
    assert differences(made.request, job.result.request) == []
    assert np.array_equal(as_pixels(job.result.images[0]), as_pixels(made.images[0]))  # the same code path
    missing = TestClient(app).get("/api/v1/gallery/99999/reuse")
    assert missing.status_code == 404 and "No image with id 99999" in missing.text


# --- the API's Reuse: built by GalleryService.reuse_body, bounded, model named, images that went --------


def inpainted_with_control(runtime):
    """A gallery record made with an init image, a mask and a ControlNet unit's image, all kept beside
    it, and the checked request that made it."""
    options = Img2ImgOptions(picture(8), strength=0.6, mask=box_mask(), mask_blur=2, inpainting_fill=FILL)
    unit = ControlUnit("edges", picture(9), module="canny", weight=0.5, threshold_a=60)
    result = runtime.service.generate(base(img2img=options, controlnet=(unit,)))
    (record,) = result.saved
    return record, result.request


def kept(record, kind: str) -> Path:
    return record.path.with_name(f"{record.path.stem}.{kind}.png")


def reuse_client(runtime, **options):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lorapg.api.auth import ApiAccess
    from lorapg.api.gallery_reuse import gallery_reuse_router

    app = FastAPI()
    app.include_router(gallery_reuse_router(runtime.gallery_service, ApiAccess(enabled=True), **options))
    return TestClient(app)


def test_the_service_reads_the_kept_images_into_the_reuse_body(runtime):
    record, made = inpainted_with_control(runtime)
    body = runtime.gallery_service.reuse_body(record.id)
    # The files' bytes themselves, never a path the route would have to read.
    assert body.request.img2img.image == kept(record, "init").read_bytes()
    assert body.request.img2img.mask == kept(record, "mask").read_bytes()
    assert [unit.image for unit in body.request.controlnet] == [kept(record, "control0").read_bytes()]
    assert (body.model_name, body.notes) == (record.model_name, [])
    assert differences(made, opened(body.request)) == []


def opened(request: GenerationRequest) -> GenerationRequest:
    """``request`` with its image bytes decoded, for ``differences`` to compare by pixels."""
    img2img = request.img2img
    if img2img is not None:
        mask = None if img2img.mask is None else Image.open(io.BytesIO(img2img.mask))
        img2img = replace(img2img, image=Image.open(io.BytesIO(img2img.image)), mask=mask)
    units = tuple(replace(unit, image=Image.open(io.BytesIO(unit.image))) for unit in request.controlnet)
    return replace(request, img2img=img2img, controlnet=units)


def test_a_reuse_body_over_the_upload_limit_is_refused_naming_its_images(runtime):
    record, _ = inpainted_with_control(runtime)
    sent = sum(kept(record, kind).stat().st_size for kind in ("init", "mask", "control0"))
    # The images fit as bytes but not base64'd (4 characters per 3 bytes), as a POST of the body must.
    reply = reuse_client(runtime, max_upload_bytes=sent + 1).get(f"/api/v1/gallery/{record.id}/reuse")
    assert reply.status_code == 413, reply.text
    message = reply.json()["detail"]
    for words in ("init image", "mask", "ControlNet unit 0 image", "max_upload_mb", f"image {record.id}"):
        assert words in message, message
    roomy = reuse_client(runtime, max_upload_bytes=2 * sent).get(f"/api/v1/gallery/{record.id}/reuse")
    assert roomy.status_code == 200, roomy.text


def test_the_reuse_reply_names_the_model_and_notes_another_loaded_one(runtime):
    (record,) = runtime.service.generate(base()).saved
    same = reuse_client(runtime, current_model=runtime.service.chosen_model).get(f"/api/v1/gallery/{record.id}/reuse")
    assert same.status_code == 200, same.text
    assert same.json()["model"] == record.model_name and record.model_name
    assert same.json()["notes"] == []
    other = reuse_client(runtime, current_model=lambda: "/models/another-model.safetensors")
    notes = other.get(f"/api/v1/gallery/{record.id}/reuse").json()["notes"]
    assert [note for note in notes if f"made with model {record.model_name!r}" in note], notes


def test_inpainting_settings_stay_in_the_form_when_one_image_is_gone(runtime):
    options = Img2ImgOptions(picture(10), strength=0.5, mask=box_mask(), mask_blur=3, only_masked=True)
    made = runtime.service.generate(base(img2img=options))
    (record,) = made.saved
    kept(record, "mask").unlink()
    reused = runtime.gallery_service.reuse_parameters(record.id)
    form = reused.img2img_form()
    # The form keeps every inpainting setting and the init image; the mask alone is to be put back.
    assert (form["image"], form["mask"]) == (kept(record, "init"), None)
    from_form = Img2ImgOptions(**form | {"image": None})
    assert differences(replace(made.request.img2img, image=None, mask=None), from_form) == []
    assert reused.to_request().img2img.mask is None  # the request, though, is plain img2img (as the note says)
    # The other way round: the init image gone, the mask stays in the form.
    (other,) = runtime.service.generate(base(img2img=Img2ImgOptions(picture(11), mask=box_mask(), mask_blur=3))).saved
    kept(other, "init").unlink()
    form = runtime.gallery_service.reuse_parameters(other.id).img2img_form()
    assert (form["image"], form["mask"], form["mask_blur"]) == (None, kept(other, "mask"), 3)


def test_an_img2img_image_without_its_init_image_is_a_409_not_a_txt2img_body(runtime):
    (record,) = runtime.service.generate(base(img2img=Img2ImgOptions(picture(12), strength=0.5))).saved
    kept(record, "init").unlink()
    reply = reuse_client(runtime).get(f"/api/v1/gallery/{record.id}/reuse")
    assert reply.status_code == 409, reply.text
    assert f"the init image of image {record.id} is not kept" in reply.json()["detail"].lower()


@pytest.mark.parametrize("kind", ["mask", "control0", "init"])
def test_a_file_that_goes_while_reuse_reads_it_is_left_out_not_a_500(runtime, monkeypatch, kind):
    record, _ = inpainted_with_control(runtime)
    gallery = runtime.gallery_service
    found = gallery.reuse_parameters

    def found_then_gone(*args, **kwargs):
        params = found(*args, **kwargs)  # the file is found here (is_file) ...
        kept(record, kind).unlink()  # ... and deleted before its bytes are read
        return params

    monkeypatch.setattr(gallery, "reuse_parameters", found_then_gone)
    reply = reuse_client(runtime).get(f"/api/v1/gallery/{record.id}/reuse")
    if kind == "init":
        assert reply.status_code == 409, reply.text
        return
    assert reply.status_code == 200, reply.text
    body, notes = reply.json()["request"], reply.json()["notes"]
    if kind == "mask":
        assert body["img2img"]["init_image"] and body["img2img"]["mask"] is None
        assert [note for note in notes if note.startswith("Mask:")], notes
    else:
        assert body["controlnet"] == [] and body["img2img"]["mask"]
        assert [note for note in notes if "ControlNet unit 0 (edges) has no control image" in note], notes
