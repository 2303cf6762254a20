"""Train tab in a real browser: Start asks for notification permission, the run's end shows a browser
notification, and the app's ``--notify-webhook`` receives the same run's POST."""

from __future__ import annotations

import pytest

from lorapg.ui.train_tab import ASK_NOTIFICATION_JS, NOTIFY_JS
from tests.conftest import ARTIFACTS
from tests.test_notifications import WAIT, Receiver
from tests.train_tab_browser import fill, set_number, train_tab_page
from tests.training_data import write_images

pytestmark = pytest.mark.browser

# Chromium headless has no notification UI: record what the page asks for instead. Permission starts
# "default" and becomes "granted" when asked, as when a user clicks Allow.
RECORD_NOTIFICATIONS = """
window.__notes = [];
window.__asked = 0;
class RecordingNotification {
  static permission = "default";
  static requestPermission() {
    window.__asked += 1;
    RecordingNotification.permission = "granted";
    return Promise.resolve("granted");
  }
  constructor(title, options) { window.__notes.push({title, body: (options || {}).body || ""}); }
}
window.Notification = RecordingNotification;
"""


def test_a_run_started_in_the_tab_ends_with_a_browser_notification(tiny_models, tmp_path):
    models = tmp_path / "models"
    write_images(models / "datasets" / "foxes", 3)  # listed in the tab's dataset menu when the app starts
    receiver = Receiver()
    try:
        with train_tab_page(
            tiny_models["sd15"],
            tmp_path,
            "foxes",
            "--notify-webhook",
            receiver.url,
            init_script=RECORD_NOTIFICATIONS,
        ) as page:
            fill(page, "train-name", "fox")
            fill(page, "train-trigger", "zqx_fox")
            page.get_by_text("Fields (from the preset; edit any)").click()
            set_number(page, "Max steps (0 = all epochs)", "2")
            page.locator("#train-start").click()
            page.wait_for_function("window.__notes.length > 0", timeout=WAIT * 1000)
            notes = page.evaluate("window.__notes")
            assert page.evaluate("window.__asked") == 1
            assert len(notes) == 1 and notes[0]["title"] == "LoRA Playground: training ended"
            assert notes[0]["body"].startswith("Done: LoRA fox")
            _, payload = receiver.next()
            assert payload["run"] == "fox" and payload["status"] == "done"
            assert payload["lora_path"].endswith("fox.safetensors")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "train_notification.png"), full_page=True)
            # Permission denied, then no Notification at all: the same script shows nothing and throws nothing.
            page.evaluate("window.Notification.permission = 'denied'")
            page.evaluate(f"({NOTIFY_JS})('job2', 'Done: LoRA fox2')")
            page.evaluate("delete window.Notification")
            page.evaluate(f"({NOTIFY_JS})('job3', 'Done: LoRA fox3')")
            page.evaluate(f"({ASK_NOTIFICATION_JS})()")
            assert page.evaluate("window.__notes.length") == 1
    finally:
        receiver.close()
