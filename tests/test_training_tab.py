"""The Train tab's API (the handlers the buttons call) through gradio_client on a real local server."""

from __future__ import annotations

import gradio as gr
import pytest
from gradio_client import Client, handle_file

from lorapg.config import Settings
from lorapg.jobs import JobQueue
from lorapg.services.training import TrainingService
from lorapg.training.config import load_config
from lorapg.ui.train_tab import FIELDS, build_train_tab
from tests.training_data import smooth_image, write_images


@pytest.fixture()
def client(tiny_models, tmp_path):
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=tmp_path / "loras",
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
    )
    jobs = JobQueue()
    service = TrainingService(settings, jobs)
    with gr.Blocks() as demo:
        build_train_tab(service)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, allowed_paths=[str(tmp_path)])
    try:
        yield Client(demo.local_url, verbose=False), service, tmp_path
    finally:
        demo.close()
        jobs.shutdown()


def test_upload_validate_train_and_status(client):
    api, service, tmp_path = client
    paths = write_images(tmp_path / "up", 3)
    (tmp_path / "up" / "bad.png").write_bytes(b"not a png")
    uploads = [handle_file(str(p)) for p in [*paths, tmp_path / "up" / "img00.txt", tmp_path / "up" / "bad.png"]]
    grid, table, report, _, _ = api.predict("foxes", uploads, api_name="/dataset_add")
    assert len(grid) == 4 and table["data"][0]  # the broken file is shown too, so it can be removed
    assert table["data"][1][1:] == ["img00.png", "a picture, pattern 0"]  # after its thumbnail
    assert report.startswith("3 of 4 image(s) usable") and "bad.png: not an image" in report
    assert api.predict("foxes", api_name="/dataset_validate") == report

    fields = {
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
        "shuffle_tags": True,  # tag captions vary per step; the config file records it
        "keep_tokens": 2,
        "caption_dropout": 0.1,
    }
    plain = write_images(tmp_path / "plain", 2)
    api.predict("plain", [handle_file(str(p)) for p in plain], api_name="/dataset_add")
    status, plot, samples, job_id, toml = api.predict(
        "foxes", "ui_fox", "zqx", "style", False, *[fields[key] for key in FIELDS], "plain", api_name="/train_start"
    )
    assert "ui_fox" in status and "in the LoRA list" in status, status
    assert (tmp_path / "loras" / "ui_fox.safetensors").is_file()
    assert len(samples) == 1 and plot["data"]
    # The fields became a config file that the headless command runs as is.
    config = load_config(service.run(job_id).config_path)
    assert config.name == "ui_fox" and config.min_snr_gamma == 5 and config.preset == "style"
    # The regularization dataset (prior preservation) is passed as its folder, like the images.
    assert config.regularization_images == str(service.dataset_folder("plain").resolve())
    assert "min_snr_gamma = 5.0" in toml
    # The tag caption options: in the run's config.toml (what the headless command would run).
    saved = load_config(service.run(job_id).config_path)
    assert saved.shuffle_tags is True and saved.keep_tokens == 2 and saved.caption_dropout == pytest.approx(0.1)
    assert "shuffle_tags = true" in service.run(job_id).config_path.read_text()
    again, _, _ = api.predict(job_id, api_name="/train_status")
    assert again == status
    assert api.predict(job_id, api_name="/train_cancel").startswith("Cancelling")


def test_train_start_names_every_config_field(client):
    """Keyed inputs: each field is an API parameter named as in TrainConfig, not param_5, param_6, …"""
    api, _, _ = client
    endpoint = api.view_api(print_info=False, return_format="dict")["named_endpoints"]["/train_start"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names == [
        "dataset_name",
        "lora_name",
        "trigger_word",
        "preset_name",
        "overwrite_flag",
        *FIELDS,
        "regularization_name",
        "quantize",  # added later: last, so positional callers keep working
    ]
    # A call by name reaches the service (which refuses the dataset that does not exist).
    with pytest.raises(Exception, match="No dataset named 'one'"):
        api.predict(
            dataset_name="one", lora_name="x", trigger_word="zqx", preset_name="style", rank=4, api_name="/train_start"
        )


def test_missing_trigger_is_an_error_message(client):
    api, _, tmp_path = client
    paths = write_images(tmp_path / "up", 1)
    api.predict("one", [handle_file(str(paths[0]))], api_name="/dataset_add")
    with pytest.raises(Exception, match="trigger word is required"):
        api.predict("one", "x", "", "style", False, *[None] * len(FIELDS), None, api_name="/train_start")


@pytest.mark.parametrize(
    ("field", "value"), [("caption_dropout", 1.5), ("keep_tokens", -1)], ids=["dropout", "keep_tokens"]
)
def test_bad_tag_caption_options_are_refused_naming_the_field(client, field, value):
    api, _, tmp_path = client
    paths = write_images(tmp_path / "up", 1)
    api.predict("tags", [handle_file(str(paths[0]))], api_name="/dataset_add")
    with pytest.raises(Exception, match=f"'{field}' is {value:g}; it must be between"):
        api.predict(
            dataset_name="tags",
            lora_name="x",
            trigger_word="zqx",
            preset_name="style",
            **{field: value},
            api_name="/train_start",
        )


def test_near_duplicates_are_listed_and_removed(client):
    api, service, tmp_path = client
    paths = write_images(tmp_path / "up", 2, captions=False)
    smooth_image(0).resize((400, 400)).save(tmp_path / "up" / "img00_copy.jpg", quality=80)
    uploads = [handle_file(str(p)) for p in [*paths, tmp_path / "up" / "img00_copy.jpg"]]
    grid, _, report, _, _ = api.predict("near", uploads, api_name="/dataset_add")
    assert len(grid) == 3 and report.startswith("3 of 3 image(s) usable")
    assert "1 near duplicate(s), kept" in report and "img00_copy.jpg looks like img00.png" in report
    grid, _, report = api.predict("near", api_name="/dataset_remove_near_duplicates")
    assert len(grid) == 2 and "Removed 1 near duplicate(s): img00_copy.jpg." in report
    assert [image.file for image in service.dataset_images("near")] == ["img00.png", "img01.png"]


def test_the_caption_table_saves_through_the_caption_service_without_the_captions_section(client):
    # One save path: the tab built without a CaptionService checks and writes captions as the full one.
    api, service, tmp_path = client
    paths = write_images(tmp_path / "up", 2)
    _, table, _, _, _ = api.predict("caps", [handle_file(str(p)) for p in paths], api_name="/dataset_add")
    rows = [row[1:] for row in table["data"]]
    with pytest.raises(Exception, match=r"Caption is 9000 characters; at most 8000 are allowed"):
        api.predict(
            "caps", {"headers": ["file", "caption"], "data": [[rows[0][0], "x" * 9000]]}, api_name="/dataset_captions"
        )
    rows[0][1] = "  a   fox\nin the rain "
    _, table, report = api.predict("caps", {"headers": ["file", "caption"], "data": rows}, api_name="/dataset_captions")
    assert report.startswith("Saved 1 caption(s).") and table["data"][0][2] == "a fox in the rain"
    assert [image.caption for image in service.dataset_images("caps")][0] == "a fox in the rain"
