"""The AUTOMATIC1111-compatible REST API (``--api``) on a real app on 127.0.0.1, driven by ``webuiapi``."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
import requests
import webuiapi
from diffusers import StableDiffusionPipeline
from PIL import Image

from lorapg.api.auth import api_access, parse_api_auth
from lorapg.config import Settings
from lorapg.errors import UserError
from lorapg.hosting.space_policy import space_policy
from tests.app_server import running_app
from tests.ldm_checkpoint import write_ldm_checkpoint
from tests.reproducibility import assert_same_bytes, assert_visibly_different

USER, PASSWORD = "alice", "s3cret"
SMALL = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    loras, models = root / "loras", root / "models"
    shutil.copytree(tiny_models["loras"], loras)
    shutil.copytree(tiny_models["sdxl"], models / "tiny-xl")  # a second model to switch to
    checkpoint = models / "tiny15.safetensors"  # a single-file checkpoint, listed with its hashes
    write_ldm_checkpoint(StableDiffusionPipeline.from_pretrained(tiny_models["sd15"]), checkpoint)
    with running_app(
        "--api",
        "--api-auth",
        f"{USER}:{PASSWORD},bob:pw2",
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(loras),
        "--models-dir",
        str(models),
        "--outputs",
        str(root / "outputs"),
        "--threads",
        "1",
    ) as url:
        yield {
            "url": url,
            "base": url + "sdapi/v1",
            "outputs": root / "outputs",
            "sd15": tiny_models["sd15"],
            "checkpoint": checkpoint,
        }


@pytest.fixture
def api(app):
    return webuiapi.WebUIApi(baseurl=app["base"], username=USER, password=PASSWORD, sampler="Euler a", steps=3)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def post(app, route: str, body, auth=(USER, PASSWORD)) -> requests.Response:
    return requests.post(f"{app['base']}/{route}", json=body, auth=auth, timeout=120)


# --- txt2img ------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_pixels_and_info_is_a_json_string(app, api):
    first = api.txt2img(prompt="a red star", seed=11, **SMALL)
    again = api.txt2img(prompt="a red star", seed=11, **SMALL)
    other = api.txt2img(prompt="a red star", seed=12, **SMALL)
    assert np.array_equal(pixels(first.image), pixels(again.image))  # the same computation: exact
    assert not np.array_equal(pixels(first.image), pixels(other.image))
    assert isinstance(first.json["info"], str)
    info = json.loads(first.json["info"])
    assert info["seed"] == 11 and info["all_seeds"] == [11]
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 3, 7.0)
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] and info["job_timestamp"]
    assert "Seed: 11" in info["infotexts"][0]
    # Raw base64 (no data: prefix) of a PNG that carries A1111's parameters chunk.
    raw = first.json["images"][0]
    assert not raw.startswith("data:")
    assert "Seed: 11" in Image.open(io.BytesIO(base64.b64decode(raw))).text["parameters"]


def test_a_partial_body_on_sd_gets_a1111_s_defaults_in_the_png_info_and_echo(app):
    # Raw JSON, as a script sends it, leaving fields out (webuiapi would send its own values). Two calls
    # keep it quick on a CPU: 20 steps at a small size, then A1111's 512 px at one step.
    reply = post(app, "txt2img", {"prompt": "a red star", "seed": 21, "width": 64, "height": 64})
    assert reply.status_code == 200, reply.text
    info, echoed = json.loads(reply.json()["info"]), reply.json()["parameters"]
    assert (info["steps"], info["sampler_name"]) == (20, "Euler") and info["cfg_scale"] == pytest.approx(7)
    png = Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0])))
    assert "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 21, Size: 64x64" in png.text["parameters"]
    assert (echoed["steps"], echoed["sampler_name"], echoed["cfg_scale"], echoed["width"]) == (20, "Euler", 7, 64)
    reply = post(app, "txt2img", {"prompt": "a red star", "seed": 21, "steps": 1})
    assert reply.status_code == 200, reply.text
    info, echoed = json.loads(reply.json()["info"]), reply.json()["parameters"]
    assert (info["width"], info["height"], echoed["width"], echoed["height"]) == (512, 512, 512, 512)
    assert Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0]))).size == (512, 512)


def test_random_seed_batches_and_iterations_use_consecutive_seeds(api):
    result = api.txt2img(prompt="a hill", seed=-1, batch_size=2, n_iter=2, **SMALL)
    seeds = result.info["all_seeds"]
    assert len(result.images) == 4 and seeds == list(range(seeds[0], seeds[0] + 4))
    assert result.info["seed"] == seeds[0] and len(result.info["infotexts"]) == 4


def test_a_lora_tag_changes_the_image_and_scale_zero_equals_none(api):
    plain = pixels(api.txt2img(prompt="a red star", seed=5, **SMALL).image)
    styled = api.txt2img(prompt="a red star <lora:style:1>", seed=5, **SMALL)
    zero = pixels(api.txt2img(prompt="a red star <lora:style:0>", seed=5, **SMALL).image)
    assert np.abs(pixels(styled.image) - plain).max() > 10
    # An adapter at weight 0 is another code path than no adapter: a stated tolerance, not equality.
    assert np.abs(zero - plain).max() <= 2
    assert "<lora:style:1>" in styled.info["infotexts"][0]


def test_sampler_and_scheduler_are_split_as_a1111_does(api):
    karras = api.txt2img(prompt="a cat", seed=3, sampler_name="DPM++ 2M", scheduler="karras", **SMALL)
    combined = api.txt2img(prompt="a cat", seed=3, sampler_name="DPM++ 2M Karras", scheduler="automatic", **SMALL)
    assert (karras.info["sampler_name"], karras.info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert np.array_equal(pixels(karras.image), pixels(combined.image))
    assert "Schedule type: Karras" in karras.info["infotexts"][0]


def test_save_images_records_in_the_gallery_only_when_asked(app, api):
    def pngs() -> set:
        return set(app["outputs"].rglob("*.png"))

    before = pngs()
    api.txt2img(prompt="not saved", seed=1, save_images=False, **SMALL)
    assert pngs() == before
    api.txt2img(prompt="saved", seed=1, save_images=True, **SMALL)
    assert len(pngs() - before) == 1


def test_png_info_reads_back_what_txt2img_wrote(api):
    image = api.txt2img(prompt="a blue moon", seed=21, **SMALL).image
    info = api.png_info(image)  # webuiapi sends a data: URL
    assert "a blue moon" in info.info and "Seed: 21" in info.info


# --- listings, options, model switch ------------------------------------------------------------


def test_listings_answer_in_a1111_shapes(app, api):
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in api.get_samplers()}
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())
    loras = {lora["name"]: lora for lora in api.get_loras()}
    assert {"style", "other", "triggered"} <= set(loras) and loras["style"]["path"].endswith("style.safetensors")
    # SillyTavern waits for both of these; webuiapi reads scripts when it starts.
    assert isinstance(api.get_upscalers(), list) and isinstance(api.get_latent_upscale_modes(), list)
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert set(api.get_embeddings()) == {"loaded", "skipped"}
    assert {"ram", "cuda"} <= set(api.get_memory())
    flags = api.get_cmd_flags()
    assert flags["api"] is True and PASSWORD not in json.dumps(flags)
    for route in ("sd-vae", "schedulers"):
        assert requests.get(f"{app['base']}/{route}", auth=(USER, PASSWORD), timeout=30).status_code == 200
    for route in ("refresh-loras", "refresh-checkpoints"):
        assert post(app, route, None).status_code == 200


def test_options_switch_the_model_and_ignore_unknown_keys(app, api):
    titles = api.util_get_model_names()
    assert "tiny-xl" in titles
    options = api.get_options()
    start = options["sd_model_checkpoint"]
    assert start == app["sd15"].name
    # Open WebUI posts the whole dict back with the model changed, plus keys this app lacks.
    api.set_options({**options, "sd_model_checkpoint": "tiny-xl", "some_extension_setting": [1, 2]})
    try:
        assert api.util_get_current_model() == "tiny-xl"
        result = api.txt2img(prompt="a square", seed=2, **SMALL)
        assert result.info["sd_model_name"] == "tiny-xl"
    finally:
        api.set_options({"sd_model_checkpoint": start})
    assert api.get_options()["sd_model_checkpoint"] == start
    # override_settings switches for the call too.
    result = api.txt2img(prompt="a square", seed=2, override_settings={"sd_model_checkpoint": start}, **SMALL)
    assert result.info["sd_model_name"] == start


# --- progress and interrupt ---------------------------------------------------------------------


def test_progress_is_idle_when_nothing_runs(api):
    api.txt2img(prompt="one", seed=1, **SMALL)  # after the start-up model load: nothing queued or running
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0


def wait_for_progress(api, job_no: int, sampling_step: int) -> dict:
    """Poll /progress until the running call reaches batch ``job_no`` at ``sampling_step``: an event
    the test observes (the job is long: 50 steps), never a time it assumes."""
    deadline = time.monotonic() + 120
    while True:
        progress = api.get_progress()
        state = progress["state"]
        if state["job_no"] == job_no and state["sampling_step"] >= sampling_step:
            return progress
        assert time.monotonic() < deadline, f"the generation never reached batch {job_no} step {sampling_step}"
        time.sleep(0.02)


def start_call(app, body: dict) -> tuple[threading.Thread, list]:
    replies: list = []
    worker = threading.Thread(target=lambda: replies.append(post(app, "txt2img", body)))
    worker.start()
    return worker, replies


LONG = {"prompt": "a long one", "steps": 50, "width": 64, "height": 64}


def test_interrupt_returns_what_the_call_has_and_stops_the_rest(app, api):
    """n_iter 3: batch 0 finishes, batch 1 is interrupted mid-way, batch 2 never runs."""
    worker, replies = start_call(app, {**LONG, "seed": 40, "n_iter": 3})
    progress = wait_for_progress(api, job_no=1, sampling_step=6)  # past batch 1's first preview (every 5 steps)
    state = progress["state"]
    assert state["job_count"] == 3 and state["sampling_steps"] == 50 and not state["interrupted"]
    assert 0 < progress["progress"] < 1
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.format == "PNG"
    skipped = requests.get(
        f"{app['base']}/progress", params={"skip_current_image": "true"}, auth=(USER, PASSWORD), timeout=30
    )
    assert skipped.json()["current_image"] is None
    api.interrupt()
    worker.join(120)
    reply = replies[0]
    assert reply.status_code == 200
    info = json.loads(reply.json()["info"])
    assert info["interrupted"] is True and info["all_seeds"] == [40, 41]
    # A1111 keeps state.interrupted until the next call begins.
    after = api.get_progress()["state"]
    assert after["interrupted"] is True and after["job_count"] == 0
    finished, partial = (decode(image) for image in reply.json()["images"])
    # Batch 0 ran in full: the same pixels as that seed alone. Batch 1 is its latents when interrupted.
    assert_same_bytes(finished, alone(app, seed=40))
    assert partial.size == (64, 64) and "Seed: 41" in partial.text["parameters"]
    assert_visibly_different(partial, alone(app, seed=41))
    assert api.get_progress()["state"]["interrupted"] is False  # those calls began afresh


def test_skip_stops_the_current_batch_and_goes_on_with_the_next(app, api):
    worker, replies = start_call(app, {**LONG, "seed": 50, "n_iter": 2})
    wait_for_progress(api, job_no=0, sampling_step=1)
    requests.post(f"{app['base']}/skip", auth=(USER, PASSWORD), timeout=30).raise_for_status()
    worker.join(120)
    info = json.loads(replies[0].json()["info"])
    # The skipped batch still returns its image (as A1111 does); the next batch runs in full.
    assert info["interrupted"] is False and info["all_seeds"] == [50, 51]
    skipped, full = (decode(image) for image in replies[0].json()["images"])
    assert_visibly_different(skipped, full)
    assert api.get_progress()["state"]["skipped"] is True


def alone(app, seed: int) -> Image.Image:
    """The LONG request run in full for one seed (the same fields as the interrupted call sent)."""
    reply = post(app, "txt2img", {**LONG, "seed": seed})
    return decode(reply.json()["images"][0])


def decode(raw: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(raw)))
    image.load()
    return image


# --- override_settings: clip skip, VAE; model hashes ------------------------------------------------


def test_clip_skip_2_changes_the_image_is_recorded_and_read_back(app, api):
    plain = api.txt2img(prompt="a red star", seed=8, **SMALL)
    one = api.txt2img(prompt="a red star", seed=8, override_settings={"CLIP_stop_at_last_layers": 1}, **SMALL)
    two = api.txt2img(prompt="a red star", seed=8, override_settings={"CLIP_stop_at_last_layers": 2}, **SMALL)
    assert_same_bytes(one.image, plain.image)  # 1 = no skip: the default code path
    assert np.abs(pixels(two.image) - pixels(plain.image)).max() > 10
    assert two.info["clip_skip"] == 2 and "Clip skip: 2" in two.info["infotexts"][0]
    assert "Clip skip" not in one.info["infotexts"][0]
    assert api.png_info(two.image).parameters["clip_skip"] == 2
    # As an option it stays for later calls, as in A1111, until set back.
    api.set_options({"CLIP_stop_at_last_layers": 2})
    try:
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        assert_same_bytes(api.txt2img(prompt="a red star", seed=8, **SMALL).image, two.image)
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})


@pytest.mark.parametrize("value", [0, 13, "two", [2]])
def test_a_bad_clip_skip_names_the_setting(app, value):
    reply = post(app, "txt2img", {"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": value}, **SMALL})
    assert reply.status_code == 400 and "CLIP_stop_at_last_layers" in reply.json()["errors"]


def test_sd_vae_accepts_the_models_own_vae_only(app, api):
    for name in ("Automatic", "None"):
        assert len(api.txt2img(prompt="x", seed=1, override_settings={"sd_vae": name}, **SMALL).images) == 1
    reply = post(app, "txt2img", {"prompt": "x", "override_settings": {"sd_vae": "vae-ft-mse.safetensors"}, **SMALL})
    assert reply.status_code == 400
    message = reply.json()["errors"]
    assert "sd_vae" in message and "only the model's own VAE" in message
    assert post(app, "options", {"sd_vae": "other.vae.pt"}).status_code == 400
    assert post(app, "options", {"sd_vae": "Automatic"}).status_code == 200


def test_sd_models_give_the_full_sha256_and_a1111s_short_hash(app, api):
    checkpoint = app["checkpoint"]
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    entry = next(model for model in api.get_sd_models() if model["filename"] == str(checkpoint.resolve()))
    assert entry["sha256"] == sha256 and entry["hash"] == sha256[:10]
    assert entry["title"] == f"{checkpoint.name} [{sha256[:10]}]" and entry["model_name"] == checkpoint.stem


# --- auth and bad input -------------------------------------------------------------------------


def test_every_route_needs_the_credentials(app):
    for method, route in (("get", "options"), ("get", "progress"), ("post", "txt2img"), ("get", "loras")):
        reply = requests.request(method, f"{app['base']}/{route}", json={"prompt": "x"}, timeout=30)
        assert reply.status_code == 401 and reply.headers["WWW-Authenticate"] == "Basic"
        wrong = requests.request(method, f"{app['base']}/{route}", auth=(USER, "nope"), timeout=30)
        assert wrong.status_code == 401
    assert requests.get(f"{app['base']}/options", auth=("bob", "pw2"), timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"prompt": "x", "steps": "many"}, 422, "steps"),
        ({"prompt": "x", "width": [64]}, 422, "width"),
        ({"prompt": ["x"]}, 422, "prompt"),
        ({"prompt": "x", "steps": 999, "width": 64, "height": 64}, 400, "Steps"),
        ({"prompt": "x <lora:nope:0.5>", "width": 64, "height": 64, "steps": 3}, 400, "Unknown LoRA 'nope'"),
        ({"prompt": "x", "sampler_name": "Bogus", **SMALL}, 400, "sampler_name"),
        ({"prompt": "x", "override_settings": {"sd_model_checkpoint": "missing"}, **SMALL}, 400, "sd_model_checkpoint"),
    ],
)
def test_bad_input_is_a_4xx_json_naming_the_field_and_the_app_keeps_serving(app, api, body, status, field):
    reply = post(app, "txt2img", body)
    assert reply.status_code == status
    error = reply.json()
    assert set(error) == {"error", "detail", "body", "errors"} and field in error["errors"]
    assert "Traceback" not in reply.text
    assert len(api.txt2img(prompt="still here", seed=1, **SMALL).images) == 1


def test_bad_json_and_img2img_answer_clearly(app):
    reply = requests.post(
        f"{app['base']}/txt2img",
        data="{not json",
        auth=(USER, PASSWORD),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 422 and "JSON" in reply.json()["errors"]
    reply = post(app, "img2img", {"init_images": []})
    assert reply.status_code == 400 and "init_images: send exactly one image" in reply.json()["errors"]
    reply = post(app, "png-info", {"image": "data:image/png;base64,!!!"})
    assert reply.status_code == 400 and "image" in reply.json()["errors"]


# --- who may reach the API (no server needed) ---------------------------------------------------


def access_for(**values):
    settings = Settings(**values)
    return api_access(settings, space_policy(settings, environ={}, has_gpu=False), environ={})


def test_api_is_never_open_without_a_password_beyond_loopback():
    assert access_for(api=False).enabled is False
    local = access_for(api=True)
    assert local.enabled and local.users == () and local.generated_password is None
    for reachable in ({"listen": True}, {"share": True}):
        access = access_for(api=True, **reachable)
        assert access.enabled and access.generated_password and access.users == (("api", access.generated_password),)
    settings = Settings(api=True)
    named = api_access(settings, space_policy(settings, environ={}), environ={"GRADIO_SERVER_NAME": "0.0.0.0"})
    assert named.generated_password
    given = access_for(api=True, listen=True, api_auth="a:b,c:d")
    assert given.users == (("a", "b"), ("c", "d")) and given.generated_password is None


def test_private_visitors_keep_the_api_off_unless_the_owner_sets_credentials():
    assert access_for(api=True, visitors="private").enabled is False
    assert access_for(api=True, visitors="private", api_auth="owner:pw").enabled is True


@pytest.mark.parametrize("text", ["nopassword", "user:", ":pw", "a:b,,c:d"])
def test_malformed_api_auth_is_a_user_error(text):
    with pytest.raises(UserError, match="--api-auth must look like user:password"):
        parse_api_auth(text)


def test_the_api_is_switched_on_by_flag_toml_or_environment(tmp_path):
    from app import parse_args
    from lorapg.cli import settings_from_args
    from lorapg.config import load_settings

    settings = settings_from_args(parse_args(["--api", "--api-auth", "a:b,c:d"]))
    assert settings.api is True and settings.api_auth == "a:b,c:d"
    assert settings_from_args(parse_args([])).api is False
    toml = tmp_path / "lorapg.toml"
    toml.write_text('api = true\napi_auth = "x:y"\n')
    from_file = load_settings(toml, environ={})
    assert from_file.api is True and from_file.api_auth == "x:y"
    assert load_settings(environ={"LORAPG_API": "1"}).api is True


def test_listen_without_api_auth_prints_a_generated_password_and_requires_it(tiny_models, tmp_path):
    log_path = tmp_path / "app.log"
    args = (
        "--api",
        "--listen",
        "--model",
        str(tiny_models["sd15"]),
        "--outputs",
        str(tmp_path / "out"),
        "--no-preload",
        "--threads",
        "1",
    )
    with running_app(*args, log_path=log_path) as url:
        line = next(line for line in log_path.read_text().splitlines() if "REST API protection" in line)
        password = line.rsplit("'", 2)[-2]
        assert requests.get(f"{url}sdapi/v1/options", timeout=30).status_code == 401
        assert requests.get(f"{url}sdapi/v1/options", auth=("api", password), timeout=30).status_code == 200
        for docs in ("openapi.json", "docs"):  # the API's documentation is behind the same password
            assert requests.get(f"{url}{docs}", timeout=30).status_code == 401
            assert requests.get(f"{url}{docs}", auth=("api", password), timeout=30).status_code == 200
