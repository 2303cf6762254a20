"""How many seconds of GPU a request needs: what a ZeroGPU Space reserves from a visitor's quota.

Rough on purpose and on the safe side: ZeroGPU stops a call that outlives its reservation, while a
reservation that is too long only makes the visitor wait longer in its queue. The rates are for a
ZeroGPU slice (an H200 share, about an A100) in half precision; both SD 1.x and SDXL run at
roughly the same cost per megapixel and step, so one rate serves both.
"""

from __future__ import annotations

import math

STARTUP_S = 20.0  # moving the weights onto the GPU, loading LoRAs, the VAE decode
SAMPLING_S_PER_MEGAPIXEL_STEP = 0.25  # a UNet step with classifier-free guidance
TRAINING_S_PER_MEGAPIXEL_STEP = 1.0  # forward + backward with gradient checkpointing
SAMPLE_IMAGE_STEPS_S = 0.1  # per step of the per-epoch sample image at native size
MARGIN = 1.5  # a slow first step, a busy GPU slice


def generation_seconds(steps: int, width: int, height: int, batch_size: int = 1) -> float:
    megapixels = width * height / 1e6
    return STARTUP_S + MARGIN * steps * batch_size * megapixels * SAMPLING_S_PER_MEGAPIXEL_STEP


def writing_seconds(timeout_s: float) -> float:
    """An LLM answer: the writer gives up at its own timeout and the rules answer instead."""
    return STARTUP_S + timeout_s


def training_seconds(
    total_steps: int, resolution: int, batch_size: int = 1, epochs: int = 1, sample_steps: int = 0
) -> float:
    megapixels = resolution * resolution / 1e6
    training = total_steps * batch_size * megapixels * TRAINING_S_PER_MEGAPIXEL_STEP
    samples = epochs * sample_steps * SAMPLE_IMAGE_STEPS_S
    return STARTUP_S + MARGIN * (training + samples)


def planned_training_steps(images: int, repeats: int, epochs: int, batch_size: int, max_steps: int) -> int:
    """The step count the trainer will run (each epoch sees every image ``repeats`` times)."""
    per_epoch = math.ceil(max(images, 1) * max(repeats, 1) / max(batch_size, 1))
    total = per_epoch * max(epochs, 1)
    return min(total, max_steps) if max_steps else total
