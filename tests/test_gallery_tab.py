"""The Gallery and PNG Info tabs served for real and called through gradio_client."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.gallery import read_png_parameters
from lorapg.services.gallery import GalleryService
from lorapg.working_state import WorkingState, WorkingValues
from tests.browser import CHROMIUM_ARGS
from tests.tiny_models import tiny_runtime

CHROMIUM = "/usr/bin/chromium"


def wait_for(condition, seconds: float = 60.0) -> None:  # a deadline for a wait, generous under load
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    from gradio_client import Client

    from lorapg.ui.app_ui import build_ui

    runtime = tiny_runtime(tmp_path_factory.mktemp("ui"))
    settings = runtime.settings
    result = runtime.service.generate(
        GenerationRequest(
            prompt="a fox",
            negative_prompt="blurry",
            loras=(LoraRequest("style", 0.7),),
            steps=2,
            width=64,
            height=64,
            seed=77,
            sampler="Euler a",
        )
    )
    demo = build_ui(
        runtime.service,
        GalleryService(runtime.gallery, runtime.library),
        WorkingState(settings.outputs / "working_state.json"),
    )
    _, url, _ = demo.queue().launch(
        prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, allowed_paths=[str(settings.outputs)]
    )
    try:
        yield Client(url, verbose=False), result.saved[0], settings, url, demo
    finally:
        demo.close()


def test_gallery_serves_pngs_with_their_parameters(app) -> None:
    client, record, *_ = app
    items, count = client.predict("", "", api_name="/gallery_list")
    assert count == "1 image(s)." and items[0]["caption"].startswith(f"#{record.id} ")
    # What the browser receives (and downloads) is the PNG file itself, metadata included.
    assert read_png_parameters(Path(items[0]["image"])) == read_png_parameters(record.path)
    assert client.predict("whale", "", api_name="/gallery_list")[0] == []

    image_id, _, details, raw, download = client.predict(record.id, api_name="/gallery_get")
    assert image_id == record.id and "Seed:** 77" in details and "<lora:style:0.7>" in raw
    assert read_png_parameters(Path(download)) == raw

    assert client.predict(record.id, api_name="/gallery_star") == f"Image #{record.id} is starred: it is never pruned."
    assert "★ starred" in client.predict(record.id, api_name="/gallery_get")[2]
    assert client.predict(record.id, api_name="/gallery_star").endswith("is no longer starred.")


def test_reuse_fills_every_generate_widget(app) -> None:
    client, record, settings, _, demo = app
    values = client.predict(record.id, settings.model, api_name="/gallery_reuse")
    prompt, negative, loras, steps, cfg, sampler, width, height, seed, batch, clip_skip, _, strength, notes = values[
        :-23
    ]
    img2img, hires, controlnet = values[-23:-14], values[-14:-9], values[-9:]
    assert list(img2img[:2]) == [None, None]  # a txt2img image: the init image and mask are cleared
    assert hires[0] is False  # no hires fix: it is switched off (the other hires fields keep their values)
    assert list(controlnet[:2]) == ["None", None]  # no ControlNet: no model, no control image
    assert (prompt, negative, steps, cfg, sampler, width, height, seed, batch, clip_skip, strength) == (
        "a fox",
        "blurry",
        2,
        7.0,
        "Euler a",
        64,
        64,
        77,
        1,
        1,
        0,  # not a variation: the strength goes back to 0 (off)
    )
    assert notes == ""
    # The LoRAs travel in session state the API does not return (the selection is cleared and then set
    # by a follow-up event, so the scale sliders are redrawn): read them from the Reuse handler itself.
    from lorapg.ui.gallery_tab import REUSE_TARGETS

    reuse = next(fn for fn in demo.fns.values() if fn.api_name == "gallery_reuse")
    updates = reuse.fn(record.id, None, settings.model)
    assert updates[reuse.outputs[REUSE_TARGETS.index("scales")]] == {"style": 0.7}
    assert updates[reuse.outputs[len(REUSE_TARGETS) + 1]] == ["style"]  # the follow-up selects exactly these
    assert any(choice[1] == "style" for choice in loras["choices"])


def test_png_info_and_bad_ids(app) -> None:
    from gradio_client import handle_file

    client, record, *_ = app
    summary, raw = client.predict(handle_file(str(record.path)), api_name="/png_info")
    assert "style at 0.7: found by name" in summary and raw.startswith("a fox <lora:style:0.7>")
    with pytest.raises(Exception, match="No image with id 999"):
        client.predict(999, api_name="/gallery_get")


@pytest.mark.browser
def test_reuse_and_working_state_in_a_real_browser(app, tmp_path: Path) -> None:
    """Restore the working prompt on page load, save it as it changes, and Reuse from the gallery:
    the Generate tab opens with every value, the LoRA scale slider included."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium at /usr/bin/chromium")
    _, record, settings, url, _ = app
    working = WorkingState(settings.outputs / "working_state.json")
    working.save(WorkingValues(prompt="restored prompt", keywords="kept", loras=(("style", 1.1),), seed=9, clip_skip=2))
    expect = playwright_api.expect
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            prompt = page.locator("#prompt textarea")
            expect(prompt).to_have_value("restored prompt", timeout=15_000)
            expect(page.locator("input[aria-label='number input for style — scale']")).to_have_value("1.1")
            clip_skip = page.locator("input[aria-label='number input for Clip skip (SD 1.x)']")
            expect(clip_skip).to_have_value("2")

            prompt.fill("typed, not yet generated")
            wait_for(lambda: working.load().prompt == "typed, not yet generated")

            page.get_by_role("tab", name="Gallery").click()
            page.locator("#gallery img").first.click()
            expect(page.locator("#gallery-selected-id input")).to_have_value(str(record.id), timeout=10_000)
            page.locator("#gallery-reuse").click()
            expect(prompt).to_have_value("a fox", timeout=10_000)
            expect(page.locator("#negative-prompt textarea")).to_have_value("blurry")
            expect(page.locator("input[aria-label='number input for style — scale']")).to_have_value("0.7")
            page.screenshot(path=str(tmp_path / "after-reuse.png"), full_page=True)
        finally:
            browser.close()
    wait_for(lambda: working.load().loras == (("style", 0.7),))
    saved = working.load()
    assert (saved.prompt, saved.seed, saved.sampler, saved.keywords) == ("a fox", 77, "Euler a", "kept")
    assert saved.clip_skip == 1  # the reused image's (no "Clip skip" field: 1), saved as the widget changed
