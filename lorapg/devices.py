"""Which device and dtype models run on: CUDA in half precision when present, CPU float32 otherwise."""

from __future__ import annotations

import logging

import torch

from lorapg.errors import UserError

log = logging.getLogger(__name__)

_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def pick_device(setting: str = "auto") -> torch.device:
    """``auto`` takes CUDA when a GPU is visible; ``cpu``/``cuda``/``cuda:N`` are taken as asked."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise UserError(f"Unknown device {setting!r}; use auto, cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible to PyTorch.")
    return device


def pick_dtype(device: torch.device, setting: str = "auto") -> torch.dtype:
    """fp16 on CUDA (bf16 where the GPU supports it and the user asks), float32 on CPU.

    CPU half precision is slow and, for the VAE, numerically unsafe; so ``auto`` never picks it.
    """
    if setting != "auto":
        try:
            return _DTYPES[setting]
        except KeyError:
            raise UserError(f"Unknown dtype {setting!r}; use auto, float16, bfloat16 or float32.") from None
    return torch.float16 if device.type == "cuda" else torch.float32


def set_cpu_threads(threads: int) -> None:
    """Tiny models on a busy 2-core machine run far faster on one thread: the count is a setting."""
    if threads > 0:
        torch.set_num_threads(threads)
        log.info("torch CPU threads: %d", threads)
