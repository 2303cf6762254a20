"""Caption a dataset folder: every image without a caption (or every image, with overwrite) gets
``<stem>.txt``, written with ``atomic_write`` so a crash never leaves half a caption.

An image that cannot be read, or that the model fails on, is skipped with its reason and the rest
are captioned. A batch that fails is retried one image at a time, so one bad image never costs its
neighbours their captions. ``should_cancel`` is asked before each batch; captions already written
stay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from lorapg.atomic_files import atomic_write_text
from lorapg.captioning.base import Captioner, CaptionOptions, RawCaption, format_caption
from lorapg.errors import UserError
from lorapg.training.dataset import Dataset

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (images done, images to caption, file just done)


@dataclass
class CaptionReport:
    written: dict[str, str] = field(default_factory=dict)  # file -> caption
    kept: list[str] = field(default_factory=list)  # had a caption and overwrite was off
    skipped: dict[str, str] = field(default_factory=dict)  # file -> reason
    cancelled: bool = False

    def summary(self) -> str:
        parts = [f"{len(self.written)} captioned", f"{len(self.kept)} kept"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        text = ", ".join(parts)
        return text + (" (cancelled)" if self.cancelled else "")

    def as_dict(self) -> dict:
        return {
            "written": self.written,
            "kept": self.kept,
            "skipped": self.skipped,
            "cancelled": self.cancelled,
            "summary": self.summary(),
        }


def caption_dataset(
    dataset: Dataset,
    captioner: Captioner,
    options: CaptionOptions,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
) -> CaptionReport:
    options = options.checked()
    report = CaptionReport()
    todo = _to_caption(dataset, options, report)
    done = 0
    for start in range(0, len(todo), options.batch_size):
        if should_cancel():
            report.cancelled = True
            break
        batch = todo[start : start + options.batch_size]
        for path, result in zip(batch, _caption_batch(batch, captioner, options, dataset.max_pixels), strict=True):
            if isinstance(result, str):
                _write(dataset, path, result, options, report)
            else:
                report.skipped[path.name] = result.reason
                log.info("captioning skipped %s: %s", path.name, result.reason)
            done += 1
            if progress is not None:
                progress(done, len(todo), path.name)
    return report


def _to_caption(dataset: Dataset, options: CaptionOptions, report: CaptionReport) -> list[Path]:
    """The images to caption; the kept and the skipped go into ``report``.

    ``a.png`` and ``a.jpg`` share ``a.txt``: only the first of a stem (sorted) is captioned, else the
    second caption would silently replace the first.
    """
    todo: list[Path] = []
    owners: dict[Path, str] = {}  # caption file -> the image that owns it
    for path in dataset.image_paths():  # sorted
        caption_file = path.with_suffix(".txt")
        if caption_file in owners:
            report.skipped[path.name] = (
                f"shares its caption file {caption_file.name} with {owners[caption_file]}; rename it to caption it"
            )
            continue
        owners[caption_file] = path.name
        if not options.overwrite and dataset.caption(path.name):
            report.kept.append(path.name)
        else:
            todo.append(path)
    return todo


def _write(dataset: Dataset, path: Path, caption: str, options: CaptionOptions, report: CaptionReport) -> None:
    # Checked again right before writing: captioning takes minutes, and a caption the user typed
    # meanwhile must stay when overwrite is off (only the instant between check and write remains).
    if not options.overwrite and dataset.caption(path.name):
        report.kept.append(path.name)
        return
    atomic_write_text(path.with_suffix(".txt"), caption + "\n")
    report.written[path.name] = caption


@dataclass(frozen=True)
class _Failure:
    reason: str


def _caption_batch(
    paths: list[Path], captioner: Captioner, options: CaptionOptions, max_pixels: int
) -> list[str | _Failure]:
    opened: list[Image.Image | _Failure] = [_open(path, max_pixels) for path in paths]
    images = [image for image in opened if isinstance(image, Image.Image)]
    captions: list[str | _Failure] = []
    if images:
        try:
            captions = [_text(raw, options) for raw in captioner.caption(images, options)]
        except UserError:
            raise  # the captioner itself cannot run (not loadable): nothing else would caption either
        except Exception as exc:
            if len(images) == 1:
                captions = [_Failure(f"the captioner failed on it: {type(exc).__name__}: {str(exc)[:200]}")]
            else:  # find the image it failed on; the others still get captions
                captions = [_one(image, captioner, options) for image in images]
    results = iter(captions)
    return [next(results) if isinstance(item, Image.Image) else item for item in opened]


def _one(image: Image.Image, captioner: Captioner, options: CaptionOptions) -> str | _Failure:
    try:
        return _text(captioner.caption([image], options)[0], options)
    except UserError:
        raise
    except Exception as exc:
        return _Failure(f"the captioner failed on it: {type(exc).__name__}: {str(exc)[:200]}")


def _text(raw: RawCaption, options: CaptionOptions) -> str | _Failure:
    if not (raw.sentence.strip() or raw.tags):
        return _Failure("the captioner returned no caption for it (no tag above the threshold, or no words)")
    return format_caption(raw, options)


def _open(path: Path, max_pixels: int) -> Image.Image | _Failure:
    try:
        with Image.open(path) as image:
            # Checked from the header, before decoding: the dataset's pixel limit (max_image_pixels).
            if 0 < max_pixels < image.width * image.height:
                return _Failure(f"{image.width}x{image.height} is more than {max_pixels} pixels (max_image_pixels)")
            return ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError:
        return _Failure("too many pixels to read safely")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        return _Failure(f"not a readable image ({type(exc).__name__})")
