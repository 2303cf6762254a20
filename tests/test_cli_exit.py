"""CLI error paths end the process cleanly: exit status 2, one error line, never an abort.

The abort was "terminate called without an active exception" (exit status 134): the job queue's worker is
a daemon thread, and a daemon thread still inside torch when the interpreter shuts down kills the process.
It was still there because waiters were woken before a failed job's frames (a half-loaded model) were
freed, and because the CLI never waited for the worker to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from lorapg.cli import main
from lorapg.errors import UserError
from lorapg.jobs import ERROR, JobQueue
from tests.forked_runs import HEAVY_MODULES, forked_runs
from tests.training_data import write_images

ROOT = Path(__file__).resolve().parent.parent
# Each case runs RUNS processes: one fresh interpreter as a user starts it, then RUNS - 1 forked from one
# interpreter that imported torch and diffusers once (tests/forked_runs.py), so repeating a race costs
# seconds per run instead of a fresh interpreter's ~10 s of imports. Three runs per case in the full suite
# (was five: this module was the second-longest, 197 worker-seconds with two xdist workers).
RUNS = 3 if os.environ.get("LORAPG_SLOW_TESTS") == "1" else 2


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


def _runs(
    args: list[str], *, cwd: Path, module: str | None = None, code: str | None = None, env=None, preload=None
) -> list[subprocess.CompletedProcess]:
    """``python -m module *args`` (or ``python -c code *args``) RUNS times: once fresh, then forked."""
    env = env or _env()
    program = ["-m", module] if module else ["-c", code]
    fresh = subprocess.run(
        [sys.executable, *program, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    extra = {} if preload is None else {"preload": preload}
    return [fresh, *forked_runs(RUNS - 1, list(args), cwd=cwd, env=env, module=module, code=code, **extra)]


def _assert_clean_error(done: subprocess.CompletedProcess, message: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "terminate called" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    # One error line, and it is the last thing printed (no progress bar redrawn after it).
    assert len(errors) == 1 and message in errors[0] and lines[-1] == errors[0], done.stderr[-2000:]


# --- the job queue ---------------------------------------------------------------------------------


def test_a_failed_jobs_frames_are_freed_before_its_waiters_wake():
    queue = JobQueue()
    seen: dict[str, bool] = {}

    class Leftover:  # stands for a half-loaded model held by the failing work's frame
        def __del__(self):
            seen["finished_when_freed"] = job.finished

    def work(_job):
        leftover = Leftover()  # noqa: F841 - held by this frame, so by the exception's traceback
        raise UserError("the model is broken")

    job = queue.submit("load", work)
    assert job.wait(30) and job.status == ERROR
    assert seen == {"finished_when_freed": False}
    assert queue.close(30)


def test_close_cancels_the_running_job_and_ends_the_worker():
    queue = JobQueue()
    started = threading.Event()

    def work(job):
        started.set()
        while not job.cancel_requested():
            job._cancel.wait(0.05)
        return "stopped"

    running = queue.submit("generate", work)
    queued = queue.submit("generate", work)
    assert started.wait(30)
    assert queue.close(30)
    assert running.cancel_requested() and running.finished
    assert queued.status == "cancelled" and queued.message == "cancelled before it started"
    assert not queue._worker.is_alive()


# Exits right after a job failed, as the CLI does; the failed work leaves torch work to its destructor.
EXIT_AFTER_FAILED_JOB = textwrap.dedent("""
    import sys, torch
    from lorapg.errors import UserError
    from lorapg.jobs import JobQueue

    class Leftover:
        def __del__(self):  # torch releases the GIL here, as freeing a real model's parts can
            a = torch.randn(256, 256)
            for _ in range(400):
                a = torch.tanh(a @ a)

    def work(job):
        leftover = Leftover()
        raise UserError("refused")

    queue = JobQueue()
    job = queue.submit("generate", work)
    job.wait()  # no close(): waking only after the leftovers are freed must be enough
    print("error:", job.error, file=sys.stderr)
    sys.exit(2)
""")

# Ctrl-C (or any error in the main thread) while a job computes: close() must stop it before exit.
EXIT_WHILE_A_JOB_RUNS = textwrap.dedent("""
    import sys, threading, torch
    from lorapg.jobs import JobQueue

    started = threading.Event()

    def work(job):
        a = torch.randn(256, 256)
        started.set()
        while not job.cancel_requested():
            a = torch.tanh(a @ a)

    queue = JobQueue()
    queue.submit("generate", work)
    started.wait()
    queue.close()
    print("error: interrupted", file=sys.stderr)
    sys.exit(2)
""")


@pytest.mark.parametrize("script", [EXIT_AFTER_FAILED_JOB, EXIT_WHILE_A_JOB_RUNS], ids=["failed-job", "running-job"])
def test_a_process_exiting_after_a_job_does_not_abort(script, tmp_path):
    for done in _runs([], cwd=tmp_path, code=script, preload=("torch", "lorapg.jobs")):
        _assert_clean_error(done, "error:")


# --- the CLI's error paths, each run as a user runs it ---------------------------------------------


@pytest.fixture()
def broken_model(tiny_models, tmp_path) -> Path:
    """The tiny SD 1.x folder with a text encoder whose weights do not fit its config."""
    folder = tmp_path / "broken_model"
    subprocess.run(["cp", "-r", str(tiny_models["sd15"]), str(folder)], check=True)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] *= 2
    config_path.write_text(json.dumps(config))
    return folder


def test_generate_with_a_model_that_fails_to_load(tiny_models, broken_model, tmp_path):
    args = [
        "generate",
        "--model",
        str(broken_model),
        "--lora-dir",
        str(tiny_models["loras"]),
        "--outputs",
        str(tmp_path / "outputs"),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "x.png"),
    ]
    for done in _runs(args, cwd=tmp_path, module="lorapg"):
        _assert_clean_error(done, "RuntimeError")


def test_generate_with_a_loaded_lora_and_a_refused_one(tiny_models, tmp_path):
    args = [
        "generate",
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(tiny_models["loras"]),
        "--outputs",
        str(tmp_path / "outputs"),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--lora",
        "style:0.5",
        "--lora",
        "xl/xl_style:0.5",
        "--out",
        str(tmp_path / "x.png"),
    ]
    for done in _runs(args, cwd=tmp_path, module="lorapg"):
        _assert_clean_error(done, "made for SDXL")


def test_train_resuming_a_checkpoint_made_with_other_images(tiny_models, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'sample_steps = 0\ngradient_checkpointing = false\nbatch_size = 3\nwork_dir = "{tmp_path / "work"}"\n'
    )
    write_images(tmp_path / "first", 3)
    write_images(tmp_path / "second", 3, start=5)
    common = [
        "--model",
        str(tiny_models["sd15"]),
        "--trigger",
        "zqx",
        "--name",
        "run",
        "--epochs",
        "1",
        "--rank",
        "4",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--models-dir",  # the run history goes there: never into the checkout's models/
        str(tmp_path / "models"),
    ]
    # The checkpoint is made in-process (fast); the failing resumes run as a user runs them.
    assert main(["train", str(config), *common, "--images", str(tmp_path / "first"), "--out", str(tmp_path / "a")]) == 0
    resume = ["train", str(config), *common, "--images", str(tmp_path / "second"), "--out", str(tmp_path / "b")]
    for done in _runs(resume, cwd=tmp_path, module="lorapg", preload=(*HEAVY_MODULES, "lorapg.train_cli")):
        _assert_clean_error(done, "made with different settings (images)")


# --- the prompt tools' model threads (enhance / rewrite) -------------------------------------------
#
# When the LLM misses its deadline the writer answers with the rules, while the model's threads are still
# inside torch finishing a step; a CLI that exited then aborted. The writer now stops them with a flag
# generate() checks after each token, and the CLI stops and joins them (PromptService.close) before exit.


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    from tests.test_prompting_backends import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-llm"))


# `python -m lorapg` with one addition: the model's forward pass computes in torch until the writer has
# given up (its fallback warning is the signal), then a while longer, so the CLI reaches its exit while
# the model thread is still inside torch.
ENHANCE_WITH_A_SLOW_MODEL = textwrap.dedent("""
    import logging, sys, threading, torch
    from lorapg.prompting import backends

    gave_up = threading.Event()

    class GaveUp(logging.Handler):
        def emit(self, record):
            if "using rules" in record.getMessage():
                gave_up.set()

    logging.getLogger("lorapg.prompting.writer").addHandler(GaveUp())
    load = backends.TransformersBackend._from_pretrained

    def slow_load(self, *args, **kwargs):
        model, tokenizer = load(self, *args, **kwargs)

        def slow_forward(module, inputs, output):
            a = torch.randn(256, 256)
            while not gave_up.is_set():
                a = torch.tanh(a @ a)
            for _ in range(500):  # still computing when the main thread has printed the answer
                a = torch.tanh(a @ a)

        model.register_forward_hook(slow_forward)
        return model, tokenizer

    backends.TransformersBackend._from_pretrained = slow_load
    from lorapg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_enhance_whose_llm_misses_its_deadline_exits_with_the_rules_answer(tiny_llm, tmp_path):
    args = [
        "enhance",
        "--keywords",
        "red fox, snowy forest",
        "--llm-backend",
        "transformers",
        "--llm-model",
        str(tiny_llm),
        "--outputs",
        str(tmp_path / "out"),
        "--models-dir",
        str(tmp_path / "models"),
        "--lora-dir",
        str(tmp_path / "loras"),
    ]
    env = dict(_env(), LORAPG_LLM_TIMEOUT="0.2")
    preload = (*HEAVY_MODULES, "lorapg.prompting.backends")
    for done in _runs(args, cwd=tmp_path, code=ENHANCE_WITH_A_SLOW_MODEL, env=env, preload=preload):
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stdout.startswith("red fox, snowy forest, highly detailed"), done.stdout
        assert "did not answer within 0.2 s" in done.stderr.splitlines()[-1], done.stderr[-2000:]  # "rules used: …"


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread not in before and thread.is_alive()]


def test_closing_a_model_stream_early_stops_and_joins_its_generate_thread(tiny_llm):
    from lorapg.prompting.backends import TransformersBackend

    backend = TransformersBackend(tiny_llm, device="cpu")
    before = set(threading.enumerate())
    pieces = backend.stream("You write prompts.", "Keywords: red fox", seed=3, max_new_tokens=120, timeout_s=60)
    assert next(pieces)
    pieces.close()  # the reader goes away after one piece, as the writer does at its deadline
    assert _new_threads(before) == []  # generation was stopped and its thread joined (the stop: next test)
    backend.release()


def test_prompt_service_close_stops_the_model_and_joins_its_threads(tiny_llm, tmp_path):
    from lorapg.config import load_settings
    from lorapg.services.build import build_services

    settings = load_settings(
        None,
        {
            "models_dir": str(tmp_path / "models"),
            "outputs": str(tmp_path / "out"),
            "lora_dir": str(tmp_path / "loras"),
            "llm_backend": "transformers",
            "llm_model": str(tiny_llm),
        },
        environ={},
    )
    runtime = build_services(settings, engines=False)
    service = runtime.prompts
    backend = service.backend
    backend.ensure_loaded()
    in_step, release = threading.Event(), threading.Event()
    forwards = []

    def held_step(*_):  # the third token's step waits until the test lets it finish
        forwards.append(1)
        if len(forwards) == 3:
            in_step.set()
            release.wait(60)

    backend.model.register_forward_hook(held_step)
    before = set(threading.enumerate())
    results = []
    asking = threading.Thread(target=lambda: results.append(service.enhance("red fox, snowy forest", seed=5)))
    asking.start()
    try:
        assert in_step.wait(60)
        assert service.close(timeout=0) is False  # flags set; the model is still inside its step
    finally:
        release.set()
    assert service.close() is True
    asking.join(60)
    assert len(forwards) == 3  # the step in progress finished, and no other began
    assert results and results[0].text  # the caller still got an answer
    # Once closed, prompt requests get the rules' answer at once instead of starting a model thread.
    after = service.enhance("red fox", seed=5)
    assert after.fell_back and "shutting down" in (after.reason or "")
    assert runtime.jobs.close(60)
    assert _new_threads(before) == []
