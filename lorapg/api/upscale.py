"""A1111's Extras over HTTP: ``GET /sdapi/v1/upscalers`` and ``POST /sdapi/v1/extra-single-image``.

Field names and shapes follow AUTOMATIC1111's API (``ExtrasSingleImageRequest``); the image comes back
as raw base64 PNG and ``html_info`` holds the "Postprocess …" text, as A1111 answers. The work and
the rules (resize modes, crop, "None") are ``lorapg.services.upscale``'s.
"""

from __future__ import annotations

import base64
import io

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from lorapg.api import models as m
from lorapg.api.auth import ApiAccess
from lorapg.api.sdapi import a1111_router
from lorapg.diffusion.upscalers import NONE
from lorapg.services.a1111 import decode_image_field
from lorapg.services.upscale import RESIZE_BY, UpscaleService

# A1111's Extras fields for features this app does not have: the service refuses them when used.
EXTRAS_REFUSED = ("gfpgan_visibility", "codeformer_visibility", "upscaler_2", "extras_upscaler_2_visibility")


class ExtrasSingleImageRequest(BaseModel):
    """A1111's fields; unknown keys are ignored, as A1111 does."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"image": "iVBORw0KGgo…", "upscaler_1": "4x-UltraSharp", "upscaling_resize": 4, "resize_mode": 0}
            ]
        },
    )

    image: str = Field("", description="the image, base64 (raw or a data: URL)")
    resize_mode: int = Field(
        RESIZE_BY, description="0: upscaling_resize is a factor; 1: to upscaling_resize_w × _h (smaller too)"
    )
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, description="face restoration: not available here, send 0")
    codeformer_visibility: float = Field(0, description="face restoration: not available here, send 0")
    codeformer_weight: float = 0
    upscaling_resize: float = Field(2, description="upscale factor, 1-8")
    upscaling_resize_w: int = Field(512, description="with resize_mode 1: the width")
    upscaling_resize_h: int = Field(512, description="with resize_mode 1: the height")
    upscaling_crop: bool = Field(
        True, description="with resize_mode 1: crop the centre to exactly the size; false: the aspect ratio kept"
    )
    upscaler_1: str = Field(NONE, description='an upscaler\'s name (GET /sdapi/v1/upscalers); "None": unchanged')
    upscaler_2: str = Field(NONE, description='"None": a second upscaler to blend in is not available here')
    extras_upscaler_2_visibility: float = Field(0, description="0-1; above 0 with an upscaler_2: refused")
    upscale_first: bool = False


class ExtrasSingleImageResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"html_info": "Postprocess upscale by: 4, Postprocess upscaler: 4x-UltraSharp", "image": "iVBORw0KGgo…"}
            ]
        }
    )

    html_info: str = Field(description='"Postprocess upscale by: 4, Postprocess upscaler: NAME"')
    image: str = Field(description="the result, raw base64 PNG")


def upscale_router(service: UpscaleService, access: ApiAccess, max_upload_bytes: int | None) -> APIRouter:
    router = a1111_router(access)

    @router.get("/upscalers", response_model=list[m.UpscalerItem])
    def upscalers() -> list[m.UpscalerItem]:
        # The latent ones are hr_upscaler's and listed by /latent-upscale-modes, as A1111 does.
        return [m.UpscalerItem(**item.__dict__) for item in service.upscalers()]

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
    def extra_single_image(body: ExtrasSingleImageRequest) -> ExtrasSingleImageResponse:
        data = decode_image_field(body.image, max_upload_bytes, "image")
        result = service.upscale_by_mode(
            data,
            body.upscaler_1,
            body.resize_mode,
            scale=body.upscaling_resize,
            width=body.upscaling_resize_w,
            height=body.upscaling_resize_h,
            crop=body.upscaling_crop,
            extras={name: getattr(body, name) for name in EXTRAS_REFUSED},
        )
        buffer = io.BytesIO()
        result.image.save(buffer, format="PNG")
        return ExtrasSingleImageResponse(html_info=result.info, image=base64.b64encode(buffer.getvalue()).decode())

    return router
