"""Training checkpoints: LoRA weights, optimizer and scheduler state, RNG and position.

Each checkpoint is a folder ``checkpoints/step-0000123/`` written under a ``.partial`` name and
renamed when complete, so a run killed mid-save (``kill -9``, power loss) leaves the previous
checkpoint as the latest one and never a half-written folder that looks finished.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from lorapg.atomic_files import atomic_write, atomic_write_bytes, fsync_directory

_PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    step: int  # optimizer steps done
    epoch: int  # epoch in progress (0-based)
    batch: int  # batches of that epoch already done
    lora: dict[str, torch.Tensor]  # trainable parameter name -> tensor
    state: dict[str, Any]  # optimizer, lr_scheduler, generator, losses, config


def checkpoint_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "checkpoints"


def list_checkpoints(work_dir: Path) -> list[Path]:
    folder = checkpoint_dir(work_dir)
    if not folder.is_dir():
        return []
    done = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.pt").is_file() and not p.name.endswith(".partial")
    ]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(work_dir: Path) -> Path | None:
    found = list_checkpoints(work_dir)
    return found[-1] if found else None


def save_checkpoint(
    work_dir: Path,
    *,
    step: int,
    epoch: int,
    batch: int,
    lora: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    folder = checkpoint_dir(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_PREFIX}{step:07d}"
    partial = folder / (final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    # Through atomic_write for its fsync: a folder renamed complete must not hold empty files after a power cut.
    atomic_write_bytes(
        partial / "lora.safetensors", save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in lora.items()})
    )
    with atomic_write(partial / "state.pt") as handle:
        torch.save({"step": step, "epoch": epoch, "batch": batch, **state}, handle)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    fsync_directory(folder)
    for stale in folder.glob("*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(work_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    lora = load_file(str(Path(path) / "lora.safetensors"))
    return Checkpoint(Path(path), int(state.pop("step")), int(state.pop("epoch")), int(state.pop("batch")), lora, state)


def clear_checkpoints(work_dir: Path) -> None:
    shutil.rmtree(checkpoint_dir(work_dir), ignore_errors=True)
