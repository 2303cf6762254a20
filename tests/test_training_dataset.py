"""Training datasets: validation per file and reason, uploads, zips (zip-slip refused), captions, limits."""

from __future__ import annotations

import io
import zipfile

import pytest
from PIL import Image

from lorapg.errors import UserError
from lorapg.training.dataset import Dataset, DatasetLimits, DatasetStore, check_name
from lorapg.training.validation import validate_images
from tests.training_data import bomb_png, smooth_image, striped_image, write_images


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
    # A near duplicate is the user's call: usable, and reported.
    assert {c.file for c in report.valid} == {"img00.png", "img01.png", "z_near.jpg"}
    assert "exact duplicate of img00.png" in found["z_copy.png"]
    assert [(c.file, c.near_duplicate_of) for c in report.near_duplicates] == [("z_near.jpg", "img00.png")]
    assert "too small: 200×400" in found["small.png"]
    assert "extreme aspect ratio 4.0:1" in found["wide.png"]
    assert "not an image type" in found["notes.pdf"]
    assert "not an image" in found["fake.png"]
    assert "unreadable or truncated" in found["cut.png"]
    summary = report.summary()
    assert summary.startswith("3 of 9 image(s) usable") and "- cut.png:" in summary
    assert "1 near duplicate(s), kept" in summary and "- z_near.jpg looks like img00.png" in summary


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


COLOURS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 255),
    (255, 255, 255),
    (128, 64, 32),
]


def test_recoloured_images_are_distinct_training_images(tmp_path):
    for i, colour in enumerate(COLOURS):
        striped_image(colour).save(tmp_path / f"stripes{i}.png")
        Image.new("RGB", (256, 256), colour).save(tmp_path / f"flat{i}.png")
    report = Dataset(tmp_path).validate()
    assert len(report.valid) == 16 and not report.invalid
    assert report.near_duplicates == []


def jpeg_copy(image: Image.Image, size: tuple[int, int], quality: int) -> bytes:
    buffer = io.BytesIO()
    image.resize(size).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_resized_reencoded_copies_are_reported_and_can_be_removed(tmp_path):
    striped_image(COLOURS[0]).save(tmp_path / "a_stripes.png")
    (tmp_path / "b_stripes_copy.jpg").write_bytes(jpeg_copy(striped_image(COLOURS[0]), (500, 500), 70))
    smooth_image(1).save(tmp_path / "c_photo.png")
    (tmp_path / "d_photo_copy.jpg").write_bytes(jpeg_copy(smooth_image(1), (600, 600), 60))
    striped_image(COLOURS[1]).save(tmp_path / "e_green.png")  # same layout, another colour: distinct
    smooth_image(1).save(tmp_path / "f_same_pixels.png", compress_level=0)  # other bytes, same pixels
    dataset = Dataset(tmp_path)
    report = dataset.validate()
    near = {c.file: c.near_duplicate_of for c in report.near_duplicates}
    assert near == {"b_stripes_copy.jpg": "a_stripes.png", "d_photo_copy.jpg": "c_photo.png"}
    assert [c.file for c in report.invalid] == ["f_same_pixels.png"]
    assert "exact duplicate of c_photo.png" in reasons(report)["f_same_pixels.png"]
    assert len(report.trainable()) == 5 and len(report.trainable(drop_near_duplicates=True)) == 3

    assert dataset.remove_near_duplicates() == ["b_stripes_copy.jpg", "d_photo_copy.jpg"]
    assert dataset.validate().near_duplicates == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a_stripes.png",
        "c_photo.png",
        "e_green.png",
        "f_same_pixels.png",
    ]


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (the store's root: datasets and any leftover staging folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def zip_of(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as handle:
        for name, data in members.items():
            handle.writestr(name, data)
    return path


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    smooth_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def filled_store(tmp_path):
    """A store with limits set low, and dataset "fox" holding three images with captions."""
    store = DatasetStore(tmp_path / "datasets", DatasetLimits(max_images=5, max_unpacked_mb=1, max_pixels=100_000))
    write_images(tmp_path / "src", 3)
    store.add_files("fox", sorted((tmp_path / "src").iterdir()))
    return store


def test_zip_bomb_is_refused_before_anything_is_written(filled_store, tmp_path):
    before = snapshot(filled_store.root)
    bomb = zip_of(tmp_path / "bomb.zip", {"one.png": png_bytes(1), "zeros.png": bytes(3 * 1024 * 1024)})
    assert bomb.stat().st_size < 100_000
    with pytest.raises(UserError, match=r"bomb.zip unpacks to more than 1 MB.*max_unpacked_mb"):
        filled_store.add_files("fox", [bomb])
    with pytest.raises(UserError, match="max_unpacked_mb"):
        filled_store.add_files("new", [bomb])
    assert snapshot(filled_store.root) == before and filled_store.names() == ["fox"]


def test_zip_that_lies_about_its_sizes_adds_nothing(filled_store, tmp_path):
    before = snapshot(filled_store.root)
    liar = zip_of(tmp_path / "liar.zip", {"one.png": png_bytes(1), "zeros.png": bytes(3 * 1024 * 1024)})
    data = bytearray(liar.read_bytes())
    # Declare 1000 bytes for zeros.png in its local header and in the central directory.
    with zipfile.ZipFile(liar) as handle:
        info = handle.getinfo("zeros.png")
    local = info.header_offset
    data[local + 22 : local + 26] = (1000).to_bytes(4, "little")
    central = data.rindex(b"PK\x01\x02")  # zeros.png is the last member
    data[central + 24 : central + 28] = (1000).to_bytes(4, "little")
    liar.write_bytes(bytes(data))
    with zipfile.ZipFile(liar) as handle:
        assert handle.getinfo("zeros.png").file_size == 1000
    with pytest.raises(UserError, match="Nothing was added"):
        filled_store.add_files("fox", [liar])
    assert snapshot(filled_store.root) == before


def test_too_many_images_are_refused_before_anything_is_written(filled_store, tmp_path):
    before = snapshot(filled_store.root)
    three = zip_of(tmp_path / "three.zip", {f"n{i}.png": png_bytes(10 + i) for i in range(3)})
    with pytest.raises(UserError, match=r"would hold 6 images.*at most 5.*max_dataset_images"):
        filled_store.add_files("fox", [three])
    assert snapshot(filled_store.root) == before
    filled_store.add_files("fox", [zip_of(tmp_path / "two.zip", {f"m{i}.png": png_bytes(20 + i) for i in range(2)})])
    assert len(filled_store.get("fox").files()) == 5


def test_decompression_bomb_upload_is_refused_naming_the_file(filled_store, tmp_path):
    before = snapshot(filled_store.root)
    (tmp_path / "huge.png").write_bytes(bomb_png(30000, 30000))
    with pytest.raises(UserError, match=r"Image huge.png: too many pixels: 900 megapixels.*max_image_pixels.*Nothing"):
        filled_store.add_files("fox", [tmp_path / "src" / "img00.txt", tmp_path / "huge.png"])
    # Under Pillow's own limit but over the store's (100 000 pixels): the setting is named.
    big = zip_of(tmp_path / "big.zip", {"big.png": bomb_png(1000, 1000)})
    with pytest.raises(UserError, match=r"big.zip: big.png: too many pixels: 1000×1000.*max_image_pixels"):
        filled_store.add_files("fox", [big])
    assert snapshot(filled_store.root) == before


@pytest.mark.parametrize("size", [(30000, 30000), (1000, 1000)])
def test_a_bomb_already_in_the_dataset_is_an_invalid_image_and_removable(filled_store, size):
    dataset = filled_store.get("fox")
    (dataset.folder / "bomb.png").write_bytes(bomb_png(*size))
    report = dataset.validate()
    assert [c.file for c in report.invalid] == ["bomb.png"] and len(report.valid) == 3
    assert "too many pixels" in reasons(report)["bomb.png"]
    dataset.require_trainable()
    dataset.remove("bomb.png")
    assert not (dataset.folder / "bomb.png").exists()
