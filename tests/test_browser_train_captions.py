"""Train tab's caption table in a real browser: one row per image with its thumbnail (a data: URL, never a
path on the server), the file name and the caption; a caption edited in its cell is saved to the
image's caption file by "Save captions"."""

from __future__ import annotations

import time

import pytest

from tests.conftest import ARTIFACTS
from tests.train_tab_browser import train_tab_page
from tests.training_data import smooth_image

pytestmark = pytest.mark.browser
WAIT_MS = 60_000


def _wait_for_file_text(path, expected: str, timeout_s: float = 60.0) -> str:
    """The caption file once it holds ``expected`` (the save runs after the click returns)."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
        if text == expected:
            break
        time.sleep(0.2)
    return text


def test_caption_table_shows_thumbnails_and_saves_an_inline_edit(tiny_models, tmp_path):
    models = tmp_path / "models"
    folder = models / "datasets" / "foxes"
    folder.mkdir(parents=True)
    for i, name in enumerate(["a", "b", "c"]):
        smooth_image(i, (320, 240)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"fox {name}\n", encoding="utf-8")
    with train_tab_page(tiny_models["sd15"], tmp_path, "foxes") as page:
        page.get_by_role("button", name="Open", exact=True).click()
        table = page.locator("#train-captions")
        table.get_by_text("fox c", exact=True).wait_for(timeout=WAIT_MS)

        assert table.locator("[role=row].virtual-row").count() == 3
        for i, name in enumerate(["a", "b", "c"]):
            thumbnail = table.locator(f"[data-testid=cell-{i}-0] img")
            thumbnail.wait_for(timeout=WAIT_MS)
            assert thumbnail.get_attribute("src").startswith("data:image/webp;base64,")
            assert thumbnail.evaluate("img => img.complete && img.naturalWidth > 0")  # it decodes
            assert table.locator(f"[data-testid=cell-{i}-1]").inner_text().strip() == f"{name}.png"

        # a.png's caption changes elsewhere after the table loaded (another tab, the API, a script): the
        # save below writes only the cell edited here, never the table's stale row for a.png.
        (folder / "a.txt").write_text("fox a, changed elsewhere\n", encoding="utf-8")
        # Edit b.png's caption in its cell, then save.
        cell = table.locator("[data-testid=cell-1-2]")
        cell.dblclick()
        editor = table.locator("textarea")
        editor.wait_for(timeout=WAIT_MS)
        editor.fill("red fox, snow")
        editor.press("Enter")
        page.get_by_role("button", name="Save captions").click()
        assert _wait_for_file_text(folder / "b.txt", "red fox, snow") == "red fox, snow"
        assert (folder / "a.txt").read_text(encoding="utf-8").strip() == "fox a, changed elsewhere"  # untouched
        cell.get_by_text("red fox, snow", exact=True).wait_for(timeout=WAIT_MS)  # the reloaded table shows it

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "train_captions.png"), full_page=True)
        toasts = page.locator("[data-testid='toast-body']")  # no handler failed on the way
        assert toasts.count() == 0, toasts.all_inner_texts()
