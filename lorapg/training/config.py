"""TrainConfig: everything a training run needs, as one flat TOML file.

The Train tab only produces this file and ``python -m lorapg train CONFIG`` runs it headless (the
ai-toolkit pattern). Loading is strict: an unknown or misspelled key is an error that names it,
and every number is range-checked, so a typo never silently falls back to a default.

Precedence: defaults < the preset named by ``preset`` (the base model family's version of it, when
the family has one and is known before loading) < the file < flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lorapg.atomic_files import atomic_write_text
from lorapg.coercion import coerce_setting, read_toml
from lorapg.errors import UserError
from lorapg.limits import TRAINING
from lorapg.training.dataset import check_name

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("auto", "adamw", "adamw8bit")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
SAVE_PRECISION = ("fp16", "bf16", "fp32")
# Flux.1 / SD 3.5 timestep sampling (diffusers' --weighting_scheme; "uniform" is its "none").
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap")
# Flow-matching numbers: name -> (low, high); not in lorapg.limits (no UI control reads them yet).
FLOW_RANGES = {
    "logit_mean": (-5.0, 5.0),
    "logit_std": (0.01, 10.0),
    "mode_scale": (0.0, 2.0),
    "guidance_scale": (0.0, 30.0),
}


@dataclass
class TrainConfig:
    # --- what -----------------------------------------------------------------------------
    name: str = ""  # the LoRA's file name (without .safetensors) in the LoRA folder
    model: str = ""  # base model: hub id, diffusers folder or .safetensors; "" = the app's model
    images: str = ""  # folder of images with optional .txt captions beside them
    trigger: str = ""  # trigger word(s), put at the start of every caption
    # Prior preservation (kohya's reg_data_dir): ordinary images of the class, captions used as they are
    # (no trigger), trained alongside so that prompts without the trigger keep their meaning.
    regularization_images: str = ""
    prior_loss_weight: float = 1.0  # weight of a regularization image's loss relative to a concept image's
    preset: str = ""  # character / style / concept: its values are the defaults for this file
    out: str = ""  # folder the LoRA is written to; "" = the app's LoRA folder
    work_dir: str = ""  # checkpoints and samples; "" = models/training/NAME
    overwrite: bool = False  # replace an existing LoRA of the same name
    resume: bool = True  # continue from the last checkpoint in work_dir when there is one
    # --- network --------------------------------------------------------------------------
    rank: int = 16
    alpha: float = 8.0
    train_text_encoder: bool = False
    # Also the UNet's ResNet 3×3 convolutions (kohya's LoCon, ``conv_dim``): shapes and layout live there,
    # attention alone mostly moves content, colour and style.
    train_conv: bool = False
    # --- schedule -------------------------------------------------------------------------
    unet_lr: float = 1e-4
    text_encoder_lr: float = 5e-5
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps; 0 = run every epoch
    repeats: int = 1  # each image is seen this many times per epoch
    batch_size: int = 1
    resolution: int = 0  # training area is resolution²; 0 = the base model's native size
    bucketing: bool = True  # aspect-ratio buckets instead of square center crops
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    min_snr_gamma: float = 0.0  # 0 = off
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    # --- machinery ------------------------------------------------------------------------
    optimizer: str = "auto"  # auto = 8-bit AdamW where bitsandbytes works on the device, else AdamW
    mixed_precision: str = "auto"  # auto = bf16 on GPUs that have it, else fp16 on CUDA; fp32 on CPU
    gradient_checkpointing: bool = True
    cache_latents: bool = True
    seed: int = 42
    save_every_epochs: int = 1  # checkpoint (and a per-epoch LoRA) every N epochs
    keep_checkpoints: int = 2
    save_precision: str = "fp16"  # dtype of the exported LoRA (kohya's usual fp16; fp32 for exact comparisons)
    # --- samples --------------------------------------------------------------------------
    sample_prompt: str = "{trigger}"  # "{trigger}" is replaced by the trigger word
    sample_steps: int = 20  # 0 = no sample images
    sample_seed: int = 1234
    # --- data ---------------------------------------------------------------------------
    # Near duplicates (resized / re-encoded copies) are reported and trained on; true leaves them out.
    drop_near_duplicates: bool = False
    # Tag captions, varied per step (kohya's shuffle_caption, keep_tokens, caption_dropout_rate); see
    # lorapg/training/caption_variation.py. keep_tokens counts comma-separated tags; the trigger is the first.
    shuffle_tags: bool = False
    keep_tokens: int = 1
    caption_dropout: float = 0.0  # chance, per image and step, of training on an empty caption
    # Centre each crop on the largest face OpenCV's bundled Haar cascade finds (character datasets); a focus
    # point set by hand (the crop preview) still wins. Off by default: detection costs time on every image.
    face_crop: bool = False
    # --- flow matching (Flux.1, SD 3.5; lorapg.training.flow_matching) -----------------------------
    # How training timesteps are drawn: diffusers' compute_density_for_timestep_sampling. logit_normal
    # (SD 3 paper, diffusers' SD 3 script default) with logit_mean/logit_std; mode with mode_scale.
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # diffusers' default
    # Flux dev's distilled guidance input while training (diffusers' README and ai-toolkit use 1).
    guidance_scale: float = 1.0
    # Added last (issue 17): the frozen Flux.1 / SD 3.5 base (transformer and T5) in 4-bit NF4 through
    # bitsandbytes, the LoRA on top in fp32 (QLoRA): FLUX.1-dev's transformer takes ~6.7 GB instead of ~24.
    # "" = the app's quantize setting (nf4 applies to Flux.1 / SD 3.5 runs; fp8 trains unquantized).
    quantize: str = ""


FIELDS = {f.name: f for f in fields(TrainConfig)}
# name -> (low, high) inclusive; numbers only. The ranges live in lorapg.limits, beside the generation ones.
RANGES: dict[str, tuple[float, float]] = {key: (r.minimum, r.maximum) for key, r in TRAINING.items()}
CHOICES = {
    "lr_scheduler": LR_SCHEDULERS,
    "optimizer": OPTIMIZERS,
    "mixed_precision": MIXED_PRECISION,
    "save_precision": SAVE_PRECISION,
    "weighting_scheme": WEIGHTING_SCHEMES,
    # fp8 storage (generation's --quantize fp8) is not offered for training: NF4 saves more and is what
    # QLoRA, diffusers' Flux QLoRA example and ai-toolkit train on.
    "quantize": ("", "none", "nf4"),  # "": the app's setting
}


def coerce(key: str, value: Any, where: str = "") -> Any:
    """``value`` as the type of field ``key``; UserError naming the key otherwise."""
    if key not in FIELDS:
        known = ", ".join(sorted(FIELDS))
        raise UserError(f"Unknown training setting {key!r}{where}. Known settings: {known}.")
    # One coercion for settings and training configs (lorapg.coercion): 3.5 epochs is refused, not truncated.
    return coerce_setting(f"Training setting {key!r}{where}", FIELDS[key].type, value)


def check(config: TrainConfig) -> TrainConfig:
    """Range and choice checks; the first problem is raised as a UserError naming the field."""
    for key, (low, high) in (RANGES | FLOW_RANGES).items():
        value = getattr(config, key)
        if not low <= value <= high:
            raise UserError(f"Training setting {key!r} is {value:g}; it must be between {low:g} and {high:g}.")
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            choices = ", ".join(choice for choice in allowed if choice)  # "" (the default) is not typed
            raise UserError(f"Training setting {key!r} is {getattr(config, key)!r}; use one of {choices}.")
    if config.resolution and (config.resolution < 64 or config.resolution % 8):
        raise UserError(f"Resolution {config.resolution} must be 0 (native) or a multiple of 8 of at least 64.")
    return config


def read_toml_file(path: Path, what: str = "Training config") -> dict[str, Any]:
    """A flat TOML file (``key = value`` lines) through the app's one TOML reader."""
    data = read_toml(path, what)
    nested = [key for key, value in data.items() if isinstance(value, dict)]
    if nested:
        raise UserError(f"{what} {path}: unexpected table [{nested[0]}]; the settings are flat key = value lines.")
    return data


def build_config(
    values: dict[str, Any], *, presets_dir: Path | None = None, where: str = "", preset_model: str = ""
) -> TrainConfig:
    """Defaults, then the named preset, then ``values`` (flags already merged in), checked.

    ``preset_model``: the base model the run will train when ``values`` names none (the app's model),
    so that its family's version of the preset is used."""
    coerced = {key: coerce(key, value, where) for key, value in values.items() if value is not None}
    preset_name = coerced.get("preset", "")
    merged: dict[str, Any] = {}
    if preset_name:
        from lorapg.training.presets import guess_family, load_preset

        # Flux.1 / SD 3.5 have their own character/style/concept values (presets/training/<family>/).
        family = guess_family(str(coerced.get("model") or preset_model))
        merged.update(load_preset(preset_name, presets_dir, family).values)
    merged.update(coerced)
    return check(dataclasses.replace(TrainConfig(), **merged))


def load_config(
    path: Path | None,
    overrides: dict[str, Any] | None = None,
    *,
    presets_dir: Path | None = None,
    preset_model: str = "",
) -> TrainConfig:
    """A config file (``path``, optional) with ``overrides`` (flags) on top; ``preset_model``: the model
    trained when neither names one (the app's), whose family chooses the preset's version."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_toml_file(Path(path)))
        for key in values:
            coerce(key, values[key], f" in {path}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    where = f" in {path}" if path else ""
    return build_config(values, presets_dir=presets_dir, where=where, preset_model=preset_model)


def validate_name(name: str) -> str:
    return check_name(name, "LoRA name")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def to_toml(config: TrainConfig) -> str:
    """Every field, one line each, in declaration order: readable, diffable, and round-trips."""
    lines = ["# LoRA Playground training config: python -m lorapg train THIS_FILE"]
    lines += [f"{f.name} = {_toml_value(getattr(config, f.name))}" for f in fields(TrainConfig)]
    return "\n".join(lines) + "\n"


def write_config(config: TrainConfig, path: Path) -> Path:
    return atomic_write_text(path, to_toml(config))
