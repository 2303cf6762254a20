"""The training history: it survives a restart, interrupted runs are marked failed, "train again"
copies a run's config, the duration estimate comes from measured runs, and two runs compare."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
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
from lorapg.training.trainer import Trainer
from tests.app_server import running_app
from tests.test_cli import ROOT
from tests.training_data import smooth_image, write_images

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


def test_the_estimate_counts_steps_as_the_trainer_plans_them(setup, tiny_models, tmp_path):
    _, service = setup
    service.engine.load_model(str(tiny_models["sd15"]))  # the bucket geometry is the loaded model's
    # 10 images and 10 regularization ones in two buckets: 11 square and 9 landscape, batch 4 ->
    # 3 + 3 batches an epoch (each bucket's last one short), not ceil(10 / 4) = 3 of the images alone.
    write_images(tmp_path / "many", 10, sizes=[(288, 288)] * 6 + [(400, 288)] * 4)
    (tmp_path / "many" / "broken.png").write_bytes(b"not an image")  # left out by the trainer
    write_images(tmp_path / "regularization", 10, start=20, sizes=[(288, 288)] * 5 + [(400, 288)] * 5)
    values = {"preset": "concept", "name": "planned", "trigger": "zqx_planned", **FAST, "batch_size": 4, "epochs": 2}
    values.update(images=str(tmp_path / "many"), regularization_images=str(tmp_path / "regularization"))
    planned = service.prepare(service.config_for(values))
    estimate = service.estimate(planned)

    totals = []

    def first_step(update):
        if update.phase == "train":
            totals.append(update.total_steps)

    trainer = Trainer(
        planned,
        lora_dir=tmp_path / "loras",
        work_dir=tmp_path / "work",
        on_progress=first_step,
        should_cancel=lambda: bool(totals),  # one step is enough to know its plan
    )
    result = trainer.run()
    assert result.cancelled and totals[0] == result.total_steps == 12
    assert estimate.steps == result.total_steps


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
    # A process that ended leaves no lock file behind once another has looked (no litter per app start).
    third = RunStore(db)
    third._process._handle.close()  # as a process that was killed: its lock released, its file left
    assert len(list((tmp_path / "locks").glob("*.lock"))) == 2
    second.mark_interrupted()
    assert [path.stem for path in (tmp_path / "locks").glob("*.lock")] == [second._process.token]


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


# --- the REST API, on a real app over HTTP -------------------------------------------------------------

AUTH = ("u", "p")
API_FAST = {"rank": "4", "batch_size": "1", "sample_steps": "1", "max_steps": "2", "resolution": "64"}


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    smooth_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for_end(api: str, job_id: str) -> str:
    """The run's final event, read from its Server-Sent Events stream to the end."""
    last = None
    with requests.get(f"{api}/{job_id}/events", auth=AUTH, stream=True, timeout=300) as reply:
        assert reply.status_code == 200, reply.text
        for line in reply.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                last = line.split(":", 1)[1].strip()
    return last


def test_history_queue_and_compare_over_http(tiny_models, tmp_path):
    with running_app(
        "--api",
        "--api-auth",
        "u:p",
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(tmp_path / "loras"),
        "--models-dir",
        str(tmp_path / "models"),
        "--outputs",
        str(tmp_path / "outputs"),
        "--threads",
        "1",
    ) as url:
        api = url + "api/v1/training"
        files = [("images", (f"img{seed}.png", png_bytes(seed), "image/png")) for seed in range(2)]
        fields = {"name": "webfox", "trigger_word": "zqx_webfox", "preset": "concept", **API_FAST}
        reply = requests.post(api, data=fields, files=files, auth=AUTH, timeout=120)
        assert reply.status_code == 202, reply.text
        first = reply.json()
        assert first["measured_estimate_seconds"] is None and "unknown until the first run" in first["estimate"]
        assert wait_for_end(api, first["job_id"]) == "complete"

        runs = requests.get(f"{api}/runs", auth=AUTH, timeout=30).json()
        assert [(run["id"], run["status"]) for run in runs] == [(first["job_id"], "done")]
        run = runs[0]
        assert run["config"]["trigger"] == "zqx_webfox" and run["duration_seconds"] > 0
        assert run["final_loss"] is not None and run["lora_path"].endswith("webfox.safetensors")
        sample = requests.get(url + run["sample_urls"][0].lstrip("/"), auth=AUTH, timeout=30)
        assert sample.status_code == 200 and sample.content.startswith(b"\x89PNG")

        # Train again with a change, by JSON: a free name, the same settings, an estimate measured here.
        again = requests.post(
            f"{api}/runs", json={"again_from": first["job_id"], "settings": {"unet_lr": 2e-4}}, auth=AUTH, timeout=60
        )
        assert again.status_code == 202, again.text
        second = again.json()
        assert second["measured_estimate_seconds"] is not None and second["measured_estimate_seconds"] > 0
        assert wait_for_end(api, second["job_id"]) == "complete"
        detail = requests.get(f"{api}/runs/{second['job_id']}", auth=AUTH, timeout=30).json()
        assert detail["name"] == "webfox-2" and detail["config"]["unet_lr"] == pytest.approx(2e-4)
        assert len(detail["losses"]) == 2 and detail["config"]["max_steps"] == 2

        compared = requests.get(
            f"{api}/compare", params={"ids": f"{first['job_id']},{second['job_id']}"}, auth=AUTH, timeout=30
        )
        assert compared.status_code == 200, compared.text
        curves = compared.json()["runs"]
        assert [curve["name"] for curve in curves] == ["webfox", "webfox-2"]
        assert all(len(curve["losses"]) == 2 and curve["samples"] for curve in curves)

        # Queue by JSON on the dataset the upload made.
        queued = requests.post(
            f"{api}/runs",
            json={"name": "webwolf", "trigger_word": "zqx_wolf", "dataset": first["dataset"], "settings": API_FAST},
            auth=AUTH,
            timeout=60,
        )
        assert queued.status_code == 202, queued.text
        assert wait_for_end(api, queued.json()["job_id"]) == "complete"
        done = requests.get(f"{api}/runs", params={"status": "done"}, auth=AUTH, timeout=30).json()
        assert [run["name"] for run in done] == ["webfox", "webfox-2", "webwolf"]

        removed = requests.delete(f"{api}/runs/{second['job_id']}", auth=AUTH, timeout=30)
        assert removed.status_code == 200 and removed.json()["name"] == "webfox-2"
        assert requests.get(f"{api}/runs/{second['job_id']}", auth=AUTH, timeout=30).status_code == 404
        assert requests.delete(f"{api}/runs/nosuchrun", auth=AUTH, timeout=30).status_code == 404
        bad = requests.get(f"{api}/runs", params={"status": "bogus"}, auth=AUTH, timeout=30)
        assert bad.status_code == 400 and "status" in bad.json()["errors"]
        one = requests.get(f"{api}/compare", params={"ids": first["job_id"]}, auth=AUTH, timeout=30)
        assert one.status_code == 400 and "at least two runs" in one.json()["errors"]
        outside = {"name": "x", "trigger_word": "x", "dataset": first["dataset"], "settings": {"work_dir": "/tmp/x"}}
        refused = requests.post(f"{api}/runs", json=outside, auth=AUTH, timeout=30)
        assert refused.status_code == 400 and "settings: work_dir cannot be set" in refused.json()["errors"]
        unknown = requests.post(f"{api}/runs", json={"again_from": "nosuchrun"}, auth=AUTH, timeout=30)
        assert unknown.status_code == 400 and "again_from" in unknown.json()["errors"]
        # The existing list still answers, and still comes before the history's routes' namesakes.
        assert requests.get(api, auth=AUTH, timeout=30).status_code == 200
