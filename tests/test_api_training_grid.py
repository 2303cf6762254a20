"""``POST /api/v1/training/{job_id}/grid`` on a real app on 127.0.0.1: a finished run's per-epoch LoRAs
× scales as one grid job, followed at ``/api/v1/grids/{id}``; runs it cannot grid are refused."""

from __future__ import annotations

import time

import pytest
import requests

from tests.app_server import running_app
from tests.test_api_training import AUTH, FAST, events, image_files, start


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-training-grid")
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
    ) as url:
        yield {"url": url, "api": url + "api/v1/training", "root": root}


def trained(app, name: str, epochs: int) -> str:
    """A finished run of ``epochs`` epochs (two images, one step each); its job id."""
    fields = {"name": name, "trigger_word": f"zqx_{name}", "preset": "concept", "epochs": str(epochs), **FAST}
    reply = start(app, fields, image_files(2))
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    assert [event for event, _ in events(app, job_id)][-1] == "complete"
    return job_id


def finished_grid(app, url: str) -> dict:
    state = {}
    for _ in range(600):  # the job's own state, not a timing assertion: poll until it says it ended
        state = requests.get(app["url"] + url.lstrip("/"), auth=AUTH, timeout=60).json()
        if state["status"] not in ("queued", "running"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"the grid never finished: {state}")


def test_a_finished_runs_epochs_by_scales_in_one_call(app):
    job_id = trained(app, "fox", epochs=2)
    reply = requests.post(f"{app['api']}/{job_id}/grid", json={"scales": [0.5, 1], "steps": 2}, auth=AUTH, timeout=60)
    assert reply.status_code == 202, reply.text
    accepted = reply.json()
    assert accepted["cells"] == 4 and accepted["url"] == f"/api/v1/grids/{accepted['job_id']}"  # 2 files × 2 scales
    state = finished_grid(app, accepted["url"])
    assert (state["status"], state["cell"], state["cells"], len(state["grids"])) == ("done", 4, 4, 1), state
    png = requests.get(app["url"] + state["grids"][0].lstrip("/"), auth=AUTH, timeout=60)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    used = []
    for image_id in state["image_ids"]:
        record = requests.get(f"{app['url']}api/v1/gallery/{image_id}", auth=AUTH, timeout=60).json()
        assert (record["prompt"], record["steps"]) == ("zqx_fox", 2)  # the run's sample prompt
        used += [(lora["name"], lora["scale"]) for lora in record["loras"]]
    assert sorted(used) == [("fox", 0.5), ("fox", 1.0), ("fox_epochs/fox-e0001", 0.5), ("fox_epochs/fox-e0001", 1.0)]
    # No body at all: the default scales (0.5, 0.75, 1) on the run's own sample settings.
    default = requests.post(f"{app['api']}/{job_id}/grid", auth=AUTH, timeout=60)
    assert default.status_code == 202 and default.json()["cells"] == 6, default.text
    requests.post(app["url"] + default.json()["url"].lstrip("/") + "/cancel", auth=AUTH, timeout=60)


def test_runs_it_cannot_grid_are_refused(app):
    one_epoch = trained(app, "owl", epochs=1)
    reply = requests.post(f"{app['api']}/{one_epoch}/grid", json={}, auth=AUTH, timeout=60)
    assert reply.status_code == 400, reply.text
    assert "saved no per-epoch LoRA files" in reply.json()["errors"]
    reply = requests.post(f"{app['api']}/nosuchrun/grid", json={}, auth=AUTH, timeout=60)
    assert reply.status_code == 404, reply.text
    reply = requests.post(f"{app['api']}/{one_epoch}/grid", json={"scales": [2]}, auth=AUTH, timeout=60)
    assert reply.status_code == 422 and "scales" in reply.text, reply.text
    reply = requests.post(f"{app['api']}/{one_epoch}/grid", json={"scale": [1]}, auth=AUTH, timeout=60)
    assert reply.status_code == 422 and "scale" in reply.text, reply.text  # a misspelt field is not ignored
