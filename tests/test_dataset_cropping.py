"""Preparing images (issue 19, item 3): buckets and crop boxes, focus points, face-aware crops, the
trainer cropping exactly what the preview shows, recoloured drawings kept apart, bad input, the API."""

from __future__ import annotations

import colorsys
import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from lorapg.config import Settings
from lorapg.errors import UserError
from lorapg.jobs import JobQueue
from lorapg.services.dataset_crops import CropOptions, DatasetCropService
from lorapg.services.training import TrainingService
from lorapg.training.config import TrainConfig
from lorapg.training.cropping import (
    FOCUS_FILE,
    FocusPoints,
    assign_bucket,
    bucket_step,
    haar_faces,
    make_buckets,
)
from lorapg.training.dataset import Dataset
from lorapg.training.trainer import Trainer, _latent_key, load_pixels
from tests.training_data import smooth_image

SQUARE_256 = CropOptions(resolution=256, bucketing=False)  # a square bucket: wide images have room to move


@pytest.fixture
def services(tmp_path) -> Iterator[tuple[TrainingService, DatasetCropService]]:
    jobs = JobQueue()
    training = TrainingService(Settings(models_dir=tmp_path / "models"), jobs)
    try:
        yield training, DatasetCropService(training)
    finally:
        jobs.shutdown()


def add(training: TrainingService, tmp_path, images: dict[str, Image.Image], name: str = "set") -> None:
    source = tmp_path / "source"
    source.mkdir(exist_ok=True)
    for file, image in images.items():
        image.save(source / file)
    training.dataset_add(name, [source / file for file in images])


def drawn_face(side: int = 200, skin: int = 200, background: int = 90) -> Image.Image:
    """A shaded schematic face OpenCV's frontal-face Haar cascade finds (head, eye sockets, brows, mouth)."""
    image = Image.new("L", (side, side), background)
    draw = ImageDraw.Draw(image)
    s = side
    draw.ellipse((0.15 * s, 0.05 * s, 0.85 * s, 0.98 * s), fill=skin)
    for cx in (0.35, 0.65):
        draw.ellipse(((cx - 0.09) * s, 0.33 * s, (cx + 0.09) * s, 0.45 * s), fill=60)
        draw.ellipse(((cx - 0.04) * s, 0.36 * s, (cx + 0.04) * s, 0.42 * s), fill=20)
        draw.rectangle(((cx - 0.11) * s, 0.27 * s, (cx + 0.11) * s, 0.30 * s), fill=70)
    draw.polygon([(0.5 * s, 0.45 * s), (0.44 * s, 0.64 * s), (0.56 * s, 0.64 * s)], fill=170)
    draw.ellipse((0.36 * s, 0.72 * s, 0.64 * s, 0.80 * s), fill=70)
    return image.filter(ImageFilter.GaussianBlur(side / 60)).convert("RGB")


def face_on_the_right() -> tuple[Image.Image, tuple[int, int, int, int]]:
    """900×400 with the face at x 660..860: a centred square crop (x 250..650) would cut it away."""
    image = smooth_image(3, (900, 400))
    image.paste(drawn_face(200), (660, 100))
    return image, (660, 100, 860, 300)


def centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


# --- buckets and boxes ----------------------------------------------------------------------------


def test_bucket_and_centred_box_for_landscape_portrait_and_square(services, tmp_path):
    training, crops = services
    sizes = {"landscape.png": (600, 400), "portrait.png": (400, 600), "square.png": (300, 300)}
    add(training, tmp_path, {file: smooth_image(i, size) for i, (file, size) in enumerate(sizes.items())})
    found = {c.file: c for c in crops.crops("set", CropOptions(resolution=512))}
    assert sorted(found) == sorted(sizes)
    trainer_buckets = make_buckets(512, bucket_step(512))  # the trainer's own bucket list
    for file, size in sizes.items():
        plan = found[file].plan
        assert plan.bucket == assign_bucket(size, trainer_buckets) and plan.source == "center"
        left, top, right, bottom = plan.box
        assert min(left, top) >= 0 and right <= size[0] + 1e-6 and bottom <= size[1] + 1e-6
        # The box has the bucket's shape and sits in the middle.
        assert abs((right - left) / (bottom - top) - plan.bucket[0] / plan.bucket[1]) < 0.02
        assert np.allclose(centre(plan.box), (size[0] / 2, size[1] / 2), atol=1.5)
    assert found["landscape.png"].plan.bucket[0] > found["landscape.png"].plan.bucket[1]
    assert found["portrait.png"].plan.bucket[0] < found["portrait.png"].plan.bucket[1]
    assert found["square.png"].plan.bucket == (512, 512)
    as_json = found["landscape.png"].as_dict()
    bucket = found["landscape.png"].plan.bucket
    assert as_json["bucket"] == {"width": bucket[0], "height": bucket[1]}
    assert as_json["source"] == "center" and as_json["focus"] is None and len(as_json["box"]) == 4


# --- focus points and the trainer ------------------------------------------------------------------


def trainer_items(folder, **config) -> list:
    """The trainer's own reading of the folder: items with bucket, focus and crop (no model loaded)."""
    trainer = Trainer(
        TrainConfig(name="t", trigger="zqx", images=str(folder), **config),
        lora_dir=folder.parent / "loras",
        work_dir=folder.parent / "work",
    )
    run = SimpleNamespace(resolution=config["resolution"], step_px=bucket_step(config["resolution"]), groups={})
    trainer._read_data(run)
    return run.items


def as_tensor(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def test_focus_point_moves_the_box_and_the_trainer_crops_what_the_preview_shows(services, tmp_path):
    training, crops = services
    add(training, tmp_path, {"wide.png": smooth_image(5, (800, 400)), "other.png": smooth_image(6, (400, 400))})
    centred = crops.crop("set", "wide.png", SQUARE_256).plan
    assert np.allclose(centre(centred.box), (400, 200), atol=1.5)

    crops.set_focus("set", "wide.png", 0.3, 0.5)
    moved = crops.crop("set", "wide.png", SQUARE_256).plan
    assert moved.source == "focus" and moved.focus == (0.3, 0.5)
    assert np.allclose(centre(moved.box), (240, 200), atol=1.5)  # centred on x = 0.3 × 800
    crops.set_focus("set", "wide.png", 0.02, 0.5)  # near the edge: the box stops at the edge
    assert crops.crop("set", "wide.png", SQUARE_256).plan.box[0] == 0
    crops.set_focus("set", "wide.png", 0.3, 0.5)

    folder = training.dataset_folder("set")
    items = {item.path.name: item for item in trainer_items(folder, resolution=256, bucketing=False)}
    wide = items["wide.png"]
    trained = load_pixels(wide).numpy()
    assert wide.crop == moved.crop and wide.focus == (0.3, 0.5)
    assert np.allclose(trained, as_tensor(crops.cropped("set", "wide.png", SQUARE_256)), atol=1e-6)
    # Other pixels than the centred crop, and a latent cache key of their own.
    centred_pixels = as_tensor(ImageOps.fit(smooth_image(5, (800, 400)), (256, 256), Image.Resampling.LANCZOS))
    assert np.abs(trained - centred_pixels).mean() > 0.05
    assert _latent_key(wide) != _latent_key(items["other.png"]).replace("other", "wide")
    assert _latent_key(items["other.png"]).count("_") == 1  # centred crops keep the key caches already have

    crops.clear_focus("set", "wide.png")
    assert crops.crop("set", "wide.png", SQUARE_256).plan == centred


def test_a_photo_turned_by_exif_gets_the_same_bucket_and_pixels_in_preview_and_training(services, tmp_path):
    training, crops = services
    stored = smooth_image(7, (600, 400))  # stored landscape, shown portrait (orientation 6: turn 90° clockwise)
    exif = Image.Exif()
    exif[0x0112] = 6
    source = tmp_path / "phone.jpg"
    stored.save(source, format="JPEG", quality=95, exif=exif.tobytes())
    training.dataset_add("set", [source])
    options = CropOptions(resolution=256)
    plan = crops.crop("set", "phone.jpg", options).plan
    assert plan.size == (400, 600) and plan.bucket[0] < plan.bucket[1]
    (item,) = trainer_items(training.dataset_folder("set"), resolution=256)
    assert item.bucket == plan.bucket and item.crop == plan.crop
    preview_pixels = as_tensor(crops.cropped("set", "phone.jpg", options))
    assert np.allclose(load_pixels(item).numpy(), preview_pixels, atol=1e-6)


def test_focus_sidecar_is_hidden_from_validation_and_survives_a_broken_file(services, tmp_path):
    training, crops = services
    add(training, tmp_path, {"a.png": smooth_image(1, (600, 300))})
    crops.set_focus("set", "a.png", 1, 0)
    folder = training.dataset_folder("set")
    assert (folder / FOCUS_FILE).is_file()
    report = Dataset(folder).validate()
    assert [c.file for c in report.checks] == ["a.png"] and not report.invalid
    (folder / FOCUS_FILE).write_text("{not json", encoding="utf-8")
    assert crops.crop("set", "a.png").plan.source == "center"  # ignored (with a warning), not a crash


def test_a_removed_images_focus_point_is_not_inherited_by_a_new_image_of_the_same_name(services, tmp_path):
    training, crops = services
    add(training, tmp_path, {"a.png": smooth_image(1, (600, 300)), "b.png": smooth_image(2, (600, 300))})
    folder = training.dataset_folder("set")
    crops.set_focus("set", "a.png", 0.9, 0.5)
    crops.set_focus("set", "b.png", 0.1, 0.5)

    # Removed by the app: its entry leaves the sidecar at once.
    training.dataset_remove("set", "a.png")
    stored = json.loads((folder / FOCUS_FILE).read_text(encoding="utf-8"))
    assert set(stored["focus"]) == set(stored["images"]) == {"b.png"}
    add(training, tmp_path, {"a.png": smooth_image(3, (600, 300))})
    assert crops.crop("set", "a.png", SQUARE_256).plan.source == "center"

    # Deleted and replaced behind the app's back: the stored stamp no longer matches, the point is ignored
    # (by the trainer too, which reads the same sidecar) and dropped at the next write.
    (folder / "b.png").unlink()
    smooth_image(4, (600, 300)).save(folder / "b.png")
    assert crops.crop("set", "b.png", SQUARE_256).plan.source == "center"
    assert "b.png" not in FocusPoints(folder).load()
    crops.set_focus("set", "a.png", 0.2, 0.5)
    assert set(json.loads((folder / FOCUS_FILE).read_text(encoding="utf-8"))["focus"]) == {"a.png"}


def test_focus_points_survive_a_copied_folder_and_an_older_sidecar_is_trusted_for_older_images(services, tmp_path):
    training, crops = services
    add(training, tmp_path, {"a.png": smooth_image(1, (600, 300))})
    folder = training.dataset_folder("set")
    crops.set_focus("set", "a.png", 0.9, 0.5)
    # A copy without its times (cp without -p): other mtimes, the same bytes.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copy)
    os.utime(copy / "a.png", ns=(1, 1))
    assert FocusPoints(copy).load() == {"a.png": (0.9, 0.5)}

    # A sidecar written before stamps existed: trusted for every image it names that exists, however new
    # its mtime (cp -r, rsync without -t, a git checkout), and stamped at the next write.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    smooth_image(1, (600, 300)).save(legacy / "old.png")
    smooth_image(2, (600, 300)).save(legacy / "new.png")
    points = {"old.png": [0.9, 0.5], "new.png": [0.1, 0.5], "gone.png": [0.5, 0.5]}
    (legacy / FOCUS_FILE).write_text(json.dumps({"focus": points}))
    sidecar_time = (legacy / FOCUS_FILE).stat().st_mtime_ns
    os.utime(legacy / "old.png", ns=(sidecar_time - 10**9, sidecar_time - 10**9))
    os.utime(legacy / "new.png", ns=(sidecar_time + 10**9, sidecar_time + 10**9))
    assert FocusPoints(legacy).load() == {"old.png": (0.9, 0.5), "new.png": (0.1, 0.5)}
    FocusPoints(legacy).set("old.png", (0.8, 0.5))
    stored = json.loads((legacy / FOCUS_FILE).read_text(encoding="utf-8"))
    assert stored["focus"] == {"old.png": [0.8, 0.5], "new.png": [0.1, 0.5]}
    assert stored["images"]["new.png"]["mtime_ns"] == sidecar_time + 10**9  # stamped: checked from now on


def test_loading_focus_points_hashes_a_copied_image_once_and_never_an_unchanged_one(tmp_path, monkeypatch):
    from lorapg.training import cropping

    folder = tmp_path / "set"
    folder.mkdir()
    smooth_image(1, (600, 300)).save(folder / "a.png")
    smooth_image(2, (600, 300)).save(folder / "b.png")
    FocusPoints(folder).set("a.png", (0.9, 0.5))
    FocusPoints(folder).set("b.png", (0.1, 0.5))
    hashed: list[str] = []
    real_stamp = cropping._stamp
    monkeypatch.setattr(cropping, "_stamp", lambda path: hashed.append(path.name) or real_stamp(path))

    assert FocusPoints(folder).load() == {"a.png": (0.9, 0.5), "b.png": (0.1, 0.5)}
    assert hashed == []  # unchanged images: stat only
    # Same bytes, another mtime (a copy): hashed once to confirm, then the new mtime is remembered.
    os.utime(folder / "a.png", ns=(10**9, 10**9))
    for _ in range(3):
        assert FocusPoints(folder).load() == {"a.png": (0.9, 0.5), "b.png": (0.1, 0.5)}
    assert hashed == ["a.png"]
    # An unstamped (old) sidecar is not hashed on load either: its entries are stamped at the next write.
    (folder / FOCUS_FILE).write_text(json.dumps({"focus": {"a.png": [0.9, 0.5], "b.png": [0.1, 0.5]}}))
    hashed.clear()
    assert FocusPoints(folder).load() == {"a.png": (0.9, 0.5), "b.png": (0.1, 0.5)}
    assert hashed == []


# --- faces ------------------------------------------------------------------------------------------


def test_haar_cascade_finds_the_drawn_face():
    image, (left, top, right, bottom) = face_on_the_right()
    faces = haar_faces(image)
    assert faces, "OpenCV's bundled cascade found no face (is opencv-python-headless < 5 installed?)"
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    assert left - 20 <= x + w / 2 <= right + 20 and top - 20 <= y + h / 2 <= bottom + 20


def test_face_aware_crop_keeps_the_face_and_the_trainer_uses_the_same_box(services, tmp_path):
    training, crops = services
    image, (left, top, right, bottom) = face_on_the_right()
    add(training, tmp_path, {"person.png": image})
    plain = crops.crop("set", "person.png", SQUARE_256).plan
    assert plain.box[2] < right  # the centred crop cuts the face
    face_options = CropOptions(resolution=256, bucketing=False, face_crop=True)
    plan = crops.crop("set", "person.png", face_options).plan
    assert plan.source == "face"
    assert plan.box[0] <= left and plan.box[2] >= right and plan.box[1] <= top and plan.box[3] >= bottom

    folder = training.dataset_folder("set")
    (item,) = trainer_items(folder, resolution=256, bucketing=False, face_crop=True)
    assert item.focus_source == "face" and item.crop == plan.crop
    preview_pixels = as_tensor(crops.cropped("set", "person.png", face_options))
    assert np.allclose(load_pixels(item).numpy(), preview_pixels, atol=1e-6)
    (item,) = trainer_items(folder, resolution=256, bucketing=False)  # face_crop off (the default): centred
    assert item.focus is None and item.crop == plain.crop

    crops.set_focus("set", "person.png", 0.0, 0.5)  # a point set by hand wins over the face
    assert crops.crop("set", "person.png", face_options).plan.source == "focus"


# --- apply: cropped copies into a new dataset ------------------------------------------------------


def test_apply_writes_cropped_copies_into_a_new_dataset_and_keeps_the_originals(services, tmp_path):
    training, crops = services
    add(training, tmp_path, {"wide.png": smooth_image(5, (800, 400)), "tall.jpg": smooth_image(6, (400, 700))})
    folder = training.dataset_folder("set")
    (folder / "wide.txt").write_text("a wide picture", encoding="utf-8")
    crops.set_focus("set", "wide.png", 0.3, 0.5)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    options = CropOptions(resolution=256)

    written = crops.apply("set", "set_cropped", options)
    assert sorted(written) == ["tall.png", "wide.png"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the originals are untouched
    copy = training.dataset_folder("set_cropped")
    assert sorted(p.name for p in copy.iterdir()) == ["tall.png", "wide.png", "wide.txt"]
    assert (copy / "wide.txt").read_text(encoding="utf-8").strip() == "a wide picture"
    for source, target in (("wide.png", "wide.png"), ("tall.jpg", "tall.png")):
        with Image.open(copy / target) as image:
            assert image.size == crops.crop("set", source, options).plan.bucket
            assert np.array_equal(np.asarray(image), np.asarray(crops.cropped("set", source, options)))
    # Training on the copy keeps every pixel: each image already has its bucket's size.
    assert all(c.plan.box == (0, 0, *c.plan.size) for c in crops.crops("set_cropped", options))

    with pytest.raises(UserError, match=r"Dataset name 'set_cropped' is taken"):
        crops.apply("set", "set_cropped", options)
    with pytest.raises(UserError, match=r"Dataset name '../x' may not contain"):
        crops.apply("set", "../x", options)
    with pytest.raises(UserError, match=r"Dataset name holds characters a file name cannot"):
        crops.apply("set", "x\ud800", options)
    assert sorted(training.dataset_names()) == ["set", "set_cropped"]


# --- duplicates: colour counts -----------------------------------------------------------------------


def drawing(size: int = 288) -> Image.Image:
    """A line-and-shape drawing in grey levels; tinted below into hues."""
    image = Image.new("L", (size, size), 20)
    draw = ImageDraw.Draw(image)
    draw.ellipse((30, 30, 170, 170), fill=230)
    draw.rectangle((150, 140, 270, 270), fill=160)
    draw.line((0, 280, 280, 0), fill=255, width=14)
    return image


def tinted(hue: float) -> Image.Image:
    rgb = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 1.0, 1.0))
    return ImageOps.colorize(drawing(), black=(0, 0, 0), white=rgb)


def test_one_drawing_in_eight_hues_is_eight_images_not_near_duplicates(tmp_path):
    for i in range(8):
        tinted(i / 8).save(tmp_path / f"hue{i}.png")
    report = Dataset(tmp_path).validate()
    assert len(report.valid) == 8 and report.near_duplicates == []
    assert len(report.trainable(drop_near_duplicates=True)) == 8
    # What does look alike in colour too is still reported, and an exact copy is still dropped.
    tinted(0.005).save(tmp_path / "hue0_almost.png")
    tinted(3 / 8).save(tmp_path / "hue3_copy.png", compress_level=0)  # other bytes, same pixels
    report = Dataset(tmp_path).validate()
    assert {c.file: c.near_duplicate_of for c in report.near_duplicates} == {"hue0_almost.png": "hue0.png"}
    assert [(c.file, c.reasons) for c in report.invalid] == [("hue3_copy.png", ["exact duplicate of hue3.png"])]


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (1.5, 0.5, r"Focus x is 1.5; it must be between 0"),
        (0.5, -0.1, r"Focus y is -0.1; it must be between 0"),
        ("left", 0.5, r"Focus x 'left' is not a number"),
        (float("nan"), 0.5, r"Focus x is nan"),
    ],
)
def test_focus_outside_the_image_is_refused(services, tmp_path, x, y, message):
    training, crops = services
    add(training, tmp_path, {"a.png": smooth_image(1)})
    with pytest.raises(UserError, match=message):
        crops.set_focus("set", "a.png", x, y)
    assert not (training.dataset_folder("set") / FOCUS_FILE).exists()


@pytest.mark.parametrize(
    ("dataset", "file", "message"),
    [
        ("set", "missing.png", r"Image name 'missing.png': no such image in dataset set"),
        ("set", "../other/a.png", r"Image name '../other/a.png' may not contain"),
        ("set", "a.txt", r"Image name 'a.txt': no such image"),
        ("set", ".lorapg-focus.json", r"Image name .* nor start with '.'"),
        ("../set", "a.png", r"Dataset name '../set' may not contain"),
        ("nope", "a.png", r"No dataset named 'nope'"),
    ],
)
def test_images_outside_the_dataset_are_refused(services, tmp_path, dataset, file, message):
    training, crops = services
    add(training, tmp_path, {"a.png": smooth_image(1)})
    (training.dataset_folder("set") / "a.txt").write_text("a caption", encoding="utf-8")
    other = training.dataset_folder("set").parent / "other"
    other.mkdir()
    smooth_image(2).save(other / "a.png")
    with pytest.raises(UserError, match=message):
        crops.set_focus(dataset, file, 0.5, 0.5)
    with pytest.raises(UserError, match=message):
        crops.preview(dataset, file)
    assert not list(training.dataset_folder("set").parent.rglob(FOCUS_FILE))


def test_resolution_is_range_checked(services, tmp_path):
    training, crops = services
    add(training, tmp_path, {"a.png": smooth_image(1)})
    with pytest.raises(UserError, match=r"[Rr]esolution"):
        crops.crops("set", CropOptions(resolution=100))


# --- the API over real HTTP --------------------------------------------------------------------------


@contextlib.contextmanager
def serving(crops: DatasetCropService) -> Iterator[str]:
    import uvicorn
    from fastapi import FastAPI

    from lorapg.api.auth import ApiAccess
    from lorapg.api.dataset_crops import dataset_crops_router

    app = FastAPI()
    app.include_router(dataset_crops_router(crops, ApiAccess(enabled=True, users=(("u", "p"),))))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:  # the server says when it listens; no fixed wait
            if not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}/api/v1/datasets"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_api_lists_crops_sets_focus_and_refuses_bad_input(services, tmp_path):
    training, crops = services
    add(training, tmp_path, {"wide.png": smooth_image(5, (800, 400)), "tall.png": smooth_image(6, (400, 700))})
    auth = ("u", "p")
    with serving(crops) as api:
        assert requests.get(f"{api}/set/crops", timeout=30).status_code == 401
        listed = requests.get(f"{api}/set/crops", params={"resolution": 256, "bucketing": "false"}, auth=auth)
        assert listed.status_code == 200, listed.text
        rows = {row["file"]: row for row in listed.json()}
        assert rows["wide.png"]["bucket"] == {"width": 256, "height": 256}
        assert rows["wide.png"]["source"] == "center" and rows["wide.png"]["box"] == [200.0, 0.0, 600.0, 400.0]

        put = requests.put(f"{api}/set/images/wide.png/focus", json={"x": 0.1, "y": 0.5}, auth=auth, timeout=30)
        assert put.status_code == 200, put.text
        assert put.json()["source"] == "focus" and put.json()["focus"] == [0.1, 0.5]
        again = requests.get(f"{api}/set/crops", params={"resolution": 256, "bucketing": "false"}, auth=auth)
        assert {row["file"]: row for row in again.json()}["wide.png"]["box"] == [0.0, 0.0, 400.0, 400.0]

        bad = requests.put(f"{api}/set/images/wide.png/focus", json={"x": 2, "y": 0.5}, auth=auth, timeout=30)
        assert bad.status_code == 400 and "Focus x is 2" in bad.text
        missing = requests.put(f"{api}/set/images/nope.png/focus", json={"x": 0.5, "y": 0.5}, auth=auth, timeout=30)
        assert missing.status_code == 400 and "Image name 'nope.png'" in missing.text
        sneaky = requests.put(f"{api}/set/images/..wide.png/focus", json={"x": 0.5, "y": 0.5}, auth=auth, timeout=30)
        assert sneaky.status_code == 400 and "Image name" in sneaky.text
        png = requests.get(f"{api}/set/images/wide.png/crop.png", auth=auth, timeout=30)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG")
        applied = requests.post(f"{api}/set/crops/apply", json={"new_name": "copy"}, auth=auth, timeout=60)
        assert applied.status_code == 201 and sorted(applied.json()["files"]) == ["tall.png", "wide.png"]
        again = requests.post(f"{api}/set/crops/apply", json={"new_name": "copy"}, auth=auth, timeout=60)
        assert again.status_code == 400 and "Dataset name 'copy' is taken" in again.text
        cleared = requests.delete(f"{api}/set/images/wide.png/focus", auth=auth, timeout=30)
        assert cleared.status_code == 200 and cleared.json()["source"] == "center"


# --- review fixes: untrainable images, the form's bucketing, concurrent focus writes -----------------


def test_a_broken_or_oversized_image_in_the_dataset_is_refused_by_name_and_no_focus_is_written(tmp_path):
    jobs = JobQueue()
    try:
        training = TrainingService(Settings(models_dir=tmp_path / "models", max_image_pixels=300 * 300), jobs)
        crops = DatasetCropService(training)
        add(training, tmp_path, {"good.png": smooth_image(1)})
        folder = training.dataset_folder("set")
        # Files training skips but that stay in the folder (copied in by hand, or the limit lowered since).
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        smooth_image(2, (400, 400)).save(folder / "huge.png")
        auth = ("u", "p")
        with serving(crops) as api:
            refusals = (("broken.png", "is not a readable image"), ("huge.png", "has 160000 pixels, more than 90000"))
            for file, reason in refusals:
                with pytest.raises(UserError, match=rf"^Image '{file}' in dataset set {reason}"):
                    crops.set_focus("set", file, 0.5, 0.5)
                png = requests.get(f"{api}/set/images/{file}/crop.png", auth=auth, timeout=30)
                assert png.status_code == 400 and f"Image '{file}' in dataset set {reason}" in png.text, png.text
                put = requests.put(f"{api}/set/images/{file}/focus", json={"x": 0.2, "y": 0.5}, auth=auth, timeout=30)
                assert put.status_code == 400 and f"Image '{file}'" in put.text, put.text
            assert not (folder / FOCUS_FILE).exists()  # nothing written for either
            assert [c.file for c in crops.crops("set")] == ["good.png"]
    finally:
        jobs.shutdown()


def test_the_train_tabs_crop_preview_follows_the_presets_bucketing(services, tmp_path):
    """The form has no bucketing field: a run from it takes its preset's (demo-concept: square crops)."""
    import gradio as gr

    from lorapg.ui.train_tab import build_train_tab

    training, _ = services
    add(training, tmp_path, {"wide.png": smooth_image(5, (800, 400))})
    assert not training.config_for({"preset": "demo-concept"}).bucketing
    assert training.config_for({"preset": "style"}).bucketing
    with gr.Blocks() as demo:
        build_train_tab(training)
    (show,) = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "show"]
    assert "Preset" in [getattr(block, "label", None) for block in show.inputs]  # the form's preset is wired in
    labels = {}
    for preset in ("demo-concept", "style"):
        items, _ = show.fn("set", 256, preset, False, None)
        labels[preset] = items[0][1]
    trained = {p: TrainConfig(**{**vars(training.config_for({"preset": p})), "resolution": 256}) for p in labels}
    assert labels["demo-concept"].startswith("wide.png — 256×256") and not trained["demo-concept"].bucketing
    assert not labels["style"].startswith("wide.png — 256×256") and trained["style"].bucketing


def test_concurrent_focus_writes_keep_both_points(services, tmp_path, monkeypatch):
    """Two requests set two images' points at once: neither save may drop the other's point."""
    from lorapg.training import cropping

    training, crops = services
    add(training, tmp_path, {"a.png": smooth_image(1), "b.png": smooth_image(2)})
    a_loaded, b_done = threading.Event(), threading.Event()
    real_load = cropping.FocusPoints._current  # the read of set()'s load-modify-save

    def load(self):
        points = real_load(self)
        if threading.current_thread().name == "a":
            a_loaded.set()
            # Without the folder lock b loads the same old file now and saves first (b_done); with it,
            # b waits for this save, and this wait only bounds a's pause: the outcome is the same.
            b_done.wait(2)
        return points

    monkeypatch.setattr(cropping.FocusPoints, "_current", load)
    first = threading.Thread(target=crops.set_focus, args=("set", "a.png", 0.1, 0.5), name="a")
    first.start()
    assert a_loaded.wait(30)

    def second():
        crops.set_focus("set", "b.png", 0.9, 0.5)
        b_done.set()

    other = threading.Thread(target=second, name="b")
    other.start()
    first.join(30)
    other.join(30)
    monkeypatch.undo()
    points = cropping.FocusPoints(training.dataset_folder("set")).load()
    assert set(points) == {"a.png", "b.png"}
