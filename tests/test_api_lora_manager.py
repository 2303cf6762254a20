"""The LoRA manager over HTTP (``/api/v1/loras/…``) on a real app on 127.0.0.1 with a tiny SD 1.x model:
details, preview, rename, delete into the trash, restore, test; refusals as 4xx JSON naming the field."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests
from PIL import Image

from tests.app_server import running_app

AUTH = ("u", "p")


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-lora-manager")
    loras = root / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    Image.new("RGB", (8, 8), "red").save(loras / "triggered.preview.png")
    (loras / "triggered_epochs").mkdir()
    shutil.copy(loras / "triggered.safetensors", loras / "triggered_epochs" / "triggered-e0001.safetensors")
    outputs = root / "outputs"
    with running_app(
        "--api",
        "--api-auth",
        ":".join(AUTH),
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(loras),
        "--models-dir",
        str(root / "models"),
        "--outputs",
        str(outputs),
        "--threads",
        "1",
    ) as url:
        yield {"base": url + "api/v1", "loras": loras, "outputs": outputs}


def call(app, method: str, route: str, body=None) -> requests.Response:
    return requests.request(method, f"{app['base']}/{route}", json=body, auth=AUTH, timeout=120)


def test_details_with_grouped_metadata_epochs_and_preview(app):
    reply = call(app, "GET", "loras/triggered/info")
    assert reply.status_code == 200, reply.text
    lora = reply.json()
    assert lora["groups"]["tag_frequency"][0] == {"tag": "zqstyle", "count": 12}
    assert lora["groups"]["training"]["ss_base_model_version"] == "sd_v1"
    assert [e["name"] for e in lora["epochs"]] == ["triggered_epochs/triggered-e0001"]
    assert len(lora["sha256"]) == 64 and lora["civitai"] is None

    image = call(app, "GET", "loras/triggered/preview.png")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == (app["loras"] / "triggered.preview.png").read_bytes()
    none = call(app, "GET", "loras/style/preview.png")
    assert none.status_code == 404 and "has no preview image" in none.json()["errors"]
    # The library's own listing and one-LoRA route still answer beside these routes.
    assert call(app, "GET", "loras/triggered").json()["name"] == "triggered"


@pytest.mark.parametrize("route", ["loras/nope/info", "loras/nope/preview.png"])
def test_an_unknown_lora_is_404(app, route):
    reply = call(app, "GET", route)
    assert reply.status_code == 404 and reply.json()["errors"].startswith("name: no LoRA 'nope'")
    assert call(app, "DELETE", "loras/nope").status_code == 404


def test_rename_then_refusals_name_the_field(app):
    renamed = call(app, "POST", "loras/other/rename", {"new_name": "kept/other2"})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == "kept/other2" and (app["loras"] / "kept" / "other2.safetensors").is_file()
    taken = call(app, "POST", "loras/kept/other2/rename", {"new_name": "style"})
    assert taken.status_code == 400 and taken.json()["errors"].startswith("new_name: a LoRA (or its files) named")
    escaping = call(app, "POST", "loras/kept/other2/rename", {"new_name": "../../etc/x"})
    assert escaping.status_code == 400 and escaping.json()["errors"].startswith("new_name: ")
    missing = call(app, "POST", "loras/kept/other2/rename", {})
    assert missing.status_code == 422 and missing.json()["errors"].startswith("new_name:")
    assert (app["loras"] / "kept" / "other2.safetensors").is_file()


def test_delete_into_the_trash_and_restore(app):
    deleted = call(app, "DELETE", "loras/notes")
    assert deleted.status_code == 200, deleted.text
    entry = deleted.json()
    assert sorted(entry["files"]) == ["notes.json", "notes.safetensors"]
    assert not (app["loras"] / "notes.safetensors").exists()
    names = [lora["name"] for lora in call(app, "GET", "loras").json()["loras"]]
    assert "notes" not in names and not any(n.startswith(".trash") for n in names)
    assert entry["id"] in [e["id"] for e in call(app, "GET", "loras/.trash").json()]

    restored = call(app, "POST", f"loras/{entry['id']}/restore")
    assert restored.status_code == 200 and restored.json()["trigger_words"] == ["inkwash", "brush"]
    assert (app["loras"] / "notes.json").is_file()
    assert call(app, "POST", "loras/notes/restore").status_code == 404  # nothing left in the trash


def test_deleting_the_selected_lora_is_refused(app):
    state = app["outputs"] / "working_state.json"
    state.write_text(json.dumps({"version": 1, "loras": [["style_kohya", 0.7]]}), encoding="utf-8")
    try:
        reply = call(app, "DELETE", "loras/style_kohya")
        assert reply.status_code == 400
        assert reply.json()["errors"].startswith("name: LoRA 'style_kohya' is in the current LoRA selection")
        assert (app["loras"] / "style_kohya.safetensors").is_file()
    finally:
        state.unlink()


def test_test_queues_a_generation_with_the_lora(app):
    reply = call(app, "POST", "loras/triggered/test", {"steps": 2, "seed": 3})
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    deadline = time.monotonic() + 120
    while (state := call(app, "GET", f"jobs/{job_id}").json())["status"] not in ("done", "error", "cancelled"):
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    assert state["status"] == "done", state
    images = requests.get(f"{app['base']}/gallery", auth=AUTH, timeout=30).json()["images"]
    made = next(image for image in images if image["job_id"] == job_id)
    assert made["prompt"] == "zqstyle" and [(u["name"], u["scale"]) for u in made["loras"]] == [("triggered", 1.0)]
    bad = call(app, "POST", "loras/triggered/test", {"steps": 0})
    assert bad.status_code == 400 and "steps" in bad.json()["errors"].lower()


def test_the_routes_need_the_credentials(app):
    assert requests.get(f"{app['base']}/loras/.trash", timeout=30).status_code == 401
    assert requests.delete(f"{app['base']}/loras/style", timeout=30).status_code == 401
    assert (app["loras"] / "style.safetensors").is_file()


def test_loose_civitai_info_and_odd_trash_records_do_not_break_the_replies(app):
    """A hand-edited .civitai.info or entry.json is coerced or skipped, never a 500."""
    info = app["loras"] / "style_kohya.civitai.info"
    odd = app["loras"] / ".trash" / "odd"
    try:
        info.write_text(json.dumps({"modelId": "123", "trainedWords": "foo"}), encoding="utf-8")
        reply = call(app, "GET", "loras/style_kohya/info")
        assert reply.status_code == 200, reply.text
        assert reply.json()["civitai"]["trained_words"] == ["foo"] and reply.json()["civitai"]["model_id"] == 123

        odd.mkdir(parents=True)
        record = {"id": "odd", "name": "odd", "deleted_at": "yesterday", "files": ["../../odd.safetensors"]}
        (odd / "entry.json").write_text(json.dumps(record), encoding="utf-8")
        trash = call(app, "GET", "loras/.trash")
        assert trash.status_code == 200, trash.text
        assert "odd" not in [entry["id"] for entry in trash.json()]
    finally:
        info.unlink(missing_ok=True)
        shutil.rmtree(odd, ignore_errors=True)


def test_a_preview_linking_outside_the_folder_is_not_served(app, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "white").save(secret)
    link = app["loras"] / "style.preview.png"
    link.symlink_to(secret)
    try:
        reply = call(app, "GET", "loras/style/preview.png")
        assert reply.status_code == 404 and "has no preview image" in reply.json()["errors"]
    finally:
        link.unlink()
