"""Variations over HTTP on a real app on 127.0.0.1: A1111's ``subseed`` / ``subseed_strength`` on
``/sdapi/v1/txt2img``, ``variation_seed`` / ``variation_strength`` on ``/api/v1/generations``, and the
Gallery tab's Reuse and Vary through ``gradio_client``."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from gradio_client import Client
from PIL import Image

from tests.app_server import running_app
from tests.reproducibility import assert_same_bytes

AUTH = ("u", "p")
SMALL = {"width": 64, "height": 64, "steps": 3, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-variations")
    with running_app(
        "--api",
        "--api-auth",
        "u:p",
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(tiny_models["loras"]),
        "--outputs",
        str(root / "outputs"),
        "--threads",
        "1",
    ) as url:
        yield url.rstrip("/")


def post(app: str, path: str, body: dict) -> requests.Response:
    return requests.post(app + path, json=body, auth=AUTH, timeout=120)


def txt2img(app: str, **body) -> tuple[list[Image.Image], dict]:
    reply = post(app, "/sdapi/v1/txt2img", {"prompt": "a red star", "seed": 11, **SMALL, **body})
    assert reply.status_code == 200, reply.text
    data = reply.json()
    images = [Image.open(io.BytesIO(base64.b64decode(raw))) for raw in data["images"]]
    return images, json.loads(data["info"])


def test_subseed_strength_zero_is_the_plain_image(app):
    plain, _ = txt2img(app)
    zero, info = txt2img(app, subseed=5, subseed_strength=0)
    assert_same_bytes(zero[0], plain[0])
    assert (info["subseed"], info["all_subseeds"], info["subseed_strength"]) == (5, [5], 0)
    assert "Variation" not in info["infotexts"][0] and "Variation" not in zero[0].text["parameters"]


def test_subseed_varies_the_image_keeps_the_seed_and_is_written_as_a1111_does(app):
    plain, _ = txt2img(app)
    varied, info = txt2img(app, subseed=5, subseed_strength=0.3, batch_size=2, n_iter=2)
    # A1111: over strength 0 every image keeps the seed; the subseed counts up over the call.
    assert info["all_seeds"] == [11] * 4 and info["all_subseeds"] == [5, 6, 7, 8]
    assert info["subseed"] == 5 and info["subseed_strength"] == 0.3
    for index, (image, text) in enumerate(zip(varied, info["infotexts"], strict=True)):
        written = f"Variation seed: {5 + index}, Variation seed strength: 0.3,"
        assert written in text and written in image.text["parameters"] and "Seed: 11," in text
    difference = np.abs(np.asarray(varied[0], dtype=np.int16) - np.asarray(plain[0], dtype=np.int16))
    assert 0 < difference.mean() < 30  # another image, yet near the seed's own
    read = post(app, "/sdapi/v1/png-info", {"image": base64.b64encode(_png(varied[1])).decode()}).json()
    assert (read["parameters"]["variation_seed"], read["parameters"]["variation_strength"]) == (6, 0.3)


def test_a_bad_subseed_strength_is_refused_with_its_name(app):
    reply = post(app, "/sdapi/v1/txt2img", {"prompt": "x", **SMALL, "subseed_strength": 3})
    assert reply.status_code in (400, 422) and "Variation strength must be 0–1" in reply.text


def _png(image: Image.Image) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", image.text["parameters"])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def run_job(app: str, **body) -> dict:
    """POST /api/v1/generations and poll the job until it finishes; its final state."""
    reply = post(app, "/api/v1/generations", {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, **body})
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    with requests.get(f"{app}/api/v1/generations/{job_id}/events", auth=AUTH, stream=True, timeout=120) as events:
        for line in events.iter_lines(decode_unicode=True):
            if line.startswith("event:") and line.split(":", 1)[1].strip() in {"complete", "error", "cancelled"}:
                break
    return requests.get(f"{app}/api/v1/generations/{job_id}", auth=AUTH, timeout=120).json()


def test_api_v1_generations_take_a_variation_and_reuse_and_vary_restore_it(app):
    state = run_job(app, seed=21, variation_seed=-1, variation_strength=0.25, batch_size=2)
    assert state["status"] == "done", state
    first = state["variation_seeds"][0]  # picked at submit, as the seed is
    assert state["seeds"] == [21, 21] and state["variation_seeds"] == [first, first + 1]
    image = requests.get(app + state["images"][1], auth=AUTH, timeout=120)
    assert (
        f"Variation seed: {first + 1}, Variation seed strength: 0.25"
        in Image.open(io.BytesIO(image.content)).text["parameters"]
    )
    plain = run_job(app, seed=21)
    assert plain["variation_seeds"] == []
    refused = post(app, "/api/v1/generations", {"prompt": "x", "variation_strength": -0.5})
    assert refused.status_code in (400, 422) and "Variation strength" in refused.text

    # The Gallery tab, as a browser calls it: Reuse puts the variation back into the Generate tab...
    client = Client(app + "/", verbose=False)
    image_id = state["image_ids"][1]
    reused = client.predict(image_id, None, api_name="/gallery_reuse")
    *_, seed, batch, _clip_skip, variation_seed, variation_strength, _notes = reused[:-23]  # img2img 9, hires 5, CN 9
    assert (seed, variation_seed, variation_strength) == (21, first + 1, 0.25)
    # ...and Vary makes a batch of variations of the image, which lands first in the gallery.
    *_, count, notes = client.predict(image_id, "", "", None, api_name="/gallery_vary")
    assert f"4 variations of image #{image_id} (seed 21," in notes and "strength 0.25" in notes
    newest = requests.get(f"{app}/api/v1/gallery", auth=AUTH, params={"limit": 4}, timeout=120).json()["images"]
    assert [image["seed"] for image in newest] == [21] * 4
    assert {image["variation_strength"] for image in newest} == {0.25}
    seeds = sorted(image["variation_seed"] for image in newest)
    assert seeds == list(range(seeds[0], seeds[0] + 4)) and f"variation seeds {seeds[0]}–{seeds[-1]}" in notes
