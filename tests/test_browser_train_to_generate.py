"""Train tab → Generate tab in a real browser: a freshly trained LoRA is listed with its trigger word."""

from __future__ import annotations

import re
import shutil

import pytest
from gradio_client import Client, handle_file

from lorapg.ui.train_tab import FIELDS
from tests.app_server import running_app
from tests.browser import browser_page
from tests.conftest import ARTIFACTS
from tests.training_data import write_images

pytestmark = pytest.mark.browser

FAST_FIELDS = {
    "rank": 4,
    "alpha": 4,
    "unet_lr": 1e-3,
    "text_encoder_lr": 0,
    "train_text_encoder": False,
    "epochs": 1,
    "repeats": 1,
    "resolution": 0,
    "batch_size": 3,
    "max_steps": 0,
    "min_snr_gamma": 5,
    "noise_offset": 0,
    "lr_scheduler": "constant",
    "seed": 3,
    "face_crop": False,
    "shuffle_tags": False,
    "keep_tokens": 1,
    "caption_dropout": 0,
}


def test_trained_lora_appears_in_generate_with_its_trigger(tiny_models, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(tiny_models["loras"] / "style.safetensors", loras)
    images = write_images(tmp_path / "upload", 3)
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
        page.get_by_text("SD 1.x, native 64px").wait_for(timeout=60_000)
        page.wait_for_timeout(2500)  # page-load events (working-state restore) settle first
        # The page was opened before the LoRA existed; train it through the Train tab's endpoints.
        api = Client(url, verbose=False)
        api.predict("foxes", [handle_file(str(p)) for p in images], api_name="/dataset_add")
        status = api.predict(
            "foxes",
            "zq_fox",
            "zqfoxstyle",
            "style",
            False,
            *[FAST_FIELDS[key] for key in FIELDS],
            None,
            api_name="/train_start",
        )[0]
        assert "in the LoRA list" in status

        page.get_by_role("tab", name="Train").click()
        page.get_by_role("tab", name="Generate").click()
        page.locator("#lora-select input").click()
        option = page.get_by_role("option", name=re.compile(r"^zq_fox \(SD 1\.x\) — zqfoxstyle$"))
        option.wait_for(timeout=15_000)
        toasts = page.locator("[data-testid='toast-body']")  # no handler failed on the way
        assert toasts.count() == 0, toasts.all_inner_texts()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "trained_lora_listed.png"), full_page=True)
