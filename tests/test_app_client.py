"""The real Gradio app on 127.0.0.1, driven through gradio_client's named endpoints."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from tests.app_server import running_app

GENERATE_DEFAULTS = {
    "negative_prompt": "",
    "steps": 3,
    "cfg_scale": 7,
    "sampler": "Euler a",
    "width": 64,
    "height": 64,
    "batch_size": 1,
}


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    loras = root / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    with running_app(
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(loras),
        "--outputs",
        str(root / "outputs"),
        "--threads",
        "1",
    ) as url:
        yield {"url": url, "loras": loras, "outputs": root / "outputs", "tiny": tiny_models}


def generate(client: Client, prompt: str, loras: str = "", seed: int = 11, **overrides):
    args = {**GENERATE_DEFAULTS, **overrides}
    return client.predict(prompt=prompt, loras=loras, seed=seed, api_name="/generate", **args)


def test_generate_with_loras_returns_pngs_with_metadata_and_the_seed(app):
    client = Client(app["url"], verbose=False)
    images, status, seed_used, job_id = generate(client, "a lighthouse", "style:0.8, other:0.3", seed=99, batch_size=2)
    assert seed_used == 99 and job_id and "seed 99" in status
    assert len(images) == 2
    text = Image.open(images[0]["image"]).text["parameters"]
    assert "<lora:style:0.8> <lora:other:0.3>" in text and "Seed: 99" in text
    # The same settings give the same pixels; the saved gallery copy is the same image.
    again = generate(client, "a lighthouse", "style:0.8, other:0.3", seed=99, batch_size=2)[0]
    assert np.array_equal(np.asarray(Image.open(images[1]["image"])), np.asarray(Image.open(again[1]["image"])))
    assert len(list(app["outputs"].rglob("*.png"))) == 4


def test_random_seed_is_returned(app):
    client = Client(app["url"], verbose=False)
    _, status, seed_used, _ = generate(client, "a hill", seed=-1)
    assert 0 <= seed_used < 2**32 and f"seed {seed_used}" in status


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"width": 20}, "Width must be 32–2048"),
        ({"width": 99999}, "Width must be 32–2048"),
        ({"seed": 2**32}, "outside 0–4294967295"),
        ({"loras": "style:1.7"}, "outside 0–1.5"),
        ({"loras": "nope:0.5"}, "Unknown LoRA 'nope'"),
        ({"loras": "../../etc/passwd:0.5"}, "outside the LoRA folder"),
        ({"loras": "broken:0.5"}, "corrupt"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_app_keeps_serving(app, overrides, message):
    client = Client(app["url"], verbose=False)
    with pytest.raises(Exception, match=message):
        generate(client, "a cat", **overrides)
    assert generate(client, "a cat")[2] == 11


def test_new_lora_files_appear_on_refresh(app):
    client = Client(app["url"], verbose=False)
    shutil.copy(app["loras"] / "other.safetensors", app["loras"] / "fresh.safetensors")
    update = client.predict([], api_name="/refresh_loras")
    names = [choice[1] if isinstance(choice, list | tuple) else choice for choice in update["choices"]]
    assert "fresh" in names and "xl/xl_style" in names


def test_several_clients_share_one_queue_in_order(app):
    """Three clients submit one after another while the first still runs; they run in that order."""
    jobs = []
    for i in range(3):
        # The first one is long, so the others are queued behind it rather than arriving after it ended.
        size = {"steps": 30, "width": 128, "height": 128} if i == 0 else {}
        job = Client(app["url"], verbose=False).submit(
            prompt=f"a tab{i} scene", loras="", seed=200 + i, api_name="/generate", **{**GENERATE_DEFAULTS, **size}
        )
        next(iter(job))  # its first update comes once the app has queued it: the next one is queued after
        jobs.append(job)
    assert [job.result()[2] for job in jobs] == [200, 201, 202]
    client = Client(app["url"], verbose=False)
    ids = []
    for i in range(3):  # gallery ids are given as each job saves its image: the order they ran
        (item,) = client.predict(f"tab{i}", "", api_name="/gallery_list")[0]
        ids.append(int(item["caption"].split()[0].lstrip("#")))
    assert ids == sorted(ids) and len(set(ids)) == 3, ids


def test_generate_parameters_have_the_names_users_know(app):
    """The API's parameter names come from the handler's; the README documents these, in this order."""
    api = Client(app["url"], verbose=False).view_api(print_info=False, return_format="dict")
    names = [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]]
    assert names == [
        "prompt",
        "negative_prompt",
        "loras",
        "steps",
        "cfg_scale",
        "sampler",
        "width",
        "height",
        "seed",
        "batch_size",
        "clip_skip",  # added after the first release: last, so positional callers keep working
        "variation_seed",
        "variation_strength",
        # img2img / inpainting, added after clip_skip for the same reason
        "init_image",
        "mask",
        "denoising_strength",
        "resize_mode",
        "mask_blur",
        "masked_content",
        "mask_invert",
        "only_masked",
        "only_masked_padding",
        # the hires fix, added after img2img
        "enable_hr",
        "hr_upscaler",
        "hr_scale",
        "hr_second_pass_steps",
        "hr_denoising_strength",
        # ControlNet (one unit), added last
        "controlnet_model",
        "controlnet_image",
        "controlnet_module",
        "controlnet_weight",
        "controlnet_guidance_start",
        "controlnet_guidance_end",
        "controlnet_resize_mode",  # added after the unit's first fields, so Reuse restores all of it
        "controlnet_threshold_a",
        "controlnet_threshold_b",
    ]


def test_clip_skip_and_prompt_syntax_reach_the_png(app):
    client = Client(app["url"], verbose=False)
    images, *_ = generate(client, "a (red:1.3) fox BREAK snow", seed=12, clip_skip=2)
    text = Image.open(images[0]["image"]).text["parameters"]
    assert text.startswith("a (red:1.3) fox BREAK snow\n") and "Clip skip: 2" in text


def test_progress_streams_and_cancel_stops_the_job(app):
    """Cancel once the job reports its first step (an event observed, not a time assumed): a 50-step job."""
    saved_before = set(app["outputs"].rglob("*.png"))
    client = Client(app["url"], verbose=False)
    job = client.submit(
        prompt="a long one",
        loras="",
        seed=5,
        api_name="/generate",
        **{**GENERATE_DEFAULTS, "steps": 50, "width": 128, "height": 128},
    )
    statuses = []
    cancelled = False
    for output in job:
        statuses.append(output[1])
        if not cancelled and "Step" in output[1]:
            client.predict(output[3], api_name="/cancel")
            cancelled = True
    assert cancelled and "Cancelled" in statuses[-1]
    # The engine now decodes what a cancelled job had (the REST API returns it), but the UI promises
    # a cancelled job leaves nothing in the gallery.
    assert set(app["outputs"].rglob("*.png")) == saved_before


def test_load_model_errors_then_switches_models(app):
    client = Client(app["url"], verbose=False)
    with pytest.raises(Exception, match="does not exist"):
        client.predict("/no/such/model", api_name="/load_model")
    status, width, height = client.predict(str(app["tiny"]["sdxl"]), api_name="/load_model")
    assert "SDXL" in status and width == 64
    _, _, seed_used, _ = generate(client, "xl now", "xl/xl_style:0.5", seed=3)
    assert seed_used == 3
    client.predict(str(app["tiny"]["sd15"]), api_name="/load_model")


def test_share_without_auth_prints_a_password_and_requires_it(tiny_models, tmp_path):
    """No internet here: Gradio cannot make the share link but keeps serving locally, password on."""
    log = tmp_path / "app.log"
    (tmp_path / "loras").mkdir()
    with running_app(
        "--model",
        str(tiny_models["sd15"]),
        "--outputs",
        str(tmp_path / "outputs"),
        "--share",
        "--lora-dir",
        str(tmp_path / "loras"),
        "--no-preload",
        log_path=log,
    ) as url:
        text = log.read_text()
        password = text.split("password '")[1].split("'")[0]
        assert len(password) >= 12
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises different types for 401
            Client(url, verbose=False)
        client = Client(url, auth=("lorapg", password), verbose=False)
        assert client.predict([], api_name="/refresh_loras")["choices"] == []
