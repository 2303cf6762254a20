"""The training queue: runs queued behind a busy GPU queue start in order, one at a time; a queued
run can be cancelled or removed before it starts; the history says so at every point."""

from __future__ import annotations

import threading

import pytest
import torch

from lorapg.config import Settings
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.errors import UserError
from lorapg.jobs import CANCELLED, DONE, JobQueue
from lorapg.services.training import TrainingService
from tests.training_data import write_images

# One step, no sample image: the queue is what is tested here, not the trainer.
FAST = dict(rank=4, alpha=4, epochs=1, max_steps=1, sample_steps=0, gradient_checkpointing=False, batch_size=2)


@pytest.fixture()
def training(tiny_models, tmp_path):
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=tmp_path / "loras",
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
    )
    jobs = JobQueue()
    engine = DiffusionEngine(LoraLibrary(settings.lora_dir), torch.device("cpu"), torch.float32)
    service = TrainingService(settings, jobs, engine)
    source = tmp_path / "upload"
    write_images(source, 2)
    service.dataset_add("foxes", sorted(source.iterdir()))
    yield service
    jobs.close(60)


def config(service: TrainingService, name: str):
    values = {"preset": "concept", "name": name, "trigger": f"zqx_{name}", **FAST}
    return service.config_for({**values, "images": str(service.dataset_folder("foxes"))})


def block_queue(service: TrainingService) -> threading.Event:
    """Occupy the GPU queue with a job that waits for the returned event (a long generation, say)."""
    release, started = threading.Event(), threading.Event()

    def hold(job):
        started.set()
        assert release.wait(120), "the blocking job was never released"

    service.jobs.submit("generate", hold)
    assert started.wait(30)
    return release


def test_queued_runs_start_in_order_and_queued_ones_can_be_cancelled_or_removed(training):
    release = block_queue(training)
    events: list[str] = []
    runs = {
        name: training.submit(config(training, name), on_progress=lambda update, n=name: events.append(n))
        for name in ("first", "second", "third", "fourth")
    }
    queue = training.queue()
    assert [record.name for record in queue] == ["first", "second", "third", "fourth"]
    assert {record.status for record in queue} == {"queued"}
    # A name still in the queue is refused: its LoRA would be written twice.
    with pytest.raises(UserError, match="already queued or running"):
        training.submit(config(training, "third"))

    training.remove(runs["second"].job.id)  # out of the queue: never runs, gone from the history
    training.cancel(runs["third"].job.id)  # stays in the history as cancelled
    assert [record.name for record in training.queue()] == ["first", "fourth"]
    assert training.history_run(runs["third"].job.id).status == "cancelled"
    with pytest.raises(UserError, match="not in the training history"):
        training.history_run(runs["second"].job.id)

    release.set()
    for run in runs.values():
        assert run.job.wait(300)
    assert runs["first"].job.status == DONE and runs["fourth"].job.status == DONE
    assert runs["second"].job.status == CANCELLED and runs["third"].job.status == CANCELLED
    # One at a time, in the order queued: every progress report of "first" comes before "fourth"'s.
    assert events and set(events) == {"first", "fourth"}
    assert events == sorted(events, key=["first", "fourth"].index)
    first, fourth = (training.history_run(runs[name].job.id) for name in ("first", "fourth"))
    assert first.finished_at <= fourth.started_at
    history = training.history_runs()
    assert [(record.name, record.status) for record in history] == [
        ("first", "done"),
        ("third", "cancelled"),
        ("fourth", "done"),
    ]
    assert [record.name for record in training.history_runs("done")] == ["first", "fourth"]
    assert not training.queue()


def test_a_running_run_is_not_removed_and_a_failed_one_records_its_error(training, tmp_path):
    release = block_queue(training)
    run = training.submit(config(training, "gone"))
    # The dataset disappears while the run waits: the run fails, and the history keeps the reason.
    for path in training.dataset_folder("foxes").iterdir():
        path.unlink()
    release.set()
    assert run.job.wait(120)
    record = training.history_run(run.job.id)
    assert record.status == "failed" and record.error, record
    assert record.error == run.job.error

    hold, entered = threading.Event(), threading.Event()
    write_images(tmp_path / "more", 2)
    training.dataset_add("foxes", sorted((tmp_path / "more").iterdir()))

    def wait_in_first_step(update):
        entered.set()
        assert hold.wait(120)

    running = training.submit(config(training, "busy"), on_progress=wait_in_first_step)
    assert entered.wait(120)
    with pytest.raises(UserError, match="is running; cancel it first"):
        training.remove(running.job.id)
    hold.set()
    assert running.job.wait(120) and running.job.status == DONE
    training.remove(running.job.id)  # a finished run leaves the history on request
    assert [record.name for record in training.history_runs()] == ["gone"]
