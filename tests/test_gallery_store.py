"""The gallery on disk: atomic PNGs other tools can read, an index that survives crashes and
threads, and retention that never loses a starred image."""

from __future__ import annotations

import io
import sqlite3
import threading
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from lorapg.errors import UserError
from lorapg.gallery import (
    GalleryStore,
    ImageRecord,
    LoraUse,
    format_parameters,
    read_png_parameters,
    save_png_atomically,
)
from lorapg.gallery import png as png_module
from lorapg.gallery.store import SCHEMA_VERSION

# --------------------------------------------------------------------------------------------
# Helpers


def tiny_image(shade: int = 0) -> Image.Image:
    return Image.new("RGB", (8, 8), (shade % 256, 100, 200))


def record(prompt: str = "a cat", seed: int = 1, **kwargs: object) -> ImageRecord:
    return ImageRecord(
        prompt=prompt,
        negative_prompt="blurry",
        seed=seed,
        steps=4,
        guidance_scale=7.0,
        sampler="Euler a",
        model_name="tiny",
        model_hash="0123456789",
        **kwargs,  # type: ignore[arg-type]
    )


def files_on_disk(images_dir: Path) -> set[Path]:
    return {path.resolve() for path in images_dir.rglob("*") if path.is_file()}


@pytest.fixture
def store(tmp_path: Path) -> GalleryStore:
    return GalleryStore(tmp_path / "gallery.sqlite", tmp_path / "images", keep=0)


# --------------------------------------------------------------------------------------------
# PNG files


def test_png_save_is_atomic_and_readable_by_plain_pil(tmp_path: Path) -> None:
    target = tmp_path / "day" / "image.png"
    text = "a fox <lora:style:0.7>\nNegative prompt: blurry\nSteps: 20, Seed: 5"
    save_png_atomically(tiny_image(), target, text)
    assert sorted(p.name for p in target.parent.iterdir()) == ["image.png"]
    with Image.open(target) as img:
        assert img.text["parameters"] == text
        assert img.size == (8, 8)
    assert read_png_parameters(target) == text
    assert read_png_parameters(target.read_bytes()) == text


def _zlib_levels(png: bytes) -> list[int]:
    """The FLEVEL of the zlib stream in every IDAT chunk: 0 fastest, 1 fast, 2 default (6), 3 best."""
    levels, position = [], len(png_module.PNG_SIGNATURE)
    while position < len(png):
        length, kind = int.from_bytes(png[position : position + 4], "big"), png[position + 4 : position + 8]
        if kind == b"IDAT" and not levels:  # the zlib header opens the first IDAT chunk
            levels.append(png[position + 9] >> 6)
        position += 12 + length
    return levels


def test_png_is_saved_with_fast_compression_and_the_same_pixels(tmp_path: Path) -> None:
    """zlib's default level spent ~350 ms on a 1024 px image after every generation; a faster one is
    lossless too, and the file says which it used."""
    image = Image.effect_noise((96, 96), 60).convert("RGB")
    target = save_png_atomically(image, tmp_path / "image.png", "Steps: 1")
    assert _zlib_levels(target.read_bytes()) == [1]  # "fast": levels 2-5 (4 here), not the default 6
    with Image.open(target) as saved:
        assert saved.tobytes() == image.tobytes()
        assert saved.text["parameters"] == "Steps: 1"


def test_png_non_latin_prompt_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "image.png"
    text = "桜の木の下の猫 🐈\nSteps: 20"
    save_png_atomically(tiny_image(), target, text)
    assert read_png_parameters(target) == text


def test_failed_png_save_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "image.png"
    save_png_atomically(tiny_image(), target, "old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(png_module.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_png_atomically(tiny_image(50), target, "new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]
    assert read_png_parameters(target) == "old"


def test_png_without_metadata_gives_none(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    tiny_image().save(buffer, format="PNG")
    assert read_png_parameters(buffer.getvalue()) is None


def test_broken_files_give_user_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    save_png_atomically(Image.effect_noise((64, 64), 50).convert("RGB"), good, "Steps: 1")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged or incomplete"):
        read_png_parameters(truncated)
    with pytest.raises(UserError, match="incomplete PNG"):
        read_png_parameters(data[:20])

    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image at all")
    with pytest.raises(UserError, match="not an image file"):
        read_png_parameters(text_file)

    jpeg = io.BytesIO()
    tiny_image().save(jpeg, format="JPEG")
    with pytest.raises(UserError, match="not a PNG"):
        read_png_parameters(jpeg.getvalue())

    with pytest.raises(UserError, match="does not exist"):
        read_png_parameters(tmp_path / "missing.png")


# --------------------------------------------------------------------------------------------
# Store basics


def test_add_writes_png_with_a1111_text_and_row(store: GalleryStore) -> None:
    loras = [LoraUse("watercolor", 0.7, "0123456789ab"), LoraUse("ink", 1.0, None)]
    stored = store.add(record("a fox", seed=77, loras=loras, job_id="job-1"), tiny_image())
    assert stored.id is not None and stored.path is not None
    assert stored.path.is_absolute() and stored.path.is_file()
    assert stored.path.is_relative_to(store.images_dir)
    assert "-77-" in stored.path.name
    assert (stored.width, stored.height) == (8, 8)  # filled from the image
    assert stored.created_at is not None and stored.created_at.tzinfo is not None

    text = read_png_parameters(stored.path)
    assert text == format_parameters(stored)
    assert "a fox <lora:watercolor:0.7> <lora:ink:1>" in text

    again = store.get(stored.id)
    assert again == stored
    assert again.loras == loras
    assert again.job_id == "job-1"


def test_a_write_does_not_checkpoint_the_whole_database(tmp_path: Path) -> None:
    """Each write's connection closed as the last one, which checkpoints the WAL into the database
    file and deletes it, with fsyncs (5-10 ms per saved image on a busy disk). With the store's
    idle connection open the WAL stays, and every other connection still sees each commit."""
    store = GalleryStore(tmp_path / "gallery.sqlite", tmp_path / "images", keep=1)
    wal = tmp_path / "gallery.sqlite-wal"
    first = store.add(record("a fox"), tiny_image())
    assert wal.is_file() and wal.stat().st_size > 0  # the commit is in the WAL, not checkpointed away
    second = store.add(record("a cat"), tiny_image(1))  # pruning the first image is a write too
    assert wal.is_file()
    with closing(sqlite3.connect(tmp_path / "gallery.sqlite")) as other:  # another process's view
        assert other.execute("SELECT id, prompt FROM images").fetchall() == [(second.id, "a cat")]
    assert first.path is not None and not first.path.exists()


def test_list_filters_by_words_and_lora(store: GalleryStore) -> None:
    cat = store.add(record("A small CAT on a roof", loras=[LoraUse("Ink", 1.0)]), tiny_image())
    dog = store.add(record("a dog on a roof"), tiny_image())
    straße = store.add(record("Große Straße bei Nacht"), tiny_image())

    assert [r.id for r in store.list()] == [straße.id, dog.id, cat.id]  # newest first
    assert [r.id for r in store.list("roof")] == [dog.id, cat.id]
    assert [r.id for r in store.list("cat ROOF")] == [cat.id]  # every word, any case
    assert [r.id for r in store.list("cat dog")] == []
    # Unicode case folding, not just ASCII: "STRASSE" finds "Straße".
    assert [r.id for r in store.list("STRASSE große")] == [straße.id]
    assert [r.id for r in store.list(lora="ink")] == [cat.id]
    assert [r.id for r in store.list("dog", lora="ink")] == []
    assert [r.id for r in store.list("100%_")] == []  # LIKE wildcards mean nothing here
    assert len(store.list(limit=2)) == 2


def test_list_pages_with_offset_and_filters_by_star(store: GalleryStore) -> None:
    ids = [store.add(record(f"image {n}"), tiny_image(n)).id for n in range(4)]
    newest_first = ids[::-1]
    assert [r.id for r in store.list(limit=2, offset=1)] == newest_first[1:3]
    assert [r.id for r in store.list(limit=None, offset=3)] == newest_first[3:]  # offset without a limit
    assert store.list(offset=10) == []
    store.set_starred(ids[1], True)
    assert [r.id for r in store.list(starred=True)] == [ids[1]]
    assert [r.id for r in store.list(starred=False)] == [i for i in newest_first if i != ids[1]]
    assert [r.id for r in store.list("image", starred=False, limit=1, offset=1)] == [newest_first[1]]


def test_delete_and_star(store: GalleryStore) -> None:
    first = store.add(record("one"), tiny_image())
    second = store.add(record("two"), tiny_image())
    assert first.id is not None and second.id is not None and first.path is not None

    starred = store.set_starred(second.id, True)
    assert starred.starred and store.get(second.id).starred
    assert not store.set_starred(second.id, False).starred

    store.delete(first.id)
    assert not first.path.exists()
    assert [r.id for r in store.list()] == [second.id]
    with pytest.raises(UserError, match="not in the gallery"):
        store.get(first.id)
    with pytest.raises(UserError, match="not in the gallery"):
        store.delete(first.id)
    with pytest.raises(UserError, match="not in the gallery"):
        store.set_starred(first.id, True)
    with pytest.raises(UserError, match="Image id must be a whole number"):
        store.get("../../etc/passwd")  # type: ignore[arg-type]
    assert store.get(str(second.id)).id == second.id  # type: ignore[arg-type]


def test_paths_in_the_database_never_escape_images_dir(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "g.sqlite", tmp_path / "images", keep=0)
    victim = tmp_path / "precious.png"
    victim.write_bytes(b"keep me")
    stored = store.add(record(), tiny_image())
    with sqlite3.connect(tmp_path / "g.sqlite") as conn:  # a tampered database
        conn.execute("UPDATE images SET path = '../precious.png' WHERE id = ?", (stored.id,))
    conn.close()
    assert stored.id is not None
    store.delete(stored.id)
    assert victim.read_bytes() == b"keep me"


def test_retention_keeps_newest_and_every_starred(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "g.sqlite", tmp_path / "images", keep=3)
    oldest = store.add(record("image 0"), tiny_image())
    assert oldest.id is not None and oldest.path is not None
    store.set_starred(oldest.id, True)
    added = [store.add(record(f"image {i}"), tiny_image(i)) for i in range(1, 5)]

    kept = store.list()
    # The starred image survives and does not count toward the three kept.
    assert [r.prompt for r in kept] == ["image 4", "image 3", "image 2", "image 0"]
    assert oldest.path.exists()
    pruned = added[0]
    assert pruned.path is not None and not pruned.path.exists()
    assert files_on_disk(store.images_dir) == {r.path for r in kept if r.path}


def test_retention_orders_by_creation_time(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "g.sqlite", tmp_path / "images", keep=1)
    now = datetime.now(UTC)
    store.add(record("new", created_at=now), tiny_image())
    store.add(record("old", created_at=now - timedelta(days=1)), tiny_image())
    assert [r.prompt for r in store.list()] == ["new"]


def test_schema_is_versioned_and_newer_databases_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "g.sqlite"
    GalleryStore(db, tmp_path / "images")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(UserError, match="newer LoRA Playground"):
        GalleryStore(db, tmp_path / "images")

    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="cannot be opened"):
        GalleryStore(garbage, tmp_path / "images")


# --------------------------------------------------------------------------------------------
# Crash recovery


def test_reconcile_repairs_what_a_crash_leaves(tmp_path: Path) -> None:
    db, images = tmp_path / "g.sqlite", tmp_path / "images"
    store = GalleryStore(db, images, keep=0)
    kept = store.add(record("kept"), tiny_image())
    lost = store.add(record("lost"), tiny_image())
    assert lost.path is not None and kept.path is not None
    lost.path.unlink()  # the row outlived its file

    # A PNG written just before a crash, before its row was inserted.
    orphan_record = record(
        "an orphan <lora:ink:0.5>",
        seed=99,
        loras=[LoraUse("ink", 0.5, "abcdefabcdef")],
        width=8,
        height=8,
    )
    orphan = images / "2026-01-01" / "120000-99-deadbeef.png"
    save_png_atomically(tiny_image(), orphan, format_parameters(orphan_record))
    # A save interrupted half-way, and files that are not ours to import.
    stray = images / "2026-01-01" / ".120001-5-cafe.png.x1y2.tmp"
    stray.write_bytes(b"\x89PNG half")
    plain = images / "screenshot.png"
    tiny_image().save(plain)
    broken = images / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    lines = GalleryStore(db, images, keep=0).reconcile()

    assert any("Removed" in line and ".tmp" in line for line in lines)
    assert any(f"#{lost.id}" in line and "missing" in line for line in lines)
    assert any("Imported 2026-01-01/120000-99-deadbeef.png" in line for line in lines)
    assert len(lines) == 3
    assert not stray.exists()
    assert plain.exists() and broken.exists()  # never delete what we did not make

    rows = {r.prompt: r for r in store.list()}
    assert set(rows) == {"kept", "an orphan"}
    imported = rows["an orphan"]
    assert imported.path == orphan.resolve()
    assert imported.seed == 99 and imported.steps == 4 and imported.sampler == "Euler a"
    assert imported.loras == [LoraUse("ink", 0.5, "abcdefabcdef")]
    assert imported.created_at is not None

    assert GalleryStore(db, images, keep=0).reconcile() == []  # repairs are done once


# --------------------------------------------------------------------------------------------
# Threads


def test_concurrent_adds_and_prunes_stay_consistent(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "g.sqlite", tmp_path / "images", keep=10)
    errors: list[BaseException] = []
    adders_done = threading.Event()

    def add_many(worker: int) -> None:
        try:
            for i in range(15):
                store.add(record(f"worker {worker} image {i}", seed=i), tiny_image(i))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def prune_loop() -> None:
        try:
            while not adders_done.is_set():
                store.prune()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    adders = [threading.Thread(target=add_many, args=(n,)) for n in range(4)]
    pruner = threading.Thread(target=prune_loop)
    pruner.start()
    for thread in adders:
        thread.start()
    for thread in adders:
        thread.join(timeout=120)
    adders_done.set()
    pruner.join(timeout=120)

    assert errors == []
    rows = store.list(limit=None)
    assert len(rows) == 10
    assert files_on_disk(store.images_dir) == {r.path for r in rows if r.path}
    with sqlite3.connect(tmp_path / "g.sqlite") as conn:
        orphan_loras = conn.execute(
            "SELECT COUNT(*) FROM image_loras WHERE image_id NOT IN (SELECT id FROM images)"
        ).fetchone()[0]
    conn.close()
    assert orphan_loras == 0
