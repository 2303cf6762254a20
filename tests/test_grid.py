"""Comparison grids (issue 18, item 1): axis parsing, the grid service against single generations,
the drawn PNG, the cell limit, cancel between cells, the CLI and the REST API."""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import pytest
import requests
from PIL import Image

from lorapg.cli import main
from lorapg.config import Settings
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.errors import UserError
from lorapg.grid.axes import cell_count, parse_axes, parse_axis
from lorapg.grid.render import HEADER_HEIGHT, LABEL_WIDTH, MISSING, grid_size
from lorapg.services.build import build_services
from lorapg.services.grid import GridService
from tests.app_server import running_app
from tests.reproducibility import assert_same_bytes
from tests.test_cli import run_cli

SMALL = {"width": 64, "height": 64, "steps": 2}


# --- axes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "values", "title"),
    [
        ("lora:style=0,0.5,1", "lora", (0.0, 0.5, 1.0), "lora:style"),
        ("lora-file=style, other", "lora-file", ("style", "other"), "LoRA"),
        ("seed=1,2,3", "seed", (1, 2, 3), "Seed"),
        ("STEPS = 2, 4", "steps", (2, 4), "Steps"),
        ("cfg=1.5,7", "cfg", (1.5, 7.0), "CFG scale"),
        ("sampler=Euler a,DDIM", "sampler", ("Euler a", "DDIM"), "Sampler"),
        ("checkpoint=a.safetensors,b", "checkpoint", ("a.safetensors", "b"), "Checkpoint"),
        ('prompt-sr=cat,"dog, big",fox', "prompt-sr", ("cat", "dog, big", "fox"), "Prompt S/R"),
    ],
)
def test_axis_parsing(text, kind, values, title):
    axis = parse_axis(text)
    assert (axis.kind, axis.values, axis.title) == (kind, values, title)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed", "must look like KIND=V1,V2"),
        ("colour=red", "unknown kind 'colour'"),
        ("lora:=1", "needs the LoRA's name"),
        ("seed=1,,2", "every value must be non-empty"),
        ("seed=one", "'one' is not a whole number"),
        ("steps=0,2", "0 is out of range; steps must be 1–50"),
        ("cfg=31", "31 is out of range; CFG scale must be 0–30"),
        ("cfg=nan", "'nan' is not a number"),
        ("lora:style=2", "2 is out of range; a LoRA scale must be 0–1.5"),
        ("seed=-1", "-1 is out of range; seed must be 0–4294967295"),
        ("sampler=Nope", "unknown sampler 'Nope'"),
    ],
)
def test_axis_errors_name_the_axis_and_the_problem(text, message):
    with pytest.raises(UserError, match="^X axis") as caught:
        parse_axis(text)
    assert message in str(caught.value)


def test_axes_need_x_and_distinct_kinds_and_a_bounded_cell_count():
    with pytest.raises(UserError, match="X axis is required"):
        parse_axes(None, "seed=1")
    with pytest.raises(UserError, match="Seed is on more than one axis"):
        parse_axes("seed=1,2", "seed=3")
    axes = parse_axes("seed=1,2,3,4,5", "steps=1,2,3,4,5", "cfg=1,2,3")
    assert cell_count(axes, 0) == 75
    with pytest.raises(UserError, match=r"5 × 5 × 3 = 75 cells; at most 64 are allowed \(setting max_grid_cells\)"):
        cell_count(axes)
    with pytest.raises(UserError, match="at most 8000"):
        parse_axis("seed=" + "1," * 5000, max_chars=8000)


# --- the service -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    settings = Settings(
        model=str(tiny_models["sd15"]), lora_dir=tiny_models["loras"], outputs=root / "outputs", threads=1
    )
    services = build_services(settings)
    yield services
    services.jobs.close()


def base_request(**changes) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red cat", "seed": 7, **SMALL, **changes})


def test_cells_equal_single_generations_and_are_saved_with_their_parameters(runtime):
    grids = GridService(runtime.settings, runtime.service)
    result = grids.run(base_request(), "lora:style=0,1", "seed=1,2")
    assert not result.cancelled and result.done == 4
    # Run order: X fastest. Each cell is the same code path as a single generation: exactly equal.
    expected = [(0.0, 1), (1.0, 1), (0.0, 2), (1.0, 2)]
    for cell, (scale, seed) in zip(result.cells, expected, strict=True):
        alone = runtime.service.generate(base_request(seed=seed, loras=(LoraRequest("style", scale),)), record=False)
        assert_same_bytes(cell.images[0], alone.images[0])
        [record] = cell.saved
        stored = runtime.gallery.get(record.id)
        assert (stored.seed, [(lora.name, lora.scale) for lora in stored.loras]) == (seed, [("style", scale)])
        assert (stored.steps, stored.width) == (2, 64)
    # One grid: the cells at their places, the label bands around them, text drawn in them.
    [path] = result.grids
    assert path.parent == runtime.settings.outputs / "grids"
    grid = Image.open(path).convert("RGB")
    assert grid.size == grid_size((64, 64), 2, 2, True) == (LABEL_WIDTH + 128, HEADER_HEIGHT + 128)
    pixels = np.asarray(grid)
    for index, cell in enumerate(result.cells):
        row, column = divmod(index, 2)
        top, left = HEADER_HEIGHT + 64 * row, LABEL_WIDTH + 64 * column
        assert np.array_equal(pixels[top : top + 64, left : left + 64], np.asarray(cell.images[0].convert("RGB")))
    assert pixels[:HEADER_HEIGHT].min() < 128, "no axis title or values drawn above the cells"
    assert pixels[HEADER_HEIGHT:, :LABEL_WIDTH].min() < 128, "no Y values drawn left of the cells"


def test_prompt_sr_z_axis_and_missing_search_text(runtime, tmp_path):
    grids = GridService(runtime.settings, runtime.service)
    plan = grids.plan(base_request(), "seed=1", None, "prompt-sr=cat,dog")
    assert [cell.request.prompt for cell in plan.cells] == ["a red cat", "a red dog"]
    result = grids.run(base_request(), "seed=1", None, "prompt-sr=cat,dog", out=tmp_path / "g.png")
    assert [p.name for p in result.grids] == ["g-1.png", "g-2.png"]
    assert Image.open(result.grids[0]).size == grid_size((64, 64), 1, 1, False)
    with pytest.raises(UserError, match="'horse' is not in the prompt"):
        grids.plan(base_request(), "prompt-sr=horse,dog")


def test_bad_grids_are_refused_before_the_queue(runtime):
    grids = GridService(runtime.settings, runtime.service)
    with pytest.raises(UserError, match="= 65 cells; at most 64"):
        grids.submit(base_request(), "seed=" + ",".join(str(i) for i in range(65)))
    with pytest.raises(UserError, match="Unknown LoRA|not found|no LoRA"):
        grids.submit(base_request(), "lora-file=style,nosuchlora")
    with pytest.raises(UserError, match="Batch size must be 1"):
        grids.submit(base_request(batch_size=2), "seed=1,2")


def test_cancel_stops_after_the_current_cell(runtime):
    """The test cancels from inside the first cell's gallery save: the cell finishes, no other starts."""
    grids = GridService(runtime.settings, runtime.service)
    sink = runtime.service.result_sink

    progress = []

    def cancelling_sink(result, job):
        progress.append((job.step, job.total, job.message))
        runtime.jobs.cancel(job.id)
        return sink(result, job)

    runtime.service.result_sink = cancelling_sink
    try:
        job = grids.submit(base_request(), "seed=1,2,3")
        job.wait()
    finally:
        runtime.service.result_sink = sink
    assert progress == [(0, 3, "cell 1 of 3: step 2 of 2")]  # one cell ran, and said which
    assert job.status == "cancelled"
    assert job.result.done == 1 and job.result.cells[0].images
    grid = np.asarray(Image.open(job.result.grids[0]).convert("RGB"))
    assert tuple(grid[HEADER_HEIGHT + 32, 64 + 32]) == MISSING  # the second cell, never generated


# --- CLI and API -------------------------------------------------------------------------------------


def test_cli_grid_end_to_end(tiny_models, tmp_path):
    common = ["--model", str(tiny_models["sd15"]), "--lora-dir", str(tiny_models["loras"])]
    common += ["--outputs", str(tmp_path / "outputs"), "--threads", "1", "--prompt", "a red cat"]
    common += ["--width", "64", "--height", "64", "--steps", "2"]
    done = run_cli("grid", *common, "--x", "lora:style=0,1", "--y", "seed=1,2", "--out", "grid.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["grid.png", "cells: 4 of 4"]
    assert Image.open(tmp_path / "grid.png").size == grid_size((64, 64), 2, 2, True)
    assert len(list((tmp_path / "outputs" / "images").rglob("*.png"))) == 4  # every cell in the gallery


def test_cli_refuses_too_many_cells_with_the_count(tiny_models, tmp_path, capsys):
    code = main(
        ["grid", "--model", str(tiny_models["sd15"]), "--outputs", str(tmp_path), "--prompt", "x"]
        + ["--x", "seed=1,2,3,4,5,6,7,8,9", "--y", "steps=1,2,3,4,5,6,7,8"]
    )
    assert code == 2
    assert "9 × 8 = 72 cells; at most 64" in capsys.readouterr().err


def test_api_grid_over_http(tiny_models, tmp_path):
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    args = ["--api", "--api-auth", "u:p", "--model", str(tiny_models["sd15"]), "--lora-dir", str(loras)]
    with running_app(*args, "--outputs", str(tmp_path / "outputs"), "--threads", "1") as url:
        api = url.rstrip("/") + "/api/v1/grids"
        body = {"prompt": "a red cat", "x": "lora:style=0,1", "y": "seed=1,2", **SMALL}
        assert requests.post(api, json=body, timeout=60).status_code == 401
        refused = requests.post(api, json={**body, "x": "steps=" + ",".join(map(str, range(1, 34)))}, auth=("u", "p"))
        assert refused.status_code == 400 and "33 × 2 = 66 cells" in refused.json()["errors"]
        reply = requests.post(api, json=body, auth=("u", "p"), timeout=60)
        assert reply.status_code == 202, reply.text
        assert reply.json()["cells"] == 4
        job_id = reply.json()["job_id"]
        state = {}
        for _ in range(600):  # the app's progress, not a timing assertion: poll until the job says it ended
            state = requests.get(f"{api}/{job_id}", auth=("u", "p"), timeout=60).json()
            if state["status"] not in ("queued", "running"):
                break
            time.sleep(0.5)
        assert state["status"] == "done", state
        assert (state["cell"], state["cells"], len(state["image_ids"])) == (4, 4, 4)
        png = requests.get(url.rstrip("/") + state["grids"][0], auth=("u", "p"), timeout=60)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert requests.get(f"{api}/nosuchjob", auth=("u", "p"), timeout=60).status_code == 404


def test_checkpoint_and_lora_file_axes(runtime, tiny_models):
    """Each checkpoint cell equals a single generation on that model; the loaded model is restored."""
    grids = GridService(runtime.settings, runtime.service)
    sd15, sdxl = str(tiny_models["sd15"]), str(tiny_models["sdxl"])
    runtime.service.load_model(sd15)
    result = grids.run(base_request(), f"checkpoint={sd15},{sdxl}")
    assert runtime.service.model_status().ref.endswith("sd15")
    assert [cell.family for cell in result.cells] == ["sd1", "sdxl"]
    runtime.service.load_model(sdxl)
    assert_same_bytes(result.cells[1].images[0], runtime.service.generate(base_request(), record=False).images[0])
    runtime.service.load_model(sd15)
    lora_files = grids.run(base_request(), "lora-file=style,other")
    assert [[lora.info.name for lora in cell.loras] for cell in lora_files.cells] == [["style"], ["other"]]
    with pytest.raises(UserError):
        grids.plan(base_request(), f"checkpoint={tiny_models['root'] / 'nosuchmodel'}")


# --- the UI's service calls, the lora-scale axis, epochs × scales ----------------------------------


def test_check_counts_without_running_and_a_confirmed_count_lifts_the_limit(runtime):
    grids = GridService(runtime.settings, runtime.service)
    seeds = "seed=" + ",".join(str(i) for i in range(1, 11))
    checked = grids.check(base_request(), seeds, "steps=1,2,3,4,5,6,7")
    assert (checked.cells, checked.shape, checked.grids, checked.over_limit) == (70, "10 × 7", 1, True)
    assert not grids.check(base_request(), "seed=1,2", None, "cfg=5,7").over_limit
    with pytest.raises(UserError, match="= 70 cells; at most 64 are allowed"):
        grids.plan(base_request(), seeds, "steps=1,2,3,4,5,6,7")  # the API's and the CLI's call
    assert len(grids.plan(base_request(), seeds, "steps=1,2,3,4,5,6,7", confirmed_cells=70).cells) == 70
    with pytest.raises(UserError, match="70 cells now, not the 71 confirmed"):
        grids.plan(base_request(), seeds, "steps=1,2,3,4,5,6,7", confirmed_cells=71)
    huge = ("seed=" + ",".join(str(i) for i in range(1, 41)), "steps=" + ",".join(str(i) for i in range(1, 31)))
    with pytest.raises(UserError, match="1200 cells; even confirmed, at most 1024"):
        grids.plan(base_request(), *huge, confirmed_cells=1200)


def test_lora_scale_axis_scales_the_lora_file_axis_lora(runtime):
    grids = GridService(runtime.settings, runtime.service)
    plan = grids.plan(base_request(), "lora-file=style,other", "lora-scale=0.5,1")
    assert [[(lora.name, lora.scale) for lora in cell.request.loras] for cell in plan.cells] == [
        [("style", 0.5)],
        [("other", 0.5)],
        [("style", 1.0)],
        [("other", 1.0)],
    ]
    assert plan.axes[1].title == "LoRA scale" and plan.axes[0].labels() == ["style", "other"]
    with pytest.raises(UserError, match="Z axis \\(lora-scale\\) scales the lora-file axis' LoRA"):
        grids.plan(base_request(), "seed=1", None, "lora-scale=1")


def test_epochs_grid_needs_a_finished_run_with_per_epoch_files(runtime, tmp_path):
    from lorapg.jobs import Job
    from lorapg.services.training import TrainingRun
    from lorapg.training.config import TrainConfig
    from lorapg.training.trainer import TrainResult

    grids = GridService(runtime.settings, runtime.service)
    loras = runtime.settings.lora_dir
    run = TrainingRun(Job("train"), TrainConfig(name="style", trigger="zq"), tmp_path / "config.toml")
    with pytest.raises(UserError, match=r"Training run \w+ \(style\) is still queued; make its epochs × scales"):
        grids.epochs_axes(run)
    run.job.status = "cancelled"
    with pytest.raises(UserError, match="did not finish \\(cancelled\\)"):
        grids.epochs_axes(run)
    run.job.status = "done"
    run.job.result = TrainResult("style", loras / "style.safetensors", "sd1", 2, 2, False, None)
    with pytest.raises(UserError, match="saved no per-epoch LoRA files"):
        grids.epochs_axes(run)
    run.job.result.epoch_loras = [loras / "other.safetensors", loras / "xl" / "xl_style.safetensors"]
    assert grids.epochs_axes(run, [0.5, 1]) == ("lora-file=other,xl/xl_style,style", "lora-scale=0.5,1")
    run.job.result.epoch_loras = [tmp_path / "elsewhere.safetensors"]
    with pytest.raises(UserError, match="outside the LoRA folder"):
        grids.epochs_axes(run)


# --- the user's model after a checkpoint grid that fails --------------------------------------------


def sd1_lora_on_both_models(grids: GridService, sd15: str, sdxl: str):
    """A checkpoint grid whose SDXL cell raises: the SD 1.x LoRA does not fit SDXL."""
    job = grids.submit(base_request(loras=(LoraRequest("style", 1.0),)), f"checkpoint={sd15},{sdxl}")
    job.wait()
    assert job.status == "error" and "does not fit" in job.error, (job.status, job.error)
    return job


def test_a_failed_checkpoint_cell_still_restores_the_loaded_model(runtime, tiny_models):
    grids = GridService(runtime.settings, runtime.service)
    sd15, sdxl = str(tiny_models["sd15"]), str(tiny_models["sdxl"])
    runtime.service.load_model(sd15)
    sd1_lora_on_both_models(grids, sd15, sdxl)
    assert runtime.service.model_status().ref.endswith("sd15")  # not the SDXL of the failed cell


def test_a_failed_restore_is_logged_and_keeps_the_cells_error(runtime, tiny_models, tmp_path, caplog):
    """The user's model (a copy) is deleted while the grid runs, so it cannot be loaded again afterwards."""
    grids = GridService(runtime.settings, runtime.service)
    sd15, sdxl = str(tiny_models["sd15"]), str(tiny_models["sdxl"])
    mine = tmp_path / "mine"
    shutil.copytree(tiny_models["sd15"], mine)
    runtime.service.load_model(str(mine))
    sink = runtime.service.result_sink

    def deleting_sink(result, job):  # after the first (SD 1.x) cell, before the SDXL one
        shutil.rmtree(mine)
        return sink(result, job)

    runtime.service.result_sink = deleting_sink
    try:
        job = sd1_lora_on_both_models(grids, sd15, sdxl)
    finally:
        runtime.service.result_sink = sink
        runtime.service.load_model(sd15)
    assert job.error.startswith("LoRA style does not fit the loaded SDXL model")  # the cell's error, kept
    restore = [r for r in caplog.records if r.name == "lorapg.services.grid" and r.levelno == logging.ERROR]
    assert len(restore) == 1 and "could not be loaded again" in restore[0].getMessage()


def test_a_failed_restore_after_a_finished_grid_is_in_its_result(runtime, tiny_models, tmp_path, caplog):
    grids = GridService(runtime.settings, runtime.service)
    sd15, sdxl = str(tiny_models["sd15"]), str(tiny_models["sdxl"])
    mine = tmp_path / "mine"
    shutil.copytree(tiny_models["sd15"], mine)
    runtime.service.load_model(str(mine))
    shutil.rmtree(mine)  # loaded, then gone: the grid cannot load it again when it ends
    try:
        job = grids.submit(base_request(), f"checkpoint={sd15},{sdxl}")
        job.wait()
    finally:
        runtime.service.load_model(sd15)
    assert job.status == "done" and job.result.done == 2 and job.result.grids[0].is_file()
    assert "could not be loaded again" in job.result.restore_error and "load a model" in job.result.restore_error
    assert any(r.levelno == logging.ERROR and r.name == "lorapg.services.grid" for r in caplog.records)
