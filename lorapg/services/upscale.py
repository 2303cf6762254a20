"""Upscaling (A1111's Extras tab): an image, an upscaler and a scale in; the bigger image out.

Used by the UI's Upscale tab, ``python -m lorapg upscale`` and ``/sdapi/v1/extra-single-image``. The
work runs on the job queue, so an upscaler never computes on the GPU next to a generation. A result
saved to the gallery keeps the source's parameters (when it had any) and adds A1111's
"Postprocess upscale by" and "Postprocess upscaler". Never imports gradio, torch or spandrel.

A1111's two resize modes are here, not in the API: "Scale by" a factor and "Scale to" a width and
height (the factor that covers it, then a centre crop to exactly that size when asked). As in A1111's
scripts/postprocessing_upscale.py, "Scale to" may make the image smaller, and "None" returns the image
as it is (no size to check, no crop, no "Postprocess" fields).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from lorapg.coercion import checked_number, shown
from lorapg.config import Settings
from lorapg.diffusion.img2img import load_image
from lorapg.diffusion.upscalers import (
    NONE,
    UpscaleCancelled,
    UpscalerFile,
    UpscalerLibrary,
    check_size,
    scale_text,
)
from lorapg.errors import UserError
from lorapg.gallery.a1111 import format_parameters, parse_parameters
from lorapg.gallery.png import read_png_parameters, save_png_atomically
from lorapg.gallery.records import ImageRecord, check_image_id, record_from_parsed
from lorapg.jobs import JobQueue
from lorapg.limits import UPSCALE_BY, UPSCALER_2_VISIBILITY
from lorapg.services.gallery import GalleryService

log = logging.getLogger(__name__)

RESIZE_BY, RESIZE_TO = 0, 1  # A1111's resize_mode: "Scale by" a factor, "Scale to" a width and height


@dataclass(frozen=True)
class UpscalerInfo:
    """One upscaler as A1111's ``/sdapi/v1/upscalers`` lists it."""

    name: str
    model_name: str | None = None  # the file's name for a model
    model_path: str | None = None
    scale: float | None = None  # a model's factor as its file name states it; None: any (resizers)


@dataclass(frozen=True)
class _Target:
    """What one upscale aims at, worked out on the queue (a model's own factor needs it loaded)."""

    scale: float
    pairs: list[tuple[str, str]]  # the "Postprocess ..." fields of the result
    crop: tuple[int, int] | None = None  # cut the centre out to exactly this size


@dataclass
class UpscaleResult:
    image: Image.Image
    upscaler: str  # as spelled here
    scale: float
    source_parameters: str | None = None  # the source PNG's A1111 text, if it had one
    record: ImageRecord | None = None  # the gallery's, once saved
    pairs: list[tuple[str, str]] = field(default_factory=list)  # "Postprocess ..." as A1111 writes them

    @property
    def info(self) -> str:
        """A1111's ``html_info``: ``Postprocess upscale by: 4, Postprocess upscaler: NAME``."""
        return ", ".join(f"{key}: {value}" for key, value in self.pairs)


class UpscaleService:
    def __init__(
        self, settings: Settings, library: UpscalerLibrary, jobs: JobQueue, gallery: GalleryService | None = None
    ):
        """``gallery`` None: results are only returned (the CLI writes its own file). Gallery images
        are read through GalleryService, so what a visitor may upscale is exactly what the Gallery
        shows them (all images in a shared gallery, their own otherwise)."""
        self.settings = settings
        self.library = library
        self.jobs = jobs
        self.gallery = gallery

    def upscalers(self) -> list[UpscalerInfo]:
        """The built-in resizers, then the models in the folder now (re-read each call)."""
        built_in = [UpscalerInfo(name) for name in self.library.names() if name not in self._model_names()]
        models = [
            UpscalerInfo(item.name, model_name=item.path.name, model_path=str(item.path), scale=item.named_scale)
            for item in self.library.files()
        ]
        return built_in + models

    def _model_names(self) -> set[str]:
        return {item.name for item in self.library.files()}

    def upscale(
        self,
        image: object,
        upscaler: object,
        scale: object = None,
        *,
        fields: tuple[str, str, str] = ("Image", "Upscaler", "Scale"),
        owner: str | None = None,
    ) -> UpscaleResult:
        """``image`` (a PIL image, a path or PNG/JPEG bytes) upscaled; ``scale`` None: the model's own
        factor (2 for the built-in resizers). ``fields``: how the caller names the image, upscaler and
        scale fields, so a refusal names the one the user filled in (the API's ``upscaler_1``)."""
        image_field, upscaler_field, scale_field = fields
        picture = load_image(image_field, image, self.settings.max_image_pixels)
        name = self._name(upscaler, upscaler_field)  # unknown: refused before the queue
        factor = None if scale is None else checked_number(scale_field, scale)
        if factor is not None and factor not in UPSCALE_BY:
            raise UserError(f"{scale_field} must be {UPSCALE_BY.describe()}, got {factor:g}.")

        def target() -> _Target:
            wanted = factor if factor is not None else self._default_scale(name)
            return _Target(wanted, [("Postprocess upscale by", scale_text(wanted)), ("Postprocess upscaler", name)])

        return self._run(picture, _parameters_of(image), name, target, (upscaler_field, scale_field), owner)

    def upscale_to(
        self,
        image: object,
        upscaler: object,
        width: object,
        height: object,
        crop: bool = True,
        *,
        fields: tuple[str, str, str, str] = ("Image", "Upscaler", "Width", "Height"),
        owner: str | None = None,
    ) -> UpscaleResult:
        """A1111's "Scale to": ``image`` scaled by the factor that covers ``width`` × ``height`` (smaller
        than the image too); ``crop``: then the centre cut out to exactly that size, else the aspect
        ratio kept (A1111 never stretches). ``fields``: the image, upscaler, width and height fields."""
        image_field, upscaler_field, width_field, height_field = fields
        picture = load_image(image_field, image, self.settings.max_image_pixels)
        name = self._name(upscaler, upscaler_field)
        size = (_pixels(width_field, width), _pixels(height_field, height))
        factor = max(size[0] / picture.width, size[1] / picture.height)
        text = f"{size[0]}x{size[1]}"
        pairs = [("Postprocess upscale to", text), *([("Postprocess crop to", text)] if crop else [])]
        target = _Target(factor, [*pairs, ("Postprocess upscaler", name)], size if crop else None)
        fields_named = (upscaler_field, f"{width_field} × {height_field}")
        return self._run(picture, _parameters_of(image), name, lambda: target, fields_named, owner)

    def upscale_by_mode(
        self,
        image: object,
        upscaler: object,
        resize_mode: object,
        *,
        scale: object,
        width: object,
        height: object,
        crop: bool,
        owner: str | None = None,
        extras: dict[str, object] | None = None,
    ) -> UpscaleResult:
        """A1111's Extras with its API's fields: ``resize_mode`` 0 upscales by ``scale``
        (upscaling_resize), 1 to ``width`` × ``height`` (upscaling_resize_w / _h). ``extras``: A1111's
        other Extras fields by their API names (face restoration, upscaler_2), refused when they ask
        for what this app does not have (see ``refuse_missing_extras``)."""
        self.refuse_missing_extras(**(extras or {}))
        if resize_mode == RESIZE_BY:
            return self.upscale(image, upscaler, scale, fields=("image", "upscaler_1", "upscaling_resize"), owner=owner)
        if resize_mode == RESIZE_TO:
            fields = ("image", "upscaler_1", "upscaling_resize_w", "upscaling_resize_h")
            return self.upscale_to(image, upscaler, width, height, crop, fields=fields, owner=owner)
        raise UserError(f"resize_mode must be 0 (by upscaling_resize) or 1 (to a size), got {shown(resize_mode)}.")

    def refuse_missing_extras(
        self,
        gfpgan_visibility: object = 0,
        codeformer_visibility: object = 0,
        upscaler_2: object = NONE,
        extras_upscaler_2_visibility: object = 0,
    ) -> None:
        """A1111 Extras features this app does not have: refused by field, rather than silently skipped.
        A second upscaler counts only when it is blended in (visibility above 0), as in A1111."""
        for name, value in (("gfpgan_visibility", gfpgan_visibility), ("codeformer_visibility", codeformer_visibility)):
            if checked_number(name, value) != 0:
                raise UserError(f"{name}: face restoration is not available here; send 0.")
        visibility = checked_number("extras_upscaler_2_visibility", extras_upscaler_2_visibility)
        if visibility not in UPSCALER_2_VISIBILITY:
            raise UserError(
                f"extras_upscaler_2_visibility must be {UPSCALER_2_VISIBILITY.describe()}, got {shown(visibility)}."
            )
        blank = upscaler_2 is None or (isinstance(upscaler_2, str) and not upscaler_2.strip())  # A1111: "None"
        if visibility > 0 and not blank and self._name(upscaler_2, "upscaler_2") != NONE:
            raise UserError('upscaler_2: blending a second upscaler is not available here; send "None".')

    def _name(self, upscaler: object, field: str) -> str:
        """The upscaler's name as spelled here (any case: "none" is "None")."""
        found = self.library.find(upscaler, field)
        return found.name if isinstance(found, UpscalerFile) else found

    def _run(
        self,
        picture: Image.Image,
        parameters: str | None,
        name: str,
        target: Callable[[], _Target],
        fields: tuple[str, str],
        owner: str | None,
    ) -> UpscaleResult:
        """The upscale on the job queue; ``fields``: the upscaler's and the size's (for refusals)."""
        upscaler_field, size_field = fields

        def work(job) -> UpscaleResult | None:
            goal = target()
            if name == NONE:  # makes no pixels: nothing to check, crop or record (A1111 skips it)
                return UpscaleResult(picture, NONE, goal.scale, parameters)
            model_scale = self.library.model_scale(name)
            size = check_size(*picture.size, goal.scale, model_scale, self.settings.max_image_pixels, size_field)
            try:
                result = self.library.upscale(picture, name, size, upscaler_field, job.cancel_requested)
            except UpscaleCancelled:
                return None  # the job ends cancelled
            if goal.crop is not None:
                result = crop_centre(result, *goal.crop)
            return UpscaleResult(result, name, goal.scale, parameters, pairs=goal.pairs)

        job = self.jobs.submit("upscale", work, owner=owner)
        job.wait()
        if job.error:
            raise UserError(job.error)
        if job.result is None:
            raise UserError("Upscaling was cancelled.")
        return job.result

    def _default_scale(self, name: str) -> float:
        model_scale = self.library.model_scale(name)
        return float(model_scale if model_scale > 1 else 2)

    def save(self, result: UpscaleResult, owner: str | None = None) -> UpscaleResult:
        """Add the result to the gallery: the source's parameters (if any) and the postprocess pairs."""
        if self.gallery is None:
            raise UserError("The gallery is not open here; write the result to a file instead.")
        stored = self.gallery.store.add(result_record(result), result.image, owner=owner)
        log.info("upscaled image saved to the gallery as #%s", stored.id)
        return replace(result, record=stored)

    def upscale_gallery_image(
        self, image_id: object, upscaler: object, scale: object = None, owner: str | None = None
    ) -> UpscaleResult:
        """Upscale one of the gallery's images (one the visitor may see) and save the result beside it."""
        if self.gallery is None:
            raise UserError("The gallery is not open here; upscale a file instead.")
        path = self.gallery.image_path(check_image_id(image_id), owner=owner)
        return self.save(self.upscale(Path(path), upscaler, scale, owner=owner), owner=owner)


def crop_centre(image: Image.Image, width: int, height: int) -> Image.Image:
    """The centre ``width`` × ``height`` of an image that covers that size (A1111's "Crop to fit")."""
    if image.size == (width, height):
        return image
    left, top = image.width // 2 - width // 2, image.height // 2 - height // 2
    return image.crop((left, top, left + width, top + height))


def _pixels(field: str, value: object) -> int:
    """A width or height of "Scale to": a whole number of pixels, 1 or more."""
    number = checked_number(field, value)
    if number != int(number) or number < 1:
        raise UserError(f"{field} must be a whole number of pixels, 1 or more, got {shown(value)}.")
    return int(number)


def result_record(result: UpscaleResult) -> ImageRecord:
    """The record an upscaled image is saved with: the source's parameters, then "Postprocess ..."."""
    record = ImageRecord(prompt="")  # no parameters: its Size is the upscaled image's
    if result.source_parameters:  # its Size stays the one it was generated at: Reuse makes that again
        record = record_from_parsed(parse_parameters(result.source_parameters))
    return replace(record, postprocess=list(result.pairs))


def write_result(result: UpscaleResult, out: Path) -> Path:
    """The upscaled image as a PNG at ``out`` with its A1111 parameters (the CLI's output)."""
    return save_png_atomically(result.image, Path(out), format_parameters(result_record(result)))


def _parameters_of(image: object) -> str | None:
    """The A1111 text of a PNG given as a path or bytes (None for PIL images, JPEGs and bare PNGs)."""
    if isinstance(image, Image.Image):
        return image.info.get("parameters") if isinstance(image.info.get("parameters"), str) else None
    try:
        return read_png_parameters(image)
    except UserError:  # a JPEG, or a PNG without a parameters chunk: nothing to keep
        return None
