"""TrainingService on the shared job queue, bad input refused before queueing, and the CLI in-process."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import threading
import zipfile

import pytest
import torch

from lorapg.cli import main
from lorapg.config import Settings
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest
from lorapg.errors import UserError
from lorapg.jobs import DONE, ERROR, JobQueue
from lorapg.services.generation import GenerationService
from lorapg.services.training import TrainingService
from lorapg.training.config import load_config
from lorapg.training.trainer import Trainer
from lorapg.ui.texts import training_run_text
from tests.test_cli import ROOT
from tests.training_data import bomb_png, smooth_image, write_images

FAST = dict(rank=4, alpha=4, epochs=1, sample_steps=1, gradient_checkpointing=False, batch_size=2)


@pytest.fixture()
def setup(tiny_models, tmp_path):
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=tmp_path / "loras",
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
    )
    jobs = JobQueue()
    engine = DiffusionEngine(LoraLibrary(settings.lora_dir), torch.device("cpu"), torch.float32)
    playground = GenerationService(settings, engine, engine.library, jobs)
    training = TrainingService(settings, jobs, engine)
    source = tmp_path / "upload"
    write_images(source, 3)
    training.dataset_add("foxes", sorted(source.iterdir()))
    yield settings, playground, training
    jobs.shutdown()


def record_runs(jobs: JobQueue, ran: list[str], hold: dict[str, threading.Event]) -> None:
    """Log when each job's work starts and ends, as the queue runs it; a kind in ``hold`` waits
    for its event before working (so a second queue or thread would show as overlapping runs)."""
    submit = jobs.submit

    def recording(kind, work, owner=None, **options):
        def run(job):
            ran.append(f"{kind} start")
            try:
                if kind in hold:
                    assert hold[kind].wait(120), f"{kind} was never released"
                return work(job)
            finally:
                ran.append(f"{kind} end")

        return submit(kind, run, owner=owner, **options)

    jobs.submit = recording


def test_training_runs_on_the_shared_queue_and_the_lora_is_listed(setup):
    settings, playground, training = setup
    playground.load_model()
    ran, release = [], threading.Event()
    record_runs(playground.jobs, ran, {"generate": release})
    generation = playground.submit_generation(GenerationRequest(prompt="x", steps=2, seed=1))
    config = training.config_for(
        {
            "preset": "concept",
            "name": "fox",
            "trigger": "zqx_fox",
            "images": str(training.dataset_folder("foxes")),
            **FAST,
        }
    )
    run = training.submit(config)
    release.set()  # the generation runs only now, with the training already submitted
    assert run.job.wait(120) and run.job.status == DONE, run.job.error
    assert generation.status == DONE
    assert ran == ["generate start", "generate end", f"{run.job.kind} start", f"{run.job.kind} end"]  # one queue
    assert "is in the LoRA list" in training_run_text(run) and "zqx_fox" in training_run_text(run)
    assert run.losses and len(run.samples) == 1
    listed = {info.name: info for info in playground.list_loras().loras}
    assert listed["fox"].trigger_words == ("zqx_fox",)
    # The file the run wrote is the config that reproduces it headless.
    assert load_config(run.config_path).name == "fox"
    # The inference pipeline is still usable (it stays on the CPU here; on CUDA it went to the CPU and back).
    assert playground.generate(GenerationRequest(prompt="x", steps=2, seed=1, loras=())).images
    with pytest.raises(UserError, match="already exists"):
        training.submit(config)
    again = training.submit(dataclasses.replace(config, overwrite=True))
    assert again.job.wait(120) and again.job.status == DONE


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trigger": " "}, "trigger word is required"),
        ({"name": "../escape"}, "may not contain"),
        ({"name": "a/b"}, "may not contain"),
        ({"images": "/does/not/exist"}, "does not exist"),
        ({"images": ""}, "No images"),
    ],
)
def test_bad_input_is_refused_before_queueing(setup, change, message):
    _, _, training = setup
    values = {"name": "fox", "trigger": "zqx", "images": str(training.dataset_folder("foxes")), **change}
    with pytest.raises(UserError, match=message):
        training.submit(training.config_for(values))
    assert training.latest_run() is None


def test_empty_dataset_is_refused(setup, tmp_path):
    _, _, training = setup
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no images"):
        training.submit(training.config_for({"name": "x", "trigger": "zqx", "images": str(tmp_path / "empty")}))


def test_cancel_through_the_service(setup):
    _, _, training = setup
    config = training.config_for(
        {
            "name": "slow",
            "trigger": "zqx",
            "images": str(training.dataset_folder("foxes")),
            **FAST,
            "epochs": 50,
            "sample_steps": 0,
        }
    )
    run = training.submit(config, on_progress=lambda p: training.cancel(run.job.id) if p.step == 2 else None)
    assert run.job.wait(120)
    assert run.result.cancelled and run.result.steps == 2 and run.result.checkpoint is not None
    assert "Cancelled at step 2" in training_run_text(run) and "resume" in training_run_text(run)


def test_cli_train_in_process_then_bad_input(tiny_models, tmp_path, capsys):
    images = tmp_path / "imgs"
    write_images(images, 3)
    args = [
        "train",
        "--model",
        str(tiny_models["sd15"]),
        "--images",
        str(images),
        "--trigger",
        "zqx",
        "--name",
        "cli_lora",
        "--epochs",
        "1",
        "--rank",
        "4",
        "--out",
        str(tmp_path / "loras"),
        "--threads",
        "1",
        "--device",
        "cpu",
        "--models-dir",  # the run history goes there: never into the checkout's models/
        str(tmp_path / "models"),
    ]
    config = tmp_path / "run.toml"
    config.write_text(
        f'sample_steps = 0\ngradient_checkpointing = false\nbatch_size = 3\nwork_dir = "{tmp_path / "work"}"\n'
    )
    assert main([*args[:1], str(config), *args[1:]]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "loras" / "cli_lora.safetensors").is_file()
    assert "cli_lora.safetensors\tsteps=1" in captured.out
    assert main([*args[:1], str(config), *args[1:]]) == 2  # the name exists now
    assert "already exists" in capsys.readouterr().err
    for bad, message in [(["--rank", "0"], "'rank' is 0"), (["--lr", "abc"], "'unet_lr'")]:
        assert main([*args, *bad, "--name", "other"]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], err
    config.write_text("ranks = 4\n")
    assert main(["train", str(config)]) == 2
    assert "Unknown training setting 'ranks'" in capsys.readouterr().err


def test_python_m_lorapg_train_help():
    done = subprocess.run(
        [sys.executable, "-m", "lorapg", "train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "--max-steps" in done.stdout and "CONFIG" in done.stdout


def test_a_refused_run_leaves_the_config_of_the_checkpointed_run(setup):
    _, _, training = setup
    values = {
        "name": "keep",
        "trigger": "zqx",
        "images": str(training.dataset_folder("foxes")),
        **FAST,
        "epochs": 50,
        "sample_steps": 0,
    }
    run = training.submit(
        training.config_for(values), on_progress=lambda p: training.cancel(run.job.id) if p.step == 1 else None
    )
    assert run.job.wait(120) and run.result.cancelled and run.result.checkpoint is not None
    written = run.config_path.read_text(encoding="utf-8")
    refused = training.submit(training.config_for({**values, "rank": 8}))  # the checkpoint has rank 4
    assert refused.job.wait(120) and refused.job.status == ERROR
    assert "different settings (rank)" in refused.job.error
    assert refused.config_path == run.config_path
    assert run.config_path.read_text(encoding="utf-8") == written  # still the run the checkpoint belongs to


def bomb_zip(path, member_bytes: int):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("zeros.png", bytes(member_bytes))
    return path


def test_dataset_upload_limits_come_from_settings(tmp_path):
    settings = Settings(
        models_dir=tmp_path / "models", max_dataset_images=3, max_unpacked_mb=1, max_image_pixels=100_000
    )
    jobs = JobQueue()
    training = TrainingService(settings, jobs)
    try:
        images = write_images(tmp_path / "src", 4, captions=False)  # 288×288: under 100 000 pixels
        with pytest.raises(UserError, match=r"would hold 4 images.*at most 3.*max_dataset_images"):
            training.dataset_add("set", images)
        with pytest.raises(UserError, match=r"big.zip unpacks to more than 1 MB.*max_unpacked_mb"):
            training.dataset_add("set", [bomb_zip(tmp_path / "big.zip", 3 * 1024 * 1024)])
        (tmp_path / "wide.png").write_bytes(bomb_png(1000, 1000))
        with pytest.raises(UserError, match=r"Image wide.png: too many pixels: 1000×1000.*max_image_pixels"):
            training.dataset_add("set", [images[0], tmp_path / "wide.png"])
        assert training.dataset_names() == [] and not [p for p in settings.models_dir.rglob("*") if p.is_file()]

        training.dataset_add("set", images[:2])
        # A bomb that got in some other way is an invalid image with its name, and the app removes it.
        (training.dataset_folder("set") / "bomb.png").write_bytes(bomb_png(30000, 30000))
        report = training.dataset_validate("set")
        assert [c.file for c in report.invalid] == ["bomb.png"] and len(report.valid) == 2
        assert "bomb.png: too many pixels: 900 megapixels" in report.summary()
        training.dataset_remove("set", "bomb.png")
        assert [image.file for image in training.dataset_images("set")] == ["img00.png", "img01.png"]
    finally:
        jobs.shutdown()


def near_duplicate_dataset(folder):
    write_images(folder, 2)
    copy = io.BytesIO()
    smooth_image(0).resize((400, 400)).save(copy, format="JPEG", quality=80)
    (folder / "img00_copy.jpg").write_bytes(copy.getvalue())
    return folder


def test_near_duplicates_are_kept_unless_dropped_and_can_be_removed(setup, tmp_path):
    _, _, training = setup
    training.dataset_add("near", sorted(near_duplicate_dataset(tmp_path / "near").iterdir()))
    folder = training.dataset_folder("near")
    report = training.dataset_validate("near")
    assert [(c.file, c.near_duplicate_of) for c in report.near_duplicates] == [("img00_copy.jpg", "img00.png")]
    for drop, count in [(False, 3), (True, 2)]:  # the images the trainer trains on
        config = training.config_for(
            {"name": "near", "trigger": "zqx", "images": str(folder), "drop_near_duplicates": drop}
        )
        trainer = Trainer(config, lora_dir=tmp_path / "loras", work_dir=tmp_path / "work")
        assert len(trainer._read_dataset()) == count
    assert training.dataset_remove_near_duplicates("near") == ["img00_copy.jpg"]
    assert training.dataset_validate("near").near_duplicates == []


def test_cli_train_warns_about_near_duplicates_and_drops_them_on_request(tiny_models, tmp_path, capsys):
    images = near_duplicate_dataset(tmp_path / "imgs")
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "taken.safetensors").write_bytes(b"")  # refused after the warning: nothing trains
    args = [
        "train",
        "--model",
        str(tiny_models["sd15"]),
        "--images",
        str(images),
        "--trigger",
        "zqx",
        "--name",
        "taken",
        "--out",
        str(tmp_path / "loras"),
        "--threads",
        "1",
        "--device",
        "cpu",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "warning: near duplicate kept; pass --drop-near-duplicates" in err
    assert "img00_copy.jpg looks like img00.png" in err
    assert main([*args, "--drop-near-duplicates"]) == 2
    assert "warning: near duplicate left out (--drop-near-duplicates): img00_copy.jpg" in capsys.readouterr().err
