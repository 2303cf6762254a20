"""``quantize`` (TrainConfig.quantize: "", none, nf4) from the REST training form and the Train tab.

The tiny SD 1.5 model trains with ``quantize = "none"`` (nf4 applies to Flux.1 / SD 3.5, and needs a
GPU with bitsandbytes); fp8 is generation's only and is refused naming the field.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from types import SimpleNamespace

import gradio as gr
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from gradio_client import Client, handle_file

from lorapg.api import api_routes
from lorapg.api.auth import ApiAccess
from lorapg.config import Settings
from lorapg.jobs import JobQueue
from lorapg.services.training import TrainingService
from lorapg.ui.train_tab import build_train_tab
from tests.training_data import smooth_image, write_images

FAST = {"rank": "4", "batch_size": "2", "sample_steps": "0", "max_steps": "1", "epochs": "1"}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    from tests.tiny_models import tiny_runtime

    services = tiny_runtime(tmp_path_factory.mktemp("quantize"))
    yield services
    services.jobs.shutdown()


@pytest.fixture(scope="module")
def api(runtime):
    return TestClient(FastAPI(routes=api_routes(runtime, ApiAccess(enabled=True))))


def images() -> list[tuple[str, tuple[str, bytes, str]]]:
    files = []
    for seed in range(2):
        buffer = io.BytesIO()
        smooth_image(seed).save(buffer, format="PNG")
        files.append(("images", (f"img{seed}.png", buffer.getvalue(), "image/png")))
    return files


def test_rest_training_takes_quantize_and_the_run_shows_it(runtime, api):
    fields = {"name": "q_fox", "trigger_word": "zqx", "quantize": "none", **FAST}
    reply = api.post("/api/v1/training", data=fields, files=images())
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    runtime.jobs.get(job_id).wait()
    run = api.get(f"/api/v1/training/runs/{job_id}")
    assert run.status_code == 200, run.text
    assert run.json()["config"]["quantize"] == "none"


@pytest.mark.parametrize("value", ["fp8", "int4"])
def test_rest_training_refuses_a_bad_quantize_naming_it(api, value):
    fields = {"name": f"q_bad_{value}", "trigger_word": "zqx", "quantize": value, **FAST}
    reply = api.post("/api/v1/training", data=fields, files=images())
    assert reply.status_code == 400, reply.text  # the service's UserError, not a 500 or a started run
    assert f"Training setting 'quantize' is '{value}'; use one of none, nf4." in reply.json()["errors"]


@pytest.fixture()
def tab(tiny_models, tmp_path):
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
        widgets = build_train_tab(service)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield Client(demo.local_url, verbose=False), service, tmp_path, widgets
    finally:
        demo.close()
        jobs.shutdown()


def test_train_tab_takes_quantize_last_and_refuses_fp8(tab):
    api, service, tmp_path, widgets = tab
    endpoint = api.view_api(print_info=False, return_format="dict")["named_endpoints"]["/train_queue"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names[-2:] == ["status_filter", "quantize"]  # appended: positional callers keep working
    assert not widgets["quantize"].visible  # an SD 1.x base: the dropdown is for Flux.1 / SD 3.5
    paths = write_images(tmp_path / "up", 2)
    api.predict("foxes", [handle_file(str(path)) for path in paths], api_name="/dataset_add")
    form = {"dataset_name": "foxes", "lora_name": "q_tab", "trigger_word": "zqx", "preset_name": "style"}
    with pytest.raises(Exception, match="quantize"):
        api.predict(**form, quantize="fp8", api_name="/train_estimate")
    note, _, _ = api.predict(**form, status_filter="all", quantize="none", max_steps=1, api_name="/train_queue")
    run_id = re.search(r"run `(\w+)`", note).group(1)
    service.cancel(run_id)
    service.jobs.get(run_id).wait()  # ended before the server and the queue close
    assert service.config_of(run_id).quantize == "none"


# --- the dropdown follows the model a run trains (issue 17 review, item 3) ---------------------------------


@pytest.fixture()
def switchable_tab(tiny_models, tmp_path):
    """The Train tab in a tab of its own, on a base model folder (a link) the test points at SD 1.5 or Flux."""
    from tests.tiny_flux import build_flux_pipeline

    flux = tmp_path / "flux"
    build_flux_pipeline(flux)
    base = tmp_path / "base"
    base.symlink_to(tiny_models["sd15"], target_is_directory=True)

    def point_at(model) -> None:
        base.unlink()
        base.symlink_to(model, target_is_directory=True)

    settings = Settings(
        model=str(base),
        lora_dir=tmp_path / "loras",
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
    )
    jobs = JobQueue()
    service = TrainingService(settings, jobs)
    with gr.Blocks() as demo, gr.Tab("Train") as tab:
        widgets = build_train_tab(service, refresh_on=(tab.select, demo.load))
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield SimpleNamespace(
            api=Client(demo.local_url, verbose=False),
            demo=demo,
            tab=tab,
            widgets=widgets,
            service=service,
            tmp_path=tmp_path,
            sd15=tiny_models["sd15"],
            flux=flux,
            point_at=point_at,
        )
    finally:
        demo.close()
        jobs.shutdown()


def refresh_of(ui, component) -> Callable[[], dict]:
    """The function the tab's select and the page's load run for ``component`` (they are private events)."""
    demo = ui.demo
    for index, dependency in enumerate(demo.config["dependencies"]):
        targets = {tuple(target) for target in dependency["targets"]}
        if {(ui.tab._id, "select"), (demo._id, "load")} <= targets and dependency["outputs"] == [component._id]:
            return demo.fns[index].fn
    raise AssertionError(f"nothing refreshes {component.label!r} on tab select and page load")


def test_quantize_is_shown_for_the_model_chosen_now_and_reset_when_hidden(switchable_tab):
    ui = switchable_tab
    quantize = ui.widgets["quantize"]
    assert not quantize.visible  # built for the SD 1.5 base
    refresh = refresh_of(ui, quantize)
    ui.point_at(ui.flux)  # e.g. a Flux model loaded in the Generate tab meanwhile
    assert refresh()["visible"] is True
    ui.point_at(ui.sd15)
    update = refresh()
    assert (update["visible"], update["value"]) == (False, "")  # no unseen "nf4" sent for an SD base


def test_train_again_sets_quantize_last_in_its_outputs(switchable_tab):
    ui = switchable_tab
    endpoint = ui.api.view_api(print_info=False, return_format="dict")["named_endpoints"]["/train_again"]
    assert endpoint["returns"][-1]["label"] == ui.widgets["quantize"].label  # appended after the old ones
    paths = write_images(ui.tmp_path / "up", 2)
    ui.api.predict("foxes", [handle_file(str(path)) for path in paths], api_name="/dataset_add")
    form = {"dataset_name": "foxes", "lora_name": "q_again", "trigger_word": "zqx", "preset_name": "style"}
    note, _, _ = ui.api.predict(**form, status_filter="all", quantize="none", max_steps=1, api_name="/train_queue")
    run_id = re.search(r"run `(\w+)`", note).group(1)
    ui.service.cancel(run_id)
    ui.service.jobs.get(run_id).wait()  # ended before the server and the queue close
    ui.point_at(ui.flux)  # the run's base (the app's model) is Flux now: quantize shown with the run's value
    again = ui.api.predict(run_id, api_name="/train_again")
    assert len(again) == len(endpoint["returns"])
    assert (again[-1]["visible"], again[-1]["value"]) == (True, "none")  # an update: value and visibility
    ui.point_at(ui.sd15)
    again = ui.api.predict(run_id, api_name="/train_again")
    assert (again[-1]["visible"], again[-1]["value"]) == (False, "")  # hidden for SD: reset
