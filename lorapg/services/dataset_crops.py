"""Crop preview and focus points for a dataset: per image, the bucket it trains at and the box kept.

Never imports gradio. Every answer comes from ``lorapg.training.cropping``, the functions the trainer
uses, so what the preview shows is what trains. ``resolution`` 0 means the loaded model's native size
(512 when none is loaded), as the trainer's 0 does; bucket sides step by 64 px, as for every real model.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from lorapg.atomic_files import current_umask
from lorapg.errors import UserError, shorten
from lorapg.training.config import TrainConfig, check
from lorapg.training.cropping import (
    PREVIEW_SIDE,
    CropPlan,
    Detector,
    Focus,
    FocusPoints,
    bucket_step,
    buckets_for,
    check_focus,
    crop_to_plan,
    open_rgb,
    plan_image,
)
from lorapg.training.dataset import Dataset, check_name

DEFAULT_RESOLUTION = 512  # SD 1.x's native size: the preview's when no model is loaded


@dataclass(frozen=True)
class ImageCrop:
    """One image's crop: what the API returns and the preview draws."""

    file: str
    plan: CropPlan

    def as_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "file": self.file,
            "width": plan.size[0],
            "height": plan.size[1],
            "bucket": {"width": plan.bucket[0], "height": plan.bucket[1]},
            # In the original image's pixels: left, top, right, bottom.
            "box": [round(v, 1) for v in plan.box],
            "source": plan.source,
            "focus": list(plan.focus) if plan.focus is not None else None,
        }


@dataclass(frozen=True)
class CropOptions:
    """The training settings that decide a crop (the Train tab's fields of the same names)."""

    resolution: int = 0
    bucketing: bool = True
    face_crop: bool = False


class DatasetCropService:
    def __init__(self, training: Any, detector: Detector | None = None):
        """``training``: the TrainingService whose datasets these are. ``detector``: face finder (default:
        OpenCV's Haar cascade), the one the trainer is given."""
        self.training = training
        self.detector = detector

    # --- lookups -------------------------------------------------------------------------------

    def _dataset(self, name: str, owner: str | None) -> Dataset:
        return self.training.dataset_store(owner).get(name)

    def _image_path(self, dataset: Dataset, file: str) -> Path:
        """An image of this dataset: a bare file name (no folders, no ``..``) that exists there."""
        file = check_name(file, "Image name")
        path = dataset.folder / file
        if path not in dataset.image_paths():
            raise UserError(
                f"Image name {shorten(file)!r}: no such image in dataset {dataset.name}; pick one it lists."
            )
        return path

    def _open_image(self, dataset: Dataset, path: Path) -> Image.Image:
        """The image, or a UserError naming it: a broken or oversized file can sit in a dataset (training
        skips it), and a route must refuse it before writing anything, not fail with a 500."""
        what = f"Image {shorten(path.name)!r} in dataset {dataset.name}"
        try:
            with Image.open(path) as header:  # the header only: the pixel limit before any decoding
                pixels = header.width * header.height
            if 0 < dataset.max_pixels < pixels:
                raise UserError(
                    f"{what} has {pixels} pixels, more than {dataset.max_pixels} (max_image_pixels); "
                    "training skips it: resize or remove it."
                )
            return open_rgb(path)
        except Image.DecompressionBombError:
            raise UserError(
                f"{what} has too many pixels to read safely; training skips it: resize or remove it."
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(
                f"{what} is not a readable image ({type(exc).__name__}); training skips it: replace or remove it."
            ) from None

    def resolution(self, options: CropOptions) -> int:
        check(dataclasses.replace(TrainConfig(), resolution=options.resolution))  # the trainer's range
        if options.resolution:
            return options.resolution
        model = getattr(getattr(self.training, "engine", None), "model", None)
        return int(getattr(model, "native_size", 0) or DEFAULT_RESOLUTION)

    def _plan(self, image: Image.Image, focus: Focus | None, options: CropOptions) -> CropPlan:
        resolution = self.resolution(options)
        buckets = buckets_for(resolution, bucket_step(resolution), options.bucketing)
        return plan_image(image, buckets, focus, options.face_crop, self.detector)

    # --- what the API and the tab call ---------------------------------------------------------

    def crops(self, name: str, options: CropOptions | None = None, owner: str | None = None) -> list[ImageCrop]:
        """Every image training would use (validation's verdict), with its bucket and box."""
        options = options or CropOptions()
        dataset = self._dataset(name, owner)
        points = FocusPoints(dataset.folder).load()
        result = []
        for item in dataset.validate().trainable():
            path = dataset.folder / item.file
            result.append(ImageCrop(item.file, self._plan(open_rgb(path), points.get(item.file), options)))
        return result

    def _image_and_plan(
        self, name: str, file: str, options: CropOptions | None, owner: str | None
    ) -> tuple[str, Image.Image, CropPlan]:
        dataset = self._dataset(name, owner)
        path = self._image_path(dataset, file)
        image = self._open_image(dataset, path)
        focus = FocusPoints(dataset.folder).load().get(path.name)
        return path.name, image, self._plan(image, focus, options or CropOptions())

    def crop(self, name: str, file: str, options: CropOptions | None = None, owner: str | None = None) -> ImageCrop:
        file, _, plan = self._image_and_plan(name, file, options, owner)
        return ImageCrop(file, plan)

    def set_focus(self, name: str, file: str, x: object, y: object, owner: str | None = None) -> Focus:
        """Store the point (0..1 of width and height) the image's crop centres on."""
        focus = check_focus(x, y)
        dataset = self._dataset(name, owner)
        path = self._image_path(dataset, file)
        self._open_image(dataset, path)  # refused before the sidecar is written
        FocusPoints(dataset.folder).set(path.name, focus)
        return focus

    def clear_focus(self, name: str, file: str, owner: str | None = None) -> None:
        dataset = self._dataset(name, owner)
        FocusPoints(dataset.folder).set(self._image_path(dataset, file).name, None)

    def cropped(self, name: str, file: str, options: CropOptions | None = None, owner: str | None = None):
        """The pixels that train (before the VAE): the same function the trainer crops with."""
        _, image, plan = self._image_and_plan(name, file, options, owner)
        return crop_to_plan(image, plan)

    def preview(self, name: str, file: str, options: CropOptions | None = None, owner: str | None = None):
        """A thumbnail with the kept box outlined and the rest dimmed; the focus point as a dot."""
        _, image, plan = self._image_and_plan(name, file, options, owner)
        return draw_preview(image, plan)

    def apply(
        self, name: str, new_name: str, options: CropOptions | None = None, owner: str | None = None
    ) -> list[str]:
        """Write every trainable image, cropped and resized to its bucket, with its caption, into a new
        dataset ``new_name`` (the originals are never touched); the files written. All or nothing: the
        copies are made in a hidden staging folder and moved in as a whole."""
        options = options or CropOptions()
        store = self.training.dataset_store(owner)
        source = store.get(name)
        target = store.get(_encodable(new_name), must_exist=False)
        if target.folder.exists():
            raise UserError(f"Dataset name {target.name!r} is taken; choose a new name for the cropped copy.")
        points = FocusPoints(source.folder).load()
        store.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".crop-", dir=store.root))  # hidden: never listed as a dataset
        try:
            written = []
            for item in source.validate().trainable():
                image = open_rgb(source.folder / item.file)
                cropped = crop_to_plan(image, self._plan(image, points.get(item.file), options))
                file = _png_name(item.file, written)
                cropped.save(staging / file, format="PNG")
                caption = source.caption(item.file)
                if caption:
                    (staging / file).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
                written.append(file)
            os.chmod(staging, 0o777 & ~current_umask(store.root))  # mkdtemp's 0700 is not a dataset's mode
            os.replace(staging, target.folder)  # move-only: the new dataset appears whole
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return written

    def preview_png(self, name: str, file: str, options: CropOptions | None = None, owner: str | None = None) -> bytes:
        out = io.BytesIO()
        self.preview(name, file, options, owner).save(out, format="PNG")
        return out.getvalue()


def _encodable(name: str) -> str:
    """A JSON body can carry lone surrogates, which no file system name can hold (a 500 otherwise)."""
    try:
        (name or "").encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("Dataset name holds characters a file name cannot; use letters, digits, - and _.") from None
    return name


def _png_name(file: str, taken: list[str]) -> str:
    """The copy's name: PNG (lossless: a JPEG would lose more when re-encoded), unique (a.jpg and a.png)."""
    name = Path(file).with_suffix(".png").name
    if name in taken:
        name = f"{Path(file).stem}-{Path(file).suffix.lstrip('.').lower()}.png"
    return name


def draw_preview(image: Image.Image, plan: CropPlan) -> Image.Image:
    scale = min(1.0, PREVIEW_SIDE / max(image.size))
    thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    left, top, right, bottom = (round(v * scale) for v in plan.box)
    # Dim what is cut away, so the kept part reads at a glance.
    shade = Image.new("RGB", thumb.size, (0, 0, 0))
    dimmed = Image.blend(thumb, shade, 0.55)
    dimmed.paste(thumb.crop((left, top, right, bottom)), (left, top))
    draw = ImageDraw.Draw(dimmed)
    draw.rectangle((left, top, right - 1, bottom - 1), outline=(255, 215, 0), width=2)
    if plan.focus is not None:
        x, y = plan.focus[0] * thumb.width, plan.focus[1] * thumb.height
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(255, 64, 64), outline=(255, 255, 255))
    return dimmed
