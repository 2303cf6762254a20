"""The Generate tab in a real headless Chromium: pick LoRAs, set a scale, generate, see images."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.app_server import running_app
from tests.browser import browser_page
from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.browser


def test_generate_tab_in_a_real_browser(tiny_models, tmp_path):
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    (loras / "broken.safetensors").unlink()
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
        page.get_by_text("SD 1.x, native 64px").wait_for(timeout=60_000)  # the background load finished
        page.wait_for_timeout(2500)  # let the page-load events (working-state restore) settle first

        page.locator("#prompt textarea").fill("a lighthouse on a cliff at dusk")
        lora_input = page.locator("#lora-select input")
        lora_input.click()
        page.get_by_role("option", name=re.compile(r"^style$")).click()
        page.keyboard.press("Escape")
        scale = page.get_by_label("number input for style — scale")
        scale.wait_for(timeout=10_000)  # one scale slider per selected LoRA
        scale.fill("0.6")
        scale.press("Enter")
        # The scale reaches the hidden "name:scale" box through two server round trips (slider -> state ->
        # spec); Generate sends that box's value, so wait for it rather than race it on a busy machine.
        page.wait_for_function(
            "() => (document.querySelector('#lora-spec textarea')?.value || '').includes('style:0.6')",
            timeout=30_000,
        )
        page.get_by_label("Seed (-1 = random)").fill("1234")
        steps = page.get_by_label("number input for Steps")
        steps.fill("4")
        steps.press("Enter")
        page.locator("#generate").click()

        page.get_by_text(re.compile(r"Done: seed 1234")).wait_for(timeout=120_000)
        images = page.locator("#images img")
        assert images.count() >= 1
        # No handler failed along the way (page-load events included): Gradio shows failures as toasts.
        toasts = page.locator("[data-testid='toast-body']")
        assert toasts.count() == 0, toasts.all_inner_texts()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "generate_tab.png"), full_page=True)

    pngs = list((tmp_path / "outputs").rglob("*.png"))
    assert len(pngs) == 1
    from PIL import Image

    text = Image.open(pngs[0]).text["parameters"]
    assert "<lora:style:0.6>" in text and "Seed: 1234" in text and "Steps: 4" in text
