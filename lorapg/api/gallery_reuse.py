"""Reuse over HTTP, ``GET /api/v1/gallery/{id}/reuse``: the body that makes a gallery image again.

The reply's ``request`` is a ``POST /api/v1/generations`` body with every setting the image was made
with (img2img with its init image and mask, the hires fix, the variation, ControlNet units with their
images, as base64 PNGs); ``model`` names the model it was made with; ``notes`` says what could not be
carried over, as the UI's Reuse does. ``GalleryService.reuse_body`` decides all of it and reads the
files; this module only turns its answer into the generations body. Its own module: it needs the
generations body, whose module imports the gallery's.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from lorapg.api.auth import ApiAccess
from lorapg.api.gallery import PREFIX, ImageId
from lorapg.api.generations import ControlNetIn, GenerationCreate, HiresIn, Img2ImgIn, LoraIn
from lorapg.api.models import ErrorResponse
from lorapg.api.routing import api_router, unknown_as_404
from lorapg.limits import INPAINTING_FILLS
from lorapg.services.gallery import GalleryService, ImageNotFound, InitImageNotKept, ReuseBody, ReuseTooLarge

REUSE_EXAMPLE = {
    "request": {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "loras": [{"name": "style", "scale": 0.8}],
        "steps": 20,
        "cfg_scale": 7,
        "sampler": "Euler a",
        "width": 512,
        "height": 512,
        "seed": 1234,
        "batch_size": 1,
        "img2img": {"init_image": "(base64 PNG)", "mask": "(base64 PNG)", "denoising_strength": 0.6},
    },
    "model": "sd15",
    "notes": ["LoRA other is not in your LoRA folder; it was left out."],
}


class GalleryReuse(BaseModel):
    """A gallery image's settings as a generate body, and what Reuse had to note."""

    model_config = ConfigDict(json_schema_extra={"examples": [REUSE_EXAMPLE]})

    request: GenerationCreate = Field(description="POST it to /api/v1/generations to make the image again.")
    model: str | None = Field(
        default=None,
        description="The model the image was made with (generations use the loaded one: load it first "
        "with POST /api/v1/models/load for the same image); null where not recorded.",
    )
    notes: list[str] = Field(default_factory=list, description="What could not be carried over, and why.")


# The route's own errors, beside the ones every /api/v1 route documents.
REUSE_ERRORS = {
    409: {"model": ErrorResponse, "description": "An img2img image whose init image is not kept."},
    413: {"model": ErrorResponse, "description": "The body with its images would be over the upload limit."},
}


def png_base64(data: bytes | None) -> str | None:
    """A kept image's bytes (a PNG already) as base64; None stays None."""
    return None if data is None else base64.b64encode(data).decode("ascii")


def generate_body(request) -> GenerationCreate:
    """The generate body of ``ReuseBody.request`` (one image: the seed names one)."""
    return GenerationCreate(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        loras=[LoraIn(name=lora.name, scale=lora.scale) for lora in request.loras],
        steps=request.steps,
        cfg_scale=request.guidance_scale,
        sampler=request.sampler,
        width=request.width,
        height=request.height,
        seed=request.seed if request.seed is not None else -1,
        clip_skip=request.clip_skip,
        variation_seed=request.variation_seed,
        variation_strength=request.variation_strength,
        batch_size=1,
        img2img=_img2img_in(request.img2img),
        hires=_hires_in(request.hires),
        controlnet=[_controlnet_in(unit) for unit in request.controlnet],
    )


def reuse_reply(body: ReuseBody) -> GalleryReuse:
    return GalleryReuse(request=generate_body(body.request), model=body.model_name, notes=body.notes)


def _img2img_in(options) -> Img2ImgIn | None:
    if options is None:
        return None
    return Img2ImgIn(
        init_image=png_base64(options.image),
        mask=png_base64(options.mask),
        denoising_strength=options.strength,
        resize_mode=options.resize_mode,
        mask_blur=options.mask_blur,
        masked_content=INPAINTING_FILLS[options.inpainting_fill],
        mask_invert=options.mask_invert,
        only_masked=options.only_masked,
        only_masked_padding=options.only_masked_padding,
    )


def _hires_in(options) -> HiresIn | None:
    if options is None:
        return None
    return HiresIn(
        scale=options.scale,
        resize_x=options.resize_x,
        resize_y=options.resize_y,
        steps=options.steps,
        denoising_strength=options.strength,
        upscaler=options.upscaler,
    )


def _controlnet_in(unit) -> ControlNetIn:
    return ControlNetIn(
        model=unit.model,
        image=png_base64(unit.image),
        module=unit.module,
        weight=unit.weight,
        guidance_start=unit.guidance_start,
        guidance_end=unit.guidance_end,
        resize_mode=unit.resize_mode,
        threshold_a=unit.threshold_a,
        threshold_b=unit.threshold_b,
    )


def gallery_reuse_router(
    gallery: GalleryService,
    access: ApiAccess,
    *,
    current_model: Callable[[], str | None] | None = None,
    max_upload_bytes: int | None = None,
) -> APIRouter:
    """``current_model``: the model a generation submitted now uses (Reuse notes a different one);
    ``max_upload_bytes``: the upload limit a reply must fit to be sent back (None: none)."""
    router = api_router(PREFIX, "Gallery", access)

    @router.get("/{image_id}/reuse", response_model=GalleryReuse, responses=REUSE_ERRORS)
    def reuse(image_id: ImageId) -> GalleryReuse:
        model = current_model() if current_model is not None else None
        try:
            with unknown_as_404(ImageNotFound):
                body = gallery.reuse_body(image_id, current_model=model, max_bytes=max_upload_bytes)
        except InitImageNotKept as exc:
            raise HTTPException(409, str(exc)) from None
        except ReuseTooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        return reuse_reply(body)

    return router
