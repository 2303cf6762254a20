"""The X/Y/Z plot tab and the Train tab's epochs × scales grid, through gradio_client on the whole app
(build_ui over build_services, served on 127.0.0.1 in this process, so a test can hold a cell's
gallery save while it cancels)."""

from __future__ import annotations

import shutil
import threading

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from lorapg.config import Settings
from lorapg.grid.render import grid_size
from lorapg.jobs import DONE
from lorapg.services.build import build_services
from lorapg.ui.app_ui import build_ui
from tests.training_data import write_images

BASE = {
    "prompt": "a red cat",
    "negative_prompt": "",
    "loras": [],
    "steps": 2,
    "cfg_scale": 7,
    "sampler": "Euler a",
    "width": 64,
    "height": 64,
    "seed": 5,
    "clip_skip": 1,
    "variation_seed": -1,
    "variation_strength": 0,
}
NO_AXES = {"y_kind": None, "y_values": "", "z_kind": None, "z_values": ""}
MAX_CELLS = 4  # small, so the over-limit grid is quick


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid-ui")
    loras = root / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=loras,
        models_dir=root / "models",
        outputs=root / "outputs",
        threads=1,
        device="cpu",
        max_grid_cells=MAX_CELLS,
    )
    runtime = build_services(settings)
    demo = build_ui(runtime.service, runtime.gallery_service, training_service=runtime.training)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, allowed_paths=[str(root)])
    try:
        yield {"client": Client(demo.local_url, verbose=False), "runtime": runtime, "root": root}
    finally:
        demo.close()
        runtime.jobs.close()


def grid_args(x_kind: str, x_values: str, **changes) -> dict:
    return {**BASE, **NO_AXES, "x_kind": x_kind, "x_values": x_values, **changes}


def check(client: Client, *args, **changes) -> tuple[str, int]:
    preview, _confirm, cells = client.predict(**grid_args(*args, **changes), api_name="/grid_check")
    return preview, cells


def gallery_count(app) -> int:
    return len(app["runtime"].gallery.list(limit=None))


def test_the_count_preview_and_bad_axes(app):
    client = app["client"]
    preview, cells = check(client, "seed", "1,2", y_kind="lora:style", y_values="0, 1")
    assert (preview, cells) == ("**4 cells** (2 × 2), one grid.", 4)
    preview, cells = check(client, "seed", "1", z_kind="prompt-sr", z_values="cat,dog")
    assert (preview, cells) == ("**2 cells** (1 × 2), 2 grids (one per Z value).", 2)
    preview, cells = check(client, "seed", "1,2,3,4,5")
    assert cells == 5 and "more than max_grid_cells (4): tick “I know this is 5 cells”" in preview
    # A bad axis is named with what is wrong, while typing: no grid is queued.
    preview, cells = check(client, "steps", "0,2")
    assert (preview, cells) == ("⚠️ X axis: 0 is out of range; steps must be 1–50.", 0)
    preview, _ = check(client, "seed", "1", y_kind="lora-scale", y_values="0.5")
    assert preview.startswith("⚠️ Y axis (lora-scale) scales the lora-file axis' LoRA")
    preview, _ = check(client, "lora-file", "style,nosuchlora")
    assert preview.startswith("⚠️ Unknown LoRA 'nosuchlora'")
    assert check(client, None, "")[1] == 0


def test_a_grid_over_the_limit_runs_only_once_its_count_is_confirmed(app):
    client, before = app["client"], gallery_count(app)
    args = grid_args("seed", "1,2,3,4,5")
    refused = r"5 cells \(5\), more than max_grid_cells \(4\): tick “I know this is 5 cells”"
    with pytest.raises(AppError, match=refused):
        client.predict(**args, confirmed=False, cells=5, api_name="/grid")
    with pytest.raises(AppError, match="I know this is 5 cells"):  # confirmed for another count
        client.predict(**args, confirmed=True, cells=6, api_name="/grid")
    assert gallery_count(app) == before  # nothing ran
    status, images, job_id = client.predict(**args, confirmed=True, cells=5, api_name="/grid")
    assert status == f"Done: 5 of 5 cells, each in the gallery with its parameters (job `{job_id}`)."
    [grid] = images
    assert Image.open(grid["image"]).size == grid_size((64, 64), 5, 1, False)
    assert gallery_count(app) == before + 5
    # Under the limit no confirmation is needed; the LoRA axis' cells carry their scales.
    status, images, _ = client.predict(**grid_args("lora:style", "0,1"), api_name="/grid")
    assert status.startswith("Done: 2 of 2 cells") and len(images) == 1
    records = app["runtime"].gallery.list(limit=2)
    assert sorted(lora.scale for record in records for lora in record.loras) == [0.0, 1.0]


def test_cancel_stops_the_grid_after_the_current_cell(app):
    """The first cell's gallery save waits until the test has pressed Cancel: one cell, then the stop."""
    client, service = app["client"], app["runtime"].service
    sink, first_saved, cancel_sent, seen = service.result_sink, threading.Event(), threading.Event(), []

    def held_sink(result, job):
        seen.append(job.id)
        first_saved.set()
        assert cancel_sent.wait(120), "the test never cancelled"
        return sink(result, job)

    service.result_sink = held_sink
    try:
        running = client.submit(**grid_args("seed", "1,2,3"), api_name="/grid")
        assert first_saved.wait(120)
        note = client.predict(seen[0], api_name="/grid_cancel")
        assert note == f"Cancelling job `{seen[0]}` after its current cell…"
        cancel_sent.set()
        status, images, job_id = running.result(timeout=120)
    finally:
        service.result_sink = sink
        cancel_sent.set()
    assert (job_id, seen) == (seen[0], [seen[0]])  # one cell was saved, no other started
    assert status.startswith("Cancelled after 1 of 3 cells")
    assert Image.open(images[0]["image"]).size == grid_size((64, 64), 3, 1, False)  # the rest drawn grey


def test_epochs_by_scales_after_a_training_run(app, tmp_path):
    client, runtime = app["client"], app["runtime"]
    with pytest.raises(AppError, match="No training run yet"):
        client.predict("", "0.5, 1", api_name="/train_epochs_grid")
    write_images(tmp_path / "images", 2)
    config = runtime.training.config_for(
        {
            "preset": "concept",
            "name": "fox",
            "trigger": "zqx_fox",
            "images": str(tmp_path / "images"),
            **dict(rank=4, alpha=4, epochs=2, batch_size=2, sample_steps=2, gradient_checkpointing=False),
        }
    )
    run = runtime.training.submit(config)
    assert run.job.wait(300) and run.job.status == DONE, run.job.error
    before = gallery_count(app)
    status, images = client.predict(run.job.id, "0.5, 1", api_name="/train_epochs_grid")
    assert status.startswith("Done: 4 of 4 cells"), status
    assert Image.open(images[0]["image"]).size == grid_size((64, 64), 2, 2, True)
    records = runtime.gallery.list(limit=4)
    assert gallery_count(app) == before + 4
    # Columns: the per-epoch file, then the final LoRA (the last epoch); rows: the scales.
    used = sorted((lora.name, lora.scale) for record in records for lora in record.loras)
    files = ["fox", "fox_epochs/fox-e0001"]
    assert used == sorted((name, scale) for name in files for scale in (0.5, 1.0))
    assert {record.prompt for record in records} == {"zqx_fox"}  # the run's sample prompt
    with pytest.raises(AppError, match="Y axis: 2 is out of range; a LoRA scale must be 0–1.5"):
        client.predict(run.job.id, "0.5, 2", api_name="/train_epochs_grid")
