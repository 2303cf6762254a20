"""Does a captioner fit? Its weights' size, estimated before loading, against the memory it would load into.

BLIP-2 (a ViT-g, a Q-Former and a 2.7 B-parameter OPT) needs ~8 GB in fp16 on a GPU or ~16 GB in fp32
on CPU: loading it where it does not fit would push the machine into swap or the OOM killer, so it is
refused first with the numbers. The estimate is the parameter count (read from the safetensors
headers, no tensor is loaded) times the bytes of the dtype it loads in, plus a margin for activations.

Free memory is what the rest of the app reads too: CUDA's ``mem_get_info`` (as ``build_residency``
and the memory panel do) on a GPU; on CPU the kernel's ``MemAvailable`` (free + reclaimable cache,
what can be allocated without swapping), else ``SC_AVPHYS_PAGES`` as the memory panel reads it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path

from lorapg.errors import UserError
from lorapg.residency import format_bytes

log = logging.getLogger(__name__)

ACTIVATION_MARGIN = 1.2  # weights × this: generation's activations and the KV cache, at batch 4
_MAX_HEADER = 100 * 1024**2  # a safetensors JSON header larger than this is not one


def safetensors_params(folder: Path) -> int:
    """Parameters in the folder's ``*.safetensors`` files, from their headers; 0 when there are none."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        for name, entry in _header(path).items():
            if name != "__metadata__" and isinstance(entry, dict):
                total += math.prod(int(side) for side in entry.get("shape", []))
    return total


def _header(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > _MAX_HEADER:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(file.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(
            f"Captioner weights {path.name} are not a readable safetensors file ({exc}); save them again."
        ) from None
    return header if isinstance(header, dict) else {}


def free_bytes(device: str) -> tuple[int, str]:
    """(bytes free now, what they are: "free VRAM" or "free RAM") on ``device``."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free), "free VRAM"
    return _available_ram(), "free RAM"


def _available_ram() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(label: str, params: int, element_bytes: int, device: str) -> int:
    """The bytes needed to load ``params`` parameters of ``element_bytes`` each on ``device``; a
    one-line UserError naming the captioner and the numbers when they are more than is free."""
    needed = int(params * element_bytes * ACTIVATION_MARGIN)
    free, what = free_bytes(device)
    log.info("captioner %s needs ~%s, %s %s", label, format_bytes(needed), format_bytes(free), what)
    if needed > free:
        dtype = {2: "float16", 4: "float32"}.get(element_bytes, f"{element_bytes}-byte")
        raise UserError(
            f"Captioner {label} needs about {format_bytes(needed)} ({params / 1e9:.2f} B parameters in {dtype}, "
            f"with room to generate) but only {format_bytes(free)} is {what} on {device}; free memory, use a GPU, "
            "or choose the captioner blip, florence2 or wd14."
        )
    return needed
