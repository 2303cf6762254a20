"""The training history: it survives a restart, interrupted runs are marked failed, "train again"
copies a run's config, the duration estimate comes from measured runs, and two runs compare."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorapg.config import Settings
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.errors import UserError
from lorapg.jobs import DONE, JobQueue
from lorapg.services.training import TrainingService
from lorapg.training.estimate import estimate_duration
from lorapg.training.run_store import RunRecord, RunStore, history_dir, thin_losses
from tests.test_cli import ROOT
from tests.training_data import write_images

# Two steps (two images, batch 1) in one epoch, with one sample image at its end.
FAST = dict(
    rank=4, alpha=4, epochs=1, repeats=1, sample_steps=1, gradient_checkpointing=False, batch_size=1, resolution=64
)


def settings_for(tiny_models, root: Path) -> Settings:
    return Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=root / "loras",
        models_dir=root / "models",
        outputs=root / "outputs",
        device="cpu",
    )


def new_service(settings: Settings) -> TrainingService:
    engine = DiffusionEngine(LoraLibrary(settings.lora_dir), torch.device("cpu"), torch.float32)
    return TrainingService(settings, JobQueue(), engine)


@pytest.fixture()
def setup(tiny_models, tmp_path):
    settings = settings_for(tiny_models, tmp_path)
    service = new_service(settings)
    source = tmp_path / "upload"
    write_images(source, 2)
    service.dataset_add("foxes", sorted(source.iterdir()))
    yield settings, service
    service.jobs.close(60)


def config(service: TrainingService, name: str, **changes):
    values = {"preset": "concept", "name": name, "trigger": f"zqx_{name}", **FAST, **changes}
    return service.config_for({**values, "images": str(service.dataset_folder("foxes"))})


def train(service: TrainingService, name: str, **changes):
    run = service.submit(config(service, name, **changes))
    assert run.job.wait(300) and run.job.status == DONE, run.job.error
    return service.history_run(run.job.id)


def test_history_survives_a_restart_and_train_again_copies_the_config(setup):
    settings, service = setup
    first = train(service, "fox", unet_lr=3e-4)
    assert first.status == "done" and first.steps == 2 and len(first.losses) == 2
    assert first.final_loss == pytest.approx(first.losses[-1][1])
    assert first.duration_s is not None and first.duration_s > 0
    assert first.started_at <= first.finished_at and first.created_at <= first.started_at
    assert Path(first.lora_path).name == "fox.safetensors" and Path(first.lora_path).is_file()
    assert [label for label, _ in first.samples] == ["epoch 1"]
    assert Image.open(first.samples[0][1]).size[0] > 0
    assert first.config["unet_lr"] == pytest.approx(3e-4) and first.config["trigger"] == "zqx_fox"

    restarted = new_service(settings)  # the app restarted on the same folders
    try:
        again = restarted.history_run(first.id)
        assert (again.status, again.losses, again.samples, again.lora_path) == (
            "done",
            first.losses,
            first.samples,
            first.lora_path,
        )
        copied = restarted.config_of(first.id)
        assert copied.name == "fox-2"  # "fox" exists: the copy gets a free name
        assert (copied.unet_lr, copied.epochs, copied.trigger, copied.images, copied.resolution) == (
            pytest.approx(3e-4),
            1,
            "zqx_fox",
            first.config["images"],
            64,
        )
        with pytest.raises(UserError, match="not in the training history"):
            restarted.config_of("nosuchrun")
    finally:
        restarted.jobs.close(60)


def test_the_estimate_is_unknown_before_the_first_run_and_measured_after(setup):
    _, service = setup
    before = service.estimate(config(service, "fox"))
    assert before.steps == 2 and before.seconds is None
    assert "unknown until the first run" in before.text()
    measured = train(service, "fox")
    assert measured.seconds_per_step is not None and measured.seconds_per_step > 0
    after = service.estimate(config(service, "other", epochs=3))
    assert after.steps == 6 and after.seconds is not None and after.seconds > 0
    assert "measured on this machine at 64 px" in after.text()
    # Another size of the same model is scaled by pixel count, and says it is rough.
    scaled = service.estimate(config(service, "other", resolution=128))
    assert scaled.seconds is not None and "rough" in scaled.basis
    with pytest.raises(UserError, match="choose a dataset"):
        service.estimate(service.config_for({"name": "x", "trigger": "x"}))


def test_compare_returns_both_curves_and_samples(setup):
    _, service = setup
    one = train(service, "fox", unet_lr=1e-4)
    two = train(service, "wolf", unet_lr=5e-4)
    curves = service.compare([one.id, two.id])
    assert [curve.name for curve in curves] == ["fox", "wolf"]
    assert all(len(curve.losses) == 2 for curve in curves)
    assert all([label for label, _ in curve.samples] == ["epoch 1"] for curve in curves)
    with pytest.raises(UserError, match="at least two runs"):
        service.compare([one.id, one.id])


def test_an_interrupted_run_is_marked_failed_at_start(setup, tmp_path):
    settings, service = setup
    db = history_dir(settings.models_dir) / "runs.sqlite3"
    # Another process queues a run, starts it, and dies without a word (kill -9 leaves no cleanup).
    script = (
        "import os, signal, sys\n"
        "from lorapg.training.run_store import RunRecord, RunStore\n"
        "store = RunStore(sys.argv[1])\n"
        "store.add(RunRecord(id='deadbeef0001', name='lost', status='queued', config={}, created_at=1.0))\n"
        "store.start('deadbeef0001')\n"
        "store.add(RunRecord(id='deadbeef0002', name='waiting', status='queued', config={}, created_at=2.0))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(db)], cwd=ROOT, timeout=60)
    assert done.returncode == -9
    # A run of a process that is still alive (this one's first service) is left alone.
    alive = service.submit(config(service, "alive"))
    assert alive.job.wait(300)

    restarted = new_service(settings)
    try:
        lost, waiting = restarted.history_run("deadbeef0001"), restarted.history_run("deadbeef0002")
        assert (lost.status, lost.error) == ("failed", "interrupted: the app stopped while it ran")
        assert (waiting.status, waiting.error) == ("failed", "interrupted: the app stopped before it started")
        assert restarted.history_run(alive.job.id).status == "done"
    finally:
        restarted.jobs.close(60)


def test_a_live_process_keeps_its_unfinished_runs(tmp_path):
    db = tmp_path / "runs.sqlite3"
    first = RunStore(db)
    first.add(RunRecord(id="run1", name="a", status="queued", config={}, created_at=time.time()))
    second = RunStore(db)  # another process (or service) on the same history, while the first lives
    assert second.mark_interrupted() == []
    first.close()  # its process ends
    assert second.mark_interrupted() == ["run1"]
    assert second.get("run1").status == "failed"


def test_a_long_loss_curve_is_thinned_and_keeps_its_last_point():
    losses = [(step, 1.0 / step) for step in range(1, 10_001)]
    thinned = thin_losses(losses, 2000)
    assert len(thinned) <= 2000 and thinned[0] == losses[0] and thinned[-1] == losses[-1]
    assert thin_losses(losses[:10]) == losses[:10]


def test_the_estimate_scales_with_batch_size_and_ignores_other_models():
    def measured(model: str, resolution: int, batch: int, per_step: float) -> RunRecord:
        return RunRecord(
            id=model,
            name=model,
            status="done",
            config={},
            created_at=0.0,
            steps=10,
            model=model,
            resolution=resolution,
            batch_size=batch,
            seconds_per_step=per_step,
            overhead_s=5.0,
        )

    runs = [measured("sd15", 512, 1, 2.0)]
    assert estimate_duration(100, "sd15", 512, 2, runs).seconds == pytest.approx(100 * 4.0 + 5.0)
    assert estimate_duration(100, "sdxl", 1024, 1, runs).seconds is None
    assert estimate_duration(100, "sd15", 1024, 1, runs).seconds == pytest.approx(100 * 8.0 + 5.0)
