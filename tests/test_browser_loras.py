"""The LoRAs tab in a real headless Chromium: the list with previews, details with tag counts, rename,
delete to the trash and restore, test, and "Use in Generate" selecting the LoRA there."""

from __future__ import annotations

import re
import shutil

import pytest
from PIL import Image

from tests.app_server import running_app
from tests.browser import browser_page
from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.browser


def test_loras_tab_in_a_real_browser(tiny_models, tmp_path):
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    (loras / "broken.safetensors").unlink()
    Image.new("RGB", (16, 16), "red").save(loras / "triggered.preview.png")
    (loras / "triggered_epochs").mkdir()
    shutil.copy(loras / "triggered.safetensors", loras / "triggered_epochs" / "triggered-e0001.safetensors")
    with (
        running_app(
            "--model",
            str(tiny_models["sd15"]),
            "--lora-dir",
            str(loras),
            "--outputs",
            str(tmp_path / "outputs"),
            "--threads",
            "1",
        ) as url,
        browser_page() as page,
    ):
        page.goto(url)
        page.get_by_text("SD 1.x, native 64px").wait_for(timeout=60_000)
        page.wait_for_timeout(2500)  # page-load events (working-state restore) settle first
        open_tab(page, "loras")
        page.locator("#loras-summary").get_by_text("6 LoRA(s)").wait_for(timeout=30_000)
        table = page.locator("#loras-table")
        assert "zqstyle" in table.inner_text() and "triggered_epochs" not in table.inner_text()
        assert page.locator("#loras-previews img").count() == 1  # only triggered has a preview

        choose(page, "#loras-selected", "triggered")
        details = page.locator("#loras-details")
        details.get_by_text("triggered_epochs/triggered-e0001").wait_for(timeout=30_000)
        assert "zqstyle" in page.get_by_label("Tag frequency (training captions)").inner_text()
        page.locator("#loras-tag-chart canvas, #loras-tag-chart svg").first.wait_for(timeout=30_000)  # the chart drew

        page.get_by_label("New name").fill("inkfox")
        page.locator("#loras-rename").click()
        status = page.locator("#loras-status")
        status.get_by_text("Renamed triggered to inkfox").wait_for(timeout=30_000)
        assert (loras / "inkfox.preview.png").is_file() and (loras / "inkfox_epochs").is_dir()

        page.locator("#loras-delete").click()
        status.get_by_text("Moved inkfox to the trash").wait_for(timeout=30_000)
        assert not (loras / "inkfox.safetensors").exists()
        page.locator("#loras-restore").click()
        status.get_by_text("Restored inkfox").wait_for(timeout=30_000)
        assert (loras / "inkfox.safetensors").is_file()

        page.locator("#loras-test").click()
        status.get_by_text(re.compile(r"Test of inkfox at 1.0 with “zqstyle”")).wait_for(timeout=120_000)
        assert page.locator("#loras-test-image img").count() == 1
        red = (loras / "inkfox.preview.png").read_bytes()
        page.locator("#loras-keep-preview").click()
        status.get_by_text("Saved the test image as the preview of inkfox").wait_for(timeout=30_000)
        assert (loras / "inkfox.preview.png").read_bytes() != red  # the generated image replaced it

        page.locator("#loras-use").click()
        # The Generate tab is shown with the LoRA selected: its scale slider is drawn.
        page.get_by_label("number input for inkfox — scale").wait_for(timeout=30_000)
        toasts = page.locator("[data-testid='toast-body']")
        assert toasts.count() == 0, toasts.all_inner_texts()
        ARTIFACTS.mkdir(exist_ok=True)
        open_tab(page, "loras")
        page.screenshot(path=str(ARTIFACTS / "loras_tab.png"), full_page=True)


def choose(page, dropdown: str, name: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=re.compile(rf"^{re.escape(name)}$")).click()


def open_tab(page, tab_id: str) -> None:
    """Gradio keeps a second copy of each tab button for its overflow menu: click the one shown."""
    page.locator(f"button[role='tab'][data-tab-id='{tab_id}']:visible").first.click()
