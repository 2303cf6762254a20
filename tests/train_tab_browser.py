"""The Train tab open in a real browser, on an app started with the tiny SD 1.5 model and a dataset picked.

Shared by the tests/test_browser_train_*.py tests so that each one starts from the same page state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.app_server import running_app
from tests.browser import browser_page


@contextmanager
def train_tab_page(
    model: Path,
    tmp_path: Path,
    dataset: str,
    *extra_args: str,
    init_script: str | None = None,
) -> Iterator:
    """Yield a page on the Train tab with ``dataset`` (a folder in ``tmp_path/models/datasets``) picked.

    ``extra_args`` go to the app's command line; ``init_script`` runs in the page before the app's own
    scripts (a test's stand-in for a browser API, for instance).
    """
    with (
        running_app(
            "--model",
            str(model),
            "--lora-dir",
            str(tmp_path / "loras"),
            "--models-dir",
            str(tmp_path / "models"),
            "--outputs",
            str(tmp_path / "outputs"),
            "--threads",
            "1",
            "--no-preload",
            *extra_args,
        ) as url,
        browser_page() as page,
    ):
        if init_script:
            page.add_init_script(init_script)
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-dataset input").click()
        page.get_by_role("option", name=dataset).click()
        yield page


def fill(page, elem_id: str, value: str) -> None:
    """Type ``value`` into the text box with ``elem_id`` (Gradio renders an input or a textarea)."""
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(value)


def set_number(page, label: str, value: str) -> None:
    """Set the field labelled ``label``; Enter commits it as a user's edit does."""
    field = page.get_by_label(label)
    field.fill(value)
    field.press("Enter")
