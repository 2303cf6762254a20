"""Stopping the app (Ctrl+C, SIGTERM) while a generation runs: a clean exit, never an abort."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

import pytest
import requests

from tests.app_server import ROOT, free_port, wait_until_serving

# Many steps and batches, so the job is still running when the signal arrives (the test waits for step 1).
LONG = {"prompt": "a long job", "seed": 3, "steps": 50, "width": 128, "height": 128, "batch_size": 2, "n_iter": 8}


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_the_app_mid_generation_cancels_the_job_and_exits_cleanly(tiny_models, tmp_path, stop_signal):
    port = free_port()
    log_path = tmp_path / "app.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    args = ["--port", str(port), "--api", "--model", str(tiny_models["sd15"]), "--threads", "1"]
    args += ["--outputs", str(tmp_path / "outputs"), "--models-dir", str(tmp_path / "models")]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # As a shell starts a background job (`python app.py &`): SIGINT ignored, inherited by the app.
            preexec_fn=_ignore_sigint,
        )
    try:
        base = wait_until_serving(process, f"http://127.0.0.1:{port}/", log_path)
        replies: list = []
        client = threading.Thread(target=_post, args=(base + "sdapi/v1/txt2img", LONG, replies), daemon=True)
        client.start()
        _wait_for_a_sampling_step(base + "sdapi/v1/progress", process, replies)
        process.send_signal(stop_signal)
        returncode = process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
    output = log_path.read_text()
    assert "terminate called" not in output, output[-3000:]
    assert returncode == 0, output[-3000:]
    # The queue was closed (the running job cancelled, the worker joined) before the interpreter exited.
    assert "shut down" in output and "still busy" not in output, output[-3000:]


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _post(url: str, body: dict, replies: list) -> None:
    with contextlib.suppress(requests.RequestException):  # the server goes away under it: that is the test
        replies.append(requests.post(url, json=body, timeout=300))


def _wait_for_a_sampling_step(progress_url: str, process: subprocess.Popen, replies: list) -> None:
    while process.poll() is None:
        # A refused request (or one that somehow finished) would leave this loop waiting forever.
        assert not replies, f"the job ended before the app was stopped: {replies[0].text[:300]}"
        state = requests.get(progress_url, params={"skip_current_image": "true"}, timeout=30).json()["state"]
        if state["sampling_step"] >= 1:
            return
        threading.Event().wait(0.1)
    raise AssertionError("the app exited before the job started")


# Whatever way an entry point's main() ends, the heap is frozen before the interpreter's own exit: its
# final garbage collections then skip the objects torch, diffusers and gradio made (seconds of CPU at
# every exit of the app, the CLI and every process of a multi-process training run).
REPORT_FROZEN_AT_EXIT = """
import atexit, gc, runpy, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, file=sys.stderr))
entry, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
if entry.endswith(".py"):
    runpy.run_path(entry, run_name="__main__")
else:
    runpy.run_module(entry, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    ("entry", "args", "code"),
    [
        ("app.py", ["--help"], 0),
        ("app.py", ["--port", "not-a-port"], 2),
        ("lorapg", ["--help"], 0),
        ("lorapg.demo", ["--help"], 0),
    ],
    ids=["app-help", "app-refused", "cli", "demo-cli"],
)
def test_entry_points_exit_without_collecting_the_whole_heap(entry, args, code, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    program = str(ROOT / entry) if entry.endswith(".py") else entry
    done = subprocess.run(
        [sys.executable, "-c", REPORT_FROZEN_AT_EXIT, program, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == code, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == "frozen at exit: True", done.stderr[-2000:]
