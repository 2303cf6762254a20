"""Two workers loading a model at once (``--devices cpu,cpu``: each worker's first job loads it).

diffusers builds a pipeline's modules under accelerate's ``init_empty_weights``, which patches
``nn.Module.register_parameter`` for the whole process, so two pipelines built at the same moment on
two threads could get each other's meta tensors ("Cannot copy out of meta tensor"), as
bench/bench_workers.py found. The loader builds them one at a time. The order is forced with events
the test controls: the first build is held until the second load has reached the loader's lock (or,
without one, the build itself).
"""

from __future__ import annotations

import threading

import torch

from lorapg.config import Settings
from lorapg.diffusion import pipeline_loader
from lorapg.jobs import DONE
from lorapg.services.build import build_services

WAIT = 120  # seconds: a safety net against a hang, never what the test measures


class SignallingLock:
    """The loader's lock, reporting a thread that arrives while the first build is held."""

    def __init__(self, first_held: threading.Event, second_arrived: threading.Event):
        self._lock = threading.Lock()
        self._first_held, self._second_arrived = first_held, second_arrived

    def __enter__(self):
        if self._first_held.is_set():
            self._second_arrived.set()
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


def test_two_workers_loading_at_once_build_their_pipelines_one_at_a_time(tiny_models, tmp_path, monkeypatch):
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=tiny_models["loras"],
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        load_model_at_start=False,
        device="cpu",
        devices="cpu,cpu",
    )
    built = build_services(settings, record_results=False)
    first_held, second_arrived, release = threading.Event(), threading.Event(), threading.Event()
    monkeypatch.setattr(pipeline_loader, "_BUILDING", SignallingLock(first_held, second_arrived), raising=False)
    building: list[str] = []  # the builds in progress
    most_at_once = 0
    original = pipeline_loader._from_folder

    def from_folder(*args, **kwargs):
        nonlocal most_at_once
        building.append(threading.current_thread().name)
        most_at_once = max(most_at_once, len(building))
        if not first_held.is_set():
            first_held.set()
            assert release.wait(WAIT), "the test never released the first build"
        else:
            second_arrived.set()  # no lock kept it out: it builds while the first one is held
        try:
            return original(*args, **kwargs)
        finally:
            building.remove(threading.current_thread().name)

    monkeypatch.setattr(pipeline_loader, "_from_folder", from_folder)
    try:
        jobs = [
            built.jobs.submit("load", lambda job, w=w: w.engine.load_model(settings.model), worker=w.index)
            for w in built.workers.workers
        ]
        assert first_held.wait(WAIT) and second_arrived.wait(WAIT)
        release.set()
        for job in jobs:
            assert job.wait(WAIT) and job.status == DONE, job.error
    finally:
        release.set()
        assert built.jobs.close(WAIT)
    assert most_at_once == 1
    for worker in built.workers.workers:  # both hold real weights, none left on the meta device
        unet = worker.engine.model.pipe.unet
        assert all(p.device == torch.device("cpu") for p in unet.parameters())
