"""Variations in a real headless Chromium: the Variation accordion, then Vary and Reuse in the Gallery tab."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from tests.app_server import running_app
from tests.browser import browser_page
from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.browser


def test_variation_accordion_vary_and_reuse_in_a_real_browser(tiny_models, tmp_path):
    outputs = tmp_path / "outputs"
    with (
        running_app(
            "--model",
            str(tiny_models["sd15"]),
            "--lora-dir",
            str(tiny_models["loras"]),
            "--outputs",
            str(outputs),
            "--threads",
            "1",
        ) as url,
        browser_page() as page,
    ):
        page.goto(url)
        page.get_by_text("SD 1.x, native 64px").wait_for(timeout=60_000)  # the background load finished
        page.wait_for_timeout(2500)  # let the page-load events (working-state restore) settle first

        page.locator("#prompt textarea").fill("a lighthouse on a cliff at dusk")
        page.get_by_label("Seed (-1 = random)").fill("1234")
        steps = page.get_by_label("number input for Steps")
        steps.fill("3")
        steps.press("Enter")
        page.locator("#variation").get_by_text("Variation", exact=True).click()  # open the accordion
        page.get_by_label("Variation seed (random: -1)").fill("5")
        strength = page.get_by_label("number input for Variation strength (0 = off)")
        strength.fill("0.3")
        strength.press("Enter")
        page.locator("#generate").click()
        page.get_by_text(re.compile(r"Done: seed 1234")).wait_for(timeout=120_000)
        (made,) = list(outputs.rglob("*.png"))
        assert "Variation seed: 5, Variation seed strength: 0.3" in Image.open(made).text["parameters"]

        page.get_by_role("tab", name="Gallery").click()
        page.locator("#gallery img").first.wait_for(timeout=30_000)
        page.locator("#gallery img").first.click()
        page.locator("#gallery-details").get_by_text("seed 5 at strength 0.3").wait_for(timeout=30_000)
        page.locator("#gallery-vary").click()
        page.locator("#gallery-notes").get_by_text(re.compile(r"4 variations of image #1")).wait_for(timeout=120_000)
        assert len(list(outputs.rglob("*.png"))) == 5

        page.locator("#gallery-reuse").click()  # the image selected before Vary: the variation itself
        page.locator("#prompt textarea").wait_for(timeout=30_000)
        assert page.get_by_label("Variation seed (random: -1)").input_value() == "5"
        assert page.get_by_label("number input for Variation strength (0 = off)").input_value() == "0.3"
        toasts = page.locator("[data-testid='toast-body']")
        assert toasts.count() == 0, toasts.all_inner_texts()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "variations.png"), full_page=True)
