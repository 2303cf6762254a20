"""The app's own jobs API (``/api/v1/generations``) and gallery API (``/api/v1/gallery``) on a real
app on 127.0.0.1, over HTTP with ``requests`` (SSE streamed with ``iter_lines``)."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable

import pytest
import requests
from gradio_client import Client
from PIL import Image

from tests.app_server import running_app

AUTH = ("u", "p")
SMALL = {"width": 64, "height": 64, "steps": 2}
TERMINAL = {"complete", "error", "cancelled"}


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-v1")
    loras = root / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    with running_app(
        "--api",
        "--api-auth",
        "u:p",
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(loras),
        "--outputs",
        str(root / "outputs"),
        "--threads",
        "1",
    ) as url:
        yield {"url": url.rstrip("/"), "outputs": root / "outputs"}


def call(app, method: str, path: str, **kwargs) -> requests.Response:
    kwargs.setdefault("auth", AUTH)
    return requests.request(method, app["url"] + path, timeout=120, **kwargs)


def submit(app, **body) -> dict:
    reply = call(app, "post", "/api/v1/generations", json={**SMALL, **body})
    assert reply.status_code == 202, reply.text
    return reply.json()


def follow(app, job_id: str, until: Callable[[str, dict], bool] = lambda name, data: False) -> list[tuple[str, dict]]:
    """The job's SSE events up to its terminal event (or the first one ``until`` accepts); then the
    connection is closed, whatever the job is doing."""
    seen: list[tuple[str, dict]] = []
    with call(app, "get", f"/api/v1/generations/{job_id}/events", stream=True) as reply:
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in reply.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                seen.append((name, json.loads(line.removeprefix("data:"))))
                if name in TERMINAL or until(*seen[-1]):
                    break
    return seen


def run_to_completion(app, **body) -> dict:
    job = submit(app, **body)
    events = follow(app, job["job_id"])
    assert events[-1][0] == "complete", events
    return events[-1][1]


def png(app, url: str) -> Image.Image:
    reply = call(app, "get", url)
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png", reply.text
    image = Image.open(io.BytesIO(reply.content))
    image.load()
    return image


# --- generations ---------------------------------------------------------------------------------


def test_a_job_streams_progress_then_complete_and_its_images_carry_parameters_and_seeds(app):
    job = submit(app, prompt="a red lighthouse <lora:style:0.5>", seed=21, batch_size=2)
    assert set(job) == {"job_id", "status", "position"} and job["status"] in {"queued", "running"}

    # A client that goes away after the first event does not cancel the job...
    first = follow(app, job["job_id"], until=lambda name, data: True)
    assert first[0][0] in {"progress", "complete"}
    # ...a second client follows it to the end: progress events, then exactly one terminal event.
    events = follow(app, job["job_id"])
    names = [name for name, _ in events]
    assert names[-1] == "complete" and set(names[:-1]) <= {"progress"}, names
    for _, data in events[:-1]:
        assert {"step", "total", "status", "preview_url"} <= set(data)
    done = events[-1][1]
    assert done["seeds"] == [21, 22] and len(done["images"]) == 2

    for url, seed in zip(done["images"], done["seeds"], strict=True):
        text = png(app, url).text["parameters"]
        assert f"Seed: {seed}" in text and "<lora:style:0.5>" in text and "Size: 64x64" in text

    state = call(app, "get", f"/api/v1/generations/{job['job_id']}").json()
    assert state["status"] == "done" and state["seeds"] == [21, 22] and state["images"] == done["images"]
    assert (state["step"], state["total"]) == (2, 2) and state["error"] is None

    # A client connecting after the end gets the terminal event at once, and nothing else.
    assert follow(app, job["job_id"]) == [("complete", done)]
    # Two steps make no preview (one comes every 5 steps).
    assert call(app, "get", f"/api/v1/generations/{job['job_id']}/preview.png").status_code == 404


def test_prompt_syntax_and_clip_skip_reach_the_png(app):
    done = run_to_completion(app, prompt="a (red:1.3) lighthouse BREAK dusk", seed=4, clip_skip=2)
    text = png(app, done["images"][0]).text["parameters"]
    assert text.startswith("a (red:1.3) lighthouse BREAK dusk\n") and "Clip skip: 2" in text
    refused = call(app, "post", "/api/v1/generations", json={"prompt": "x", "clip_skip": 13})
    assert refused.status_code in (400, 422) and "Clip skip" in refused.text, refused.text


def test_a_random_seed_is_reported_before_the_job_runs_and_used(app):
    job = submit(app, prompt="a boat", seed=-1)
    seeds = call(app, "get", f"/api/v1/generations/{job['job_id']}").json()["seeds"]
    assert len(seeds) == 1 and seeds[0] >= 0
    done = follow(app, job["job_id"])[-1][1]
    assert done["seeds"] == seeds
    assert f"Seed: {seeds[0]}" in png(app, done["images"][0]).text["parameters"]


def test_a_job_queued_behind_another_is_cancelled_and_previews_are_served(app):
    # A long job holds the queue: once it has sent a preview it is running, and has 45 steps to go.
    long_job = submit(app, prompt="a long one", steps=50, width=128, height=128, batch_size=2, seed=1)
    seen = follow(app, long_job["job_id"], until=lambda name, data: data.get("preview_url") is not None)
    assert seen[-1][0] == "progress" and seen[-1][1]["status"] == "running", seen
    assert png(app, seen[-1][1]["preview_url"]).mode == "RGB"  # the latents' quick look, as a PNG

    queued = submit(app, prompt="never drawn", seed=2)
    assert queued["status"] == "queued" and queued["position"] == 1
    cancel = call(app, "post", f"/api/v1/generations/{queued['job_id']}/cancel")
    assert cancel.status_code == 200 and cancel.json()["job_id"] == queued["job_id"]
    call(app, "post", f"/api/v1/generations/{long_job['job_id']}/cancel")

    events = follow(app, queued["job_id"])
    assert events[-1][0] == "cancelled" and "before it started" in events[-1][1]["message"]
    assert follow(app, long_job["job_id"])[-1][0] == "cancelled"
    state = call(app, "get", f"/api/v1/generations/{queued['job_id']}").json()
    assert state["status"] == "cancelled" and state["images"] == [] and state["step"] == 0


def test_the_ui_sees_api_jobs_in_its_queue_and_api_clients_see_ui_jobs(app):
    """One queue: a browser tab's generation waits behind an API job and says so, then runs."""
    long_job = submit(app, prompt="an api job", steps=50, width=128, height=128, batch_size=2, seed=1)
    seen = follow(app, long_job["job_id"], until=lambda name, data: data.get("step", 0) >= 1)
    assert seen[-1][1]["status"] == "running", seen
    client = Client(app["url"] + "/", verbose=False)
    ui_job = client.submit(
        prompt="a ui job", negative_prompt="", loras="", steps=2, cfg_scale=7, sampler="Euler a",
        width=64, height=64, seed=3, batch_size=1, api_name="/generate",
    )  # fmt: skip
    statuses = []
    for output in ui_job:
        statuses.append(output[1])
        if "job(s) ahead" in output[1]:
            call(app, "post", f"/api/v1/generations/{long_job['job_id']}/cancel")  # let the UI job run
    assert any("1 job(s) ahead" in status for status in statuses), statuses
    assert follow(app, long_job["job_id"])[-1][0] == "cancelled"
    assert ui_job.outputs()[-1][2] == 3  # the UI job ran after the API job, with its own seed


def test_unknown_jobs_are_404_and_bad_bodies_name_the_field(app):
    for method, path in (
        ("get", "/api/v1/generations/nope"),
        ("get", "/api/v1/generations/nope/events"),
        ("post", "/api/v1/generations/nope/cancel"),
        ("get", "/api/v1/generations/nope/preview.png"),
    ):
        reply = call(app, method, path)
        assert reply.status_code == 404, (path, reply.text)
        assert "No generation job 'nope'" in reply.json()["errors"]

    for body, status, words in (
        ({"prompt": "x", "stepz": 3}, 422, "stepz"),
        ({"prompt": "x", "steps": "many"}, 422, "steps"),
        ({"prompt": "x", "loras": [{"scale": 1}]}, 422, "loras.0.name"),
        ({"negative_prompt": "x"}, 422, "prompt"),
        ({"prompt": "x", "steps": 500}, 400, "Steps"),
        ({"prompt": "x", "loras": [{"name": "nope", "scale": 1}]}, 400, "nope"),
        ({"prompt": "x", "sampler": "Warp 9"}, 400, "sampler"),
    ):
        reply = call(app, "post", "/api/v1/generations", json=body)
        assert reply.status_code == status, (body, reply.text)
        assert words in reply.json()["errors"], (body, reply.text)

    assert call(app, "get", "/api/v1/generations/nope", auth=None).status_code == 401


# --- gallery -------------------------------------------------------------------------------------


def test_gallery_lists_searches_stars_shows_and_deletes_over_http(app):
    whale = run_to_completion(app, prompt="a blue whale", seed=31)["image_ids"][0]
    frog = run_to_completion(app, prompt="a green frog <lora:other:0.7>", seed=32)["image_ids"][0]

    def ids(**query) -> list[int]:
        reply = call(app, "get", "/api/v1/gallery", params=query)
        assert reply.status_code == 200, reply.text
        return [image["id"] for image in reply.json()["images"]]

    assert ids(q="blue whale") == [whale]
    assert ids(lora="other") == [frog]
    newest = ids(limit=2)
    assert newest == [frog, whale] and ids(limit=1, offset=1) == [whale]

    starred = call(app, "post", f"/api/v1/gallery/{frog}/star", json={"starred": True})
    assert starred.status_code == 200 and starred.json()["starred"] is True
    assert frog in ids(starred="true") and whale not in ids(starred="true")
    assert frog not in ids(starred="false") and whale in ids(starred="false")

    record = call(app, "get", f"/api/v1/gallery/{frog}").json()
    assert record["seed"] == 32 and record["loras"][0]["name"] == "other" and record["starred"] is True
    assert "Seed: 32" in record["parameters"] and record["image_url"] == f"/api/v1/gallery/{frog}/image"
    assert "Seed: 32" in png(app, record["image_url"]).text["parameters"]

    files_before = set(app["outputs"].rglob("*.png"))
    assert call(app, "delete", f"/api/v1/gallery/{whale}").json() == {"id": whale, "deleted": True}
    assert len(files_before - set(app["outputs"].rglob("*.png"))) == 1
    assert whale not in ids()
    for method, path in (
        ("get", f"/api/v1/gallery/{whale}"),
        ("get", f"/api/v1/gallery/{whale}/image"),
        ("delete", f"/api/v1/gallery/{whale}"),
        ("post", f"/api/v1/gallery/{whale}/star"),
    ):
        reply = call(app, method, path, json={"starred": True} if method == "post" else None)
        assert reply.status_code == 404 and f"No image with id {whale}" in reply.json()["errors"], (path, reply.text)


def test_gallery_bad_queries_and_bodies_name_the_field(app):
    for method, path, body, words in (
        ("get", "/api/v1/gallery?limit=0", None, "limit"),
        ("get", "/api/v1/gallery?starred=maybe", None, "starred"),
        ("get", "/api/v1/gallery/abc", None, "image_id"),
        # Past SQLite's 64-bit integers: a field error, not an OverflowError (a 500) in the database.
        ("get", "/api/v1/gallery?offset=268887188417354694656", None, "offset"),
        ("get", "/api/v1/gallery/268887188417354694656", None, "image_id"),
        ("post", "/api/v1/gallery/1/star", {"star": True}, "starred"),
    ):
        reply = call(app, method, path, json=body)
        assert reply.status_code == 422 and words in reply.json()["errors"], (path, reply.text)
    assert call(app, "get", "/api/v1/gallery", auth=None).status_code == 401
