"""``/api/v1/training`` on a real app on 127.0.0.1: multipart upload, the SSE stream to ``complete``,
the LoRA in ``/sdapi/v1/loras``, bad uploads refused, the run list, cancel and resume."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator

import pytest
import requests

from tests.app_server import running_app
from tests.training_data import smooth_image

AUTH = ("u", "p")
# Tiny and quick: no sample images unless a test asks; two images, one step each.
FAST = {"rank": "4", "batch_size": "2", "sample_steps": "0"}


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-training")
    with running_app(
        "--api",
        "--api-auth",
        "u:p",
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(root / "loras"),
        "--models-dir",
        str(root / "models"),
        "--outputs",
        str(root / "outputs"),
        "--threads",
        "1",
        # Small upload limits, so that going past them costs a few MB (all test images are far smaller).
        env={"LORAPG_MAX_UPLOAD_MB": "2", "LORAPG_MAX_UNPACKED_MB": "1"},
    ) as url:
        yield {"url": url, "api": url + "api/v1/training", "root": root}


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    smooth_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def image_files(count: int = 2, first_seed: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    files = []
    for seed in range(first_seed, first_seed + count):
        files.append(("images", (f"img{seed}.png", png(seed), "image/png")))
        files.append(("images", (f"img{seed}.txt", f"a picture, pattern {seed}".encode(), "text/plain")))
    return files


def start(app, fields: dict[str, str], files) -> requests.Response:
    return requests.post(app["api"], data=fields, files=files, auth=AUTH, timeout=120)


def events(app, job_id: str) -> Iterator[tuple[str, dict]]:
    """The run's Server-Sent Events as (event, data), read as a raw HTTP client reads them."""
    with requests.get(f"{app['api']}/{job_id}/events", auth=AUTH, stream=True, timeout=300) as reply:
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in reply.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                yield name, json.loads(line.split(":", 1)[1])


def assert_refused(reply: requests.Response, status: int, *words: str) -> None:
    assert reply.status_code == status, reply.text
    message = reply.json()["errors"]
    for word in words:
        assert word in message, message


def test_upload_trains_streams_to_complete_and_the_lora_is_listed(app):
    fields = {"name": "apifox", "trigger_word": "zqx_apifox", "preset": "concept", "max_steps": "3", **FAST}
    fields["sample_steps"] = "1"  # one sample image, at the end
    reply = start(app, fields, image_files(2))
    assert reply.status_code == 202, reply.text
    started = reply.json()
    assert started["status"] in {"queued", "running"} and started["estimated_duration_seconds"] > 0
    # A client that reads one event and hangs up does not stop the run: the next one sees it complete.
    first = events(app, started["job_id"])
    assert next(first)[0] == "progress"
    first.close()
    seen = list(events(app, started["job_id"]))
    names = [name for name, _ in seen]
    assert names[-1] == "complete" and set(names[:-1]) == {"progress"}, names
    steps = [data["step"] for name, data in seen if name == "progress"]
    assert steps == sorted(steps) and steps[-1] == 3  # max_steps bounds the preset's epochs
    last = seen[-2][1]
    assert (last["total_steps"], last["percent"]) == (3, 100.0) and last["loss"] is not None
    sample_urls = [data["sample_url"] for name, data in seen if "sample_url" in data]
    assert sample_urls and sample_urls[-1].endswith("/samples/1.png")
    sample = requests.get(app["url"] + sample_urls[-1].lstrip("/"), auth=AUTH, timeout=30)
    assert sample.status_code == 200 and sample.content.startswith(b"\x89PNG")
    complete = seen[-1][1]
    assert complete["lora_name"] == "apifox" and complete["lora_path"].endswith("apifox.safetensors")
    loras = requests.get(app["url"] + "sdapi/v1/loras", auth=AUTH, timeout=30).json()
    assert "apifox" in [lora["name"] for lora in loras]
    # A late client gets the current state first, then the outcome.
    late = list(events(app, started["job_id"]))
    assert [name for name, _ in late] == ["progress", "complete"] and late[0][1]["percent"] == 100.0
    # The list shows the run; the run's page has its loss curve.
    listed = {run["job_id"]: run for run in requests.get(app["api"], auth=AUTH, timeout=30).json()}
    assert listed[started["job_id"]]["status"] == "done" and listed[started["job_id"]]["name"] == "apifox"
    detail = requests.get(f"{app['api']}/{started['job_id']}", auth=AUTH, timeout=30).json()
    assert [point["step"] for point in detail["losses"]] == [1, 2, 3] and detail["lora_name"] == "apifox"
    # The same name again is refused (the LoRA exists), with the field to change named.
    assert_refused(start(app, fields, image_files(2)), 400, "apifox", "already exists")


def test_a_non_image_upload_is_refused_naming_the_file(app):
    files = [*image_files(1), ("images", ("notes.exe", b"MZ\x90\x00", "application/octet-stream"))]
    assert_refused(start(app, {"name": "badfile", "trigger_word": "zqx"}, files), 400, "notes.exe", "not an image")
    fake = [("images", ("photo.png", b"this is text, not a PNG", "image/png"))]
    assert_refused(start(app, {"name": "badfile", "trigger_word": "zqx"}, fake), 400, "photo.png", "not a readable")
    datasets = app["root"] / "models" / "datasets"
    assert not [p for p in datasets.iterdir() if p.name.startswith("badfile")]  # nothing was kept


def test_a_zip_that_escapes_its_folder_is_refused(app):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("img0.png", png(0))
        archive.writestr("../../escaped.png", png(1))
    files = [("images", ("set.zip", buffer.getvalue(), "application/zip"))]
    assert_refused(start(app, {"name": "slip", "trigger_word": "zqx"}, files), 400, "set.zip", "../../escaped.png")
    assert not list(app["root"].rglob("escaped.png"))


def test_uploads_past_the_limits_are_refused(app):
    big = [("images", ("huge.png", b"\x89PNG" + bytes(3 * 1024 * 1024), "image/png"))]
    assert_refused(start(app, {"name": "big", "trigger_word": "zqx"}, big), 413, "2 MB", "max_upload_mb")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:  # 2 MB of zeros: a few KB zipped
        archive.writestr("img0.png", png(0))
        archive.writestr("img1.png", bytes(2 * 1024 * 1024))
    files = [("images", ("bomb.zip", buffer.getvalue(), "application/zip"))]
    assert_refused(start(app, {"name": "bomb", "trigger_word": "zqx"}, files), 400, "bomb.zip", "max_unpacked_mb")
    datasets = app["root"] / "models" / "datasets"
    assert not [p for p in datasets.iterdir() if p.name.startswith(("big", "bomb"))]


def test_bad_fields_are_4xx_naming_the_field(app):
    assert_refused(start(app, {"name": "x", "trigger_word": "zqx", "rank": "0"}, image_files(1)), 422, "rank")
    assert_refused(start(app, {"name": "x", "trigger_word": "zqx"}, None), 400, "images")
    assert_refused(start(app, {"name": "x", "trigger_word": "zqx", "dataset": "nope"}, None), 400, "nope")
    missing = requests.get(f"{app['api']}/nosuchjob/events", auth=AUTH, timeout=30)
    assert_refused(missing, 404, "nosuchjob")
    assert requests.get(app["api"], timeout=30).status_code == 401


def test_tag_caption_options_are_taken_and_bad_ones_refused_naming_them(app):
    tags = {"shuffle_tags": "true", "keep_tokens": "2", "caption_dropout": "0.1"}
    fields = {"name": "tagfox", "trigger_word": "zqx_tag", "max_steps": "1", **FAST, **tags}
    reply = start(app, fields, image_files(2, first_seed=20))
    assert reply.status_code == 202, reply.text
    started = reply.json()
    assert [name for name, _ in events(app, started["job_id"])][-1] == "complete"
    config = requests.get(f"{app['api']}/runs/{started['job_id']}", auth=AUTH, timeout=30).json()["config"]
    assert config["shuffle_tags"] is True and config["keep_tokens"] == 2
    assert config["caption_dropout"] == pytest.approx(0.1)
    # Out of range on the upload form: 422 naming the field, before anything is stored.
    for key, value in (("keep_tokens", "-1"), ("caption_dropout", "1.5")):
        bad = {"name": "badtags", "trigger_word": "zqx", **FAST, key: value}
        assert_refused(start(app, bad, image_files(1)), 422, key)
    # Queued by JSON, the settings go through the config check: 400 naming the field.
    body = {"name": "badtags", "trigger_word": "zqx", "dataset": started["dataset"]}
    for settings, words in (
        ({"caption_dropout": 1.5}, ("caption_dropout", "between 0 and 1")),
        ({"shuffle_tags": "maybe"}, ("shuffle_tags",)),
    ):
        refused = requests.post(f"{app['api']}/runs", json={**body, "settings": settings}, auth=AUTH, timeout=30)
        assert_refused(refused, 400, *words)


def test_cancel_gives_a_cancelled_event_and_posting_again_resumes(app):
    fields = {"name": "longfox", "trigger_word": "zqx_long", "epochs": "1000", **FAST}
    reply = start(app, fields, image_files(2, first_seed=5))
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    outcome = None
    for name, data in events(app, job_id):
        if name == "progress" and data["step"] >= 1:
            cancel = requests.post(f"{app['api']}/{job_id}/cancel", auth=AUTH, timeout=30)
            assert cancel.status_code == 200, cancel.text
        if name != "progress":
            outcome = (name, data)
    assert outcome is not None and outcome[0] == "cancelled", outcome
    stopped_at = outcome[1]["step"]
    assert stopped_at >= 1 and outcome[1]["checkpoint"]
    # The same upload and settings again continue from the checkpoint (then stop it again).
    again = start(app, fields, image_files(2, first_seed=5))
    assert again.status_code == 202, again.text
    assert again.json()["dataset"] == reply.json()["dataset"]
    again_id = again.json()["job_id"]
    for name, data in events(app, again_id):
        if name == "progress" and data["step"] > stopped_at:
            requests.post(f"{app['api']}/{again_id}/cancel", auth=AUTH, timeout=30)
    detail = requests.get(f"{app['api']}/{again_id}", auth=AUTH, timeout=30).json()
    assert detail["status"] == "cancelled" and detail["resumed_from"] == stopped_at
    # Other settings than the checkpoint's: the run fails with an `error` event that names the setting.
    changed = start(app, {**fields, "rank": "8"}, image_files(2, first_seed=5))
    assert changed.status_code == 202, changed.text
    name, data = list(events(app, changed.json()["job_id"]))[-1]
    assert name == "error" and "rank" in data["message"] and "resume" in data["message"], (name, data)
