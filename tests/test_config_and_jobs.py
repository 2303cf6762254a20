"""Settings precedence and strictness; the GPU job queue's order, progress and cancellation."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from lorapg.config import Settings, load_settings
from lorapg.errors import UserError
from lorapg.jobs import CANCELLED, DONE, ERROR, JobQueue


def test_toml_then_env_then_flags(tmp_path):
    config = tmp_path / "lorapg.toml"
    config.write_text('model = "from/toml"\nport = 7000\nthreads = 2\nlora_dir = "my/loras"\n')
    settings = load_settings(config, {"port": 9000}, environ={"LORAPG_THREADS": "1"})
    assert settings.model == "from/toml"
    assert settings.port == 9000 and settings.threads == 1
    assert settings.lora_dir == Path("my/loras")


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    config = tmp_path / "lorapg.toml"
    config.write_text('modle = "typo"\n')
    with pytest.raises(UserError, match="Unknown setting.*modle"):
        load_settings(config, environ={})
    config.write_text('port = "high"\n')
    with pytest.raises(UserError, match="'port'"):
        load_settings(config, environ={})
    config.write_text("port = [\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_settings(config, environ={})
    with pytest.raises(UserError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_share_without_auth_gets_a_random_password():
    settings = Settings(share=True)
    password = settings.ensure_share_auth()
    assert password and len(password) >= 12
    assert settings.auth_pair() == ("lorapg", password)
    assert Settings(share=True, auth="me:secret").ensure_share_auth() is None
    with pytest.raises(UserError, match="user:password"):
        Settings(auth="nopassword").auth_pair()


def test_jobs_run_in_order_and_report_progress():
    queue = JobQueue()
    order = []

    def work(name):
        def run(job):
            for step in range(1, 4):
                job.report(step, 3)
            order.append(name)
            return name

        return run

    jobs = [queue.submit("test", work(n)) for n in "abc"]
    for job in jobs:
        assert job.wait(5)
    assert order == ["a", "b", "c"]
    assert [j.status for j in jobs] == [DONE] * 3 and jobs[0].step == 3 and jobs[2].result == "c"


def test_cancel_queued_and_running_jobs_and_errors_do_not_stop_the_worker():
    queue = JobQueue()
    release, started = threading.Event(), threading.Event()

    def blocking(job):
        started.set()
        while not job.cancel_requested():
            release.wait(0.01)
        return "stopped"

    running = queue.submit("test", blocking)
    waiting = queue.submit("test", lambda job: "never")
    assert queue.position(waiting) == 1
    queue.cancel(waiting.id)
    assert started.wait(30)  # cancel a job that is really running, not one still queued
    queue.cancel(running.id)
    assert running.wait(30) and waiting.wait(30)
    assert running.status == CANCELLED and waiting.status == CANCELLED and waiting.result is None

    def broken(job):
        raise UserError("bad input")

    failed = queue.submit("test", broken)
    crashed = queue.submit("test", lambda job: 1 / 0)
    after = queue.submit("test", lambda job: "still serving")
    assert after.wait(30)
    assert failed.status == ERROR and failed.error == "bad input"
    assert crashed.status == ERROR and "ZeroDivisionError" in crashed.error
    assert after.status == DONE
    with pytest.raises(UserError, match="Unknown job id"):
        queue.get("nope")


def test_local_models_are_offered_as_choices(tiny_models, tmp_path):
    import shutil

    from lorapg.services.build import build_services

    models = tmp_path / "models"
    shutil.copytree(tiny_models["sd15"], models / "my-sd15")
    (models / "checkpoints").mkdir()
    (models / "checkpoints" / "civitai-model.safetensors").write_bytes(b"")
    shutil.copytree(tiny_models["loras"], models / "loras")
    settings = load_settings(
        None,
        {
            "model": "org/model",
            "models_dir": str(models),
            "lora_dir": str(models / "loras"),
            "outputs": str(tmp_path / "out"),
        },
        environ={},
    )
    runtime = build_services(settings)
    choices = runtime.service.model_choices()
    assert choices[0] == "org/model"
    assert str(models / "my-sd15") in choices
    assert str(models / "checkpoints" / "civitai-model.safetensors") in choices
    assert not any("loras" in choice for choice in choices)
    runtime.jobs.shutdown()


def test_queued_status_says_when_training_holds_the_gpu():
    from lorapg.ui.common import job_status_text

    queue = JobQueue()
    release, started = threading.Event(), threading.Event()
    training = queue.submit("train", lambda job: started.set() or release.wait(60))
    assert started.wait(30)
    waiting = queue.submit("generate", lambda job: "image")
    assert queue.running() is training
    text = job_status_text(waiting, queue)
    assert "1 job(s) ahead" in text and "LoRA training in progress" in text
    release.set()
    assert waiting.wait(30) and waiting.result == "image"


def test_interactive_jobs_go_ahead_of_queued_background_runs():
    """Three training runs queued for the night must not make a generation wait for all three: it runs
    after the job running now, and the runs keep their own order."""
    queue = JobQueue()
    release, started = threading.Event(), threading.Event()
    order = []

    def work(name, wait=False):
        def run(job):
            if wait:
                started.set()
                release.wait(60)
            order.append(name)
            return name

        return run

    running = queue.submit("train", work("run 1", wait=True), background=True)
    assert started.wait(30)
    run2 = queue.submit("train", work("run 2"), background=True)
    run3 = queue.submit("train", work("run 3"), background=True)
    generation = queue.submit("generate", work("generation"))
    prompt = queue.submit("prompt", work("prompt"))
    assert [queue.position(job) for job in (generation, prompt, run2, run3)] == [1, 2, 3, 4]
    release.set()
    for job in (running, run2, run3, generation, prompt):
        assert job.wait(30) and job.status == DONE
    assert order == ["run 1", "generation", "prompt", "run 2", "run 3"]
    assert queue.close(30)


def test_a_result_that_finished_despite_a_late_cancel_is_done():
    class Finished:
        cancelled = False

    queue = JobQueue()
    release, started = threading.Event(), threading.Event()

    def work(job):
        started.set()
        release.wait(60)
        return Finished()

    job = queue.submit("generate", work)
    assert started.wait(30)  # running, so the cancel comes after the work began
    queue.cancel(job.id)  # pressed after the last step: the images were made and saved
    release.set()
    assert job.wait(30) and job.status == DONE


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"policy": "sometimes"}, "Unknown memory policy 'sometimes'"),
        ({"vram_budget": "lots"}, "VRAM budget 'lots' is not a size"),
        ({"gallery_keep": -1}, "gallery size must be 0"),
    ],
)
def test_bad_memory_and_gallery_settings_are_refused_on_any_machine(tmp_path, overrides, message):
    """A typo in --policy / --vram-budget is reported on a CPU machine too, not only where a GPU makes it matter."""
    from lorapg.services.build import build_services

    settings = load_settings(None, {"outputs": str(tmp_path / "out"), **overrides}, environ={})
    with pytest.raises(UserError, match=message):
        build_services(settings)
