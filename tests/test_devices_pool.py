"""Several devices in one app (``--devices``, issue 20 item 1): one generation worker per device, all
behind the one job queue.

Run on ``cpu,cpu`` with the tiny SD 1.5: two workers, each with its own engine. Concurrency is proven
with barriers and events the tests control (a job waits until the other has started), never timing.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

import app
from lorapg.config import Settings
from lorapg.diffusion.request import GenerationRequest
from lorapg.errors import UserError
from lorapg.jobs import ANY_WORKER, CANCELLED, DONE, ERROR, JobQueue
from lorapg.services.a1111 import A1111Service
from lorapg.services.build import build_services
from lorapg.services.generation_jobs import GenerationJobs, Urls
from lorapg.ui.common import job_status_text
from tests.training_data import write_images

WAIT = 120  # seconds: a safety net against a hang, never what a test measures


def settings_for(tiny_models, tmp_path, **values) -> Settings:
    values = {"device": "cpu", **values}
    # A copy of the session's LoRA folder: a run trained here must not appear in other modules' scans.
    loras = tmp_path / "loras"
    if not loras.exists():
        shutil.copytree(tiny_models["loras"], loras)
    return Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=loras,
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        load_model_at_start=False,
        **values,
    )


@pytest.fixture()
def pool(tiny_models, tmp_path):
    """The services of an app started with ``--devices cpu,cpu``; the model loaded on the primary worker."""
    built = build_services(settings_for(tiny_models, tmp_path, devices="cpu,cpu"), record_results=False)
    built.service.load_model()
    yield built
    assert built.jobs.close(WAIT)


def request(seed: int = 7, steps: int = 2) -> GenerationRequest:
    return GenerationRequest(prompt="a red fox", steps=steps, width=64, height=64, seed=seed)


def wait_done(job) -> None:
    assert job.wait(WAIT), f"job {job.id} never finished"


def hold_steps(engine) -> tuple[threading.Event, threading.Event]:
    """Make ``engine`` stop at its first step until released: (started, release)."""
    started, release = threading.Event(), threading.Event()
    original = engine.generate

    def generate(request, on_step=None, should_cancel=None):
        def step(*args):
            started.set()
            assert release.wait(WAIT), "the test never released the step"
            if on_step is not None:
                on_step(*args)

        return original(request, on_step=step, should_cancel=should_cancel)

    engine.generate = generate
    return started, release


# --- start-up: which devices ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "words"),
    [
        ("cpu,cpux", "'cpux' is not a device"),
        ("", "is empty"),
        ("cpu,,cpu", "empty entry"),
        ("cuda:3", "cuda:3 does not exist"),
    ],
)
def test_a_device_that_does_not_exist_is_refused_at_start_naming_devices(tiny_models, tmp_path, devices, words):
    settings = settings_for(tiny_models, tmp_path, devices=devices)
    with pytest.raises(UserError, match="Setting devices") as refused:
        build_services(settings)
    message = str(refused.value)
    assert words in message and "\n" not in message and "cuda:0,cuda:1" in message


def test_the_app_refuses_a_bad_devices_flag_in_one_line(tmp_path, capsys):
    assert app.main(["--devices", "cpu,cpux", "--outputs", str(tmp_path / "out"), "--no-preload"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: Setting devices: 'cpux' is not a device") and "\n" not in error


def test_compile_with_several_devices_is_refused_in_one_line(tiny_models, tmp_path):
    """torch.compile is not thread-safe: two workers compiling their first generation at once."""
    with pytest.raises(UserError, match=r"Settings compile_unet \(--compile\) and devices") as refused:
        build_services(settings_for(tiny_models, tmp_path, devices="cpu,cpu", compile_unet=True))
    assert "\n" not in str(refused.value)
    built = build_services(settings_for(tiny_models, tmp_path, devices="cpu", compile_unet=True))  # one: fine
    assert built.jobs.close(WAIT)


def test_devices_and_train_device_come_from_flags_and_the_environment(tiny_models, tmp_path):
    from lorapg.cli import settings_from_args
    from lorapg.config import load_settings

    args = app.parse_args(["--devices", "cpu,cpu", "--train-device", "cpu"])
    settings = settings_from_args(args)
    assert (settings.devices, settings.train_device) == ("cpu,cpu", "cpu")
    assert load_settings(None, environ={"LORAPG_DEVICES": "cuda:0,cuda:1"}).devices == "cuda:0,cuda:1"
    with pytest.raises(UserError, match="Setting train_device: cuda:0 does not exist|not one of the devices"):
        build_services(settings_for(tiny_models, tmp_path, devices="cpu,cpu", train_device="cuda:0"))
    with pytest.raises(UserError, match="train_device takes one device"):
        build_services(settings_for(tiny_models, tmp_path, devices="cpu,cpu", train_device="cpu,cpu"))


def test_without_devices_the_app_has_one_worker_as_before(tiny_models, tmp_path):
    built = build_services(settings_for(tiny_models, tmp_path), record_results=False)
    try:
        assert len(built.workers) == 1 and built.jobs.worker_count == 1
        assert built.workers.primary.engine is built.engine is built.service.engine
        result_job = built.service.submit_generation(request())
        wait_done(result_job)
        assert result_job.status == DONE and (result_job.worker, result_job.device) == (0, "cpu")
        # The UI's line is the one it always was: no device named where there is one.
        assert job_status_text(result_job, built.jobs) == f"Done (job `{result_job.id}`)."
    finally:
        assert built.jobs.close(WAIT)


def test_one_listed_device_is_the_one_training_uses(tiny_models, tmp_path):
    """``--devices cuda:1`` alone: training goes there too, not to ``device``'s default GPU."""
    built = build_services(settings_for(tiny_models, tmp_path, devices="cpu", device="cuda"), record_results=False)
    try:
        assert (len(built.workers), built.training.device, built.training.worker) == (1, "cpu", 0)
        assert str(built.engine.device) == "cpu"
    finally:
        assert built.jobs.close(WAIT)


# --- the queue: order and dispatch ------------------------------------------------------------


def test_jobs_start_in_queue_order_across_workers_interactive_first():
    """Each job holds its worker until the test releases it, so the order in which jobs start is
    decided by the queue alone: submission order, interactive before background, across both workers."""
    queue = JobQueue(devices=["cpu", "cpu"])
    started: dict[str, threading.Event] = {}
    release: dict[str, threading.Event] = {}
    order: list[str] = []

    def holder(name):
        started[name], release[name] = threading.Event(), threading.Event()

        def work(job):
            order.append(name)
            started[name].set()
            assert release[name].wait(WAIT)

        return work

    try:
        first = queue.submit("generate", holder("a"), worker=ANY_WORKER)
        queue.submit("generate", holder("b"), worker=ANY_WORKER)
        assert started["a"].wait(WAIT) and started["b"].wait(WAIT)  # two jobs run at once: two workers
        queue.submit("train", holder("night-run"), background=True, worker=ANY_WORKER)
        for name in ("c", "d", "e"):
            queue.submit("generate", holder(name), worker=ANY_WORKER)
        # One worker frees at a time; the next job to start is always the queue's next one.
        for done, expected in [("a", "c"), ("b", "d"), ("c", "e"), ("d", "night-run")]:
            release[done].set()
            assert started[expected].wait(WAIT)
        assert order == ["a", "b", "c", "d", "e", "night-run"]
        assert first.device == "cpu" and first.worker in (0, 1)
    finally:
        for event in release.values():
            event.set()
        assert queue.close(WAIT)


def test_a_job_meant_for_a_busy_worker_does_not_hold_up_the_other():
    queue = JobQueue(devices=["cpu", "cpu"])
    go, holding = threading.Event(), threading.Event()
    try:
        busy = queue.submit("hold", lambda job: holding.set() or go.wait(WAIT), worker=0)
        assert holding.wait(WAIT)
        pinned = queue.submit("prompt", lambda job: "pinned", worker=0)  # waits for worker 0
        anywhere = queue.submit("generate", lambda job: "ran", worker=ANY_WORKER)
        wait_done(anywhere)
        assert (anywhere.status, anywhere.worker) == (DONE, 1)
        assert pinned.status == "queued" and busy.status == "running"
        go.set()
        wait_done(pinned)
        assert (pinned.status, pinned.worker) == (DONE, 0)
    finally:
        go.set()
        assert queue.close(WAIT)


# --- generation on two workers ----------------------------------------------------------------


def test_two_generations_run_at_once_and_give_the_same_image_on_either_worker(pool):
    """Both jobs wait in the result sink until the other has arrived there: they can only both
    finish when two workers run them at the same time."""
    both_generated = threading.Barrier(2, timeout=WAIT)

    def sink(result, job):
        both_generated.wait()
        return []

    pool.service.result_sink = sink
    jobs = [pool.service.submit_generation(request(seed=11)) for _ in range(2)]
    for job in jobs:
        wait_done(job)
    assert [job.status for job in jobs] == [DONE, DONE], [job.error for job in jobs]
    assert sorted(job.worker for job in jobs) == [0, 1] and {job.device for job in jobs} == {"cpu"}
    engines = pool.workers.workers
    assert engines[1].engine.model is not None and engines[1].engine is not engines[0].engine
    # The same request, the same image, whichever worker ran it (same path and device type: a small atol).
    first, second = (np.asarray(job.result.images[0], dtype=np.int16) for job in jobs)
    assert np.abs(first - second).max() <= 1
    assert jobs[0].result.seeds == jobs[1].result.seeds == [11]


def test_cancel_reaches_the_worker_running_that_job(pool):
    holds = [hold_steps(worker.engine) for worker in pool.workers.workers]
    jobs = [pool.service.submit_generation(request(steps=3)) for _ in range(2)]
    for started, _release in holds:  # each engine has reached its first step: one job on each worker
        assert started.wait(WAIT)
    on_second = next(job for job in jobs if job.worker == 1)
    on_first = next(job for job in jobs if job.worker == 0)
    pool.service.cancel(on_second.id)
    for _started, release in holds:
        release.set()
    wait_done(on_first)
    wait_done(on_second)
    assert on_second.status == CANCELLED and on_second.result.cancelled
    assert on_first.status == DONE and not on_first.result.cancelled and on_first.step == on_first.total == 3


def test_the_api_and_the_ui_show_the_device_a_job_runs_on(pool):
    started, release = hold_steps(pool.workers.primary.engine)
    api = GenerationJobs(pool.service, Urls(image=lambda i: f"/img/{i}", preview=lambda j: f"/prev/{j}"))
    try:
        hold = pool.jobs.submit("hold", lambda job: release.wait(WAIT), worker=1)  # worker 1 busy
        state = api.submit(api_params())
        assert started.wait(WAIT)
        job = api.job(state.job_id)
        assert api.state(job).device == "cpu" and job.worker == 0
        assert job_status_text(job, pool.jobs).endswith(f"(job `{job.id}` on cpu).")
        a1111 = A1111Service(pool.settings, pool.service, pool.gallery_service)
        assert a1111.progress()["state"]["device"] == "cpu"
    finally:
        release.set()
    wait_done(job)
    wait_done(hold)
    assert api.state(job).device == "cpu" and api.state(job).status == DONE


@pytest.mark.parametrize("call", ["interrupt", "skip"])
def test_a1111_interrupt_and_skip_stop_the_generation_on_every_worker(pool, call):
    """A1111's interrupt is global: with two devices, both running generations stop."""
    holds = [hold_steps(worker.engine) for worker in pool.workers.workers]
    jobs = [pool.service.submit_generation(request(steps=3)) for _ in range(2)]
    for started, _release in holds:  # one generation held at its first step on each worker
        assert started.wait(WAIT)
    getattr(A1111Service(pool.settings, pool.service, pool.gallery_service), call)()
    for _started, release in holds:
        release.set()
    for job in jobs:
        wait_done(job)
    assert sorted(job.worker for job in jobs) == [0, 1]
    assert [job.status for job in jobs] == [CANCELLED, CANCELLED]


def test_the_a1111_progress_route_names_the_device(pool):
    """Through the real route (its response model), not only the service's dict."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lorapg.api.auth import ApiAccess
    from lorapg.api.sdapi import sdapi_router

    a1111 = A1111Service(pool.settings, pool.service, pool.gallery_service)
    server = FastAPI()
    server.include_router(sdapi_router(a1111, ApiAccess(True)))
    started, release = hold_steps(pool.workers.primary.engine)
    hold = pool.jobs.submit("hold", lambda job: release.wait(WAIT), worker=1)  # the generation runs on worker 0
    try:
        job = pool.service.submit_generation(request())
        assert started.wait(WAIT)
        with TestClient(server) as client:
            state = client.get("/sdapi/v1/progress").json()["state"]
        assert state["device"] == "cpu" and state["job"] == "generate"
    finally:
        release.set()
    wait_done(job)
    wait_done(hold)


def api_params():
    from lorapg.services.generation_jobs import GenerationParams

    return GenerationParams(prompt="a red fox", steps=2, width=64, height=64, seed=3)


# --- a worker that fails; training on one worker ------------------------------------------------


def test_a_worker_whose_model_fails_to_load_leaves_the_rotation_and_the_other_serves_on(pool):
    second = pool.workers.workers[1].engine

    def out_of_memory(ref, on_status=None):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    second.load_model = out_of_memory
    go = threading.Event()
    hold = pool.jobs.submit("hold", lambda job: go.wait(WAIT), worker=0)  # the next generation goes to worker 1
    failed = pool.service.submit_generation(request())
    wait_done(failed)
    go.set()
    wait_done(hold)
    assert failed.status == ERROR and failed.worker == 1
    assert failed.error.startswith("Device cpu could not load the model") and "out of memory" in failed.error
    assert "\n" not in failed.error and pool.jobs.retired() == [1]
    # The queue serves on with worker 0, even while worker 1 is free.
    for job in [pool.service.submit_generation(request(seed=s)) for s in (1, 2)]:
        wait_done(job)
        assert (job.status, job.worker) == (DONE, 0)
    pool.service.load_model()  # another model (here the same one, reloaded): every worker tries again
    assert pool.jobs.retired() == []


def test_training_holds_its_worker_while_the_other_keeps_generating(pool, monkeypatch):
    import lorapg.devices

    entered = []  # the devices whose context the run entered (cuda:N: that GPU current; see device_context)
    context = lorapg.devices.device_context
    monkeypatch.setattr(lorapg.devices, "device_context", lambda device: entered.append(device) or context(device))
    training = pool.training
    source = pool.settings.models_dir / "upload"
    write_images(source, 2)
    training.dataset_add("foxes", sorted(source.iterdir()))
    values = dict(rank=4, alpha=4, epochs=1, max_steps=1, sample_steps=0, gradient_checkpointing=False, batch_size=2)
    config = training.config_for(
        {
            "preset": "concept",
            "name": "pooled",
            "trigger": "zqx",
            **values,
            "images": str(training.dataset_folder("foxes")),
        }
    )
    training_started, generated = threading.Event(), threading.Event()

    def hold(update):  # the run waits, holding worker 0, until a generation has finished elsewhere
        training_started.set()
        assert generated.wait(WAIT), "no generation finished while training held its worker"

    run = training.submit(config, on_progress=hold)
    assert training_started.wait(WAIT)
    assert (run.job.worker, run.job.device) == (0, "cpu")
    job = pool.service.submit_generation(request())
    wait_done(job)
    generated.set()
    assert (job.status, job.worker) == (DONE, 1), job.error
    wait_done(run.job)
    assert run.job.status == DONE, run.job.error
    assert [str(device) for device in entered] == ["cpu"]


def test_the_ui_lets_one_generate_handler_run_per_worker(pool):
    """Gradio's "gpu" concurrency group would otherwise let one visitor's generation in at a time,
    leaving the second device idle; the job queue still orders them."""
    from lorapg.ui.app_ui import build_ui

    demo = build_ui(pool.service, pool.gallery_service, training_service=pool.training)
    limits = {fn.api_name: fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "gpu"}
    assert limits["generate"] == limits["gallery_vary"] == 2 and set(limits.values()) == {2}
    # Events whose jobs run on worker 0 alone wait in a group of their own: two of them (a load and a
    # grid) never hold both "gpu" slots while generations could run on worker 1.
    primary = {fn.api_name: fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "gpu-primary"}
    assert primary == {"load_model": 1, "grid": 1, "train_epochs_grid": 1}


# --- the chosen model after a load that fails or is cancelled (review item 2) -------------------


def test_a_failed_load_leaves_every_worker_on_the_model_still_loaded(pool, tiny_models):
    """Not on the configured default: each worker would load that over the model in use."""
    pool.settings.model = "configured/default-model"  # what the user did not choose
    primary = pool.workers.primary.engine
    loaded = primary.model.source.ref
    original = primary.load_model

    def out_of_memory(ref, on_status=None):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    primary.load_model = out_of_memory
    failed = pool.service.submit_load_model(str(tiny_models["sdxl"]))
    wait_done(failed)
    primary.load_model = original
    assert failed.status == ERROR and pool.service.chosen_model() == loaded
    # A generation on the other worker loads the model in use there, not the configured default.
    go = threading.Event()
    hold = pool.jobs.submit("hold", lambda job: go.wait(WAIT), worker=0)
    job = pool.service.submit_generation(request())
    wait_done(job)
    go.set()
    wait_done(hold)
    assert (job.status, job.worker) == (DONE, 1), job.error
    assert pool.workers.workers[1].engine.model.source.ref == loaded


def test_a_load_cancelled_while_queued_leaves_the_choice_as_it_was(pool, tiny_models):
    pool.settings.model = "configured/default-model"
    loaded = pool.workers.primary.engine.model.source.ref
    go, holding = threading.Event(), threading.Event()
    hold = pool.jobs.submit("hold", lambda job: holding.set() or go.wait(WAIT), worker=0)
    assert holding.wait(WAIT)
    queued = pool.service.submit_load_model(str(tiny_models["sdxl"]))
    assert pool.service.chosen_model() == str(tiny_models["sdxl"])  # chosen from the moment it is queued
    pool.service.cancel(queued.id)
    go.set()
    wait_done(hold)
    wait_done(queued)
    assert queued.status == CANCELLED and pool.service.chosen_model() == loaded


def test_training_on_a_later_worker_defaults_to_the_chosen_model_not_its_last_one(tiny_models, tmp_path, monkeypatch):
    """``--train-device`` naming the second device (here: the choice made as build_services makes it):
    that worker's engine still holds the model it generated with before the user loaded another."""
    import lorapg.devices

    monkeypatch.setattr(lorapg.devices, "training_worker", lambda setting, devices: 1)
    built = build_services(settings_for(tiny_models, tmp_path, devices="cpu,cpu"), record_results=False)
    try:
        built.service.load_model(str(tiny_models["sd15"]))
        built.workers.workers[1].engine.load_model(str(tiny_models["sdxl"]))  # generated with it earlier
        training = built.training
        assert training.worker == 1 and training.engine is built.workers.workers[1].engine
        source = tmp_path / "upload"
        write_images(source, 2)
        training.dataset_add("foxes", sorted(source.iterdir()))
        values = {"preset": "concept", "name": "chosen", "trigger": "zqx", "max_steps": 1}
        config = training.config_for({**values, "images": str(training.dataset_folder("foxes"))})
        assert training.prepare(config).model == str(tiny_models["sd15"])
    finally:
        assert built.jobs.close(WAIT)


@pytest.mark.parametrize(("name", "index"), [("cuda:1", 1), ("cuda:0", 0), ("cpu", None), ("cuda", None)])
def test_training_on_cuda_n_makes_that_gpu_the_current_one_of_its_thread(name, index):
    """Accelerate's device is plain "cuda", the thread's current GPU: training on cuda:1 enters this
    context, or it would run on cuda:0. (Checked here at the unit level; no multi-GPU run in the tests.)"""
    import contextlib

    import torch

    from lorapg.devices import device_context

    context = device_context(torch.device(name))
    if index is None:
        assert isinstance(context, contextlib.nullcontext)
    else:
        assert isinstance(context, torch.cuda.device) and context.idx == index


# --- device names: one type, and "auto" / "cuda" as the GPU they mean (review items 5 and 9) ------


@pytest.fixture()
def two_gpus(monkeypatch):
    """What PyTorch reports on a machine with two GPUs, cuda:0 current (the names are only parsed here)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_plain_cuda_is_the_current_gpu_by_index():
    import torch

    from lorapg.devices import cuda_with_index

    assert cuda_with_index(torch.device("cuda"), 2, 1, "devices", "hint") == torch.device("cuda", 1)
    assert cuda_with_index(torch.device("cuda", 0), 2, 1, "devices", "hint") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"Setting devices: cuda:2 does not exist \(this machine has 2"):
        cuda_with_index(torch.device("cuda", 2), 2, 0, "devices", "hint")


@pytest.mark.parametrize("devices", ["auto,cuda:0", "cuda,cuda:0", "cuda:0,auto"])
def test_auto_or_cuda_and_cuda_0_are_one_gpu_named_twice(two_gpus, devices):
    from lorapg.devices import parse_devices

    with pytest.raises(UserError, match="Setting devices names cuda:0 twice"):
        parse_devices(devices)


def test_train_device_cuda_0_is_found_among_auto_devices(two_gpus):
    import torch

    from lorapg.devices import parse_devices, training_worker

    for fallback in ("auto", "cuda"):
        devices = parse_devices(None, fallback)
        assert devices == [torch.device("cuda", 0)] and training_worker("cuda:0", devices) == 0
    assert parse_devices("cuda,cuda:1") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert training_worker("auto", parse_devices("cuda:0,cuda:1")) == 0


@pytest.mark.parametrize("devices", ["cpu,cuda:0", "cuda:1,cpu"])
def test_devices_of_two_types_are_refused_in_one_line(two_gpus, devices):
    from lorapg.devices import parse_devices

    with pytest.raises(UserError, match=r"Setting devices mixes device types \(cpu, cuda\)") as refused:
        parse_devices(devices)
    assert "\n" not in str(refused.value)


def test_a_retired_worker_tries_again_once_another_model_is_chosen(pool, tiny_models):
    """Not only after that model has loaded on worker 0: here worker 0 is busy, and the next
    generation (with the newly chosen model) runs on the worker that failed the previous one."""
    second = pool.workers.workers[1].engine
    original, refused = second.load_model, str(tiny_models["sd15"])

    def refuses_sd15(ref, on_status=None):
        if ref == refused:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(ref, on_status=on_status)

    second.load_model = refuses_sd15
    go = threading.Event()
    try:
        hold = pool.jobs.submit("hold", lambda job: go.wait(WAIT), worker=0)  # worker 0 busy throughout
        failed = pool.service.submit_generation(request())
        wait_done(failed)
        assert (failed.status, failed.worker, pool.jobs.retired()) == (ERROR, 1, [1])
        waiting = pool.jobs.submit("prompt", lambda job: None, worker=0)  # the status of a job that waits
        assert job_status_text(waiting, pool.jobs).endswith(
            "Out of the rotation, as it could not load the model: cpu (it tries again when another model is chosen)."
        )
        pool.service.submit_load_model(str(tiny_models["sdxl"]))  # waits behind the hold on worker 0
        job = pool.service.submit_generation(request())
        wait_done(job)
        assert (job.status, job.worker) == (DONE, 1), job.error
        assert second.model.source.ref == str(tiny_models["sdxl"]) and pool.jobs.retired() == []
    finally:
        go.set()
    wait_done(hold)


def test_the_api_and_the_memory_panel_list_the_workers_with_their_model_and_load(pool):
    from lorapg.services.library import LibraryService
    from lorapg.ui.texts import workers_text

    started, release = hold_steps(pool.workers.primary.engine)
    try:
        job = pool.service.submit_generation(request())
        assert started.wait(WAIT)
        listed = LibraryService(pool.service).workers()["workers"]
        text = workers_text(pool.service.worker_status())
    finally:
        release.set()
    wait_done(job)
    model = str(pool.settings.model)
    assert [(w["index"], w["device"], w["state"], w["job"]) for w in listed] == [
        (0, "cpu", "running", job.id),
        (1, "cpu", "idle", None),
    ]
    assert listed[0]["model"] == model  # the model the primary worker holds; the other loads on its first job
    assert f"- cpu: running (job {job.id}); {model}" in text and "- cpu: idle;" in text
    assert workers_text(pool.service.worker_status()[:1]) == ""  # one worker: nothing to list
