"""Where a base model comes from: a Hugging Face id, a local diffusers folder or a single file.

Resolving the reference is separate from loading it so that bad input (a missing path, a pickled
checkpoint) is refused before anything heavy happens, with a message the user can act on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from lorapg.diffusion.families import SD1, SD2, SDXL
from lorapg.errors import UserError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
FOLDER, SINGLE_FILE, HUB = "folder", "single_file", "hub"


@dataclass(frozen=True)
class ModelSource:
    ref: str  # what the user typed
    kind: str  # FOLDER, SINGLE_FILE or HUB
    path: Path | None  # local folder or file; None for a hub id not yet downloaded
    family: str | None = None  # known before loading for single files (from tensor names)

    @property
    def display_name(self) -> str:
        return Path(self.ref).stem if self.kind == SINGLE_FILE else Path(self.ref.rstrip("/")).name


def resolve_model_source(ref: str, *, allow_pickle: bool = False) -> ModelSource:
    """Classify ``ref``; raise UserError for a path that is missing or unsafe to load."""
    ref = (ref or "").strip()
    if not ref:
        raise UserError("No base model given. Pass a Hugging Face id, a diffusers folder or a .safetensors file.")
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"{ref} is a folder but not a diffusers model (no model_index.json). "
                "Point at the folder that holds model_index.json, or at a single .safetensors file."
            )
        return ModelSource(ref, FOLDER, path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise UserError(
                    f"{path.name} is a pickled checkpoint ({suffix}); loading one can run arbitrary code. "
                    "Convert it to .safetensors, or pass --allow-pickle if you trust its source."
                )
            return ModelSource(ref, SINGLE_FILE, path, None)
        if suffix != ".safetensors":
            raise UserError(f"{path.name}: unsupported model file type {suffix!r}; use a .safetensors checkpoint.")
        return ModelSource(ref, SINGLE_FILE, path, detect_checkpoint_family(path))
    if _looks_like_path(ref):
        raise UserError(f"Model path {ref} does not exist.")
    return ModelSource(ref, HUB, None)


def _looks_like_path(ref: str) -> bool:
    # A hub id is "owner/name" exactly; anything with more parts, a drive, a dot-prefix or a file
    # suffix was meant as a local path.
    if ref.startswith((".", "/", "~")) or "\\" in ref or Path(ref).suffix.lower() in PICKLE_SUFFIXES | {".safetensors"}:
        return True
    return ref.count("/") != 1


def detect_checkpoint_family(path: Path) -> str:
    """Tell SD 1.x, SD 2.x and SDXL apart from the tensor names of an original-layout checkpoint."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path.name} is not a readable .safetensors file ({exc}).") from None
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return SDXL
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return SD2
    if any(k.startswith("cond_stage_model.transformer.") for k in keys) or any(
        k.startswith("model.diffusion_model.") for k in keys
    ):
        return SD1
    raise UserError(
        f"{path.name} does not look like a Stable Diffusion checkpoint (no UNet or text encoder tensors). "
        "Is it a LoRA? Put LoRAs in the LoRA folder instead."
    )
