"""Remote workers joining while the app runs, and LoRA-aware routing (issue 20 item 3, review fixes).

Fast: no cluster. The app's real services (one CPU worker, no model loaded) get ``RemoteEngine``s over
a scripted stand-in for the ``ray`` module that raises Ray's real exception classes; discovery runs
one round at a time (``WorkerDiscovery.look``), called by the test. Concurrency is set up with events
the tests control, never timing.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]>=2.40'): Ray workers untested")

from ray import exceptions  # noqa: E402

from lorapg.config import Settings  # noqa: E402
from lorapg.diffusion.request import GenerationRequest, LoraRequest  # noqa: E402
from lorapg.jobs import DONE  # noqa: E402
from lorapg.services import build, ray_workers  # noqa: E402
from lorapg.services.build import build_services  # noqa: E402
from lorapg.services.ray_workers import RemoteEngine  # noqa: E402

WAIT = 60  # seconds: a safety net against a hang, never what a test measures


class _Method:
    def __init__(self, actor, name):
        self.actor, self.name = actor, name

    def remote(self, *args, **kwargs):
        self.actor.calls.append((self.name, args, kwargs))
        return (self.name, args, self.actor)


class ScriptedActor:
    """An actor handle: each ``.method.remote(...)`` returns a token that ``ScriptedRay`` answers."""

    def __init__(self, info: dict | None = None):
        self.calls = []
        self.info_answer = info

    def __getattr__(self, name):
        return _Method(self, name)


class ScriptedRay:
    """``get``/``wait``/``kill`` as ``ray`` has them: a generation is finished at once and its result
    is ``result``; an ``info`` call answers the actor's ``info_answer`` (an exception is raised)."""

    exceptions = exceptions

    def __init__(self, result=None):
        self.result = result

    def get(self, token, timeout=None):
        name, _args, actor = token
        answer = {"generate": self.result, "info": actor.info_answer}.get(name)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def wait(self, refs, num_returns=1, timeout=None):
        return list(refs), []

    def kill(self, actor, no_restart=True):
        pass


def remote_info(name: str, loras=(), model=None, actor_id=None, files=None) -> dict:
    """What ``GenerationActor.info`` answers; ``files``: its LoRA files (name -> size and hash)."""
    return {
        "name": name,
        "label": f"{name}:0/cpu",
        "actor_id": actor_id or f"actor-{name}",
        "model": model,
        "family": "sd1" if model else None,
        "native_size": 512 if model else None,
        "loras": list(files or loras),
        "lora_files": files or {lora: {"size": None, "hash": None} for lora in loras},
        "running": 0,
        "done": 0,
    }


@pytest.fixture()
def app(tiny_models, tmp_path):
    """The services of an app with one CPU worker (no model loaded); remote workers are added by the tests."""
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=loras,
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
        load_model_at_start=False,
    )
    built = build_services(settings, record_results=False)
    yield built
    assert built.close(WAIT)


def hold(app, worker: int) -> threading.Event:
    """Worker ``worker`` kept busy (a job meant for it alone) until the returned event is set."""
    started, release = threading.Event(), threading.Event()
    app.jobs.submit("hold", lambda job: (started.set(), release.wait(WAIT)), worker=worker)
    assert started.wait(WAIT)
    return release


def add_remote(app, name: str, **info) -> tuple[RemoteEngine, ScriptedActor]:
    actor = ScriptedActor()
    result = SimpleNamespace(cancelled=False, family="sd1")
    engine = RemoteEngine(ScriptedRay(result), actor, remote_info(name, **info), actor_name=f"lorapg-worker:{name}:0")
    app.service.add_worker(engine)
    return engine, actor


def app_files(app, *names: str, **hashes: str) -> dict:
    """The app's LoRA files ``names`` as a worker with the same copies reports them (``hashes``: where hashed)."""
    folder = app.settings.lora_dir
    return {name: {"size": (folder / f"{name}.safetensors").stat().st_size, "hash": hashes.get(name)} for name in names}


def sent_loras(actor: ScriptedActor) -> list[str]:
    (request,) = [args[1] for name, args, _kwargs in actor.calls if name == "generate"]
    return [lora.name for lora in request.loras]


# --- 1. a LoRA typed as a path reaches the worker as its library name ---------------------------


@pytest.mark.parametrize("typed", ["absolute", "relative"])
def test_a_lora_typed_as_a_path_reaches_the_remote_worker_as_its_library_name(app, typed, monkeypatch):
    folder = app.settings.lora_dir
    if typed == "absolute":
        tag = str(folder / "style.safetensors")
    else:  # relative to the working directory, as `models/loras/style` is typed
        monkeypatch.chdir(folder.parent)
        tag = f"{folder.name}/style"
    assert app.service.prepare(GenerationRequest(prompt=f"a fox <lora:{tag}:0.5>")).loras == (
        LoraRequest("style", 0.5),
    )
    _engine, actor = add_remote(app, "wa", files=app_files(app, "style"), model=str(app.settings.model))
    release = hold(app, 0)  # the app's own worker is busy: the one that has `style` runs it
    try:
        job = app.service.submit_generation(GenerationRequest(prompt=f"a fox <lora:{tag}:0.5>", width=64, height=64))
        assert job.wait(WAIT) and job.status == DONE, job.error
        assert job.worker == 1
    finally:
        release.set()
    assert sent_loras(actor) == ["style"]  # the worker resolves it in its own folder


# --- 2, 6, 7. worker discovery: odd answers, slow workers, newer model state ---------------------

PREFIX = ray_workers.ACTOR_PREFIX
SILENT = object()  # an info call that has not answered (yet)


class Cluster(ScriptedRay):
    """The cluster's named actors (``actors``: name -> ScriptedActor); an info call answers once its
    actor's ``info_answer`` is not ``SILENT``."""

    def __init__(self, actors: dict):
        super().__init__(SimpleNamespace(cancelled=False, family="sd1"))
        self.actors = actors
        self.util = SimpleNamespace(list_named_actors=lambda: list(self.actors))
        self.info_timeouts = []  # the timeout of every ray.get of an info call

    def get_actor(self, name):
        if name not in self.actors:
            raise ValueError(f"Failed to look up actor with name {name!r}")
        return self.actors[name]

    def answered(self, ref) -> bool:
        return ref[0] != "info" or ref[2].info_answer is not SILENT

    def wait(self, refs, num_returns=1, timeout=None):
        return [ref for ref in refs if self.answered(ref)], [ref for ref in refs if not self.answered(ref)]

    def get(self, token, timeout=None):
        if token[0] == "info":
            self.info_timeouts.append(timeout)
            if not self.answered(token):
                raise exceptions.GetTimeoutError("no answer yet")
        return super().get(token, timeout)


def devices(app) -> list[str]:
    return [worker.device for worker in app.workers.workers]


def test_one_odd_answer_or_failed_join_does_not_keep_the_other_workers_out(app, monkeypatch, caplog):
    class Stranger:  # another program's actor under the name prefix: no info() at all
        pass

    odd = ScriptedActor({"label": "wa:0/cpu"})  # no actor_id: an actor of another version
    failing, good = ScriptedActor(remote_info("wb")), ScriptedActor(remote_info("wc"))
    actors = {f"{PREFIX}wa:0": odd, f"{PREFIX}wb:0": failing, f"{PREFIX}wc:0": good}
    cluster = Cluster({f"{PREFIX}w0:0": Stranger(), **actors})
    add_worker = app.service.add_worker

    def refuse_wb(engine):
        if engine.device == "ray:wb:0/cpu":
            raise RuntimeError("its engine is odd")
        return add_worker(engine)

    monkeypatch.setattr(app.service, "add_worker", refuse_wb)
    discovery = ray_workers.WorkerDiscovery(cluster, app.service)
    with caplog.at_level(logging.WARNING, logger=ray_workers.__name__):
        assert discovery.look() == [1]
        assert discovery.look() == []  # asked again next round: skipped again, without a second warning
    assert devices(app) == ["cpu", "ray:wc:0/cpu"]
    assert caplog.text.count(f"{PREFIX}wa:0 answered") == 1
    assert caplog.text.count(f"{PREFIX}wb:0 could not join") == 1
    assert caplog.text.count(f"{PREFIX}w0:0 has no info()") == 1


def test_a_worker_slow_to_answer_is_asked_once_and_joins_when_its_answer_comes(app, monkeypatch):
    monkeypatch.setattr(ray_workers, "JOIN_TIMEOUT_S", 0.0)  # the round's one deadline: now
    slow, fast = ScriptedActor(SILENT), ScriptedActor(remote_info("wb"))
    cluster = Cluster({f"{PREFIX}wa:0": slow, f"{PREFIX}wb:0": fast})
    discovery = ray_workers.WorkerDiscovery(cluster, app.service)
    assert discovery.look() == [1]  # the fast one joins while the slow one has not answered
    assert discovery.look() == []
    slow.info_answer = remote_info("wa")  # its folder scanned at last
    assert discovery.look() == [2]
    assert devices(app) == ["cpu", "ray:wb:0/cpu", "ray:wa:0/cpu"]
    assert [call[0] for call in slow.calls].count("info") == 1  # never asked again while it had not answered
    assert set(cluster.info_timeouts) == {0}  # answers are read once ready: no wait on one worker after another


def test_discovery_updates_a_workers_loras_but_not_a_model_the_app_set_since(app):
    actor = ScriptedActor(remote_info("wa", model="old-model"))
    discovery = ray_workers.WorkerDiscovery(Cluster({f"{PREFIX}wa:0": actor}), app.service)
    assert discovery.look() == [1]
    engine = app.workers.engine(1)
    # A snapshot the worker took before the generation below finished, arriving after it.
    actor.info_answer = remote_info("wa", model="old-model", loras=["style"])
    engine.generate(GenerationRequest(prompt="a fox"), model_ref="new-model")
    assert engine.model.source.ref == "new-model"
    discovery.look()
    assert engine.model.source.ref == "new-model" and engine.loras == ["style"]


def test_close_gives_discovery_and_the_queue_one_deadline_together(app):
    class SlowDiscovery:
        def stop(self, timeout):
            self.given = timeout
            time.sleep(0.2)  # it used part of the time
            return False  # and has not ended

    class Queue:
        def close(self, timeout):
            self.given = timeout
            return True

    discovery, queue = SlowDiscovery(), Queue()
    assert not replace(app, discovery=discovery, jobs=queue).close(5.0)  # discovery still runs: not closed
    assert discovery.given == 5.0 and queue.given <= 4.8


# --- 3. workers that join later get UI slots and the backlog ---------------------------------------


@pytest.fixture()
def ray_app(tiny_models, tmp_path, monkeypatch):
    """The services of an app started with ``--ray`` while no worker was connected yet (the cluster
    lookups stubbed out): one CPU worker; remote ones are added by the tests, as discovery adds them."""
    monkeypatch.setattr(build, "remote_workers", lambda settings: [])
    monkeypatch.setattr(build, "worker_discovery", lambda settings, service: None)
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=tiny_models["loras"],
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
        load_model_at_start=False,
        ray="127.0.0.1:1",
    )
    built = build_services(settings, record_results=False)
    yield built
    assert built.close(WAIT)


def test_a_backlog_queued_while_one_worker_served_moves_to_a_worker_that_joins(ray_app):
    release = hold(ray_app, 0)
    try:
        job = ray_app.service.submit_generation(GenerationRequest(prompt="a fox", width=64, height=64))
        add_remote(ray_app, "wa", model=str(ray_app.settings.model))
        assert job.wait(WAIT) and job.status == DONE, job.error  # while the first worker is still busy
        assert job.worker == 1
    finally:
        release.set()


def test_with_ray_the_ui_does_not_cap_generations_at_the_workers_there_at_start(ray_app):
    from lorapg.ui.app_ui import build_ui
    from lorapg.ui.common import GROWING_GPU_SLOTS

    demo = build_ui(ray_app.service, ray_app.gallery_service, training_service=ray_app.training)
    gpu = {fn.api_name: fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "gpu"}
    assert gpu == {"generate": GROWING_GPU_SLOTS, "gallery_vary": GROWING_GPU_SLOTS}
    # A load or a grid (first worker alone) waits in its own group: Gradio would give "gpu" their limit of 1.
    primary = {fn.api_name for fn in demo.fns.values() if fn.concurrency_id == "gpu-primary"}
    assert {"load_model", "grid"} <= primary


def test_without_ray_one_worker_keeps_its_one_gpu_slot(app):
    from lorapg.ui.common import gpu_slots, primary_worker_group

    assert gpu_slots(app.jobs) == 1 and primary_worker_group(app.jobs)["concurrency_id"] == "gpu"
    release = hold(app, 0)
    job = app.service.submit_generation(GenerationRequest(prompt="a fox", width=64, height=64))
    app.jobs.cancel(job.id)  # it never runs: only where it was meant to run matters
    release.set()
    assert job.worker == 0  # meant for the one worker, as before --devices


# --- 4. the CLI stops worker discovery ------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "grid"])
def test_a_cli_command_with_ray_stops_worker_discovery_before_it_exits(tiny_models, tmp_path, monkeypatch, command):
    from lorapg.cli import main

    class Discovery:
        stopped = False

        def stop(self, timeout=None):
            self.stopped = True
            return True

    discovery = Discovery()
    monkeypatch.setattr(build, "remote_workers", lambda settings: [])
    monkeypatch.setattr(build, "worker_discovery", lambda settings, service: discovery)
    args = [command, "--model", str(tiny_models["sd15"]), "--lora-dir", str(tiny_models["loras"])]
    args += ["--outputs", str(tmp_path / "outputs"), "--threads", "1", "--ray", "127.0.0.1:1", "--prompt", "x"]
    args += ["--lora", "unknown_lora", "--out", str(tmp_path / "out")]  # refused before any model loads
    if command == "grid":
        args += ["--x", "steps=1,2"]
    assert main(args) == 2
    assert discovery.stopped


# --- 5. the worker lists its LoRAs cheaply ---------------------------------------------------------


def worker_settings(folder, tmp_path) -> Settings:
    """A worker's settings with no model to load at start (its LoRA checks come before any load)."""
    return Settings(model="", lora_dir=folder, models_dir=tmp_path / "models", outputs=tmp_path / "out", device="cpu")


def test_the_worker_reads_each_lora_header_once_per_file_version_and_logs_a_non_lora_once(
    tiny_models, tmp_path, monkeypatch, caplog
):
    folder = tmp_path / "worker-loras"
    shutil.copytree(tiny_models["loras"], folder)
    actor = ray_workers.GenerationActor(worker_settings(folder, tmp_path), "cpu", "wa")
    read, describe = [], actor.library.describe
    monkeypatch.setattr(actor.library, "describe", lambda path: (read.append(path.name), describe(path))[1])
    with caplog.at_level(logging.WARNING):
        first, second = actor.info(), actor.info()  # two discovery rounds
    assert first["loras"] == second["loras"] and "style" in first["loras"] and "broken" not in first["loras"]
    assert first["lora_files"]["style"]["size"] == (folder / "style.safetensors").stat().st_size
    assert sorted(read) == sorted(path.name for path in folder.rglob("*.safetensors"))  # each header once
    assert caplog.text.count("skipping LoRA") == 1  # `broken`, once
    os.utime(folder / "other.safetensors", ns=(1, 1))  # replaced by another version
    read.clear()
    assert "other" in actor.info()["loras"] and read == ["other.safetensors"]


# --- 8. a LoRA of the same name is not enough: the same file --------------------------------------


def test_a_worker_whose_lora_differs_in_size_or_hash_is_not_able_to_run_it(app):
    from lorapg.hashing import lora_hash

    mine = lora_hash(app.settings.lora_dir / "style.safetensors")  # hashed here once (the gallery does)
    same = app_files(app, "style")
    resized = {"style": {**same["style"], "size": same["style"]["size"] + 1}}
    rehashed = app_files(app, "style", style="0" * 12)
    hashed_alike = app_files(app, "style", style=mine)
    for name, files in [("wa", same), ("wb", resized), ("wc", rehashed), ("wd", hashed_alike)]:
        add_remote(app, name, files=files, model=str(app.settings.model))
    releases = [hold(app, index) for index in range(len(app.workers))]
    try:
        job = app.service.submit_generation(GenerationRequest(prompt="a fox <lora:style:0.5>", width=64, height=64))
        assert job.able == frozenset({0, 1, 4})
    finally:
        app.jobs.cancel(job.id)
        for release in releases:
            release.set()


def test_a_worker_refuses_a_lora_that_differs_from_the_apps_and_says_so(app, tiny_models, tmp_path):
    from lorapg.errors import UserError
    from lorapg.hashing import lora_hash

    folder = tmp_path / "worker-loras"
    folder.mkdir()
    shutil.copy(tiny_models["loras"] / "other.safetensors", folder / "style.safetensors")  # another file
    actor = ray_workers.GenerationActor(worker_settings(folder, tmp_path), "cpu", "wa")
    request = app.service.prepare(GenerationRequest(prompt="a fox <lora:style:0.5>", width=64, height=64))
    with pytest.raises(UserError) as raised:
        actor.generate("job-1", request, str(app.settings.model), None, app.service._lora_files(request, hashed=True))
    assert str(raised.value).startswith("loras: LoRA 'style' differs in the LoRA folder of worker 'wa'")
    assert "from the app's copy" in str(raised.value)
    # Hashed there now: the app sees the difference and routes the LoRA elsewhere from now on.
    assert actor.info()["lora_files"]["style"]["hash"] == lora_hash(folder / "style.safetensors")


# --- 9. a worker restarting in a loop leaves no trail ----------------------------------------------


def test_a_restarted_worker_takes_the_slot_of_its_lost_former_self(app):
    actor = ScriptedActor(remote_info("wa", model=str(app.settings.model)))
    cluster = Cluster({f"{PREFIX}wa:0": actor})
    discovery = ray_workers.WorkerDiscovery(cluster, app.service)
    assert discovery.look() == [1]
    for restart in range(3):
        del cluster.actors[f"{PREFIX}wa:0"]  # its process stopped: the name is released
        discovery.look()
        assert app.jobs.lost() == [1]
        app.jobs._workers[1].join(WAIT)  # its thread ends: nothing was meant for it alone
        actor = ScriptedActor(remote_info("wa", model=str(app.settings.model), actor_id=f"restarted-{restart}"))
        cluster.actors[f"{PREFIX}wa:0"] = actor
        assert discovery.look() == [1]  # the same slot
    assert [(status.device, status.state) for status in app.service.worker_status()] == [
        ("cpu", "idle"),
        ("ray:wa:0/cpu", "idle"),
    ]
    assert app.workers.engine(1).actor_id == "restarted-2"
    assert [thread.is_alive() for thread in app.jobs._workers] == [True, True]
