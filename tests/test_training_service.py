"""TrainingService on the shared job queue, bad input refused before queueing, and the CLI in-process."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from lorapg.cli import main
from lorapg.config import Settings
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest
from lorapg.errors import UserError
from lorapg.jobs import DONE, JobQueue
from lorapg.services.generation import GenerationService
from lorapg.services.training import TrainingService
from lorapg.training.config import load_config
from tests.test_cli import ROOT
from tests.training_data import write_images

FAST = dict(rank=4, alpha=4, epochs=1, sample_steps=1, gradient_checkpointing=False, batch_size=2)


@pytest.fixture()
def setup(tiny_models, tmp_path):
    settings = Settings(model=str(tiny_models["sd15"]), lora_dir=tmp_path / "loras", models_dir=tmp_path / "models",
                        outputs=tmp_path / "outputs", device="cpu")
    jobs = JobQueue()
    engine = DiffusionEngine(LoraLibrary(settings.lora_dir), torch.device("cpu"), torch.float32)
    playground = GenerationService(settings, engine, engine.library, jobs)
    training = TrainingService(settings, jobs, engine)
    source = tmp_path / "upload"
    write_images(source, 3)
    training.dataset_add("foxes", sorted(source.iterdir()))
    yield settings, playground, training
    jobs.shutdown()


def test_training_runs_on_the_shared_queue_and_the_lora_is_listed(setup):
    settings, playground, training = setup
    playground.load_model()
    generation = playground.submit_generation(GenerationRequest(prompt="x", steps=2, seed=1))
    config = training.config_for({"preset": "concept", "name": "fox", "trigger": "zqx_fox",
                                  "images": str(training.dataset_folder("foxes")), **FAST})
    run = training.submit(config)
    assert run.job.wait(120) and run.job.status == DONE, run.job.error
    assert generation.status == DONE and generation.created_at <= run.job.created_at  # one queue, in order
    assert "is in the LoRA list" in run.describe() and "zqx_fox" in run.describe()
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


@pytest.mark.parametrize(("change", "message"), [
    ({"trigger": " "}, "trigger word is required"),
    ({"name": "../escape"}, "may not contain"),
    ({"name": "a/b"}, "may not contain"),
    ({"images": "/does/not/exist"}, "does not exist"),
    ({"images": ""}, "No images"),
])
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
    config = training.config_for({"name": "slow", "trigger": "zqx", "images": str(training.dataset_folder("foxes")),
                                  **FAST, "epochs": 50, "sample_steps": 0})
    run = training.submit(config, on_progress=lambda p: training.cancel(run.job.id) if p.step == 2 else None)
    assert run.job.wait(120)
    assert run.result.cancelled and run.result.steps == 2 and run.result.checkpoint is not None
    assert "Cancelled at step 2" in run.describe() and "resume" in run.describe()


def test_cli_train_in_process_then_bad_input(tiny_models, tmp_path, capsys):
    images = tmp_path / "imgs"
    write_images(images, 3)
    args = ["train", "--model", str(tiny_models["sd15"]), "--images", str(images), "--trigger", "zqx",
            "--name", "cli_lora", "--epochs", "1", "--rank", "4", "--out", str(tmp_path / "loras"), "--threads", "1",
            "--device", "cpu"]
    config = tmp_path / "run.toml"
    config.write_text("sample_steps = 0\ngradient_checkpointing = false\nbatch_size = 3\n"
                      f'work_dir = "{tmp_path / "work"}"\n')
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
    done = subprocess.run([sys.executable, "-m", "lorapg", "train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--max-steps" in done.stdout and "CONFIG" in done.stdout
