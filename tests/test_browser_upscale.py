"""The Upscale tab in a real headless Chromium (issue 18 items 4 and 8): an uploaded image through the
tiny ESRGAN, then the Gallery tab's "Upscale" sending a gallery image to the tab; both results land in
the gallery, ×scale in size, with A1111's "Postprocess upscaler"."""

from __future__ import annotations

import re

import pytest
from PIL import Image
from safetensors.torch import save_file

from tests.app_server import running_app
from tests.browser import browser_page
from tests.conftest import ARTIFACTS
from tests.test_upscalers import TINY, noise, tiny_esrgan_state

pytestmark = pytest.mark.browser


def choose(page, dropdown: str, name: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=re.compile(rf"^{re.escape(name)}$")).click()


def set_scale(page, value: str) -> None:
    scale = page.locator("#upscale-scale input[type=number]")
    scale.fill(value)
    scale.press("Enter")


def shown_size(page, selector: str) -> tuple[int, int]:
    """The pixel size of the image the browser shows in ``selector`` (as decoded, not as laid out)."""
    image = page.locator(f"{selector} img").first
    image.wait_for(timeout=30_000)
    return tuple(image.evaluate("img => [img.naturalWidth, img.naturalHeight]"))


def gallery_png(outputs, image_id: int) -> Image.Image:
    from lorapg.gallery.store import GalleryStore

    store = GalleryStore(outputs / "gallery.sqlite3", outputs / "images", keep=0)
    return Image.open(store.get(image_id).path)


def test_upscale_tab_and_the_gallerys_upscale_action_in_a_real_browser(tiny_models, tmp_path):
    models, outputs = tmp_path / "models", tmp_path / "outputs"
    (models / "upscalers").mkdir(parents=True)
    save_file(tiny_esrgan_state(), models / "upscalers" / f"{TINY}.safetensors")
    noise(16, 12, seed=5).save(tmp_path / "source.png")
    args = ["--model", str(tiny_models["sd15"]), "--models-dir", str(models), "--outputs", str(outputs)]
    with running_app(*args, "--threads", "1") as url, browser_page() as page:
        page.goto(url)
        page.get_by_text("SD 1.x, native 64px").wait_for(timeout=60_000)  # the background load finished
        page.wait_for_timeout(2500)  # let the page-load events (working-state restore) settle first

        # 1. An upload, the tiny 4× ESRGAN at 2×: one model pass, then Lanczos down to 32×24.
        page.get_by_role("tab", name="Upscale").click()
        page.locator("#upscale-image input[type=file]").set_input_files(str(tmp_path / "source.png"))
        page.locator("#upscale-image img").wait_for(timeout=30_000)
        choose(page, "#upscale-upscaler", TINY)
        set_scale(page, "2")
        page.locator("#upscale-run").click()
        info = page.locator("#upscale-info textarea")
        wanted = f"#1: Postprocess upscale by: 2, Postprocess upscaler: {TINY}"
        page.wait_for_function(
            "([el, text]) => el.value === text", arg=[info.element_handle(), wanted], timeout=120_000
        )
        assert shown_size(page, "#upscale-result") == (32, 24)
        first = gallery_png(outputs, 1)
        assert first.size == (32, 24)
        assert f"Postprocess upscaler: {TINY}" in first.text["parameters"]

        # 2. The Gallery tab's "Upscale": image #1 goes to the Upscale tab by its id; 4× of it is 128×96.
        page.get_by_role("tab", name="Gallery").click()
        page.locator("#gallery img").first.wait_for(timeout=30_000)
        page.locator("#gallery img").first.click()
        selected = page.locator("#gallery-selected-id input").first
        page.wait_for_function("el => el.value === '1'", arg=selected.element_handle(), timeout=30_000)
        page.locator("#gallery-send-upscale").click()
        gallery_id = page.locator("#upscale-gallery-id textarea, #upscale-gallery-id input").first
        page.wait_for_function("el => el.value === '1'", arg=gallery_id.element_handle(), timeout=30_000)
        assert page.locator("#upscale-run").is_visible()  # the tab switched to Upscale
        set_scale(page, "4")
        page.locator("#upscale-run").click()
        wanted = f"#2: Postprocess upscale by: 4, Postprocess upscaler: {TINY}"
        page.wait_for_function(
            "([el, text]) => el.value === text", arg=[info.element_handle(), wanted], timeout=120_000
        )
        assert shown_size(page, "#upscale-result") == (128, 96)
        toasts = page.locator("[data-testid='toast-body']")
        assert toasts.count() == 0, toasts.all_inner_texts()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "upscale_tab.png"), full_page=True)

    second = gallery_png(outputs, 2)
    assert second.size == (128, 96)
    assert f"Postprocess upscale by: 4, Postprocess upscaler: {TINY}" in second.text["parameters"]
