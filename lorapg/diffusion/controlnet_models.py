"""ControlNet models from ``models/controlnet/``: listed by name, checked against the base model's
family, loaded once and kept (registered with the residency manager like the pipeline's parts).

A model is a diffusers folder (config.json + diffusion_pytorch_model.safetensors) or a single
``.safetensors`` file (``ControlNetModel.from_single_file``); pickled files (.pth, .ckpt, .bin) only
with --allow-pickle, the rule base models follow (``model_source``).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel

from lorapg.diffusion.families import SD1, SD2, SDXL, family_label
from lorapg.diffusion.model_source import PICKLE_SUFFIXES
from lorapg.errors import UserError, shorten
from lorapg.hashing import model_hash

log = logging.getLogger(__name__)

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SDXL_TEXT_WIDTH, SD2_TEXT_WIDTH = 2048, 1024  # cross_attention_dim tells the families apart


@dataclass(frozen=True)
class ControlNetInfo:
    name: str
    path: Path  # a folder or a file
    family: str | None  # None: known only once loaded (a pickled single file)

    @property
    def weights_file(self) -> Path | None:
        """The file A1111's short hash is of (a folder's weights, or the file itself)."""
        if self.path.is_file():
            return self.path
        return next((self.path / name for name in WEIGHT_NAMES if (self.path / name).is_file()), None)

    @property
    def short_hash(self) -> str:
        """The extension writes ``Model: name [hash]`` with the first 8 hex digits of the file's hash."""
        weights = self.weights_file
        return model_hash(weights)[:8] if weights is not None else ""

    @property
    def title(self) -> str:
        """``name [hash]``, as the extension names models in its lists and PNG parameters."""
        digest = self.short_hash
        return f"{self.name} [{digest}]" if digest else self.name


class ControlNetLibrary:
    """The ControlNet models under ``root``; ``load`` keeps each loaded model for the next request."""

    def __init__(self, root: Path, *, allow_pickle: bool = False):
        self.root = Path(root)
        self.allow_pickle = allow_pickle
        self._loaded: dict[tuple[str, str], ControlNetModel] = {}
        self._lock = threading.Lock()

    def scan(self) -> list[ControlNetInfo]:
        """The models in the folder now (read on each call, so files added while the app runs appear)."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and (entry / "config.json").is_file():
                found.append(ControlNetInfo(entry.name, entry, _folder_family(entry)))
            elif entry.is_file() and entry.suffix.lower() == ".safetensors":
                found.append(ControlNetInfo(entry.stem, entry, _file_family(entry)))
            elif entry.is_file() and entry.suffix.lower() in PICKLE_SUFFIXES and self.allow_pickle:
                found.append(ControlNetInfo(entry.stem, entry, None))
        return found

    def names(self) -> list[str]:
        return [info.name for info in self.scan()]

    def resolve(self, name: str) -> ControlNetInfo:
        """The model called ``name`` (a folder name or a file's stem), or a UserError saying where models go."""
        models = self.scan()
        for info in models:
            if info.name == name:
                return info
        if _is_plain_name(name) and self._pickled(name):
            raise UserError(
                f"ControlNet model {shorten(name, 60)} is a pickled file; loading one can run arbitrary code. "
                "Convert it to .safetensors, or pass --allow-pickle if you trust its source."
            )
        available = ", ".join(info.name for info in models[:10]) or "none yet"
        raise UserError(
            f"ControlNet model {shorten(name, 60)!r} is not in {self.root} (available: {available}); put a diffusers "
            "folder (config.json + diffusion_pytorch_model.safetensors) or a .safetensors file there."
        )

    def _pickled(self, name: str) -> bool:
        """A pickled file called ``name`` in the folder, refused without --allow-pickle."""
        return not self.allow_pickle and any((self.root / f"{name}{suffix}").is_file() for suffix in PICKLE_SUFFIXES)

    def check_family(self, info: ControlNetInfo, family: str) -> None:
        """Refuse a model made for another family, naming both."""
        if info.family is not None and info.family != family:
            raise UserError(
                f"ControlNet model {info.name} is made for {family_label(info.family)}, but the loaded base model is "
                f"{family_label(family)}; pick a {family_label(family)} ControlNet."
            )

    def load(self, info: ControlNetInfo, dtype: torch.dtype) -> ControlNetModel:
        """The model, loaded once per file and dtype (on the CPU; the engine places it)."""
        key = (str(info.path.resolve()), str(dtype))
        with self._lock:
            model = self._loaded.get(key)
            if model is None:
                model = self._loaded[key] = self._read(info, dtype)
            return model

    def _read(self, info: ControlNetInfo, dtype: torch.dtype) -> ControlNetModel:
        try:
            if info.path.is_dir():
                safetensors = (info.path / WEIGHT_NAMES[0]).is_file()
                if not safetensors and not self.allow_pickle:
                    raise UserError(
                        f"ControlNet model {info.name} has only pickled weights (.bin); convert them to "
                        ".safetensors, or pass --allow-pickle if you trust its source."
                    )
                model = ControlNetModel.from_pretrained(info.path, torch_dtype=dtype, use_safetensors=safetensors)
            else:
                model = ControlNetModel.from_single_file(str(info.path), torch_dtype=dtype)
        except UserError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UserError(
                f"ControlNet model {info.name} could not be loaded ({shorten(str(exc), 160)}); "
                "use a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."
            ) from None
        model.eval()
        log.info("loaded ControlNet %s (%s) from %s", info.name, family_label(config_family(model.config)), info.path)
        return model


def config_family(config) -> str:
    """The base family a ControlNet's config was made for (its text width, and SDXL's time embedding)."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    if get("addition_embed_type") == "text_time":
        return SDXL
    width = get("cross_attention_dim")
    width = width[0] if isinstance(width, list | tuple) else width
    return SD2 if width == SD2_TEXT_WIDTH else SD1


def _folder_family(folder: Path) -> str | None:
    try:
        return config_family(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None  # unreadable: refused with the loader's message when used


def _file_family(path: Path) -> str | None:
    """SDXL ControlNets carry the time-embedding of SDXL's added conditions; SD 1.x ones do not."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception:  # safetensors raises its own error types for corrupt headers
        return None
    if any(k.startswith(("add_embedding.", "control_model.label_emb.")) for k in keys):
        return SDXL
    return SD1


def conditioning_width(model: ControlNetModel) -> int | None:
    width = model.config.cross_attention_dim
    return width[0] if isinstance(width, list | tuple) else width


def check_text_width(name: str, model: ControlNetModel, unet_width: int | None, family: str) -> None:
    """A ControlNet whose text width differs from the UNet's cannot steer it (another model's ControlNet)."""
    width = conditioning_width(model)
    if unet_width is not None and width is not None and width != unet_width:
        raise UserError(
            f"ControlNet model {name} reads text features of width {width}, but the loaded {family_label(family)} "
            f"model's are {unet_width}; pick a ControlNet made for this base model."
        )


def _is_plain_name(name: str) -> bool:
    """One file name: probing ``root/name`` for anything else (``../../x``) would tell a visitor whether
    a file exists outside the folder. Such a name gets the same "not in the folder" answer as any other."""
    return bool(name) and name not in {".", ".."} and not any(ch in name for ch in "/\\:\x00") and ".." not in name
