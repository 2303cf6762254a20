"""Training presets (character, style, concept): TOML files in ``presets/training/``.

A preset is a partial TrainConfig plus a ``description``; its keys are checked as strictly as a
config file's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapg.errors import UserError

PRESETS_DIR = Path(__file__).resolve().parent.parent.parent / "presets" / "training"
_NOT_IN_PRESETS = {
    "name",
    "model",
    "images",
    "regularization_images",
    "trigger",
    "preset",
    "out",
    "work_dir",
    "overwrite",
    "resume",
}


@dataclass(frozen=True)
class TrainingPreset:
    name: str
    description: str
    values: dict[str, Any]


def preset_names(folder: Path | None = None) -> list[str]:
    folder = folder or PRESETS_DIR
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def load_preset(name: str, folder: Path | None = None) -> TrainingPreset:
    from lorapg.training.config import coerce, read_toml_file

    folder = folder or PRESETS_DIR
    names = preset_names(folder)
    if name not in names:
        raise UserError(f"Unknown training preset {name!r}; choose one of {', '.join(names) or '(none found)'}.")
    path = folder / f"{name}.toml"
    data = read_toml_file(path, "Training preset")
    description = str(data.pop("description", ""))
    for key in data:
        if key in _NOT_IN_PRESETS:
            raise UserError(f"Training preset {path}: {key!r} belongs in a run's config, not in a preset.")
    values = {key: coerce(key, value, f" in preset {path}") for key, value in data.items()}
    return TrainingPreset(name, description, values)
