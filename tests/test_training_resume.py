"""A resumed run is the uninterrupted run, bit for bit: weights, per-epoch LoRAs and the loss curve.

Exact equality is meant here: a resume replays the same operations on the same batch shapes from
restored state (weights, optimizer, LR schedule, generator), so any difference is a resume bug,
not rounding. test_training_trainer.py checks the same runs to a tolerance, across more settings.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorapg.training.config import build_config
from lorapg.training.trainer import Trainer
from tests.training_data import write_images

SIZES = [(288, 288), (288, 288), (400, 288), (288, 400)]  # 3 buckets: 4 batches of 1 per epoch


@pytest.fixture(scope="module")
def config(tiny_models, tmp_path_factory):
    images = tmp_path_factory.mktemp("resume_images")
    write_images(images, 4, sizes=SIZES)
    values = dict(
        name="zqx_resume",
        model=str(tiny_models["sd15"]),
        images=str(images),
        trigger="zqx",
        rank=4,
        alpha=4,
        unet_lr=3e-2,
        text_encoder_lr=1e-2,
        epochs=2,
        max_steps=6,
        batch_size=1,
        sample_steps=0,
        gradient_checkpointing=False,
        save_precision="fp32",
        seed=7,
        min_snr_gamma=5,
        noise_offset=0.05,
        train_text_encoder=True,
        lr_scheduler="cosine",
    )
    return build_config(values)


def train(root, config, **kwargs):
    return Trainer(config, lora_dir=root / "loras", work_dir=root / "work", device=torch.device("cpu"), **kwargs).run()


@pytest.fixture(scope="module")
def straight(config, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    return train(root, config), root


def assert_same_lora(expected_path, got_path):
    expected, got = load_file(str(expected_path)), load_file(str(got_path))
    assert expected.keys() == got.keys()
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, different


# Step 3 stops mid-epoch; step 4 after an epoch's last batch, before its checkpoint and per-epoch LoRA.
@pytest.mark.parametrize("cancel_at", [3, 4])
def test_cancel_then_resume_is_bit_identical_to_an_uninterrupted_run(config, straight, tmp_path, cancel_at):
    straight_result, straight_root = straight
    steps = []

    def on_progress(progress):
        if progress.phase == "train":
            steps.append(progress.step)

    cancelled = train(tmp_path, config, on_progress=on_progress, should_cancel=lambda: len(steps) >= cancel_at)
    assert cancelled.cancelled and cancelled.steps == cancel_at
    resumed = train(tmp_path, config)

    assert resumed.resumed_from == cancel_at and resumed.steps == straight_result.steps == 6
    assert resumed.losses == straight_result.losses
    assert_same_lora(straight_result.lora_path, resumed.lora_path)
    epoch_file = "zqx_resume_epochs/zqx_resume-e0001.safetensors"
    assert_same_lora(straight_root / "loras" / epoch_file, tmp_path / "loras" / epoch_file)
