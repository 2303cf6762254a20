"""img2img / inpainting on the Generate tab in a real headless Chromium: upload, mask, generate."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from tests.app_server import running_app
from tests.browser import browser_page
from tests.conftest import ARTIFACTS
from tests.test_img2img import box_mask, gradient, pixels

pytestmark = pytest.mark.browser


def test_inpainting_from_the_generate_tab(tiny_models, tmp_path):
    init, mask = gradient(seed=30), box_mask()
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    args = ["--model", str(tiny_models["sd15"]), "--lora-dir", str(tiny_models["loras"])]
    with running_app(*args, "--outputs", str(tmp_path / "outputs"), "--threads", "1") as url, browser_page() as page:
        page.goto(url)
        page.get_by_text("SD 1.x, native 64px").wait_for(timeout=60_000)  # the background load finished
        page.wait_for_timeout(2500)  # let the page-load events (working-state restore) settle first

        page.locator("#prompt textarea").fill("a fox in the snow")
        page.get_by_label("Seed (-1 = random)").fill("42")
        steps = page.get_by_label("number input for Steps")
        steps.fill("4")
        steps.press("Enter")
        page.get_by_text("img2img / inpainting").click()
        with page.expect_file_chooser() as chooser:  # the editor opens its file dialog from its upload area
            page.locator("#init-image").get_by_text("Upload an image").click()
        chooser.value.set_files(str(tmp_path / "init.png"))
        # The editor shows the upload once the server has it (its placeholder goes away).
        page.locator("#init-image").get_by_text("Upload an image").wait_for(state="hidden", timeout=30_000)
        page.locator("#mask-upload input[type=file]").set_input_files(str(tmp_path / "mask.png"))
        page.locator("#mask-upload img").wait_for(timeout=30_000)
        strength = page.get_by_label("number input for Denoising strength")
        strength.fill("1")
        strength.press("Enter")
        page.locator("#generate").click()

        page.get_by_text(re.compile(r"Done: seed 42")).wait_for(timeout=120_000)
        toasts = page.locator("[data-testid='toast-body']")
        assert toasts.count() == 0, toasts.all_inner_texts()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "img2img_section.png"), full_page=True)

        # Reuse on a fresh page (the init image is not kept across loads): the init image, the mask and
        # the settings come back from the gallery.
        page.goto(url)
        page.get_by_text("SD 1.x, native 64px").wait_for(timeout=60_000)
        page.wait_for_timeout(2500)
        page.get_by_role("tab", name="Gallery").click()
        page.locator("#gallery img").first.wait_for(timeout=30_000)
        page.locator("#gallery img").first.click()
        expect = pytest.importorskip("playwright.sync_api").expect
        # Reuse acts on the selected image: wait until the server has the selection (under load the click
        # on Reuse could otherwise reach it first, and Reuse of nothing never opens the Generate tab).
        expect(page.locator("#gallery-selected-id input")).to_have_value(re.compile(r"^\d+$"), timeout=60_000)
        page.locator("#gallery-reuse").click()
        page.get_by_text("img2img / inpainting").click(timeout=60_000)
        expect(page.get_by_label("number input for Denoising strength")).to_have_value("1", timeout=30_000)
        page.locator("#mask-upload img").wait_for(timeout=30_000)
        page.locator("#init-image").get_by_text("Upload an image").wait_for(state="hidden", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "img2img_reused.png"), full_page=True)

    results = [p for p in (tmp_path / "outputs").rglob("*.png") if not p.name.endswith((".init.png", ".mask.png"))]
    assert len(results) == 1
    result = Image.open(results[0])
    assert "Denoising strength: 1" in result.text["parameters"] and "Mask blur: 4" in result.text["parameters"]
    far = np.ones(mask.size[::-1], dtype=bool)
    far[4:52, 4:52] = False  # beyond the default blur of 4
    assert np.array_equal(pixels(result)[far], pixels(init)[far])
    assert results[0].with_name(f"{results[0].stem}.init.png").is_file()
