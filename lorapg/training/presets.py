"""Training presets (character, style, concept): TOML files in ``presets/training/``.

A preset is a partial TrainConfig plus a ``description``; its keys are checked as strictly as a
config file's. A family whose training differs (Flux.1, SD 3.5: flow matching, no text-encoder
training) has its own version of each preset in ``presets/training/<family>/``, used when the base
model is known to be of that family before it is loaded (``guess_family``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapg.diffusion.families import FLUX, SD3
from lorapg.errors import MAX_REF_CHARS, UserError

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


def load_preset(name: str, folder: Path | None = None, family: str | None = None) -> TrainingPreset:
    """Preset ``name``; ``family``'s own version of it when that family has one."""
    from lorapg.training.config import coerce, read_toml_file

    folder = folder or PRESETS_DIR
    names = preset_names(folder)
    if name not in names:
        raise UserError(f"Unknown training preset {name!r}; choose one of {', '.join(names) or '(none found)'}.")
    path = folder / f"{name}.toml"
    if family and (folder / family / f"{name}.toml").is_file():
        path = folder / family / f"{name}.toml"
    data = read_toml_file(path, "Training preset")
    description = str(data.pop("description", ""))
    for key in data:
        if key in _NOT_IN_PRESETS:
            raise UserError(f"Training preset {path}: {key!r} belongs in a run's config, not in a preset.")
    values = {key: coerce(key, value, f" in preset {path}") for key, value in data.items()}
    return TrainingPreset(name, description, values)


# model_index.json's pipeline class -> the families with their own presets.
_PIPELINE_FAMILIES = {"FluxPipeline": FLUX, "StableDiffusion3Pipeline": SD3}


def guess_family(model: str) -> str | None:
    """The family of base model ``model`` when it can be told without loading it: a diffusers folder's
    (or an already-downloaded hub model's) ``model_index.json``, a single file's tensor names. None
    when unknown (the app's model, a hub id not downloaded yet): the presets' SD values apply."""
    if not model or len(model) > MAX_REF_CHARS:
        return None  # too long for a path or hub id: resolve_model_source says so, naming the field
    try:
        return _guess_family(model)
    except (OSError, RuntimeError, ValueError):
        # "File name too long", "~nosuchuser" (RuntimeError), a bad hub id: the trainer's own checks
        # (resolve_model_source) name the problem; a guess must not turn it into a traceback.
        return None


def _guess_family(model: str) -> str | None:
    path = Path(model).expanduser()
    index: Path | None = path / "model_index.json" if path.is_dir() else None
    if path.is_file():
        from lorapg.diffusion.model_source import resolve_model_source

        try:
            return resolve_model_source(model).family
        except UserError:
            return None  # the trainer says what is wrong with it
    if index is None and "/" in model and not path.exists():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "model_index.json")
        except ValueError:  # not a hub id either (HFValidationError): the trainer will say so
            return None
        index = Path(cached) if isinstance(cached, str) else None
    if index is None or not index.is_file():
        return None
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return None
    return _PIPELINE_FAMILIES.get(class_name)
