"""How the app side of a Ray worker meets Ray's failures, and a cancel that overtakes its generation
(issue 20 item 3 follow-ups). Fast: no cluster. ``RemoteEngine`` runs over a scripted stand-in for the
``ray`` module that raises Ray's real exception classes (an unreachable actor cannot be produced on
demand on one machine); the actor is the real ``GenerationActor``, called in this process.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]>=2.40'): Ray workers untested")

from ray import exceptions  # noqa: E402

from lorapg.config import Settings  # noqa: E402
from lorapg.diffusion.request import GenerationRequest  # noqa: E402
from lorapg.jobs import WorkerLost  # noqa: E402
from lorapg.services import ray_workers  # noqa: E402
from lorapg.services.ray_workers import GenerationActor, RemoteEngine  # noqa: E402


class _Method:
    def __init__(self, actor, name):
        self.actor, self.name = actor, name

    def remote(self, *args):
        self.actor.calls.append((self.name, args))
        return (self.name, args, self.actor)


class ScriptedActor:
    """An actor handle: each ``.method.remote(...)`` returns a token that ``ScriptedRay.get`` answers."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return _Method(self, name)


class ScriptedRay:
    """``get``/``wait``/``kill`` as ``ray`` has them; ``answers[method]`` is a value or an exception
    (raised), ``finished`` whether the pending generation is done."""

    exceptions = exceptions

    def __init__(self, answers, finished=False, wait_error=None):
        self.answers, self.finished, self.wait_error = answers, finished, wait_error
        self.events = []  # ("kill", ...) in the order things happened
        self.waits = 0

    def get(self, token, timeout=None):
        answer = self.answers[token[0]]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def wait(self, refs, timeout=None):
        self.waits += 1
        assert self.waits < 1000, "the app never gave up on a worker that does not answer"
        if self.wait_error is not None:
            raise self.wait_error
        return (refs, []) if self.finished else ([], refs)

    def kill(self, actor, no_restart=True):
        self.events.append("kill")


def engine(ray) -> RemoteEngine:
    return RemoteEngine(ray, ScriptedActor(), {"label": "wa:0/cpu", "model": "m", "family": "sd1"})


@pytest.mark.parametrize(
    "error",
    [
        exceptions.ActorUnavailableError("the actor is temporarily unavailable", None),
        exceptions.ObjectLostError("ab" * 14, None, ""),
        exceptions.OwnerDiedError("ab" * 14, None, ""),
        exceptions.RaySystemError("the raylet is gone"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_ray_failure_kills_the_actor_before_the_job_moves_on(error):
    ray = ScriptedRay({"generate": error, "progress": None}, finished=True)
    remote = engine(ray)
    with pytest.raises(WorkerLost, match=type(error).__name__):
        remote.generate(object())
    # Killed first: an actor that was only unreachable must not finish the job the queue runs again.
    assert ray.events == ["kill"]


def test_a_failure_while_waiting_loses_the_worker_too():
    ray = ScriptedRay({"progress": None}, wait_error=exceptions.RaySystemError("the raylet is gone"))
    with pytest.raises(WorkerLost, match="RaySystemError"):
        engine(ray).generate(object())
    assert ray.events == ["kill"]


def test_a_worker_that_stops_answering_progress_polls_is_lost():
    ray = ScriptedRay({"progress": exceptions.GetTimeoutError("no answer")})  # never finishes
    remote = engine(ray)
    with pytest.raises(WorkerLost, match="progress polls"):
        remote.generate(object())
    polls = [name for name, _ in remote._actor.calls if name == "progress"]
    assert len(polls) == ray_workers.MISSED_POLLS and ray.events == ["kill"]


def test_a_worker_not_ready_at_app_start_is_left_out_with_its_name(monkeypatch, caplog):
    ready, hung = ScriptedActor(), ScriptedActor()
    info = {"label": "wa:0/cpu", "model": "m", "family": "sd1"}

    class Cluster(ScriptedRay):
        class util:
            @staticmethod
            def list_named_actors():
                return [f"{ray_workers.ACTOR_PREFIX}wa:0", f"{ray_workers.ACTOR_PREFIX}wb:0"]

        def get_actor(self, name):
            return ready if name.endswith("wa:0") else hung

        def get(self, token, timeout=None):
            if token[2] is hung:  # still building its engine when the deadline passes
                raise exceptions.GetTimeoutError("not ready")
            return info

    monkeypatch.setattr(ray_workers, "connect", lambda address: Cluster({}))
    with caplog.at_level(logging.WARNING, logger=ray_workers.__name__):
        engines = ray_workers.remote_engines("127.0.0.1:1", ready_s=1.0)
    assert [remote.device for remote in engines] == ["ray:wa:0/cpu"]
    assert "lorapg-worker:wb:0 was not ready" in caplog.text


def test_a_cancel_that_arrives_before_its_generation_still_stops_it(tiny_models, tmp_path):
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=tiny_models["loras"],
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
    )
    actor = GenerationActor(settings, "cpu", "wa")
    actor.cancel("job-1")  # overtook its generate call
    request = GenerationRequest(prompt="a red fox", steps=3, width=64, height=64, seed=1)
    result = actor.generate("job-1", request, str(tiny_models["sd15"]), None)
    assert result.cancelled
    assert actor.cancelling() == []  # cleared with the generation


def test_a_relative_model_path_reaches_the_actors_absolute(tmp_path, monkeypatch):
    from lorapg.worker_cli import absolute_if_path

    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert absolute_if_path("models/mine") == str(tmp_path / "models" / "mine")
    assert absolute_if_path("org/some-model") == "org/some-model"  # a hub id: no such folder here
    assert absolute_if_path(None) is None


def test_any_failure_to_reach_the_cluster_names_the_flag(monkeypatch):
    import ray

    from lorapg.errors import UserError

    def unreachable(**_options):
        raise exceptions.RaySystemError("failed to connect to the GCS")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", unreachable)
    with pytest.raises(UserError, match=r"--ray 10\.0\.0\.9:6379: no Ray cluster answered"):
        ray_workers.connect("10.0.0.9:6379")


def test_the_worker_hashes_its_loras_so_the_app_needs_no_path_to_them(tiny_models, tmp_path):
    import shutil

    from lorapg.diffusion.request import LoraRequest
    from lorapg.hashing import lora_hash
    from lorapg.outputs import image_record

    loras = tmp_path / "worker-loras"
    shutil.copytree(tiny_models["loras"], loras)
    expected = lora_hash(loras / "style.safetensors")
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=loras,
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
    )
    actor = GenerationActor(settings, "cpu", "wa")
    request = GenerationRequest(
        prompt="a red fox", steps=2, width=64, height=64, seed=1, loras=(LoraRequest("style", 0.8),)
    )
    result = actor.generate("job-2", request, str(tiny_models["sd15"]), None)
    shutil.rmtree(loras)  # the app's machine: no such folder
    record = image_record(result, 0)
    assert [(use.name, use.file_hash) for use in record.loras] == [("style", expected)]


def test_a_worker_without_a_lora_names_it_and_itself_and_serves_on(tiny_models, tmp_path):
    from lorapg.diffusion.request import LoraRequest
    from lorapg.errors import UserError
    from lorapg.jobs import WorkerUnfit

    empty = tmp_path / "worker-loras"
    empty.mkdir()
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=empty,
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
    )
    actor = GenerationActor(settings, "cpu", "gpu-box-1")
    info = actor.info()
    assert info["loras"] == [] and info["lora_dir"] == str(empty)  # what the app routes by
    plain = GenerationRequest(prompt="a red fox", steps=2, width=64, height=64, seed=1)
    both = (LoraRequest("style", 0.8), LoraRequest("other", 0.5))
    with pytest.raises(UserError) as raised:
        actor.generate("job-3", replace(plain, loras=both[:1]), str(tiny_models["sd15"]), None)
    assert not isinstance(raised.value, WorkerUnfit)  # the worker is not retired for it
    assert str(raised.value).startswith("loras: LoRA 'style' is not in the LoRA folder of worker 'gpu-box-1'")
    with pytest.raises(UserError, match="loras: LoRAs 'style', 'other' are not in the LoRA folder"):
        actor.generate("job-4", replace(plain, loras=both), str(tiny_models["sd15"]), None)
    assert actor.generate("job-5", plain, str(tiny_models["sd15"]), None).images  # it serves on
    assert actor.progress("job-3") is None  # nothing left behind
