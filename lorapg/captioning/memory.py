"""Does a captioner fit? Its weights' size, estimated before loading, against the memory it would load into.

BLIP-2 (a ViT-g, a Q-Former and a 2.7 B-parameter OPT) needs ~8 GB in fp16 on a GPU or ~16 GB in fp32
on CPU: loading it where it does not fit would push the machine into swap or the OOM killer, so it is
refused first with the numbers. The estimate is the parameter count of the weights the loader will
read (from the safetensors headers, no tensor is loaded; see ``weights_params``) times the bytes of the
dtype it loads in, plus a margin for activations.

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

from lorapg.errors import UserError, shorten
from lorapg.residency import format_bytes

log = logging.getLogger(__name__)

ACTIVATION_MARGIN = 1.2  # weights × this: generation's activations and the KV cache, at batch 4
_MAX_HEADER = 100 * 1024**2  # a safetensors JSON header larger than this is not one


# What transformers' from_pretrained reads from a folder, in its order: safetensors first (an index for
# sharded weights), then the pickles (allowed only with --allow-pickle).
SAFE_INDEX, SAFE_FILE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_FILE = "pytorch_model.bin.index.json", "pytorch_model.bin"
# Bytes per parameter of the dtypes a config's ``dtype`` (``torch_dtype`` before transformers 5) names.
CONFIG_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# Pickled weights whose config names no dtype: assume fp16, the way large checkpoints are shared. An
# fp32 file is then counted at twice its parameters: a refusal with numbers, never the OOM killer.
PICKLE_FALLBACK_BYTES = 2


def weights_params(folder: Path) -> int:
    """Parameters of the weights from_pretrained will read in ``folder`` (other files there, an extra
    ``*.safetensors`` or a second format, are not counted); 0 when there are none.

    Safetensors: counted from the headers of the files the index lists (or ``model.safetensors``).
    Pickles have no readable header: the index's ``metadata.total_size`` (else the file sizes) divided
    by the bytes of the dtype the config says they were saved in."""
    folder = Path(folder)
    if (folder / SAFE_INDEX).is_file():
        return sum(safetensors_file_params(folder / name) for name in _indexed_files(folder / SAFE_INDEX))
    if (folder / SAFE_FILE).is_file():
        return safetensors_file_params(folder / SAFE_FILE)
    if (folder / BIN_INDEX).is_file():
        index = _index(folder / BIN_INDEX)
        total = index.get("metadata", {}).get("total_size")
        if not isinstance(total, int) or total <= 0:
            total = sum((folder / name).stat().st_size for name in _indexed_files(folder / BIN_INDEX))
        return total // _config_element_bytes(folder)
    if (folder / BIN_FILE).is_file():
        return (folder / BIN_FILE).stat().st_size // _config_element_bytes(folder)
    return 0


def safetensors_file_params(path: Path) -> int:
    """Parameters in one safetensors file, from its header (no tensor is loaded)."""
    total = 0
    for name, entry in _header(path).items():
        if name != "__metadata__" and isinstance(entry, dict):
            total += math.prod(int(side) for side in entry.get("shape", []))
    return total


def _index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(index, dict) or not isinstance(index.get("weight_map", {}), dict):
            raise ValueError("not an object with a weight_map")
    except (OSError, ValueError) as exc:
        raise UserError(f"Captioner weights index {path.name} is not readable ({exc}); save the model again.") from None
    return index


def _indexed_files(path: Path) -> list[str]:
    """The shard files an index maps weights to, each once; names outside the folder are refused."""
    names = sorted({str(name) for name in _index(path).get("weight_map", {}).values()})
    for name in names:
        if Path(name).name != name or not (path.parent / name).is_file():
            raise UserError(
                f"Captioner weights index {path.name} lacks shard {shorten(name, 60)!r}; save the model again."
            )
    return names


def _config_element_bytes(folder: Path) -> int:
    """Bytes per stored parameter of pickled weights: the config's dtype, else ``PICKLE_FALLBACK_BYTES``."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return PICKLE_FALLBACK_BYTES
    dtype = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    return CONFIG_DTYPE_BYTES.get(str(dtype).removeprefix("torch."), PICKLE_FALLBACK_BYTES)


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
