"""The training queue: runs queued behind a busy GPU queue start in order, one at a time; a queued
run can be cancelled or removed before it starts; the history says so at every point."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lorapg.config import Settings
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.errors import UserError
from lorapg.jobs import CANCELLED, DONE, JobQueue
from lorapg.services.training import TrainingService
from lorapg.training.run_store import RunRecord, RunStore
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


# --- the Train tab's Runs section, through gradio_client on a real local server ------------------------

FORM = {
    "rank": 4,
    "alpha": 4,
    "unet_lr": 1e-3,
    "text_encoder_lr": 0,
    "train_text_encoder": False,
    "epochs": 1,
    "repeats": 1,
    "resolution": 64,
    "batch_size": 2,
    "max_steps": 1,
    "min_snr_gamma": 0,
    "noise_offset": 0,
    "lr_scheduler": "constant",
    "seed": 3,
    "face_crop": False,
    "shuffle_tags": False,
    "keep_tokens": 1,
    "caption_dropout": 0,
}


@pytest.fixture()
def tab(training, tmp_path):
    import gradio as gr
    from gradio_client import Client

    from lorapg.ui.train_tab import build_train_tab

    with gr.Blocks() as demo:
        build_train_tab(training)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, allowed_paths=[str(tmp_path)])
    try:
        yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def queue_from_tab(api, name: str, **changes):
    from lorapg.ui.train_tab import FIELDS

    fields = {**FORM, **changes}
    values = ["foxes", name, f"zqx_{name}", "concept", False, *[fields[key] for key in FIELDS], None, "all"]
    return api.predict(*values, api_name="/train_queue")


def test_the_runs_section_queues_removes_trains_again_and_compares(training, tab):
    api = tab
    release = block_queue(training)
    note, estimate, table = queue_from_tab(api, "ui_a")
    assert "Queued **ui_a**" in note and "unknown until the first run" in estimate
    _, _, table = queue_from_tab(api, "ui_b")
    assert [(row[1], row[2]) for row in table["data"]] == [("ui_a", "queued"), ("ui_b", "queued")]
    ids = {row[1]: row[0] for row in table["data"]}
    note, table, picked = api.predict(ids["ui_b"], "all", api_name="/train_remove")
    assert "Removed ui_b" in note and [row[1] for row in table["data"]] == ["ui_a"] and picked == ""
    release.set()
    assert training.run(ids["ui_a"]).job.wait(300)
    table = api.predict("done", api_name="/train_runs")
    assert [(row[1], row[2]) for row in table["data"]] == [("ui_a", "done")]

    # Train again: the form gets the run's settings under a free name.
    again = api.predict(ids["ui_a"], api_name="/train_again")
    assert "ui_a-2" in again and "zqx_ui_a" in again and "foxes" in again
    _, estimate, table = queue_from_tab(api, "ui_a-2", unet_lr=2e-3)
    assert "Estimated duration: about" in estimate and "measured on this machine" in estimate
    second = next(row[0] for row in table["data"] if row[1] == "ui_a-2")
    assert training.run(second).job.wait(300)

    plot, samples = api.predict(f"{ids['ui_a']}, {second}", api_name="/train_compare")
    # Overlaid curves: one line per run (the plot's colour column), the loss of each step.
    assert {row[2] for row in plot["data"]} == {f"ui_a ({ids['ui_a']})", f"ui_a-2 ({second})"}
    # Side by side: the epoch's samples of both runs, one column per run.
    assert samples["columns"] == 2
    assert [cell["caption"] for cell in samples["value"]] == ["ui_a · epoch 1", "ui_a-2 · epoch 1"]


# --- races when queueing and removing runs ------------------------------------------------------------


def test_a_run_of_another_process_is_not_removed_while_it_is_unfinished(training, tiny_models, tmp_path):
    # Another process on the same folders (a CLI run): its own queue and its own hold on the history.
    other = TrainingService(training.settings, JobQueue(), training.engine)
    try:
        release = block_queue(other)
        theirs = other.submit(config(training, "theirs"))
        assert training.history_run(theirs.job.id).status == "queued"
        with pytest.raises(UserError, match="queued in another process .*cancel it there"):
            training.remove(theirs.job.id)
        assert training.history_run(theirs.job.id).status == "queued"
        release.set()
        assert theirs.job.wait(300) and theirs.job.status == DONE
        training.remove(theirs.job.id)  # finished: it may leave the history now
    finally:
        other.jobs.close(60)
    # A row left queued by a process that is gone is marked failed, then removed.
    gone = RunStore(training.history.db_path)
    gone.add(RunRecord(id="gone1", name="gone", owner=None, status="queued", config={}, created_at=time.time()))
    gone.close()
    assert training.remove("gone1").id == "gone1"
    assert [record.id for record in training.history_runs()] == []


def test_a_run_that_starts_while_it_is_removed_stays_in_the_history(training, monkeypatch):
    entered, hold = threading.Event(), threading.Event()
    record_start = training._record_start

    def held_start(run):
        # The worker took the job; the history still says queued until this returns.
        entered.set()
        assert hold.wait(120)
        record_start(run)

    monkeypatch.setattr(training, "_record_start", held_start)
    release = block_queue(training)
    run = training.submit(config(training, "racing"))  # recorded as queued: the queue is busy
    release.set()
    assert entered.wait(60)
    assert training.history_run(run.job.id).status == "queued"
    with pytest.raises(UserError, match="is running; cancel it first"):
        training.remove(run.job.id)
    hold.set()
    assert run.job.wait(300) and run.job.status == CANCELLED  # the remove's cancel stopped it
    assert training.history_run(run.job.id).status == "cancelled"


def test_a_run_the_history_cannot_record_is_cancelled_not_trained(training, monkeypatch):
    submitted = []
    submit = training.jobs.submit

    def spy(*args, **kwargs):
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]

    def full_disk(record):
        raise OSError("database or disk is full")

    monkeypatch.setattr(training.jobs, "submit", spy)
    monkeypatch.setattr(training.history, "add", full_disk)
    with pytest.raises(OSError, match="disk is full"):
        training.submit(config(training, "unrecorded"))
    [job] = submitted
    assert job.wait(300) and job.status == CANCELLED
    assert not (training.lora_dir(config(training, "unrecorded")) / "unrecorded.safetensors").exists()
    assert training.runs() == []
