"""Bad input and races against the gallery (issue 13, item 7): ids, stars, search, PNG Info, caches."""

from __future__ import annotations

import io
import math
import struct
import threading
import tracemalloc
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.errors import UserError
from lorapg.gallery import GalleryStore, ImageRecord, read_png_parameters
from lorapg.services.gallery import GalleryService
from tests.app_server import running_app


@pytest.fixture
def service(tmp_path: Path) -> GalleryService:
    store = GalleryStore(tmp_path / "gallery.sqlite3", tmp_path / "images", keep=0)
    return GalleryService(store, LoraLibrary(tmp_path / "loras"), max_query_chars=100)


def add(service: GalleryService, prompt: str, seed: int = 1) -> ImageRecord:
    return service.store.add(ImageRecord(prompt=prompt, seed=seed), Image.new("RGB", (8, 8)))


# --------------------------------------------------------------------------------------------
# Image ids: refused, never rounded


BAD_IDS = [
    (1.5, "got 1.5"),
    (2.5, "got 2.5"),
    ("1.5", "got '1.5'"),
    (0, "got 0"),
    (-2, "got -2"),
    (2**63, f"got {2**63}"),
    (1e19, "got 1e+19"),
    (math.nan, "got nan"),
    (math.inf, "got inf"),
    ("²", "got '²'"),
    (True, "got True"),
    ("9" * 10_000, "(10000 characters)"),
]


@pytest.mark.parametrize(("bad", "shown"), BAD_IDS)
def test_every_gallery_call_refuses_a_bad_id_with_one_message(service: GalleryService, bad, shown) -> None:
    first, second = add(service, "one"), add(service, "two")
    service.star(second.id)
    calls = (
        service.get,
        service.delete,
        service.star,
        service.toggle_star,
        service.show,
        service.reuse_parameters,
        service.store.get,
        service.store.delete,
        service.store.toggle_starred,
        lambda image_id: service.store.set_starred(image_id, True),
    )
    for call in calls:
        with pytest.raises(UserError, match="Image id must be a whole number ≥ 1") as caught:
            call(bad)
        assert shown in str(caught.value) and "\n" not in str(caught.value)
        assert len(str(caught.value)) < 200  # a 10 MB id is not echoed in full
    # Nothing was rounded to an existing image and changed.
    assert [(r.id, r.starred) for r in service.list()] == [(second.id, True), (first.id, False)]


def test_whole_number_ids_in_any_form_still_work(service: GalleryService) -> None:
    stored = add(service, "a cat")
    for form in (stored.id, float(stored.id), str(stored.id), f" #{stored.id} "):
        assert service.get(form).id == stored.id


# --------------------------------------------------------------------------------------------
# Stars: one transaction per toggle


def test_concurrent_toggles_leave_the_parity_of_the_toggles(service: GalleryService) -> None:
    """Threads released together by a barrier the test holds; each toggle must count once."""
    image = add(service, "contested")
    threads_n, toggles = 7, 30
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            barrier.wait()
            for _ in range(toggles):
                service.toggle_star(image.id)
        except BaseException as exc:  # reported below; a thread must not swallow a failure
            errors.append(exc)

    workers = [threading.Thread(target=client) for _ in range(threads_n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert service.get(image.id).starred is bool(threads_n * toggles % 2)


def test_prune_never_removes_an_image_starred_while_it_runs(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "g.sqlite3", tmp_path / "images", keep=1)
    for round_ in range(15):
        target = store.add(ImageRecord(prompt=f"target {round_}", seed=round_), Image.new("RGB", (8, 8)))
        starred = _star_while_adding(store, target.id)
        if starred:
            assert store.get(target.id).starred and target.path.is_file()
        store.prune()
        assert all(r.path.is_file() for r in store.list(limit=None))
        starred_ids = {r.id for r in store.list(limit=None) if r.starred}
        assert (target.id in starred_ids) is starred


def _star_while_adding(store: GalleryStore, image_id: int) -> bool:
    """Star ``image_id`` while another thread adds an image (which prunes); True if the star took."""
    barrier = threading.Barrier(2)
    starred: list[bool] = []

    def star() -> None:
        barrier.wait()
        try:
            starred.append(store.toggle_starred(image_id).starred)
        except UserError:  # pruned first: then it is gone, which the caller accepts
            starred.append(False)

    def add_newer() -> None:
        barrier.wait()
        store.add(ImageRecord(prompt="newer", seed=99), Image.new("RGB", (8, 8)))

    workers = [threading.Thread(target=star), threading.Thread(target=add_newer)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return starred == [True]


# --------------------------------------------------------------------------------------------
# Search


def test_a_search_of_a_thousand_words_works(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "g.sqlite3", tmp_path / "images", keep=0)
    words = [f"w{i}" for i in range(1000)]
    match = store.add(ImageRecord(prompt=" ".join(reversed(words)).upper()), Image.new("RGB", (8, 8)))
    store.add(ImageRecord(prompt=" ".join(words[:-1])), Image.new("RGB", (8, 8)))
    assert [r.id for r in store.list(query=" ".join(words))] == [match.id]


def test_a_search_longer_than_the_prompt_limit_is_refused_naming_it(service: GalleryService) -> None:
    add(service, "a cat")
    assert len(service.list(query="cat " * 25)) == 1  # exactly 100 characters: allowed
    with pytest.raises(UserError, match=r"Prompt words: .*10000000 characters.*limit of 100 \(max_prompt_chars\)"):
        service.list(query="x" * 10_000_000)
    with pytest.raises(UserError, match="LoRA: .*max_prompt_chars"):
        service.list(lora="y" * 101)
    with pytest.raises(UserError, match="Prompt words: the search must be text"):
        service.list(query=["cat"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# PNG Info reads chunks, never pixels


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(text: str, width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` and whose pixel data is garbage: any
    attempt to decode it fails, so reading its text proves no decode was tried."""
    buffer = io.BytesIO()
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            body = struct.pack(">II", width, height) + body[8:]
        elif kind == b"IDAT":
            body = b"\x00garbage, not zlib" * 64
        chunks.append(_chunk(kind, body))
        position += 12 + length
    return data[:8] + b"".join(chunks)


def test_png_info_reads_parameters_of_a_huge_png_without_decoding(service: GalleryService, tmp_path: Path) -> None:
    text = "a giant lighthouse\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64"
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(text))
    tracemalloc.start()
    try:
        info = service.png_info(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.text == text and info.parsed.seed == 5
    assert peak < 5 * 2**20  # 10^10 pixels would be 30 GB; a few chunks are kilobytes
    assert read_png_parameters(path.read_bytes()) == text


def test_text_chunks_are_bounded_and_checked(tmp_path: Path) -> None:
    whole = bomb_png("Steps: 4")
    iend = whole.index(b"IEND") - 4
    # zTXt that inflates to 64 MB of zeros from 64 KB: refused, not held in memory.
    ztxt = _chunk(b"zTXt", b"parameters\x00\x00" + zlib.compress(b"\0" * 64 * 2**20, 9))
    with pytest.raises(UserError, match="damaged or incomplete PNG .*expands past 1 MB"):
        read_png_parameters(whole[:iend] + ztxt + whole[iend:])
    # Parameters too large for a text chunk are refused by size, never read.
    huge = _chunk(b"tEXt", b"parameters\x00" + b"x" * (2 * 2**20))
    with pytest.raises(UserError, match="parameters chunk is 2 MB or more, over the 1 MB"):
        read_png_parameters(whole[:iend] + huge + whole[iend:])
    other = _chunk(b"tEXt", b"comment\x00" + b"x" * (2 * 2**20))
    assert read_png_parameters(whole[:iend] + other + whole[iend:]) == "Steps: 4"
    # A text chunk whose checksum is wrong is damage, not parameters.
    broken = bytearray(whole)
    at = broken.index(b"Steps: 4")
    broken[at] = ord("s")
    with pytest.raises(UserError, match="fails its checksum"):
        read_png_parameters(bytes(broken))
    # iTXt (what PIL writes for non-Latin-1 text) after the pixel data is read too.
    itxt = _chunk(b"iTXt", b"parameters\x00\x00\x00\x00\x00" + "桜 Steps: 2".encode())
    assert read_png_parameters(whole[:iend] + itxt + whole[iend:]) == "桜 Steps: 2"
    # Cut anywhere, the file is incomplete.
    for cut in (len(whole) - 1, len(whole) // 2, 30, 5):
        with pytest.raises(UserError, match="damaged or incomplete PNG"):
            read_png_parameters(whole[:cut])


# --------------------------------------------------------------------------------------------
# Through the real app over HTTP: ids, stale URLs, PNG Info, one-line refusals

GENERATE = {
    "negative_prompt": "",
    "loras": "",
    "steps": 2,
    "cfg_scale": 7,
    "sampler": "Euler a",
    "width": 64,
    "height": 64,
    "batch_size": 1,
}


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_app_refuses_bad_ids_and_forgets_images_that_leave_the_gallery(tiny_models, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    log_path = tmp_path / "app.log"
    outputs = tmp_path / "outputs"
    with running_app(
        "--model",
        str(tiny_models["sd15"]),
        "--outputs",
        str(outputs),
        "--threads",
        "1",
        "--gallery-keep",
        "1",
        log_path=log_path,
    ) as url:
        client = Client(url, verbose=False, download_files=False)

        def generate(seed: int) -> str:
            images = client.predict(prompt=f"a cat {seed}", seed=seed, api_name="/generate", **GENERATE)[0]
            return images[0]["image"]["url"]

        first_url = generate(1)
        client.predict(1, api_name="/gallery_star")  # #1 starred: never pruned
        second_url = generate(2)
        # 1.5 was rounded to 2 and deleted image #2; now every id endpoint refuses it.
        for api_name, args in (
            ("/gallery_delete", (1.5, "", "")),
            ("/gallery_get", (1.5,)),
            ("/gallery_star", (1.5,)),
            ("/gallery_reuse", (1.5,)),
            ("/gallery_delete", (2**63, "", "")),
        ):
            with pytest.raises(Exception, match="Image id must be a whole number ≥ 1, got "):
                client.predict(*args, api_name=api_name)
        listing = client.predict("", "", api_name="/gallery_list")
        assert listing[-1] == "2 image(s)." and len(listing[0]) == 2
        shown = client.predict(1, api_name="/gallery_get")
        assert any(isinstance(part, str) and "★ starred" in part for part in shown)
        assert _status(first_url) == _status(second_url) == 200

        # Deleted: its URL no longer answers with the image.
        client.predict(2, "", "", api_name="/gallery_delete")
        assert _status(second_url) in (403, 404)
        # Pruned: #3 goes when #4 arrives (keep 1); its URL goes with it. The starred #1 stays.
        third_url = generate(3)
        generate(4)
        assert _status(third_url) in (403, 404)
        assert _status(first_url) == 200
        assert len(list(outputs.rglob("*.png"))) == 2

        # A file gone between the query and the answer (pruned by another client's generation) is
        # left out: clients download every listed file, and one 403 failed the whole listing.
        newest = client.predict("", "", api_name="/gallery_list")[0][0]
        Path(newest["image"]["path"]).unlink()
        listed = Client(url, verbose=False).predict("", "", api_name="/gallery_list")
        assert listed[-1] == "1 image(s)."

        with pytest.raises(Exception, match="Prompt words: .*over the limit of .*max_prompt_chars"):
            client.predict("cat " * 5000, "", api_name="/gallery_list")

        bomb = tmp_path / "bomb.png"
        bomb.write_bytes(bomb_png("a giant\nSteps: 4, Seed: 77"))
        summary, raw = client.predict(handle_file(str(bomb)), api_name="/png_info")
        assert raw == "a giant\nSteps: 4, Seed: 77" and "77" in summary

    log = log_path.read_text()
    assert "Traceback" not in log
    assert log.count("refused: Image id must be a whole number ≥ 1, got 1.5") == 4
