"""WD14-family booru taggers (SmilingWolf's wd-*-tagger repos) through onnxruntime.

The repo layout: ``model.onnx`` (NHWC float32 input, BGR, 0-255, a square side such as 448; output
one sigmoid probability per tag) and ``selected_tags.csv`` (``tag_id,name,category,count``;
category 9 = rating, 4 = character, 0 = general). Preprocessing is the taggers' own: pad to a
square on white, resize to the input side, RGB -> BGR. Character tags (above their own, higher
threshold) come first, then general tags, most confident first; rating tags are left out.
"""

from __future__ import annotations

import csv
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lorapg.captioning.base import CaptionOptions, RawCaption
from lorapg.captioning.sources import WD14
from lorapg.errors import UserError

log = logging.getLogger(__name__)

GENERAL, CHARACTER, RATING = 0, 4, 9
GENERAL_THRESHOLD, CHARACTER_THRESHOLD = 0.35, 0.85
DEFAULT_SIDE = 448


@dataclass(frozen=True)
class TagList:
    names: tuple[str, ...]
    categories: tuple[int, ...]


def read_tags(path: Path) -> TagList:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        names = tuple(row["name"] for row in rows)
        categories = tuple(int(row["category"]) for row in rows)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise UserError(
            f"Tagger tag list {path} is not a selected_tags.csv with name and category columns ({exc}); "
            "download the tagger again."
        ) from None
    return TagList(names, categories)


def readable_tag(tag: str) -> str:
    """``long_hair`` -> ``long hair``, as kohya's tagger writes them; kaomoji such as ``^_^`` stay."""
    return tag.replace("_", " ") if len(tag) > 3 and any(ch.isalnum() for ch in tag) else tag


def to_input(image: Image.Image, side: int) -> np.ndarray:
    """HWC float32 BGR 0-255, padded square on white and resized to ``side``."""
    image = image.convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    canvas.alpha_composite(image)  # transparency onto white, as the taggers were trained
    rgb = canvas.convert("RGB")
    square = max(rgb.size)
    padded = Image.new("RGB", (square, square), (255, 255, 255))
    padded.paste(rgb, ((square - rgb.width) // 2, (square - rgb.height) // 2))
    if square != side:
        padded = padded.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(padded, dtype=np.float32)[:, :, ::-1].copy()


class Wd14Tagger:
    kind = WD14

    def __init__(
        self,
        folder: Path,
        label: str,
        device: str = "cpu",
        general_threshold: float = GENERAL_THRESHOLD,
        character_threshold: float = CHARACTER_THRESHOLD,
    ):
        self.folder = Path(folder)
        self.label = label
        self.device = device
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self._session: Any = None
        self._tags: TagList | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def ensure_loaded(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            try:
                import onnxruntime
            except ImportError:
                raise UserError(
                    "The WD14 tagger needs onnxruntime: `pip install onnxruntime` (it is in requirements.txt)."
                ) from None
            tags = read_tags(self.folder / "selected_tags.csv")
            providers = ["CPUExecutionProvider"]
            if self.device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            try:
                session = onnxruntime.InferenceSession(str(self.folder / "model.onnx"), providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types for a damaged file
                raise UserError(
                    f"Could not load the WD14 tagger {self.label}: {str(exc).splitlines()[0][:300]}. "
                    "Download model.onnx again, or pick another captioner."
                ) from None
            outputs = session.get_outputs()[0].shape[-1]
            if isinstance(outputs, int) and outputs != len(tags.names):
                raise UserError(
                    f"WD14 tagger {self.label}: model.onnx scores {outputs} tags but selected_tags.csv lists "
                    f"{len(tags.names)}; the two files belong to different taggers."
                )
            self._session, self._tags = session, tags
            log.info("loaded WD14 tagger %s (%s)", self.label, providers[0])

    def release(self) -> None:
        with self._lock:
            self._session = None

    def estimated_bytes(self) -> int:
        path = self.folder / "model.onnx"
        return int(path.stat().st_size * 1.5) if path.is_file() else 1

    @property
    def side(self) -> int:
        """The model's square input side (NHWC: dimension 1); 448 when the model leaves it open."""
        shape = self._session.get_inputs()[0].shape
        return shape[1] if isinstance(shape[1], int) else DEFAULT_SIDE

    def caption(self, images: Sequence[Image.Image], options: CaptionOptions) -> list[RawCaption]:
        self.ensure_loaded()
        side = self.side
        batch = np.stack([to_input(image, side) for image in images])
        feed = self._session.get_inputs()[0].name
        scores = self._session.run(None, {feed: batch})[0]
        return [self._tags_of(row) for row in scores]

    def _tags_of(self, scores: np.ndarray) -> RawCaption:
        assert self._tags is not None
        character: list[tuple[float, str]] = []
        general: list[tuple[float, str]] = []
        for name, category, score in zip(self._tags.names, self._tags.categories, scores.tolist(), strict=True):
            if category == CHARACTER and score >= self.character_threshold:
                character.append((score, name))
            elif category == GENERAL and score >= self.general_threshold:
                general.append((score, name))
        ordered = sorted(character, key=lambda t: -t[0]) + sorted(general, key=lambda t: -t[0])
        return RawCaption(tags=tuple(readable_tag(name) for _, name in ordered))
