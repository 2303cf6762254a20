"""The X/Y/Z plot tab in a real headless Chromium: the Generate tab's prompt as the base, an axis
picked and typed, the count preview, the confirmation a grid over max_grid_cells asks for, the grid."""

from __future__ import annotations

import re

import pytest

from tests.app_server import running_app
from tests.browser import browser_page
from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.browser


def test_grid_tab_previews_asks_to_confirm_and_draws_the_grid(tiny_models, tmp_path):
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
            env={"LORAPG_MAX_GRID_CELLS": "2"},
        ) as url,
        browser_page() as page,
    ):
        page.goto(url)
        page.get_by_text("SD 1.x, native 64px").wait_for(timeout=60_000)  # the background load finished
        page.wait_for_timeout(2500)  # let the page-load events (working-state restore) settle first
        page.locator("#prompt textarea").fill("a lighthouse on a cliff at dusk")
        steps = page.get_by_label("number input for Steps")
        steps.fill("2")
        steps.press("Enter")

        page.get_by_role("tab", name="X/Y/Z plot").click()
        kind = page.locator("#grid-x-kind input")
        kind.click()
        page.get_by_role("option", name="seed", exact=True).click()
        page.get_by_text("Seeds, 0–4294967295, e.g. 1, 2, 3").first.wait_for(timeout=30_000)  # the hint
        values = page.locator("#grid-x-values textarea")
        values.fill("1, 2, 3")
        values.press("Tab")
        preview = page.locator("#grid-preview")
        preview.get_by_text(re.compile(r"3 cells")).wait_for(timeout=30_000)
        assert "more than max_grid_cells (2)" in preview.inner_text()

        page.locator("#grid-run").click()  # not confirmed yet: refused, naming the checkbox
        page.locator("[data-testid='toast-body']").get_by_text(re.compile("I know this is 3 cells")).first.wait_for(
            timeout=30_000
        )
        assert not list(outputs.rglob("images/**/*.png"))
        page.get_by_label("I know this is 3 cells").check()
        page.locator("#grid-run").click()
        page.locator("#grid-status").get_by_text(re.compile(r"Done: 3 of 3 cells")).wait_for(timeout=120_000)
        assert page.locator("#grid-images img").count() >= 1
        assert len(list((outputs / "grids").glob("*.png"))) == 1
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "grid_tab.png"), full_page=True)
    cells = [path for path in outputs.rglob("*.png") if "grids" not in path.parts]
    assert len(cells) == 3  # every cell in the gallery
