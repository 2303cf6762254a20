"""Generation workers on other machines through Ray (issue 20 item 3).

One local Ray cluster on 127.0.0.1 for the module (``ray start --head --block``) and two worker
processes started as users start them, ``python -m lorapg worker --connect ADDRESS``, on the tiny
SD 1.5. The app's services connect with ``--ray ADDRESS`` (``Settings.ray``). A job is held at its
first step by a file the test controls (tests/ray_hold/sitecustomize.py, on the cluster's
PYTHONPATH), never by timing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]>=2.40'): Ray workers untested")

from lorapg.config import Settings  # noqa: E402
from lorapg.diffusion.request import GenerationRequest  # noqa: E402
from lorapg.errors import UserError  # noqa: E402
from lorapg.jobs import CANCELLED, DONE, WorkerUnfit  # noqa: E402
from lorapg.services.build import build_services  # noqa: E402
from lorapg.worker_cli import READY  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HOOK = Path(__file__).resolve().parent / "ray_hold"
WAIT = 240  # seconds: a safety net against a hang, never what a test measures
WORKERS = ("wa", "wb")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.2)


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def cluster(tiny_models):
    """A head on 127.0.0.1 and two lorapg workers (one CPU actor each); torn down after the module."""
    # Short: Ray's socket paths live under its temp dir and must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="lpgray", dir="/tmp"))
    hold = root / "hold-dir"
    hold.mkdir()
    loras = root / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(HOOK)]),
        "LORAPG_TEST_HOLD_DIR": str(hold),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    port = free_port()
    address = f"127.0.0.1:{port}"
    head_cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}"]
    head_cmd += ["--node-ip-address=127.0.0.1", "--num-cpus=4", "--include-dashboard=false"]
    head_cmd += [f"--temp-dir={root / 'ray'}", "--disable-usage-stats"]
    head = start(head_cmd, root / "head.log", env=env)
    workers = {}
    try:
        wait_for(lambda: port_open(port), "the Ray head listening")
        for name in WORKERS:
            log = root / f"{name}.log"
            cmd = [sys.executable, "-m", "lorapg", "worker", "--connect", address, "--name", name]
            cmd += ["--device", "cpu", "--model", str(tiny_models["sd15"]), "--lora-dir", str(loras)]
            cmd += ["--models-dir", str(root / "models"), "--outputs", str(root / f"out-{name}")]
            workers[name] = start(cmd, log, cwd=REPO, env=env)
        for name in WORKERS:
            log = root / f"{name}.log"
            wait_for(lambda log=log, name=name: ready(log, workers[name]), f"worker {name} ready")
        yield {"address": address, "hold": hold, "loras": loras, "root": root, "workers": workers}
    finally:
        import ray

        ray.shutdown()  # the app's driver connection
        for process in workers.values():
            process.send_signal(signal.SIGTERM)
        for process in workers.values():
            process.wait(60)
        head.send_signal(signal.SIGTERM)  # --block: the head stops its own processes
        head.wait(60)
        shutil.rmtree(root, ignore_errors=True)


def start(cmd: list[str], log: Path, **options) -> subprocess.Popen:
    """A process writing its output to ``log`` (a file, not a pipe nobody drains)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **options)


def ready(log: Path, process: subprocess.Popen) -> bool:
    text = log.read_text()
    assert process.poll() is None, f"the worker exited: {text[-2000:]}"
    return READY in text


@pytest.fixture()
def app(cluster, tiny_models, tmp_path):
    """The app's services with ``--ray``: its own CPU worker first, then the remote ones."""
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=cluster["loras"],
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
        load_model_at_start=False,
        ray=cluster["address"],
    )
    built = build_services(settings)
    yield built
    assert built.jobs.close(WAIT)


def request(seed: int = 11) -> GenerationRequest:
    return GenerationRequest(prompt="a red fox", steps=3, width=64, height=64, seed=seed)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_generation_runs_on_a_remote_worker_like_a_local_one(app):
    remote = [device for device in app.workers.devices if device.startswith("ray:")]
    assert remote, app.workers.devices
    assert app.engine.model is None  # the model is resident only on the workers: they are asked first
    job = app.service.submit_generation(request())
    assert job.wait(WAIT)
    assert job.status == DONE, job.error
    assert job.device in remote
    # Saved into the app's gallery exactly as a local result.
    records = [record for record in app.gallery.list() if record.job_id == job.id]
    assert len(records) == 1 and Path(records[0].path).is_file()
    assert records[0].seed == 11
    app.engine.load_model(str(app.settings.model))
    local = app.engine.generate(request())
    diff = np.abs(pixels(job.result.images[0]) - pixels(local.images[0])).max()
    assert diff <= 1, f"remote and local images differ by {diff} levels"
    listed = {status.device: status for status in app.service.worker_status()}
    assert listed[job.device].model == str(app.settings.model) and listed[job.device].state == "idle"


def test_a_worker_whose_model_is_another_family_says_so(app):
    remote = next(worker.engine for worker in app.workers.workers if worker.device.startswith("ray:"))
    ref = str(app.settings.model)
    # WorkerUnfit: the queue retires that worker for the model instead of failing every Nth job on it.
    with pytest.raises(WorkerUnfit, match="as a sd1 model, but the request was checked for sdxl"):
        remote.generate(request(), model_ref=ref, family="sdxl")
    assert remote.generate(request(), model_ref=ref, family="sd1").images  # the worker serves on


def test_a_worker_killed_mid_job_hands_the_job_to_another(app, cluster):
    hold = cluster["hold"]
    (hold / "hold").write_text("")
    job = app.service.submit_generation(request(seed=5))
    wait_for(lambda: list(hold.glob("held-*")), "a worker holding the job")
    (held,) = hold.glob("held-*")
    held.unlink()
    first = job.device
    assert first.startswith("ray:")
    (hold / "hold").unlink()  # the retry is not held
    os.kill(int(held.name.removeprefix("held-")), signal.SIGKILL)
    assert job.wait(WAIT)
    assert job.status == DONE, job.error
    assert job.retries == 1 and job.device != first
    assert [app.workers.devices[index] for index in app.jobs.lost()] == [first]
    assert {status.device: status.state for status in app.service.worker_status()}[first] == "lost"
    # Run once: one image in the gallery for the job.
    assert len([record for record in app.gallery.list() if record.job_id == job.id]) == 1
    # The queue keeps serving with the workers it has.
    again = app.service.submit_generation(request(seed=6))
    assert again.wait(WAIT) and again.status == DONE, again.error
    assert again.device != first


def test_cancel_reaches_the_remote_worker(app, cluster):
    hold = cluster["hold"]
    (hold / "hold").write_text("")
    job = app.service.submit_generation(request(seed=8))
    wait_for(lambda: list(hold.glob("held-*")), "a worker holding the job")
    remote = app.workers.engine(job.worker)
    app.service.cancel(job.id)
    wait_for(lambda: remote._get(remote._actor.cancelling.remote()), "the cancel reaching the worker")
    for held in hold.glob("held-*"):
        held.unlink()
    (hold / "hold").unlink()  # released: the worker stops at the step it holds
    assert job.wait(WAIT)
    assert job.status == CANCELLED and job.result.cancelled
    assert not [record for record in app.gallery.list() if record.job_id == job.id]  # nothing saved


def test_without_ray_the_flag_says_to_install_it(monkeypatch):
    from lorapg.services.ray_workers import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    with pytest.raises(UserError, match="install ray to use --ray"):
        require_ray()
