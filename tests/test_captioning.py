"""Auto-captioning with tiny captioning models built in code: a WD14-style ONNX tagger and a BLIP,
loaded through the product's path (a folder, detected by its layout), on CPU.

Every image gets ``<stem>.txt`` through ``atomic_write``; existing captions stay unless overwrite; an
unreadable image or one the model fails on is skipped with its reason; cancel stops; the CLI runs end
to end; the captioner is registered with the residency manager and leaves when training takes the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

import lorapg.atomic_files
from lorapg.captioning import memory
from lorapg.captioning.base import CaptionOptions, RawCaption, format_caption, sentence_to_tags
from lorapg.captioning.runner import caption_dataset
from lorapg.captioning.sources import BLIP, BLIP2, FLORENCE2, WD14, detect_kind, resolve
from lorapg.captioning.wd14 import Wd14Tagger, to_input
from lorapg.config import Settings
from lorapg.errors import UserError
from lorapg.jobs import CANCELLED, DONE, JobQueue
from lorapg.residency import ResidencyManager
from lorapg.services.captions import CAPTIONER_RESIDENT_NAME, CaptionService, build_captioner
from lorapg.training.dataset import Dataset, DatasetStore
from tests import process_factory
from tests.tiny_captioners import (
    BLIP2_WORDS,
    FLORENCE_WORDS,
    save_tiny_blip,
    save_tiny_blip2,
    save_tiny_florence2,
    save_tiny_wd14,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wd14(tmp_path_factory) -> Path:
    return save_tiny_wd14(tmp_path_factory.mktemp("captioners") / "wd14")


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    return save_tiny_blip(tmp_path_factory.mktemp("captioners") / "blip")


def make_dataset(root: Path, colours=("red", "blue", "red"), side: int = 20) -> Dataset:
    folder = root / "datasets" / "foxes"
    folder.mkdir(parents=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", (side, side), colour).save(folder / f"img{i}.png")
    return Dataset(folder)


def tagger(folder: Path) -> Wd14Tagger:
    captioner = build_captioner(resolve(str(folder)), "cpu")
    assert isinstance(captioner, Wd14Tagger)
    return captioner


@pytest.fixture
def replaced(monkeypatch) -> list[Path]:
    """Every path ``atomic_write`` put in place (by ``os.replace`` of its temp file)."""
    seen: list[Path] = []
    real = os.replace

    def spy(src, dst, *args, **kwargs):
        seen.append(Path(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(lorapg.atomic_files.os, "replace", spy)
    return seen


def test_the_tagger_captions_every_image_through_atomic_writes(wd14, tmp_path, replaced):
    dataset = make_dataset(tmp_path)
    done: list[tuple[int, int, str]] = []
    options = CaptionOptions(style="tags", trigger="zqx")
    report = caption_dataset(dataset, tagger(wd14), options, progress=lambda *p: done.append(p))

    assert sorted(report.written) == ["img0.png", "img1.png", "img2.png"] and not report.skipped
    # Trigger first, then the character tag, then general tags by confidence; the rating tag never.
    assert dataset.caption("img0.png") == "zqx, hero (character), red theme, ^_^"
    assert dataset.caption("img1.png") == "zqx, hero (character), blue theme, ^_^"
    assert sorted(replaced) == sorted(p.with_suffix(".txt") for p in dataset.image_paths())
    assert done == [(1, 3, "img0.png"), (2, 3, "img1.png"), (3, 3, "img2.png")]
    assert not [p for p in dataset.folder.iterdir() if p.name.startswith(".")]  # no temp file left


def test_existing_captions_are_kept_unless_overwrite(wd14, tmp_path):
    dataset = make_dataset(tmp_path)
    (dataset.folder / "img1.txt").write_text("my own words\n", encoding="utf-8")
    report = caption_dataset(dataset, tagger(wd14), CaptionOptions(style="tags"))
    assert report.kept == ["img1.png"] and sorted(report.written) == ["img0.png", "img2.png"]
    assert dataset.caption("img1.png") == "my own words"

    again = caption_dataset(dataset, tagger(wd14), CaptionOptions(style="tags", overwrite=True))
    assert sorted(again.written) == ["img0.png", "img1.png", "img2.png"] and not again.kept
    assert dataset.caption("img1.png") == "hero (character), blue theme, ^_^"


class TypesWhileCaptioning(Wd14Tagger):
    """The real tagger; while it runs, the user types a caption for img1.png (the test's own event)."""

    def caption(self, images, options):
        self.folder_typed.joinpath("img1.txt").write_text("typed by hand\n", encoding="utf-8")
        return super().caption(images, options)


def test_a_caption_typed_while_captioning_runs_is_kept_when_overwrite_is_off(wd14, tmp_path):
    dataset = make_dataset(tmp_path)
    captioner = TypesWhileCaptioning(wd14, "tiny")
    captioner.folder_typed = dataset.folder
    report = caption_dataset(dataset, captioner, CaptionOptions(style="tags", batch_size=3))
    assert dataset.caption("img1.png") == "typed by hand"
    assert sorted(report.written) == ["img0.png", "img2.png"] and report.kept == ["img1.png"]


def test_images_sharing_a_caption_file_caption_only_the_first_and_say_why_the_other_is_skipped(wd14, tmp_path):
    dataset = make_dataset(tmp_path, ("red", "blue"))
    Image.new("RGB", (20, 20), "blue").save(dataset.folder / "img0.jpg")  # img0.jpg and img0.png: img0.txt
    for overwrite in (False, True):
        report = caption_dataset(dataset, tagger(wd14), CaptionOptions(style="tags", overwrite=overwrite))
        assert report.skipped == {"img0.png": "shares its caption file img0.txt with img0.jpg; rename it to caption it"}
        assert dataset.caption("img0.png") == "hero (character), blue theme, ^_^"  # img0.jpg's (blue), not red's
    assert sorted(report.written) == ["img0.jpg", "img1.png"]


def test_an_unreadable_image_is_skipped_with_its_reason_and_the_rest_captioned(wd14, tmp_path):
    dataset = make_dataset(tmp_path)
    (dataset.folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    report = caption_dataset(dataset, tagger(wd14), CaptionOptions(style="tags", batch_size=4))
    assert report.skipped == {"broken.png": "not a readable image (UnidentifiedImageError)"}
    assert sorted(report.written) == ["img0.png", "img1.png", "img2.png"]
    assert not (dataset.folder / "broken.txt").exists()


class FailsOnGrey(Wd14Tagger):
    """The real tagger, failing (as a model can on an odd input) on any batch holding a grey image."""

    def caption(self, images, options):
        if any(image.getpixel((0, 0)) == (128, 128, 128) for image in images):
            raise RuntimeError("shape mismatch in the model")
        return super().caption(images, options)


def test_an_image_the_model_fails_on_is_skipped_and_its_batch_neighbours_captioned(wd14, tmp_path):
    dataset = make_dataset(tmp_path, ("red", "grey", "blue"))
    Image.new("RGB", (20, 20), (128, 128, 128)).save(dataset.folder / "img1.png")
    report = caption_dataset(dataset, FailsOnGrey(wd14, "tiny"), CaptionOptions(style="tags", batch_size=3))
    assert report.skipped == {"img1.png": "the captioner failed on it: RuntimeError: shape mismatch in the model"}
    assert sorted(report.written) == ["img0.png", "img2.png"]


def test_cancel_stops_before_the_next_batch_and_keeps_what_was_written(wd14, tmp_path):
    dataset = make_dataset(tmp_path)
    done: list[str] = []
    report = caption_dataset(
        dataset,
        tagger(wd14),
        CaptionOptions(style="tags", batch_size=1),
        progress=lambda _d, _t, file: done.append(file),
        should_cancel=lambda: bool(done),  # set by the first image's progress: an event the test controls
    )
    assert report.cancelled and list(report.written) == ["img0.png"] == done
    assert not (dataset.folder / "img1.txt").exists()


def test_the_tagger_input_is_padded_white_bgr_at_the_models_side(wd14):
    wide = Image.new("RGB", (4, 2), (255, 0, 0))
    data = to_input(wide, 4)
    assert data.shape == (4, 4, 3) and data.dtype.name == "float32"
    assert data[2, 2].tolist() == [0.0, 0.0, 255.0]  # red in BGR order
    assert data[0, 0].tolist() == [255.0, 255.0, 255.0]  # the padding is white
    captioner = tagger(wd14)
    captioner.ensure_loaded()
    assert captioner.side == 16  # read from the model's input shape, not assumed


def test_tiny_blip_loads_through_the_product_path_and_captions_sentences(blip, tmp_path, replaced):
    assert detect_kind(blip) == BLIP
    dataset = make_dataset(tmp_path)
    store = DatasetStore(tmp_path / "datasets")
    service = CaptionService(Settings(), lambda owner: store, allow_any_path=True)
    report = service.caption("foxes", str(blip), CaptionOptions(trigger="zqx", max_length=4, batch_size=2))
    assert sorted(report.written) == ["img0.png", "img1.png", "img2.png"] and not report.skipped
    for path in dataset.image_paths():
        caption = dataset.caption(path.name)
        words = caption.removeprefix("zqx, ").split()
        assert caption.startswith("zqx, ") and 1 <= len(words) <= 4, caption
        assert set(words) <= {"a", "photo", "of", "red", "cat", "blue", "dog", "on", "grass"}
    assert {path.with_suffix(".txt") for path in dataset.image_paths()} <= set(replaced)


def test_tiny_blip2_is_recognised_by_its_layout_and_captions_where_memory_allows(tmp_path, replaced):
    folder = save_tiny_blip2(tmp_path / "blip2")
    assert detect_kind(folder) == BLIP2
    dataset = make_dataset(tmp_path)
    store = DatasetStore(tmp_path / "datasets")
    service = CaptionService(Settings(), lambda owner: store, allow_any_path=True)
    captioner = service.captioner(str(folder))
    params = memory.weights_params(folder)
    assert params > 0 and captioner.estimated_bytes() == int(params * 4 * memory.ACTIVATION_MARGIN)  # fp32 on CPU
    report = service.caption("foxes", str(folder), CaptionOptions(trigger="zqx", max_length=4, batch_size=2))
    assert sorted(report.written) == ["img0.png", "img1.png", "img2.png"] and not report.skipped
    for path in dataset.image_paths():
        caption = dataset.caption(path.name)
        words = caption.removeprefix("zqx, ").split()
        assert caption.startswith("zqx, ") and 1 <= len(words) <= 4 and set(words) <= set(BLIP2_WORDS), caption
    assert {path.with_suffix(".txt") for path in dataset.image_paths()} <= set(replaced)


def test_blip2_estimate_counts_the_weights_the_loader_reads_in_their_stored_dtype(tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from lorapg.captioning.transformers_models import Blip2Captioner

    folder = save_tiny_blip2(tmp_path / "blip2")
    params = memory.safetensors_file_params(folder / "model.safetensors")
    estimate = Blip2Captioner(folder, "tiny").estimated_bytes()
    assert estimate == int(params * 4 * memory.ACTIVATION_MARGIN)
    # A stray safetensors file next to the weights (an adapter, a backup) is not read by the loader.
    shutil.copy(folder / "model.safetensors", folder / "backup.safetensors")
    assert Blip2Captioner(folder, "tiny").estimated_bytes() == estimate

    # Sharded safetensors: the files the index maps, counted once each.
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    weight_map = {name: "model-00001-of-00001.safetensors" for name in ("a", "b")}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert Blip2Captioner(sharded, "tiny").estimated_bytes() == estimate

    # fp16 pickles only (--allow-pickle): their parameters, not half of them.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (pickled / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    state = {name: tensor.half() for name, tensor in load_file(folder / "model.safetensors").items()}
    torch.save(state, pickled / "pytorch_model.bin")
    counted = Blip2Captioner(pickled, "tiny", allow_pickle=True)._params()
    assert params <= counted < params * 2  # never fewer; more only by the pickle format's own overhead
    # With an index, its metadata.total_size (the tensors' bytes) is the measure.
    index = {"metadata": {"total_size": params * 2}, "weight_map": {"a": "pytorch_model.bin"}}
    (pickled / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert Blip2Captioner(pickled, "tiny", allow_pickle=True)._params() == params


def test_blip2_is_refused_before_loading_when_it_does_not_fit_in_free_memory(tmp_path, monkeypatch):
    folder = save_tiny_blip2(tmp_path / "blip2")
    dataset = make_dataset(tmp_path)
    store = DatasetStore(tmp_path / "datasets")
    service = CaptionService(Settings(), lambda owner: store, allow_any_path=True)
    needed = service.captioner(str(folder)).estimated_bytes()
    # The free-RAM figure the product reads, one byte short of the estimate: refused, nothing loaded.
    monkeypatch.setattr(memory, "_available_ram", lambda: needed - 1)
    with pytest.raises(UserError) as refused:
        service.caption("foxes", str(folder), CaptionOptions())
    message = str(refused.value)
    assert message.startswith(f"Captioner blip2 ({folder}) needs about ") and "\n" not in message
    assert "B parameters in float32" in message and "is free RAM on cpu" in message, message
    assert not service.captioner(str(folder)).loaded
    assert not any(path.with_suffix(".txt").exists() for path in dataset.image_paths())
    # The hub BLIP-2 is refused before its download (offline here: the download would fail differently).
    with pytest.raises(UserError, match=r"Captioner blip2 \(Salesforce/blip2-opt-2.7b\) needs about 17.30 GB"):
        service.caption("foxes", BLIP2, CaptionOptions())
    monkeypatch.setattr(memory, "_available_ram", lambda: needed)  # exactly enough: captioned
    assert len(service.caption("foxes", str(folder), CaptionOptions()).written) == 3


def test_the_captioner_is_resident_and_leaves_when_training_takes_the_gpu(wd14, tmp_path):
    make_dataset(tmp_path)
    store = DatasetStore(tmp_path / "datasets")
    residency = ResidencyManager(budget_bytes=1 << 30)
    service = CaptionService(Settings(), lambda owner: store, residency=residency, allow_any_path=True)
    service.caption("foxes", str(wd14), CaptionOptions(style="tags"))
    captioner = service.captioner(str(wd14))
    assert captioner.loaded
    assert [row["name"] for row in residency.status()] == [CAPTIONER_RESIDENT_NAME]
    with residency.exclusive("LoRA training", 0):
        assert not captioner.loaded  # dropped for training
    service.caption("foxes", str(wd14), CaptionOptions(style="tags", overwrite=True))
    assert captioner.loaded  # and loaded again on next use


def test_without_a_residency_manager_the_captioner_leaves_ram_when_its_caption_run_ends(wd14, tmp_path):
    make_dataset(tmp_path)
    store = DatasetStore(tmp_path / "datasets")
    jobs = JobQueue()
    try:  # as the app builds it on a CPU-only machine: a job queue, no residency manager
        service = CaptionService(Settings(), lambda owner: store, jobs, residency=None, allow_any_path=True)
        captioner = service.captioner(str(wd14))
        loaded_while_captioning: list[bool] = []
        service.caption(
            "foxes",
            str(wd14),
            CaptionOptions(style="tags"),
            progress=lambda *_: loaded_while_captioning.append(captioner.loaded),
        )
        assert loaded_while_captioning == [True, True, True]
        assert not captioner.loaded  # released when the run ended
        job = service.start("foxes", str(wd14), CaptionOptions(style="tags", overwrite=True))
        assert job.wait(120) and job.status == DONE, job.error
        assert len(job.result.written) == 3 and service.captioner(str(wd14)) is captioner and not captioner.loaded
    finally:
        jobs.close(30)


def test_a_caption_job_reports_progress_and_can_be_cancelled(wd14, tmp_path):
    make_dataset(tmp_path)
    store = DatasetStore(tmp_path / "datasets")
    jobs = JobQueue()
    try:
        service = CaptionService(Settings(), lambda owner: store, jobs, allow_any_path=True)
        job = service.start("foxes", str(wd14), CaptionOptions(style="tags"))
        assert job.wait(120) and job.status == DONE, job.error
        assert (job.step, job.total) == (3, 3) and job.result.summary() == "3 captioned, 0 kept"

        jobs.submit("hold", lambda j: None)  # nothing to wait for; the next job is cancelled before it runs
        cancelled = service.start("foxes", str(wd14), CaptionOptions(style="tags", overwrite=True))
        jobs.cancel(cancelled.id)
        assert cancelled.wait(60) and cancelled.status == CANCELLED
    finally:
        jobs.close(30)


def test_bad_options_and_captioners_are_refused_with_a_clear_message(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="Caption style 'poem' is not one of sentence, tags"):
        CaptionOptions(style="poem").checked()
    with pytest.raises(UserError, match="Max length must be between 1 and 200"):
        CaptionOptions(max_length=0).checked()
    with pytest.raises(UserError, match="neither blip, blip2, florence2, wd14 nor an existing folder"):
        resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds neither model.onnx"):
        resolve(str(tmp_path / "empty"))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {"x": "y"}}))
    with pytest.raises(UserError, match="never runs; use the transformers-native florence-community/Florence-2-base"):
        resolve(str(remote))


def test_a_hub_captioner_missing_offline_says_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for choice in (BLIP, FLORENCE2, WD14):
        with pytest.raises(UserError, match="not in the local Hugging Face cache and the hub is offline"):
            resolve(choice)
    # Online mode but no hub answering: refused within the reachability check's seconds, not after
    # minutes of retries on the GPU queue.
    from tests.app_server import free_port

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(
        UserError, match="Captioner SmilingWolf/wd-vit-tagger-v3 is not in the local .* cannot be reached"
    ):
        resolve(WD14)


def test_tiny_florence2_loads_natively_and_captions(tmp_path):
    folder = save_tiny_florence2(tmp_path / "florence2")
    assert detect_kind(folder) == FLORENCE2
    dataset = make_dataset(tmp_path)
    service = CaptionService(Settings(), lambda owner: DatasetStore(tmp_path / "datasets"), allow_any_path=True)
    report = service.caption("foxes", str(folder), CaptionOptions(max_length=5, batch_size=3))
    assert sorted(report.written) == ["img0.png", "img1.png", "img2.png"] and not report.skipped
    for path in dataset.image_paths():
        words = dataset.caption(path.name).split()
        assert 1 <= len(words) <= 5 and set(words) <= set(FLORENCE_WORDS), words


def test_a_florence2_folder_without_weights_fails_to_load_with_a_clear_message(tmp_path):
    folder = tmp_path / "florence"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "florence2"}))
    with pytest.raises(UserError, match=r"florence2 captioner in .*florence has no .safetensors weights"):
        build_captioner(resolve(str(folder)), "cpu").ensure_loaded()
    captioner = build_captioner(resolve(str(folder)), "cpu", allow_pickle=True)  # may look for .bin: none
    with pytest.raises(UserError, match=r"Could not load the florence2 captioner from .*florence: .*pick another"):
        captioner.ensure_loaded()


def test_pickled_captioner_weights_load_only_with_allow_pickle(blip, tmp_path):
    """A .bin is a pickle that can run code when loaded: refused unless the owner passed --allow-pickle."""
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = shutil.copytree(blip, tmp_path / "blip-bin")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    make_dataset(tmp_path)
    store = DatasetStore(tmp_path / "datasets")
    service = CaptionService(Settings(), lambda owner: store, allow_any_path=True)
    with pytest.raises(UserError, match=r"no .safetensors weights; pickled weights .* pass --allow-pickle if you"):
        service.caption("foxes", str(pickled), CaptionOptions(max_length=4))
    assert not list((tmp_path / "datasets" / "foxes").glob("*.txt"))
    trusting = CaptionService(Settings(allow_pickle=True), lambda owner: store, allow_any_path=True)
    report = trusting.caption("foxes", str(pickled), CaptionOptions(max_length=4))
    assert sorted(report.written) == ["img0.png", "img1.png", "img2.png"]


def test_the_app_takes_a_captioner_folder_only_by_its_name_in_models_captioners(wd14, tmp_path):
    """UI and API: blip / florence2 / wd14 or a folder NAME in <models_dir>/captioners; the CLI any path."""
    import shutil

    make_dataset(tmp_path)
    store = DatasetStore(tmp_path / "datasets")
    models = tmp_path / "models"
    shutil.copytree(wd14, models / "captioners" / "my-tagger")
    jobs = JobQueue()
    try:
        service = CaptionService(Settings(models_dir=models), lambda owner: store, jobs)
        assert service.captioner_choices() == ["blip", "blip2", "florence2", "wd14", "my-tagger"]
        listing = "is not one of blip, blip2, florence2, wd14, my-tagger; choose one of those"
        for choice in (str(wd14), str(tmp_path / "missing"), "../models/captioners/my-tagger", "my-tagger/.", "~"):
            with pytest.raises(UserError, match=listing):
                service.caption("foxes", choice, CaptionOptions(style="tags"))
            with pytest.raises(UserError, match=listing):  # refused in the request, before any job
                service.start("foxes", choice, CaptionOptions(style="tags"))
        assert not list((tmp_path / "datasets" / "foxes").glob("*.txt"))
        report = service.caption("foxes", "my-tagger", CaptionOptions(style="tags"))
        assert sorted(report.written) == ["img0.png", "img1.png", "img2.png"]
    finally:
        jobs.close(30)


def test_caption_styles_and_lengths_are_the_same_for_every_model():
    sentence = RawCaption(sentence="a red cat sitting on the grass with a ball")
    assert sentence_to_tags(sentence.sentence) == ["red cat sitting on the grass", "ball"]
    assert (
        format_caption(sentence, CaptionOptions(style="tags", trigger="zqx"))
        == "zqx, red cat sitting on the grass, ball"
    )
    assert format_caption(sentence, CaptionOptions(max_length=3)) == "a red cat"
    tags = RawCaption(tags=("red hair", "smile", "red hair"))
    assert format_caption(tags, CaptionOptions(style="tags", max_length=1)) == "red hair"
    # A caption that already uses the trigger as a word is kept as written, as the trainer does.
    assert format_caption(RawCaption(sentence="zqx on grass"), CaptionOptions(trigger="zqx")) == "zqx on grass"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return process_factory.run(["-m", "lorapg", *args], cwd=cwd, env=process_factory.test_env())


def test_cli_lists_validates_and_captions_a_dataset(wd14, tmp_path):
    dataset = make_dataset(tmp_path / "models", ("red", "blue"), side=256)  # trainable: 256 px or more
    (dataset.folder / "img1.txt").write_text("kept caption\n", encoding="utf-8")
    (dataset.folder / "notes.png").write_bytes(b"not an image")
    models = ["--models-dir", str(tmp_path / "models")]

    listing = run_cli("dataset", "list", *models, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.strip() == "foxes\t3 image(s)\t1 captioned"

    validate = run_cli("dataset", "validate", "foxes", *models, cwd=tmp_path)
    assert validate.returncode == 0 and "2 of 3 image(s) usable for training." in validate.stdout

    run = run_cli(
        "dataset",
        "caption",
        "foxes",
        "--captioner",
        str(wd14),
        "--style",
        "tags",
        "--trigger",
        "zqx",
        *models,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "1 captioned, 1 kept, 1 skipped"
    assert "[1/2] img0.png" in run.stderr and "skipped notes.png: not a readable image" in run.stderr
    assert dataset.caption("img0.png") == "zqx, hero (character), red theme, ^_^"
    assert dataset.caption("img1.png") == "kept caption"

    over = run_cli("dataset", "caption", "foxes", "--captioner", str(wd14), "--overwrite", *models, cwd=tmp_path)
    assert over.returncode == 0 and over.stdout.strip() == "2 captioned, 0 kept, 1 skipped"
    assert dataset.caption("img1.png") == "hero (character), blue theme, ^_^"

    missing = run_cli("dataset", "caption", "nope", "--captioner", "wd14", *models, cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: No dataset named 'nope'")


def test_build_services_gives_captioning_the_shared_queue_and_the_training_datasets(tmp_path):
    from lorapg.config import load_settings
    from lorapg.services.build import build_services

    overrides = {"outputs": str(tmp_path / "out"), "models_dir": str(tmp_path / "models"), "device": "cpu"}
    built = build_services(load_settings(None, overrides, environ={}))
    try:
        assert built.captions.jobs is built.jobs and built.captions.residency is built.residency
        assert built.captions.stores(None).root == built.training.dataset_store(None).root
        assert built.captions.stores("visitor-1").root == built.training.dataset_store("visitor-1").root
    finally:
        built.jobs.shutdown()
