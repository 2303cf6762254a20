"""Preprocessors that need weights: a depth-estimation model read with transformers.

The model is a transformers folder (``AutoModelForDepthEstimation``: Depth Anything, DPT/MiDaS, ...)
in ``models/annotators/depth``; nothing is downloaded at run time. It runs on the CPU: the models
are small (Depth Anything V2 Small has 25M parameters) and it keeps the GPU's budget for the UNet.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorapg.diffusion.controlnet import missing_depth_model_message
from lorapg.errors import UserError, shorten

log = logging.getLogger(__name__)

_loaded: dict[str, tuple] = {}  # folder -> (processor, model): loaded once
_lock = threading.Lock()


def estimate_depth(image: Image.Image, folder: Path) -> Image.Image:
    """``image``'s depth map (white = near, as the extension's depth preprocessors make), same size, RGB."""
    processor, model = _depth_model(Path(folder))
    inputs = processor(images=image.convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        predicted = model(**inputs).predicted_depth  # (batch, h, w): relative inverse depth
    depth = torch.nn.functional.interpolate(
        predicted.unsqueeze(1).float(), size=(image.height, image.width), mode="bicubic", align_corners=False
    )[0, 0]
    low, high = float(depth.min()), float(depth.max())
    scaled = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
    grey = (scaled.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _depth_model(folder: Path) -> tuple:
    key = str(folder.resolve())
    with _lock:
        if key not in _loaded:
            _loaded[key] = _load(folder)
        return _loaded[key]


def _load(folder: Path) -> tuple:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        # Pickled .bin weights are not read here: a depth model ships as safetensors.
        raise UserError(missing_depth_model_message(folder))
    try:
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"The depth model in {folder} could not be loaded ({shorten(str(exc), 160)}); "
            + missing_depth_model_message(folder)
        ) from None
    model.eval()
    log.info("loaded the depth preprocessor %s from %s", type(model).__name__, folder)
    return processor, model
