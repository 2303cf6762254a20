"""Training datasets: validation per file and reason, uploads, zips (zip-slip refused), captions."""

from __future__ import annotations

import io
import zipfile

import pytest
from PIL import Image

from lorapg.errors import UserError
from lorapg.training.dataset import Dataset, DatasetStore, check_name
from lorapg.training.validation import validate_images
from tests.training_data import smooth_image, write_images


def reasons(report) -> dict[str, str]:
    return {c.file: "; ".join(c.reasons) for c in report.checks}


def test_each_problem_is_reported_with_its_reason(tmp_path):
    write_images(tmp_path, 2, captions=False)  # img00, img01: fine
    (tmp_path / "z_copy.png").write_bytes((tmp_path / "img00.png").read_bytes())
    smooth_image(0).resize((300, 300)).save(tmp_path / "z_near.jpg", quality=90)  # resized + recompressed copy
    smooth_image(7, (200, 400)).save(tmp_path / "small.png")
    smooth_image(8, (1200, 300)).save(tmp_path / "wide.png")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "fake.png").write_bytes(b"this is text, not a PNG")
    buffer = io.BytesIO()
    smooth_image(9).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    report = Dataset(tmp_path).validate()
    found = reasons(report)
    assert {c.file for c in report.valid} == {"img00.png", "img01.png"}
    assert "exact duplicate of img00.png" in found["z_copy.png"]
    assert "near duplicate of" in found["z_near.jpg"]
    assert "too small: 200×400" in found["small.png"]
    assert "extreme aspect ratio 4.0:1" in found["wide.png"]
    assert "not an image type" in found["notes.pdf"]
    assert "not an image" in found["fake.png"]
    assert "unreadable or truncated" in found["cut.png"]
    summary = report.summary()
    assert summary.startswith("2 of 9 image(s) usable") and "- cut.png:" in summary


def test_distinct_images_are_not_near_duplicates(tmp_path):
    paths = write_images(tmp_path, 8, captions=False)
    assert len(validate_images(paths).valid) == 8


def test_empty_and_all_invalid_datasets_are_refused(tmp_path):
    with pytest.raises(UserError, match="has no images"):
        Dataset(tmp_path).require_trainable()
    smooth_image(1, (100, 100)).save(tmp_path / "tiny.png")
    with pytest.raises(UserError, match=r"every file was refused \(tiny.png: too small"):
        Dataset(tmp_path).require_trainable()


def test_uploads_captions_and_removal(tmp_path):
    source = tmp_path / "src"
    write_images(source, 3)
    store = DatasetStore(tmp_path / "datasets")
    files = sorted(source.iterdir())  # images and their .txt captions
    dataset, notes = store.add_files("fox", files)
    assert notes == [] and store.names() == ["fox"]
    assert [(i.file, i.caption) for i in dataset.images()][0] == ("img00.png", "a picture, pattern 0")
    dataset.set_caption("img01.png", "  a fox,\n in snow ")
    assert dataset.caption("img01.png") == "a fox, in snow"
    dataset.remove("img02.png")
    assert [i.file for i in dataset.images()] == ["img00.png", "img01.png"]
    assert not (dataset.folder / "img02.txt").exists()
    # Uploading a file of the same name keeps both.
    _, notes = store.add_files("fox", [source / "img00.png"])
    assert "saved as img00-2.png" in notes[0]
    with pytest.raises(UserError, match="No image"):
        dataset.remove("../../etc/passwd")


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "..", ".hidden", "a\\b", "x..y"])
def test_names_never_escape(bad):
    with pytest.raises(UserError):
        check_name(bad)


def test_zip_upload_flattens_folders_and_refuses_zip_slip(tmp_path):
    archive = tmp_path / "set.zip"
    png = io.BytesIO()
    smooth_image(3).save(png, format="PNG")
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("set/one.png", png.getvalue())
        handle.writestr("set/one.txt", "zqx, a cat")
        handle.writestr("../../evil.png", png.getvalue())
        handle.writestr("/abs/evil2.png", png.getvalue())
        handle.writestr("__MACOSX/set/._one.png", b"junk")
    store = DatasetStore(tmp_path / "datasets")
    dataset, notes = store.add_files("cats", [archive])
    assert [i.file for i in dataset.images()] == ["one.png"]
    assert dataset.caption("one.png") == "zqx, a cat"
    assert sum("refused" in n for n in notes) == 2
    assert not (tmp_path / "evil.png").exists() and not list(tmp_path.rglob("evil*.png"))
    not_zip = tmp_path / "broken.zip"
    not_zip.write_bytes(b"nope")
    with pytest.raises(UserError, match="not a readable zip"):
        store.add_files("cats", [not_zip])


def test_image_orientation_independent_checks(tmp_path):
    Image.new("RGB", (256, 256), "red").save(tmp_path / "ok.png")
    assert Dataset(tmp_path).validate().valid[0].file == "ok.png"
