"""Which device and dtype models run on: CUDA in half precision when present, CPU float32 otherwise."""

from __future__ import annotations

import contextlib
import logging

import torch

from lorapg.diffusion.families import is_transformer_family
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


def pick_dtype(device: torch.device, setting: str = "auto", family: str | None = None) -> torch.dtype:
    """fp16 on CUDA for SD 1.x/2.x/SDXL, bf16 for Flux.1 / SD 3.5 (``family``) where the GPU supports it;
    float32 on CPU; an explicit ``setting`` as asked.

    Flux.1 and SD 3.5 are published in bf16 and their authors run them in it (their T5 text encoder is known
    to overflow fp16's range), so ``auto`` gives them fp16 only on GPUs without bf16 (before Ampere).
    CPU half precision is slow and, for the VAE, numerically unsafe; so ``auto`` never picks it.
    """
    if setting != "auto":
        try:
            return _DTYPES[setting]
        except KeyError:
            raise UserError(f"Unknown dtype {setting!r}; use auto, float16, bfloat16 or float32.") from None
    if device.type != "cuda":
        return torch.float32
    if is_transformer_family(family) and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def device_context(device: torch.device) -> contextlib.AbstractContextManager:
    """The context that makes ``cuda:N`` this thread's current GPU, for code that places work on plain
    ``"cuda"`` (accelerate's device, the trainer's): without it that is cuda:0 whatever was asked.
    Elsewhere (CPU, or a GPU without an index, which is the current one already) nothing changes."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def set_cpu_threads(threads: int) -> None:
    """Tiny models on a busy 2-core machine run far faster on one thread: the count is a setting."""
    if threads > 0:
        torch.set_num_threads(threads)
        log.info("torch CPU threads: %d", threads)


def parse_devices(setting: str | None, fallback: str = "auto") -> list[torch.device]:
    """The devices of ``--devices`` (one generation worker each), e.g. ``cuda:0,cuda:1`` or ``cpu,cpu``.

    ``None`` (not given): one device, ``fallback`` (the ``device`` setting), exactly as before. A GPU
    may be named once (two workers on one GPU would each budget its whole free memory); ``cpu`` may
    repeat, which is how tests run several workers on one machine.
    """
    if setting is None:
        device = pick_device(fallback)
        return [_existing_cuda(device, "device", "use cpu or cuda:N") if device.type == "cuda" else device]
    names = [name.strip() for name in str(setting).split(",")]
    if not any(names):
        raise UserError("Setting devices is empty; give a comma-separated list such as cuda:0,cuda:1 or cpu,cpu.")
    devices = [_one_device(name) for name in names]  # "auto" and "cuda" as cuda:N: compared by index below
    for device in devices:
        if device.type != "cpu" and devices.count(device) > 1:
            raise UserError(f"Setting devices names {device} twice; a GPU takes one worker, so list each once.")
    types = sorted({device.type for device in devices})
    if len(types) > 1:  # each type has its own dtype (fp16 / fp32): the same request would give other images
        raise UserError(
            f"Setting devices mixes device types ({', '.join(types)}); a job's image would depend on the worker "
            "that ran it, so list devices of one type, such as cuda:0,cuda:1."
        )
    return devices


def _one_device(name: str, field: str = "devices") -> torch.device:
    hint = "use a comma-separated list such as cuda:0,cuda:1 or cpu,cpu" if field == "devices" else "use cpu or cuda:N"
    if not name:
        raise UserError(f"Setting devices has an empty entry (two commas, or one at an end); {hint}.")
    if name == "auto":
        device = pick_device("auto")
        return _existing_cuda(device, field, hint) if device.type == "cuda" else device
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"Setting {field}: {name[:40]!r} is not a device; {hint}.") from None
    if device.type == "cuda":
        return _existing_cuda(device, field, hint)
    if device.type != "cpu":
        raise UserError(f"Setting {field}: {name[:40]!r} is not a cpu or cuda device; {hint}.")
    return device


def _existing_cuda(device: torch.device, field: str, hint: str) -> torch.device:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return cuda_with_index(device, count, torch.cuda.current_device() if count else 0, field, hint)


def cuda_with_index(device: torch.device, count: int, current: int, field: str, hint: str) -> torch.device:
    """``device`` as ``cuda:N``, refused unless one of the ``count`` GPUs. Plain ``cuda`` (and ``auto`` on
    a GPU machine) is the ``current`` GPU; torch.device("cuda") != torch.device("cuda", 0), so without
    the index the same GPU could be listed twice, or not be found among the devices."""
    index = current if device.index is None else device.index
    if index >= count:
        seen = f"this machine has {count} CUDA GPU(s)" + (f": cuda:0 to cuda:{count - 1}" if count else "")
        raise UserError(f"Setting {field}: {device} does not exist ({seen}); {hint}.")
    return torch.device("cuda", index)


def training_worker(setting: str | None, devices: list[torch.device]) -> int:
    """Which worker's device training runs on (``train_device``; default the first): one of ``devices``,
    so that training holds that worker while the others keep generating."""
    if setting is None or not str(setting).strip():
        return 0
    names = ", ".join(str(device) for device in devices)
    if "," in str(setting):
        raise UserError(
            f"Setting train_device takes one device, not {str(setting)[:60]!r}; for several processes use "
            "accelerate launch -m lorapg train."
        )
    wanted = _one_device(str(setting).strip(), "train_device")
    for index, device in enumerate(devices):
        if device == wanted:
            return index
    raise UserError(f"Setting train_device: {wanted} is not one of the devices ({names}); name one of them.")
