"""Train tab's crop preview in a real browser: the crops gallery appears, a click on an image sets its focus
point (stored in the dataset's sidecar), and the crop listed for it moves there."""

from __future__ import annotations

import json

import pytest

from lorapg.training.cropping import FOCUS_FILE
from tests.conftest import ARTIFACTS
from tests.train_tab_browser import train_tab_page
from tests.training_data import smooth_image

pytestmark = pytest.mark.browser
WAIT_MS = 60_000


def test_click_on_a_crop_preview_sets_the_focus_point(tiny_models, tmp_path):
    models = tmp_path / "models"
    folder = models / "datasets" / "wide"
    folder.mkdir(parents=True)
    smooth_image(5, (800, 400)).save(folder / "wide.png")
    smooth_image(6, (400, 400)).save(folder / "square.png")
    with train_tab_page(tiny_models["sd15"], tmp_path, "wide") as page:
        page.get_by_text("Crops (the bucket and box each image trains at)").click()
        page.locator("#train-show-crops").click()
        thumbnails = page.locator("#train-crops button img")
        thumbnails.nth(1).wait_for(timeout=WAIT_MS)
        page.locator("#train-crops").get_by_text("wide.png", exact=False).first.wait_for(timeout=WAIT_MS)
        # Gallery order is the dataset's (sorted): square.png, then wide.png.
        thumbnails.nth(1).click()
        preview = page.locator("#train-crop-focus img")
        preview.wait_for(timeout=WAIT_MS)
        box = preview.bounding_box()
        preview.click(position={"x": box["width"] * 0.15, "y": box["height"] * 0.5})
        page.get_by_text("Focus of wide.png set").wait_for(timeout=WAIT_MS)
        stored = json.loads((folder / FOCUS_FILE).read_text(encoding="utf-8"))["focus"]
        x, y = stored["wide.png"]
        assert 0.1 < x < 0.2 and 0.4 < y < 0.6, stored
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "train_crops.png"), full_page=True)
        toasts = page.locator("[data-testid='toast-body']")  # no handler failed on the way
        assert toasts.count() == 0, toasts.all_inner_texts()
