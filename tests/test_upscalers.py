"""Upscaler models (A1111's Extras, issue 18 item 4) on a tiny ESRGAN built in code: detection by
spandrel, sizes, tiling, the pickle flag, bad files and names, the gallery, the CLI, the hires fix and
the A1111 API over HTTP (webuiapi)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading

import numpy as np
import pytest
import requests
import torch
import webuiapi
from gradio_client import Client, handle_file
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from lorapg.cli import main
from lorapg.config import Settings
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.hires import HiresOptions
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest
from lorapg.diffusion.upscalers import (
    UpscaleCancelled,
    UpscalerLibrary,
    _to_tensor,
    check_size,
    tile_starts,
    tiled_upscale,
)
from lorapg.errors import UserError
from lorapg.gallery.png import read_png_parameters
from lorapg.gallery.records import ImageRecord
from lorapg.gallery.store import GalleryStore
from lorapg.jobs import JobQueue
from lorapg.residency import GB, GPU, ResidencyManager
from lorapg.services.gallery import GalleryService
from lorapg.services.generation import GenerationService
from lorapg.services.upscale import UpscaleService
from tests.app_server import running_app

TINY = "4x-tiny"


def tiny_esrgan_state(filters: int = 4) -> dict[str, torch.Tensor]:
    """An ESRGAN (RRDBNet, the original "model.N" layout) with 4 features and one block: a 4× upscaler
    of a few kilobytes, random but fixed weights (``filters``: another size of file)."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    net = ESRGAN(num_filters=filters, num_blocks=1, scale=4)
    return {key: value.contiguous() for key, value in net.state_dict().items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A models folder whose upscalers/ holds the tiny ESRGAN as .safetensors."""
    root = tmp_path_factory.mktemp("upscalers-models")
    (root / "upscalers").mkdir()
    save_file(tiny_esrgan_state(), root / "upscalers" / f"{TINY}.safetensors")
    return root


@pytest.fixture(scope="module")
def library(folder):
    return UpscalerLibrary(folder / "upscalers", tile=0)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(values, "RGB")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png_with(image: Image.Image, parameters: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# --- the library ---------------------------------------------------------------------------------


def test_spandrel_detects_the_tiny_esrgan_and_the_output_is_input_times_scale(library):
    descriptor = library.load(library.find(TINY))
    assert (descriptor.architecture.name, descriptor.scale) == ("ESRGAN", 4)
    assert library.names() == ["None", "Lanczos", "Nearest", TINY]
    result = library.upscale(noise(20, 12), TINY, (80, 48))
    assert result.size == (80, 48)
    # Another factor: one 4× pass then Lanczos down (2×), or two passes then down (6×), as A1111 does.
    assert library.upscale(noise(20, 12), TINY, (40, 24)).size == (40, 24)
    assert library.upscale(noise(5, 3), TINY, (30, 18)).size == (30, 18)
    assert library.upscale(noise(20, 12), "lanczos", (50, 30)).size == (50, 30)
    assert library.upscale(noise(20, 12), "None", (50, 30)).size == (20, 12)  # None: unchanged


def test_tiled_output_matches_the_untiled_one_within_a_tolerance(library):
    descriptor = library.load(library.find(TINY))
    image = _to_tensor(noise(56, 40, seed=3))
    whole = tiled_upscale(descriptor, image, 4, 0, 0)
    tiled = tiled_upscale(descriptor, image, 4, 24, 8)
    assert tiled.shape == whole.shape == (1, 3, 160, 224)
    assert float(whole.std()) > 0.01  # the tiny net's output does depend on the picture
    # Blended overlaps: no seam. Both are the same net on the same pixels; only the tiles' edges differ.
    assert float((tiled - whole).abs().max()) < 0.02
    assert float((tiled - whole).abs().mean()) < 0.002
    assert tile_starts(56, 24, 8) == [0, 16, 32]  # every pixel covered, the last tile flush with the end


def test_a_loaded_upscaler_is_registered_with_the_residency_manager(folder):
    residency = ResidencyManager(GB)  # the moves are the model's own .to(): "cpu" here, CUDA on a GPU
    library = UpscalerLibrary(folder / "upscalers", residency=residency, tile=0)
    assert library.upscale(noise(8, 8), TINY, (32, 32)).size == (32, 32)
    assert [entry["name"] for entry in residency.status()] == [f"upscaler: {TINY}"]
    assert residency.used_bytes > 0  # placed "on the device" while it ran, kept there (policy auto)


def test_a_pickle_is_refused_without_the_flag_and_loads_with_it(tmp_path):
    torch.save(tiny_esrgan_state(), tmp_path / "4x-pickled.pth")
    refused = UpscalerLibrary(tmp_path, tile=0)
    with pytest.raises(UserError, match=r"pickle file \(\.pth\).*--allow-pickle") as caught:
        refused.upscale(noise(8, 8), "4x-pickled", (32, 32))
    assert "\n" not in str(caught.value)
    allowed = UpscalerLibrary(tmp_path, allow_pickle=True, tile=0)
    assert allowed.upscale(noise(8, 8), "4x-pickled", (32, 32)).size == (32, 32)


def test_a_file_that_is_no_upscaler_and_an_unknown_name_are_refused_in_one_line(tmp_path, library):
    save_file({"weight": torch.zeros(3, 3)}, tmp_path / "notes.safetensors")
    with pytest.raises(UserError, match="'notes' .* is not a model architecture spandrel knows") as caught:
        UpscalerLibrary(tmp_path).upscale(noise(8, 8), "notes", (32, 32))
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match=f"upscaler_1 'R-ESRGAN 4x\\+' is not available; pick one of .*\"{TINY}\""):
        library.find("R-ESRGAN 4x+", "upscaler_1")


def test_a_read_error_with_an_empty_message_is_named_by_its_type(tmp_path, monkeypatch):
    # Some of spandrel's architecture checks are bare asserts: an error whose message is empty. A real
    # file cannot be made to trip one reliably, so the loader raises one here.
    import spandrel

    def fail(self, state):
        raise AssertionError()

    monkeypatch.setattr(spandrel.ModelLoader, "load_from_state_dict", fail)
    save_file(tiny_esrgan_state(), tmp_path / "broken.safetensors")
    with pytest.raises(UserError, match=r"'broken' \(broken\.safetensors\) could not be read: AssertionError; replace"):
        UpscalerLibrary(tmp_path, tile=0).upscale(noise(8, 8), "broken", (32, 32))


def resident(residency: ResidencyManager, name: str):
    """The residency manager's entry for ``name`` (``use`` hands it out; released at once)."""
    with residency.use(name) as entry:
        return entry


def test_a_model_whose_registration_fails_is_not_kept_and_registers_on_the_next_load(folder):
    residency = ResidencyManager(GB)
    name = f"upscaler: {TINY}"
    residency.register(name, 1, to_gpu=lambda: None)  # another entry of that name, pinned below
    library = UpscalerLibrary(folder / "upscalers", residency=residency, tile=0)
    with residency.use(name), pytest.raises(UserError, match="is in use"):
        library.load(library.find(TINY))
    descriptor = library.load(library.find(TINY))
    # Registered this time: the entry is the model's own (its bytes), not the one that was in the way.
    size = sum(p.numel() * p.element_size() for p in descriptor.model.parameters())
    assert resident(residency, name).size_bytes == size > 1


def test_a_replaced_or_changed_file_is_read_again_and_the_old_model_leaves_the_device(tmp_path):
    torch.save(tiny_esrgan_state(), tmp_path / "4x-swap.pth")
    residency = ResidencyManager(GB)
    library = UpscalerLibrary(tmp_path, allow_pickle=True, residency=residency, tile=0)
    library.upscale(noise(8, 8), "4x-swap", (32, 32))
    first, old = library.load(library.find("4x-swap")), resident(residency, "upscaler: 4x-swap")
    assert old.location == GPU
    save_file(tiny_esrgan_state(filters=8), tmp_path / "4x-swap.safetensors")  # wins over the pickle
    second = library.load(library.find("4x-swap"))
    assert second is not first and old.location != GPU  # moved off, not left there uncounted
    assert [entry["name"] for entry in residency.status()] == ["upscaler: 4x-swap"]
    # The same file name and modification time, another size: another file, read again.
    path = tmp_path / "4x-swap.safetensors"
    before = path.stat()
    save_file(tiny_esrgan_state(filters=4), path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    third = library.load(library.find("4x-swap"))
    assert third is not second and third.model.state_dict()["model.0.weight"].shape[0] == 4


def test_a_deleted_file_leaves_the_residency_manager_at_the_next_listing(tmp_path):
    save_file(tiny_esrgan_state(), tmp_path / "4x-gone.safetensors")
    residency = ResidencyManager(GB)
    library = UpscalerLibrary(tmp_path, residency=residency, tile=0)
    library.upscale(noise(8, 8), "4x-gone", (32, 32))
    old = resident(residency, "upscaler: 4x-gone")
    (tmp_path / "4x-gone.safetensors").unlink()
    assert library.names() == ["None", "Lanczos", "Nearest"]
    assert residency.status() == [] and residency.used_bytes == 0 and old.location != GPU


def test_a_cancel_stops_the_tiled_loop_between_tiles(library):
    descriptor = library.load(library.find(TINY))
    cancel = threading.Event()
    tiles = []

    def run(piece: torch.Tensor) -> torch.Tensor:
        tiles.append(piece.shape)
        cancel.set()  # asked for while the first tile runs
        return descriptor(piece)

    with pytest.raises(UpscaleCancelled, match="Upscaling was cancelled."):
        tiled_upscale(run, _to_tensor(noise(56, 40)), 4, 24, 8, cancel.is_set)
    assert len(tiles) == 1  # the tiles after it never ran
    with pytest.raises(UpscaleCancelled):  # in one piece: asked before it
        tiled_upscale(run, _to_tensor(noise(8, 8)), 4, 0, 0, cancel.is_set)
    assert len(tiles) == 1


def test_scale_1_with_a_model_runs_it_once_and_its_4x_intermediate_must_fit(library, monkeypatch):
    # A1111's Upscaler.upscale: at scale 1 the model runs once and the result is resized back down.
    passes = []
    run = library._run
    monkeypatch.setattr(library, "_run", lambda *args: passes.append(args[2].size) or run(*args))
    image = noise(20, 12)
    once = library.upscale(image, TINY, (20, 12))
    assert passes == [(20, 12)] and once.size == (20, 12)
    # The model's work (4×, then Lanczos down), not the image passed through untouched.
    model_then_down = library.upscale(image, TINY, (80, 48)).resize((20, 12), Image.Resampling.LANCZOS)
    assert float(np.abs(pixels(once) - pixels(model_then_down)).mean()) < 1
    assert float(np.abs(pixels(once) - pixels(image)).mean()) > 5
    assert check_size(20, 12, 1, 4, 80 * 48, "Scale") == (20, 12)  # the 80×48 intermediate fits exactly
    with pytest.raises(UserError, match=r"Scale: upscaling 20×12 makes 80×48 .*max_image_pixels"):
        check_size(20, 12, 1, 4, 80 * 48 - 1, "Scale")


def test_a_file_deleted_after_find_is_not_available_naming_the_field(tmp_path, monkeypatch):
    import lorapg.diffusion.upscalers as upscalers

    save_file(tiny_esrgan_state(), tmp_path / "4x-brief.safetensors")
    library = UpscalerLibrary(tmp_path, tile=0)
    item = library.find("4x-brief", "upscaler_1")
    (tmp_path / "4x-brief.safetensors").unlink()
    expected = r"upscaler_1 '4x-brief' is not available: its file 4x-brief\.safetensors is gone from .*; pick another"
    with pytest.raises(UserError, match=expected) as caught:
        library.load(item, "upscaler_1")
    assert "\n" not in str(caught.value)
    # Deleted after its size and time were read, while spandrel opens it: the same refusal.
    monkeypatch.setattr(upscalers, "_stamp", lambda path: (1, 1))
    with pytest.raises(UserError, match=expected):
        library.load(item, "upscaler_1")


def test_a_listing_read_before_a_job_loaded_a_model_does_not_forget_it(tmp_path, monkeypatch):
    residency = ResidencyManager(GB)
    library = UpscalerLibrary(tmp_path, residency=residency, tile=0)
    scanned, loaded = threading.Event(), threading.Event()
    views, errors = [], []
    scan = library._scan

    def lister_pauses_after_its_first_read():
        found = scan()
        if threading.current_thread() is lister and not views:
            views.append(found)
            scanned.set()
            loaded.wait(timeout=60)  # a fail-safe only: the test sets it
        return found

    def list_names():
        try:
            library.names()
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)

    monkeypatch.setattr(library, "_scan", lister_pauses_after_its_first_read)
    lister = threading.Thread(target=list_names)
    lister.start()
    assert scanned.wait(timeout=60)
    save_file(tiny_esrgan_state(), tmp_path / "4x-new.safetensors")  # added after the listing read the folder
    descriptor = library.load(library.find("4x-new"))
    loaded.set()
    lister.join()
    assert views == [{}] and errors == []  # the listing's view had no such file
    assert [entry["name"] for entry in residency.status()] == ["upscaler: 4x-new"]  # not forgotten
    assert library.load(library.find("4x-new")) is descriptor  # nor read again


def test_a_file_deleted_between_two_passes_does_not_fail_the_second(tmp_path, monkeypatch):
    path = tmp_path / "4x-passes.safetensors"
    save_file(tiny_esrgan_state(), path)
    residency = ResidencyManager(GB)
    library = UpscalerLibrary(tmp_path, residency=residency, tile=0)
    passes = []
    run = library._run

    def run_then_delete_and_list(*args):
        image = run(*args)
        passes.append(image.size)
        if len(passes) == 1:  # between the first pass and the second
            path.unlink()
            assert library.names() == ["None", "Lanczos", "Nearest"]
        return image

    monkeypatch.setattr(library, "_run", run_then_delete_and_list)
    result = library.upscale(noise(6, 4), "4x-passes", (48, 32))  # 8×: two 4× passes, then Lanczos down
    assert passes == [(24, 16), (96, 64)] and result.size == (48, 32)
    assert residency.status() != []  # kept in use until the upscale ended...
    library.names()
    assert residency.status() == []  # ...then the next listing lets it go


def test_a_model_is_read_outside_the_lock_and_two_loads_at_once_register_one(tmp_path, monkeypatch):
    import lorapg.diffusion.upscalers as upscalers

    save_file(tiny_esrgan_state(), tmp_path / "4x-both.safetensors")
    residency = ResidencyManager(GB)
    library = UpscalerLibrary(tmp_path, residency=residency, tile=0)
    read = upscalers._read_model
    lock_free = []

    def read_noting_the_lock(item, allow_pickle):
        free = library._lock.acquire(blocking=False)  # a listing now would not wait for this read
        if free:
            library._lock.release()
        lock_free.append(free)
        return read(item, allow_pickle)

    monkeypatch.setattr(upscalers, "_read_model", read_noting_the_lock)
    library.load(library.find("4x-both"))
    assert lock_free == [True]
    library.names()  # nothing forgotten: the file is there
    (tmp_path / "4x-both.safetensors").unlink()
    library.names()  # forgotten: the next loads read the new file again
    save_file(tiny_esrgan_state(filters=8), tmp_path / "4x-both.safetensors")

    both_reading = threading.Barrier(2, timeout=60)  # the timeout is a fail-safe: the reads meet at once

    def read_when_both_are_reading(item, allow_pickle):
        both_reading.wait()  # broken (the test fails) if one read waited for the other
        return read(item, allow_pickle)

    monkeypatch.setattr(upscalers, "_read_model", read_when_both_are_reading)
    item = library.find("4x-both")
    results, errors = [], []

    def load():
        try:
            results.append(library.load(item))
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)

    loaders = [threading.Thread(target=load) for _ in range(2)]
    for loader in loaders:
        loader.start()
    for loader in loaders:
        loader.join()
    assert errors == [] and len(results) == 2 and results[0] is results[1]  # the first registered is used
    assert [entry["name"] for entry in residency.status()] == ["upscaler: 4x-both"]
    size = sum(p.numel() * p.element_size() for p in results[0].model.parameters())
    assert resident(residency, "upscaler: 4x-both").size_bytes == size


# --- the service: limits and the gallery ------------------------------------------------------------


@pytest.fixture
def service(folder, tmp_path):
    jobs = JobQueue()
    store = GalleryStore(tmp_path / "gallery.sqlite3", tmp_path / "images", keep=0)
    settings = Settings(models_dir=folder, outputs=tmp_path, max_image_pixels=20_000)
    gallery = GalleryService(store, LoraLibrary(tmp_path / "loras"))
    yield UpscaleService(settings, UpscalerLibrary(folder / "upscalers", tile=16), jobs, gallery)
    jobs.close()


def test_the_result_goes_to_the_gallery_with_a1111s_postprocess_fields(service):
    source = png_with(noise(24, 16), "a red fox\nSteps: 4, Seed: 7, Size: 24x16")
    done = service.save(service.upscale(source, TINY, 4))
    assert done.image.size == (96, 64) and done.record.id is not None
    text = read_png_parameters(done.record.path)
    assert text.startswith("a red fox\nSteps: 4, Seed: 7, Size: 24x16")  # the source's, as generated
    assert "Postprocess upscale by: 4, Postprocess upscaler: 4x-tiny" in text
    assert done.info == "Postprocess upscale by: 4, Postprocess upscaler: 4x-tiny"
    again = service.upscale_gallery_image(done.record.id, "Lanczos", 1.5)
    assert again.image.size == (144, 96)


def test_an_image_too_large_after_scaling_and_a_bad_scale_are_refused(service):
    with pytest.raises(UserError, match=r"Scale: upscaling 60×40 makes 240×160 .*setting max_image_pixels"):
        service.upscale(noise(60, 40), TINY)  # 2 400 pixels in, 38 400 out: over 20 000
    with pytest.raises(UserError, match="Scale must be 1–8, got 9."):
        service.upscale(noise(8, 8), TINY, 9)
    with pytest.raises(UserError, match=r"Image is 200×101 .*max_image_pixels"):
        service.upscale(noise(200, 101), TINY, 1)


@pytest.mark.parametrize("shared", [True, False])
def test_a_gallery_image_another_visitor_made_is_upscaled_where_the_gallery_shows_it(folder, tmp_path, shared):
    from lorapg.config import load_settings
    from lorapg.services.build import build_services

    values = {"outputs": str(tmp_path / "out"), "models_dir": str(folder), "device": "cpu", "visitors": "private"}
    built = build_services(load_settings(None, values | {"shared_gallery": shared}, environ={}))
    try:
        theirs = built.gallery.add(ImageRecord(prompt="theirs", seed=9), noise(12, 8), owner="alice")
        if not shared:  # each visitor sees their own images: bob is not shown alice's
            with pytest.raises(UserError, match=f"No image with id {theirs.id}"):
                built.upscale.upscale_gallery_image(theirs.id, "Lanczos", 2, owner="bob")
            return
        # A shared gallery shows bob every image: what the Gallery shows him, he may upscale.
        assert built.gallery_service.get(theirs.id, owner="bob").id == theirs.id
        done = built.upscale.upscale_gallery_image(theirs.id, "Lanczos", 2, owner="bob")
        assert done.image.size == (24, 16) and built.gallery.get(done.record.id, owner="bob").prompt == "theirs"
    finally:
        built.jobs.shutdown()


def test_scale_to_makes_smaller_sizes_crops_or_keeps_the_aspect_and_none_leaves_the_image(service):
    image = noise(40, 20)
    smaller = service.upscale_by_mode(image, TINY, 1, scale=2, width=16, height=6, crop=True)
    assert smaller.image.size == (16, 6)  # ×0.4 covers it (16×8), then the centre cut out
    assert smaller.info == "Postprocess upscale to: 16x6, Postprocess crop to: 16x6, Postprocess upscaler: 4x-tiny"
    kept = service.upscale_by_mode(image, "Lanczos", 1, scale=2, width=60, height=60, crop=False)
    assert kept.image.size == (120, 60)  # covers 60×60 with the aspect ratio kept: A1111 never stretches
    for name in ("none", "NONE"):  # makes no pixels: no size over the limit, no black padding
        unchanged = service.upscale_by_mode(image, name, 1, scale=2, width=5000, height=5000, crop=True)
        assert (unchanged.upscaler, unchanged.info) == ("None", "")
        assert np.array_equal(np.asarray(unchanged.image), np.asarray(image))
    with pytest.raises(UserError, match="upscaling_resize_w must be a whole number of pixels, 1 or more, got 0."):
        service.upscale_by_mode(image, TINY, 1, scale=2, width=0, height=8, crop=True)
    with pytest.raises(UserError, match=r"upscaling_resize_w × upscaling_resize_h: upscaling 40×20 makes 400×200"):
        service.upscale_by_mode(image, "Lanczos", 1, scale=2, width=400, height=8, crop=True)
    with pytest.raises(UserError, match=r"upscaling_resize must be 1–8, got 0.5"):  # "Scale by": A1111's 1-8
        service.upscale_by_mode(image, "Lanczos", 0, scale=0.5, width=1, height=1, crop=True)
    with pytest.raises(UserError, match="resize_mode must be 0 .* got 2"):
        service.upscale_by_mode(image, "Lanczos", 2, scale=2, width=1, height=1, crop=True)


def test_extras_this_app_lacks_are_refused_by_field_in_the_service(service):
    def upscale(**extras):
        return service.upscale_by_mode(noise(8, 8), "Lanczos", 0, scale=2, width=1, height=1, crop=True, extras=extras)

    for value in (float("nan"), "NaN", float("inf")):
        with pytest.raises(UserError, match="extras_upscaler_2_visibility must be a number, got"):
            upscale(upscaler_2=TINY, extras_upscaler_2_visibility=value)
    for value in (1.5, -0.1):
        with pytest.raises(UserError, match="extras_upscaler_2_visibility must be 0–1, got"):
            upscale(extras_upscaler_2_visibility=value)
    with pytest.raises(UserError, match='upscaler_2: blending a second upscaler is not available here; send "None".'):
        upscale(upscaler_2=TINY.upper(), extras_upscaler_2_visibility=0.5)  # a model's name, any case
    with pytest.raises(UserError, match="upscaler_2 'SwinIR' is not available; pick one of"):
        upscale(upscaler_2="SwinIR", extras_upscaler_2_visibility=0.5)
    with pytest.raises(UserError, match="codeformer_visibility: face restoration is not available here; send 0."):
        upscale(codeformer_visibility=0.2)
    # Nothing blended in ("None" in any case, a blank name, or visibility 0), as A1111 then skips it.
    blended = [
        {"upscaler_2": "NONE", "extras_upscaler_2_visibility": 1},
        {"upscaler_2": " ", "extras_upscaler_2_visibility": 1},
    ]
    for extras in [*blended, {"upscaler_2": TINY}]:
        assert upscale(**extras, gfpgan_visibility=0).image.size == (16, 16)


def test_a_model_at_scale_1_must_fit_its_4x_pass(service):
    with pytest.raises(UserError, match=r"Scale: upscaling 100×60 makes 400×240 .*max_image_pixels"):
        service.upscale(noise(100, 60), TINY, 1)  # 6 000 pixels in and out; 96 000 on the way


# --- the CLI -----------------------------------------------------------------------------------------


def test_cli_upscale_writes_the_png_and_refuses_an_unknown_upscaler(folder, tmp_path, capsys):
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    source.write_bytes(png_with(noise(16, 12), "a fox\nSteps: 2, Seed: 1, Size: 16x12"))
    args = ["upscale", "--image", str(source), "--out", str(out), "--models-dir", str(folder), "--tile", "8"]
    assert main([*args, "--upscaler", TINY, "--scale", "2"]) == 0
    assert Image.open(out).size == (32, 24)
    assert "Postprocess upscale by: 2, Postprocess upscaler: 4x-tiny" in read_png_parameters(out)
    assert capsys.readouterr().out.strip() == str(out)
    assert main([*args, "--upscaler", "ESRGAN_4x"]) == 2
    assert "--upscaler 'ESRGAN_4x' is not available; pick one of" in capsys.readouterr().err


# --- the hires fix -----------------------------------------------------------------------------------


def test_the_hires_fix_upscales_with_an_upscaler_model(tiny_models, folder):
    library = UpscalerLibrary(folder / "upscalers", tile=0)
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32, upscalers=library)
    engine.load_model(str(tiny_models["sd15"]))
    options = HiresOptions(scale=2, steps=2, strength=0.5, upscaler=TINY)
    result = engine.generate(GenerationRequest(prompt="a fox", steps=2, seed=3, width=32, height=32, hires=options))
    assert result.images[0].size == (64, 64)
    engine.check_hires_upscaler(TINY.upper())  # a file's name, any case
    with pytest.raises(UserError, match=f"Hires upscaler 'SwinIR 4x' is not available; pick one of .*\"{TINY}\""):
        engine.check_hires_upscaler("SwinIR 4x")


def test_the_hires_fix_refuses_an_upscaler_models_pass_over_max_image_pixels(tiny_models, folder):
    # 32² × 1.25 is 40² (1 600 pixels), within the limit; the 4× model makes 128² (16 384) on the way.
    library = UpscalerLibrary(folder / "upscalers", tile=0)
    engine = DiffusionEngine(
        LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32, upscalers=library, max_image_pixels=10**4
    )
    engine.load_model(str(tiny_models["sd15"]))
    options = HiresOptions(scale=1.25, steps=2, strength=0.5, upscaler=TINY)
    request = GenerationRequest(prompt="a fox", steps=2, seed=3, width=32, height=32, hires=options)
    expected = r"Hires upscaler '4x-tiny': upscaling 32×32 makes 128×128 \(0\.0 megapixels\), over the limit"
    with pytest.raises(UserError, match=expected) as caught:
        engine.generate(request)
    assert "\n" not in str(caught.value) and "max_image_pixels" in str(caught.value)


def test_a_cancel_at_the_hires_upscalers_first_tile_ends_the_job_cancelled_with_the_first_pass(tiny_models, folder):
    library = UpscalerLibrary(folder / "upscalers", tile=8)  # the 32² first pass in many tiles
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32, upscalers=library)
    engine.load_model(str(tiny_models["sd15"]))
    options = HiresOptions(scale=2, steps=2, strength=0.5, upscaler=TINY)
    request = GenerationRequest(prompt="a fox", steps=2, seed=3, width=32, height=32, hires=options)
    asked = []

    def should_cancel() -> bool:  # asked after each first-pass step, then before each tile
        asked.append(True)
        return len(asked) > request.steps

    jobs = JobQueue()
    try:
        job = jobs.submit("generate", lambda job: engine.generate(request, should_cancel=should_cancel))
        job.wait()
    finally:
        jobs.close()
    assert (job.status, job.error, job.result.cancelled) == ("cancelled", None, True)
    # The first pass's image at the base size, as a cancel one step earlier (in the first pass) keeps it.
    assert [image.size for image in job.result.images] == [(32, 32)]
    assert len(asked) == request.steps + 1  # stopped at the first tile: no tile, no second pass ran


def test_the_generation_service_lists_the_hires_upscalers_the_ui_offers(tiny_models, folder, tmp_path):
    from lorapg.limits import HIRES_UPSCALERS
    from lorapg.ui.hires_section import hires_upscaler_choices

    loras = LoraLibrary(tiny_models["loras"])
    engine = DiffusionEngine(loras, torch.device("cpu"), torch.float32, upscalers=UpscalerLibrary(folder / "upscalers"))
    jobs = JobQueue()
    try:
        service = GenerationService(Settings(models_dir=folder, outputs=tmp_path), engine, loras, jobs)
        assert service.hires_upscalers() == hires_upscaler_choices(service) == [*HIRES_UPSCALERS, TINY]
    finally:
        jobs.close()


# --- the A1111 API and the UI over HTTP ------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tiny_models, folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("upscale-api")
    models = root / "models"
    shutil.copytree(folder, models)
    args = ["--api", "--model", str(tiny_models["sd15"]), "--models-dir", str(models), "--threads", "1"]
    with running_app(*args, "--outputs", str(root / "outputs")) as url:
        yield url


def test_webuiapi_extra_single_image_and_the_upscalers_list(app):
    api = webuiapi.WebUIApi(baseurl=app + "sdapi/v1")
    result = api.extra_single_image(image=noise(20, 16), upscaler_1=TINY, upscaling_resize=2)
    assert result.image.size == (40, 32)
    assert result.info == "Postprocess upscale by: 2, Postprocess upscaler: 4x-tiny"

    listed = requests.get(f"{app}sdapi/v1/upscalers", timeout=30).json()
    assert [item["name"] for item in listed] == ["None", "Lanczos", "Nearest", TINY]
    model = listed[-1]
    assert (model["model_name"], model["scale"]) == (f"{TINY}.safetensors", 4)
    assert model["model_path"].endswith(f"upscalers/{TINY}.safetensors") and model["model_url"] is None


def test_extra_single_image_refuses_an_unknown_upscaler_by_field(app):
    image = base64.b64encode(png_with(noise(8, 8), "x")).decode()
    body = {"image": image, "upscaler_1": "4x-UltraSharp", "upscaling_resize": 2}
    reply = requests.post(f"{app}sdapi/v1/extra-single-image", json=body, timeout=60)
    assert reply.status_code in (400, 422) and "upscaler_1 '4x-UltraSharp' is not available" in reply.text
    sized = requests.post(
        f"{app}sdapi/v1/extra-single-image",
        json=body | {"upscaler_1": TINY, "resize_mode": 1, "upscaling_resize_w": 30, "upscaling_resize_h": 20},
        timeout=60,
    )
    assert sized.status_code == 200, sized.text
    assert Image.open(io.BytesIO(base64.b64decode(sized.json()["image"]))).size == (30, 20)


def test_extra_single_image_scales_to_a_smaller_size_and_none_in_any_case_leaves_the_image(app):
    source = noise(20, 16)
    body = {"image": base64.b64encode(png_with(source, "x")).decode(), "upscaler_1": "Lanczos", "resize_mode": 1}
    url = f"{app}sdapi/v1/extra-single-image"
    smaller = requests.post(url, json=body | {"upscaling_resize_w": 10, "upscaling_resize_h": 6}, timeout=60)
    assert smaller.status_code == 200, smaller.text
    assert Image.open(io.BytesIO(base64.b64decode(smaller.json()["image"]))).size == (10, 6)
    assert smaller.json()["html_info"].startswith("Postprocess upscale to: 10x6")
    none = requests.post(
        url, json=body | {"upscaler_1": "none", "upscaling_resize_w": 30, "upscaling_resize_h": 20}, timeout=60
    )
    assert none.status_code == 200, none.text
    returned = Image.open(io.BytesIO(base64.b64decode(none.json()["image"]))).convert("RGB")
    assert np.array_equal(np.asarray(returned), np.asarray(source)) and none.json()["html_info"] == ""
    zero = requests.post(url, json=body | {"upscaling_resize_w": 0}, timeout=60)
    assert zero.status_code in (400, 422) and "upscaling_resize_w must be a whole number of pixels" in zero.text


def test_extra_single_image_refuses_a_visibility_that_is_not_a_number_from_0_to_1(app):
    body = {"image": base64.b64encode(png_with(noise(8, 8), "x")).decode(), "upscaler_1": "Lanczos"}
    url = f"{app}sdapi/v1/extra-single-image"
    for value, expected in (("NaN", "must be a number, got nan"), (1.5, "must be 0–1, got 1.5")):
        reply = requests.post(url, json=body | {"upscaler_2": TINY, "extras_upscaler_2_visibility": value}, timeout=60)
        assert reply.status_code in (400, 422) and f"extras_upscaler_2_visibility {expected}" in reply.text


def test_txt2img_hires_fix_with_the_upscaler_model(app):
    body = {"prompt": "a fox", "steps": 2, "width": 32, "height": 32, "seed": 5, "enable_hr": True}
    body |= {"hr_scale": 2, "hr_second_pass_steps": 2, "denoising_strength": 0.5, "hr_upscaler": TINY}
    reply = requests.post(f"{app}sdapi/v1/txt2img", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0]))).size == (64, 64)
    assert f"Hires upscaler: {TINY}" in json.loads(reply.json()["info"])["infotexts"][0]


def test_the_upscale_tab_saves_to_the_gallery(app, tmp_path):
    source = tmp_path / "source.png"
    source.write_bytes(png_with(noise(12, 10), "a fox\nSteps: 2, Seed: 1, Size: 12x10"))
    image, info = Client(app, verbose=False).predict(handle_file(str(source)), "", TINY, 2, api_name="/upscale")
    assert Image.open(image).size == (24, 20)
    assert info.startswith("#") and info.endswith("Postprocess upscale by: 2, Postprocess upscaler: 4x-tiny")
