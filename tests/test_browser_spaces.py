"""A Space in real headless Chromium: a visitor's draft survives a reload in their browser, and a
visitor in another browser (another localStorage) starts with an empty page."""

from __future__ import annotations

import shutil

import pytest

from tests.app_server import running_app
from tests.browser import CHROMIUM_ARGS, chromium_path

pytestmark = pytest.mark.browser


def _open(context, url):
    page = context.new_page()
    page.goto(url)
    page.get_by_text("SD 1.x, native 64px").wait_for(timeout=60_000)
    page.wait_for_timeout(2500)  # the page-open events (visitor id, then the draft) settle first
    return page


def test_drafts_follow_the_browser_and_stay_private(tiny_models, tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = chromium_path()
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    env = {
        "SYSTEM": "spaces",
        "SPACE_ID": "tester/lorapg",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SSR_MODE": "False",
        "LORAPG_THREADS": "1",
    }
    with (
        running_app(
            "--model",
            str(tiny_models["sd15"]),
            "--lora-dir",
            str(loras),
            "--outputs",
            str(tmp_path / "outputs"),
            env=env,
        ) as url,
        playwright_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            alice = _open(browser.new_context(), url)
            alice.locator("#prompt textarea").fill("alice's secret lighthouse")
            alice.wait_for_timeout(2000)  # the change event writes her draft
            alice.reload()
            alice.get_by_text("SD 1.x, native 64px").wait_for(timeout=60_000)
            prompt = alice.locator("#prompt textarea")
            prompt.wait_for()
            alice.wait_for_function(
                "() => document.querySelector('#prompt textarea').value.includes('lighthouse')", timeout=20_000
            )

            bob = _open(browser.new_context(), url)
            assert bob.locator("#prompt textarea").input_value() == ""
            toasts = [p.locator("[data-testid='toast-body']") for p in (alice, bob)]
            assert all(t.count() == 0 for t in toasts), [t.all_inner_texts() for t in toasts]
        finally:
            browser.close()
    # One file per visitor (Bob's page saves its own settings too); Alice's prompt is in hers only.
    drafts = [path.read_text() for path in (tmp_path / "outputs" / "working_states").glob("*.json")]
    assert len(drafts) == 2 and sum("alice's secret lighthouse" in text for text in drafts) == 1
    assert not (tmp_path / "outputs" / "working_state.json").exists()
