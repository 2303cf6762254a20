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
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]>=2.40'): Ray workers untested")

from lorapg.config import Settings  # noqa: E402
from lorapg.diffusion.request import GenerationRequest, LoraRequest  # noqa: E402
from lorapg.errors import UserError  # noqa: E402
from lorapg.jobs import CANCELLED, DONE, ERROR, QUEUED, WorkerUnfit  # noqa: E402
from lorapg.services.build import build_services  # noqa: E402
from lorapg.worker_cli import READY  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HOOK = Path(__file__).resolve().parent / "ray_hold"
WAIT = 240  # seconds: a safety net against a hang, never what a test measures
WORKERS = ("wa", "wb")
LATE = "wc"  # a worker started while the app runs, with its own empty LoRA folder
LATE_DEVICE = f"ray:{LATE}/cpu"


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
        running = {"address": address, "hold": hold, "loras": loras, "root": root, "workers": workers, "env": env}
        for name in WORKERS:
            start_worker(running, tiny_models, name, loras)
        for name in WORKERS:
            wait_ready(running, name)
        yield running
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


def start_worker(cluster: dict, tiny_models, name: str, loras: Path) -> None:
    """``python -m lorapg worker`` as users start it, on the tiny SD 1.5, with its own LoRA folder; the
    module's teardown stops it (``cluster["workers"]``)."""
    root = cluster["root"]
    cmd = [sys.executable, "-m", "lorapg", "worker", "--connect", cluster["address"], "--name", name]
    cmd += ["--device", "cpu", "--model", str(tiny_models["sd15"]), "--lora-dir", str(loras)]
    cmd += ["--models-dir", str(root / "models"), "--outputs", str(root / f"out-{name}")]
    cluster["workers"][name] = start(cmd, root / f"{name}.log", cwd=REPO, env=cluster["env"])


def wait_ready(cluster: dict, name: str) -> None:
    log, process = cluster["root"] / f"{name}.log", cluster["workers"][name]
    wait_for(lambda: ready(log, process), f"worker {name} ready")


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
    assert built.close(WAIT)  # worker discovery too
    assert not built.discovery._thread.is_alive()


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


def start_late_worker(cluster, tiny_models) -> None:
    """The worker ``LATE`` (again, when a test stopped it), with an empty LoRA folder of its own."""
    folder = cluster["root"] / f"{LATE}-loras"
    folder.mkdir(exist_ok=True)
    start_worker(cluster, tiny_models, LATE, folder)
    wait_ready(cluster, LATE)


def late_workers(app) -> list:
    """The app's entries for the ``LATE`` worker, one per time it joined (each process a new worker)."""
    return [status for status in app.service.worker_status() if status.device == LATE_DEVICE]


def hold_workers(app) -> list:
    """Every worker the app has now, kept busy by a queue job meant for it alone until its event is set."""
    holds = []
    for index in range(len(app.workers)):
        started, release = threading.Event(), threading.Event()
        app.jobs.submit("hold", lambda job, s=started, r=release: (s.set(), r.wait(WAIT)), worker=index)
        assert started.wait(WAIT)
        holds.append(release)
    return holds


def test_a_worker_started_after_the_app_joins_the_queue_and_again_after_a_restart(app, cluster, tiny_models):
    assert not late_workers(app)  # not running when the app started
    holds = hold_workers(app)
    try:
        # Queued while every worker the app has is busy: the worker that joins takes it at once.
        job = app.service.submit_generation(request(seed=21))
        start_late_worker(cluster, tiny_models)
        assert job.wait(WAIT)
        assert job.status == DONE, job.error
        assert job.device == LATE_DEVICE
    finally:
        for release in holds:
            release.set()
    # Listed as the API and the memory panel list workers, and saved into the app's gallery.
    (listed,) = late_workers(app)
    assert listed.model == str(app.settings.model) and listed.state == "idle"
    assert len([record for record in app.gallery.list() if record.job_id == job.id]) == 1
    # Its process restarted under the same name: the old entry is lost, and the new process takes its
    # slot (a worker restarting in a loop leaves no trail of threads and rows).
    process = cluster["workers"][LATE]
    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT) == 0
    wait_for(lambda: [status.state for status in late_workers(app)] == ["lost"], "the stopped worker listed as lost")
    old_engine = app.workers.engine(listed.index)
    start_late_worker(cluster, tiny_models)
    wait_for(lambda: app.workers.engine(listed.index) is not old_engine, "the restarted worker joined")
    wait_for(lambda: [status.state for status in late_workers(app)] == ["idle"], "the restarted worker listed")
    (new,) = late_workers(app)
    assert new.index == listed.index and app.workers.engine(new.index).actor_id != old_engine.actor_id
    holds = hold_workers(app)
    holds.pop(new.index).set()  # every worker busy but the new one
    try:
        again = app.service.submit_generation(request(seed=22))
        assert again.wait(WAIT) and again.status == DONE, again.error
        assert again.worker == new.index
    finally:
        for release in holds:
            release.set()


def run_on(app, index: int, req: GenerationRequest):
    """A generation as the service runs it, in a job meant for worker ``index`` alone."""
    prepared, ref = app.service.prepare(req), str(app.settings.model)
    return app.jobs.submit("generate", lambda job: app.service.run_in_job(prepared, job, model_ref=ref), worker=index)


def test_a_lora_runs_on_a_worker_that_has_it_and_one_that_lacks_it_says_so(app, cluster, tiny_models):
    if cluster["workers"].get(LATE) is None or cluster["workers"][LATE].poll() is not None:
        start_late_worker(cluster, tiny_models)  # this test run alone
    wait_for(lambda: "idle" in [status.state for status in late_workers(app)], "the late worker listed")
    late = next(status.index for status in late_workers(app) if status.state == "idle")
    engine = app.workers.engine(late)
    assert engine.loras == [] and engine.info["lora_dir"].endswith(f"{LATE}-loras")
    with_lora = replace(request(seed=31), loras=(LoraRequest("style", 1.0),))
    # Every worker but the one lacking the LoRA is busy: it passes over the job (it takes the one after).
    holds = hold_workers(app)
    holds.pop(late).set()
    try:
        job = app.service.submit_generation(with_lora)
        plain = app.service.submit_generation(request(seed=32))
        assert plain.wait(WAIT) and plain.status == DONE and plain.worker == late, plain.error
        assert job.status == QUEUED
    finally:
        for release in holds:
            release.set()
    assert job.wait(WAIT) and job.status == DONE, job.error
    assert job.worker != late and job.device != LATE_DEVICE
    (record,) = [record for record in app.gallery.list() if record.job_id == job.id]
    assert [use.name for use in record.loras] == ["style"]  # the LoRA was applied where it ran
    # Run on the lacking worker alone: the error names the field, the file and the worker.
    failed = run_on(app, late, with_lora)
    assert failed.wait(WAIT) and failed.status == ERROR
    assert f"loras: LoRA 'style' is not in the LoRA folder of worker '{LATE}'" in failed.error
    # The worker is neither retired nor lost: it keeps serving.
    assert late not in app.jobs.retired() + app.jobs.lost()
    served = run_on(app, late, request(seed=33))
    assert served.wait(WAIT) and served.status == DONE, served.error
    # The file copied there: the app sees it (the look-out asks the worker again) and the LoRA runs there.
    shutil.copy(cluster["loras"] / "style.safetensors", Path(engine.info["lora_dir"]) / "style.safetensors")
    wait_for(lambda: "style" in engine.loras, "the copied LoRA reported")
    copied = run_on(app, late, with_lora)
    assert copied.wait(WAIT) and copied.status == DONE, copied.error


def test_without_ray_the_flag_says_to_install_it(monkeypatch):
    from lorapg.services.ray_workers import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    with pytest.raises(UserError, match="install ray to use --ray"):
        require_ray()
