"""Caption editing: the table's rows, one caption or many set (all checked before any is written,
each through ``atomic_write``), tag counts equal to the ``ss_tag_frequency`` a training run records,
find/replace, add/remove a tag everywhere; and the whole of it over real HTTP (``/api/v1/datasets``),
caption jobs included.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

import lorapg.atomic_files
from lorapg.api.auth import ApiAccess
from lorapg.api.datasets import datasets_router
from lorapg.config import Settings
from lorapg.errors import UserError
from lorapg.jobs import JobQueue
from lorapg.services.captions import CaptionService
from lorapg.training import export
from lorapg.training.config import TrainConfig
from lorapg.training.dataset import DatasetStore
from lorapg.training.trainer import Trainer
from tests.app_server import free_port
from tests.tiny_captioners import save_tiny_wd14

CAPTIONS = {
    "a.png": "red fox, snow, forest",
    "b.png": "red fox, grass",
    "c.png": "",
    "d.png": "zqx on a hill, snow",
}
AUTH = ("u", "p")


def make_service(root: Path, jobs: JobQueue | None = None, max_prompt_chars: int = 500) -> CaptionService:
    folder = root / "datasets" / "foxes"
    folder.mkdir(parents=True)
    for i, (file, caption) in enumerate(CAPTIONS.items()):
        Image.new("RGB", (256, 256), (40 * i, 90, 200)).save(folder / file)
        if caption:
            (folder / file).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    store = DatasetStore(root / "datasets")
    settings = Settings(models_dir=root, max_prompt_chars=max_prompt_chars)  # captioners in root/captioners
    return CaptionService(settings, lambda owner: store, jobs)


def test_rows_and_setting_one_caption_through_an_atomic_write(tmp_path, monkeypatch):
    service = make_service(tmp_path)
    assert service.captions("foxes") == [{"file": f, "caption": c} for f, c in CAPTIONS.items()]
    replaced: list[str] = []
    real = os.replace
    monkeypatch.setattr(lorapg.atomic_files.os, "replace", lambda s, d: (replaced.append(Path(d).name), real(s, d)))
    assert service.set_caption("foxes", "c.png", "  a   fox\nin the rain ") == {
        "file": "c.png",
        "caption": "a fox in the rain",
    }
    assert replaced == ["c.txt"]
    assert service.set_caption("foxes", "c.png", "") == {"file": "c.png", "caption": ""}
    assert not (tmp_path / "datasets" / "foxes" / "c.txt").exists()
    with pytest.raises(UserError, match="No image 'zz.png' in dataset foxes"):
        service.set_caption("foxes", "zz.png", "x")


def test_many_captions_are_all_checked_before_any_is_written(tmp_path):
    service = make_service(tmp_path, max_prompt_chars=30)
    with pytest.raises(UserError, match=r"Caption is 40 characters; at most 30 are allowed \(max_prompt_chars\)"):
        service.set_captions("foxes", {"a.png": "short", "b.png": "x" * 40})
    assert service.captions("foxes")[0]["caption"] == CAPTIONS["a.png"]  # nothing was written
    assert service.set_captions("foxes", {"a.png": "short", "b.png": CAPTIONS["b.png"]}) == ["a.png"]


def test_saving_a_table_writes_only_the_cells_edited_and_never_reverts_a_later_edit(tmp_path):
    service = make_service(tmp_path)
    shown = service.view("foxes").captions  # what the table showed when it was loaded
    assert shown == CAPTIONS
    # Meanwhile another edit (find/replace, another tab, the API) changes a.png and b.png on disk.
    service.find_replace("foxes", "red fox", "fox")
    edited = {**shown, "b.png": "red fox, meadow", "c.png": "a  fox"}  # a.png untouched in the table
    saved = service.save_captions("foxes", edited, shown)
    assert saved.changed == ["c.png"] and saved.stale == ["b.png"]
    captions = {row["file"]: row["caption"] for row in service.captions("foxes")}
    assert captions["a.png"] == "fox, snow, forest"  # not written back from the stale table
    assert captions["b.png"] == "fox, grass"  # both edited it: the later one on disk stays, the user is told
    assert captions["c.png"] == "a fox"
    assert saved.note().startswith("Saved 1 caption(s). Not saved: b.png: changed since the table was loaded")
    # Without ``expected`` (an API client sending captions): compared with the disk, as before.
    assert service.set_captions("foxes", {"a.png": "fox, snow, forest", "b.png": "fox"}) == ["b.png"]


def test_the_caption_table_has_a_thumbnail_of_each_image_and_none_of_a_file_outside(tmp_path):
    import base64
    import io

    service = make_service(tmp_path)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(outside)
    (tmp_path / "datasets" / "foxes" / "e.png").symlink_to(outside)  # a link out of the dataset folder
    rows = service.table("foxes")
    assert [row["file"] for row in rows] == [*CAPTIONS, "e.png"]
    assert [row["caption"] for row in rows[:4]] == list(CAPTIONS.values())
    for row in rows[:4]:
        prefix = "data:image/webp;base64,"
        assert row["thumbnail"].startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(row["thumbnail"][len(prefix) :]))) as thumb:
            assert max(thumb.size) <= 96
    assert rows[4]["thumbnail"] == ""  # never read: its real file is outside the dataset


def test_tag_counts_are_the_ss_tag_frequency_a_training_run_records(tmp_path):
    service = make_service(tmp_path)
    folder = tmp_path / "datasets" / "foxes"
    config = TrainConfig(name="fox", images=str(folder), trigger="zqx", repeats=3)
    trainer = Trainer(config, lora_dir=tmp_path / "loras", work_dir=tmp_path / "work")
    items = trainer._read_dataset()  # the captions the trainer trains on (and the export counts)
    metadata = export.build_metadata(
        name="fox",
        family="sd15",
        rank=4,
        alpha=4,
        trigger="zqx",
        captions=[item.caption for item in items],
        repeats=3,
        epochs=1,
        steps=1,
        resolution=(512, 512),
        started_at=0.0,
        base_model="m",
    )
    recorded = json.loads(metadata["ss_tag_frequency"])["3_zqx"]
    counts = service.tag_frequency("foxes", trigger="zqx", repeats=3)
    assert dict(counts) == recorded and list(dict(counts)) == list(recorded)  # same numbers, same order
    assert counts[:2] == [("zqx", 3), ("red fox", 2)]  # "zqx on a hill" already uses the trigger
    plain = dict(service.tag_frequency("foxes"))
    assert plain == {"red fox": 2, "snow": 2, "forest": 1, "grass": 1, "zqx on a hill": 1}


def test_find_replace_and_tags_everywhere(tmp_path):
    service = make_service(tmp_path)
    assert service.find_replace("foxes", "red fox", "fox") == ["a.png", "b.png"]
    assert service.find_replace("foxes", r"\bsnow\b", "deep snow", regex=True) == ["a.png", "d.png"]
    with pytest.raises(UserError, match="is not a valid regular expression"):
        service.find_replace("foxes", "(", "x", regex=True)
    assert service.add_tag("foxes", "outdoors") == ["a.png", "b.png", "c.png", "d.png"]
    assert service.add_tag("foxes", "zqx", position="start") == ["a.png", "b.png", "c.png", "d.png"]
    assert service.add_tag("foxes", "outdoors") == []  # every caption has it already
    assert service.remove_tag("foxes", "deep snow") == ["a.png", "d.png"]
    assert [row["caption"] for row in service.captions("foxes")] == [
        "zqx, fox, forest, outdoors",
        "zqx, fox, grass, outdoors",
        "zqx, outdoors",
        "zqx, zqx on a hill, outdoors",
    ]
    with pytest.raises(UserError, match="Tag must be one non-empty tag without commas"):
        service.add_tag("foxes", "a, b")


def test_a_replacement_the_pattern_cannot_fill_and_an_overlong_find_are_refused_before_any_change(tmp_path):
    service = make_service(tmp_path)
    before = service.captions("foxes")
    for replace in ("\\1", "\\g<name>", "x\\"):  # no group 1, no group "name", a dangling backslash
        with pytest.raises(UserError, match=r"^Replace .* is not a valid replacement for this pattern"):
            service.find_replace("foxes", "fox", replace, regex=True)
    with pytest.raises(UserError, match="^Find is 201 characters; at most 200 are allowed"):
        service.find_replace("foxes", "a" * 201, "b", regex=True)
    assert service.captions("foxes") == before
    assert service.find_replace("foxes", "(red) fox", "\\1 wolf", regex=True) == ["a.png", "b.png"]


# --- over HTTP -----------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path):
    import uvicorn
    from fastapi import FastAPI

    jobs = JobQueue()
    service = make_service(tmp_path, jobs)
    app = FastAPI()
    app.include_router(datasets_router(service, ApiAccess(True, (AUTH,))))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield {"base": f"http://127.0.0.1:{port}/api/v1/datasets", "root": tmp_path}
    finally:
        server.should_exit = True
        thread.join(10)
        jobs.close(30)


def call(api, method: str, route: str = "", body=None, auth=AUTH, **params) -> requests.Response:
    url = f"{api['base']}/{route}".rstrip("/")
    return requests.request(method, url, json=body, auth=auth, params=params or None, timeout=60)


def test_the_api_lists_edits_counts_and_captions_datasets(api):
    assert call(api, "GET", auth=None).status_code == 401
    assert call(api, "GET").json() == [{"name": "foxes", "images": 4, "captioned": 3}]
    assert call(api, "GET", "foxes/captions").json()[1] == {"file": "b.png", "caption": "red fox, grass"}
    put = call(api, "PUT", "foxes/captions/c.png", {"caption": "fox, rain"})
    assert put.status_code == 200 and put.json() == {"file": "c.png", "caption": "fox, rain"}
    many = call(api, "PUT", "foxes/captions", {"captions": {"a.png": "fox, snow", "b.png": "red fox, grass"}})
    assert many.json() == {"changed": ["a.png"]}
    tags = call(api, "GET", "foxes/tags", trigger="zqx").json()
    assert tags[0] == {"tag": "zqx", "count": 3} and {"tag": "snow", "count": 2} in tags
    assert call(api, "POST", "foxes/captions/replace", {"find": "red fox", "replace": "fox"}).json() == {
        "changed": ["b.png"]
    }
    assert call(api, "POST", "foxes/tags/add", {"tag": "wild"}).json()["changed"] == [
        "a.png",
        "b.png",
        "c.png",
        "d.png",
    ]
    assert call(api, "POST", "foxes/tags/remove", {"tag": "wild"}).json()["changed"] == [
        "a.png",
        "b.png",
        "c.png",
        "d.png",
    ]

    unknown = call(api, "GET", "nope/captions")
    assert unknown.status_code == 404 and unknown.json()["errors"].startswith("name: No dataset named 'nope'")
    no_file = call(api, "PUT", "foxes/captions/zz.png", {"caption": "x"})
    assert no_file.status_code == 404 and no_file.json()["errors"].startswith("file: no image 'zz.png'")
    bad_replace = call(api, "POST", "foxes/captions/replace", {"find": "a", "replace": "\\1", "regex": True})
    assert bad_replace.status_code == 400 and bad_replace.json()["errors"].startswith("replace: Replace '\\\\1'")
    bad = call(api, "POST", "foxes/caption", {"captioner": "wd14", "style": "poem"})
    assert bad.status_code == 400 and bad.json()["errors"].startswith("options: Caption style 'poem'")
    assert call(api, "GET", "caption-jobs/nope").status_code == 404


def test_a_caption_job_over_http_reports_per_image_and_its_result(api):
    save_tiny_wd14(api["root"] / "captioners" / "tiny-wd14")  # the API takes a folder NAME there
    started = call(api, "POST", "foxes/caption", {"captioner": "tiny-wd14", "style": "tags", "overwrite": True})
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["total"] == 4 and job["status"] in ("queued", "running", "done")
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = call(api, "GET", f"caption-jobs/{job['job_id']}").json()
    assert job["status"] == "done" and job["done"] == 4, job
    assert job["result"]["summary"] == "4 captioned, 0 kept"
    assert call(api, "GET", "foxes/captions").json()[0]["caption"].startswith("hero (character), ")

    broken = api["root"] / "captioners" / "broken"
    broken.mkdir()
    failing = call(api, "POST", "foxes/caption", {"captioner": "broken"}).json()  # fails inside the job
    while failing["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        failing = call(api, "GET", f"caption-jobs/{failing['job_id']}").json()
    assert failing["status"] == "error" and "holds neither model.onnx" in failing["error"]


def test_the_api_takes_only_known_captioners_and_folder_names_never_a_server_path(api):
    """A visitor must not load, nor learn the existence of, any folder on the server."""
    save_tiny_wd14(api["root"] / "captioners" / "tiny-wd14")
    existing = save_tiny_wd14(api["root"] / "elsewhere")  # a real model outside models/captioners
    for choice in (str(existing), str(api["root"] / "missing"), "../elsewhere", "tiny-wd14/..", "~/x", "C:x"):
        refused = call(api, "POST", "foxes/caption", {"captioner": choice})
        assert refused.status_code == 400, (choice, refused.text)
        message = refused.json()["errors"]
        assert message.startswith("captioner: Captioner ")
        assert "blip, blip2, florence2, wd14, tiny-wd14; choose one of those" in message, message
    assert call(api, "GET", "foxes/captions").json()[2]["caption"] == ""  # nothing was captioned


# --- the Train tab's Captions section, through gradio_client on a real local server ---------------


def test_the_train_tabs_captions_section_captions_counts_and_edits(tmp_path):
    import gradio as gr
    from gradio_client import Client

    from lorapg.services.training import TrainingService
    from lorapg.ui.train_tab import build_train_tab

    make_service(tmp_path / "models")
    settings = Settings(models_dir=tmp_path / "models", outputs=tmp_path / "outputs", device="cpu")
    jobs = JobQueue()
    training = TrainingService(settings, jobs)
    captions = CaptionService(settings, training.dataset_store, jobs)
    with gr.Blocks() as demo:
        build_train_tab(training, caption_service=captions)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        api = Client(demo.local_url, verbose=False)
        save_tiny_wd14(tmp_path / "models" / "captioners" / "tiny-wd14")
        wd14 = "tiny-wd14"  # the UI takes a folder NAME in models/captioners
        status, job_id, table = api.predict("foxes", wd14, "tags", 40, "zqx", False, api_name="/dataset_caption")
        assert status == "Captioning done: 1 captioned, 3 kept." and job_id
        assert table["headers"] == ["thumbnail", "file", "caption"]
        assert table["data"][2][1:] == ["c.png", "zqx, hero (character), blue theme, ^_^"]  # it had no caption
        assert table["data"][2][0].startswith('<img src="data:image/webp;base64,')

        counts = api.predict("foxes", "zqx", api_name="/dataset_tags")
        assert counts["data"][0] == ["zqx", 3]  # d.png says "zqx on a hill": kept as written
        status, table = api.predict("foxes", "red fox", "fox", False, api_name="/dataset_replace")
        assert status == "Replace: 2 caption(s) changed." and table["data"][0][2] == "fox, snow, forest"
        status, table = api.predict("foxes", "wild", "start", api_name="/dataset_add_tag")
        assert status == "Add tag: 4 caption(s) changed." and table["data"][1][2] == "wild, fox, grass"
        status, _ = api.predict("foxes", "wild", api_name="/dataset_remove_tag")
        assert status == "Remove tag: 4 caption(s) changed."
        with pytest.raises(Exception, match="Tag must be one non-empty tag without commas"):
            api.predict("foxes", "a, b", "end", api_name="/dataset_add_tag")

        # The table edited inline is saved through CaptionService: the table as shown (thumbnail, file,
        # caption) and the older two-column one a script may still send.
        shown = {"headers": table["headers"], "data": [row[:2] + ["fox, edited"] for row in table["data"][:1]]}
        api.predict("foxes", shown, api_name="/dataset_captions")
        assert captions.captions("foxes")[0]["caption"] == "fox, edited"
        api.predict(
            "foxes", {"headers": ["file", "caption"], "data": [["b.png", "fox, two"]]}, api_name="/dataset_captions"
        )
        assert captions.captions("foxes")[1]["caption"] == "fox, two"
        with pytest.raises(Exception, match=r"Caption is 9000 characters; at most 8000 are allowed"):
            api.predict(
                "foxes", {"headers": ["file", "caption"], "data": [["b.png", "x" * 9000]]}, api_name="/dataset_captions"
            )
        assert captions.captions("foxes")[1]["caption"] == "fox, two"  # the same checks as the API's

        # The table this session loaded, then an edit elsewhere (the API): a save in the tab writes only
        # the cells edited in it and never reverts the other edit with the table's stale row.
        _, table = api.predict("foxes", "fox", "start", api_name="/dataset_add_tag")
        captions.set_caption("foxes", "b.png", "b changed elsewhere")
        captions.set_caption("foxes", "c.png", "c changed elsewhere")
        rows = [row[1:] for row in table["data"]]
        rows[2][1] = "c edited in the tab"  # edited here and elsewhere since this table loaded: not saved
        rows[3][1] = "zqx, edited in the tab"
        _, _, report = api.predict(
            "foxes", {"headers": ["file", "caption"], "data": rows}, api_name="/dataset_captions"
        )
        assert [row["caption"] for row in captions.captions("foxes")][1:] == [
            "b changed elsewhere",  # the table's stale row was not written back
            "c changed elsewhere",
            "zqx, edited in the tab",
        ]
        assert report.startswith("Saved 1 caption(s). Not saved: c.png: changed since the table was loaded"), report
    finally:
        demo.close()
        jobs.close(30)


# --- training options for tag captions: shuffle, keep the first N, caption dropout ---------------


def test_step_captions_shuffle_after_the_kept_tags_and_drop_out_reproducibly():
    from lorapg.training.caption_variation import step_caption

    caption = "zqx, a, b, c, d, e"
    kwargs = dict(shuffle=True, keep_tokens=1, dropout=0.0, seed=7, index=0)
    orders = {step_caption(caption, step=step, **kwargs) for step in range(50)}
    assert len(orders) > 10 and all(order.startswith("zqx, ") for order in orders)
    assert all(sorted(order.split(", ")) == sorted(caption.split(", ")) for order in orders)
    assert step_caption(caption, step=3, **kwargs) == step_caption(caption, step=3, **kwargs)  # resumable
    two = {step_caption(caption, step=s, **{**kwargs, "keep_tokens": 2}).split(", ")[1] for s in range(50)}
    assert two == {"a"}
    dropped = [
        step_caption(caption, shuffle=False, keep_tokens=1, dropout=0.3, seed=7, step=s, index=0) for s in range(1000)
    ]
    assert set(dropped) == {"", caption} and 200 < dropped.count("") < 400
    assert step_caption(caption, shuffle=False, keep_tokens=0, dropout=0.0, seed=7, step=1, index=0) == caption


def test_the_caption_options_are_config_fields_with_ranges(tmp_path):
    from lorapg.training.config import build_config, to_toml

    config = build_config({"shuffle_tags": True, "keep_tokens": 2, "caption_dropout": 0.1})
    assert (config.shuffle_tags, config.keep_tokens, config.caption_dropout) == (True, 2, 0.1)
    assert "shuffle_tags = true" in to_toml(config) and "caption_dropout = 0.1" in to_toml(config)
    with pytest.raises(UserError, match="caption_dropout"):
        build_config({"caption_dropout": 1.5})


def test_the_trainer_trains_on_shuffled_and_dropped_captions(tiny_models, tmp_path, monkeypatch):
    import torch

    from lorapg.training.config import build_config
    from tests.training_data import write_images

    images = tmp_path / "images"
    for path in write_images(images, 2):
        path.with_suffix(".txt").write_text("a, b, c, d", encoding="utf-8")
    seen: list[str] = []
    real = Trainer._encode_text

    def spy(self, run, captions, device, *, cache):
        seen.extend(captions)
        return real(self, run, captions, device, cache=cache)

    monkeypatch.setattr(Trainer, "_encode_text", spy)
    values = dict(
        name="shuffled",
        model=str(tiny_models["sd15"]),
        images=str(images),
        trigger="zqx",
        rank=4,
        epochs=20,
        max_steps=12,
        sample_steps=0,
        gradient_checkpointing=False,
        seed=7,
    )

    def train(folder, **options):
        seen.clear()
        config = build_config({**values, **options})
        Trainer(config, lora_dir=folder / "loras", work_dir=folder / "work", device=torch.device("cpu")).run()
        return list(seen)

    plain = train(tmp_path / "plain")
    assert set(plain) == {"zqx, a, b, c, d"}
    varied = train(tmp_path / "varied", shuffle_tags=True, caption_dropout=0.25)
    assert len(varied) == 12 and "" in varied and len(set(varied)) > 3
    for caption in filter(None, varied):
        assert caption.startswith("zqx, ") and sorted(caption.split(", ")) == ["a", "b", "c", "d", "zqx"]
