"""The Train tab's Runs section in a real browser: the estimate before the first run, two runs queued
from the form, the runs table, rows picked by clicking, Compare (curves and samples) and Train again."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ARTIFACTS
from tests.train_tab_browser import fill, set_number, train_tab_page
from tests.training_data import write_images

pytestmark = pytest.mark.browser
WAIT_MS = 300_000
# The table's visible cells (Gradio also renders a hidden table of the rows to size the columns).
CELLS = '#train-runs [role="gridcell"]'


def test_queue_two_runs_compare_them_and_train_again(tiny_models, tmp_path):
    models = tmp_path / "models"
    write_images(models / "datasets" / "foxes", 2)
    with train_tab_page(tiny_models["sd15"], tmp_path, "foxes") as page:
        fill(page, "train-name", "fox")
        fill(page, "train-trigger", "zqx_fox")
        page.get_by_text("Fields (from the preset; edit any)").click()
        set_number(page, "Max steps (0 = all epochs)", "1")
        set_number(page, "Resolution (0 = native)", "64")
        page.get_by_role("button", name="Estimate duration").click()
        estimate = page.locator("#train-estimate")
        estimate.get_by_text("unknown until the first run").wait_for(timeout=WAIT_MS)

        page.get_by_text("3. Runs: history, queue, compare").click()
        page.locator("#train-queue").click()
        page.locator("#train-runs-note").get_by_text("Queued fox").wait_for(timeout=WAIT_MS)
        fill(page, "train-name", "wolf")
        page.locator("#train-queue").click()
        page.locator("#train-runs-note").get_by_text("Queued wolf").wait_for(timeout=WAIT_MS)

        # Both runs end on the GPU queue; the table shows it after a refresh (a deadline, not a timing check).
        page.wait_for_function(
            """(ROWS) => {
              const buttons = [...document.querySelectorAll("button")];
              buttons.find((b) => b.textContent.trim() === "Refresh runs").click();
              const cells = [...document.querySelectorAll(ROWS)].map((c) => c.textContent.trim());
              return cells.filter((text) => text === "done").length === 2;
            }""",
            arg=CELLS,
            timeout=WAIT_MS,
            polling=1000,
        )
        cells = page.locator(CELLS)
        cells.filter(has_text=re.compile(r"^\s*wolf\s*$")).first.click()
        cells.filter(has_text=re.compile(r"^\s*fox\s*$")).first.click()
        ids = page.locator("#train-run-ids textarea, #train-run-ids input").first
        page.wait_for_function(
            "() => { const box = document.querySelector('#train-run-ids textarea, #train-run-ids input');"
            " return box && box.value.split(',').filter((s) => s.trim()).length === 2; }",
            timeout=WAIT_MS,
        )
        assert re.fullmatch(r"[0-9a-f]{12}, [0-9a-f]{12}", ids.input_value())

        page.locator("#train-compare").click()
        samples = page.locator("#train-compare-samples img")
        samples.nth(1).wait_for(timeout=WAIT_MS)
        assert samples.count() == 2

        page.locator("#train-again").click()
        page.wait_for_function(
            "() => { const box = document.querySelector('#train-name input, #train-name textarea');"
            " return box && box.value === 'wolf-2'; }",
            timeout=WAIT_MS,
        )
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "train_runs.png"), full_page=True)
