"""AUTOMATIC1111-compatible routes, ``/sdapi/v1/...``: parse with a model, call a service, reply.

Every route is a plain function (FastAPI runs it in its thread pool, so a txt2img waiting for the
job queue never blocks ``progress`` or ``interrupt``). The work and the A1111 vocabulary live in
``lorapg.services.a1111``; errors are shaped by ``lorapg.api.errors``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from lorapg.api import models as m
from lorapg.api.auth import ApiAccess, basic_auth_check
from lorapg.api.errors import A1111Route
from lorapg.diffusion.hires import LATENT_MODES
from lorapg.services.a1111 import SCHEDULES, A1111Service, Img2ImgParams, Txt2ImgParams, echoed_parameters

PREFIX = "/sdapi/v1"
ERRORS = {400: {"model": m.ErrorResponse}, 401: {"model": m.ErrorResponse}, 422: {"model": m.ErrorResponse}}


def a1111_router(access: ApiAccess) -> APIRouter:
    """A ``/sdapi/v1`` router: its routes ask for the API's credentials and answer errors in A1111's shape.

    Every module serving part of ``/sdapi/v1`` builds its router here, so /docs lists them as one group.
    """
    return APIRouter(
        prefix=PREFIX,
        tags=["A1111 (sdapi/v1)"],
        route_class=A1111Route,
        responses=ERRORS,
        dependencies=[Depends(basic_auth_check(access.users))],
    )


def sdapi_router(service: A1111Service, access: ApiAccess) -> APIRouter:
    router = a1111_router(access)

    @router.post("/txt2img", response_model=m.Txt2ImgResponse)
    def txt2img(body: m.Txt2ImgRequest) -> m.Txt2ImgResponse:
        overrides = body.override_settings or {}
        params = Txt2ImgParams(
            **body.model_dump(exclude={"override_settings"}),
            sd_model_checkpoint=overrides.get("sd_model_checkpoint"),
            clip_skip=overrides.get("CLIP_stop_at_last_layers"),
            sd_vae=overrides.get("sd_vae"),
            given=frozenset(body.model_fields_set),  # fields left out get the model family's defaults
        )
        result = service.txt2img(params)
        return m.Txt2ImgResponse(
            images=result.images if body.send_images else None,
            parameters=echoed_parameters(body.model_dump(), params, result.info),  # left out: what ran
            info=json.dumps(result.info),
        )

    @router.post("/img2img", response_model=m.Txt2ImgResponse)
    def img2img(body: m.Img2ImgRequest) -> m.Txt2ImgResponse:
        overrides = body.override_settings or {}
        fields = body.model_dump(exclude={"override_settings"})
        params = Img2ImgParams(
            **dict(fields, init_images=tuple(body.init_images)),
            sd_model_checkpoint=overrides.get("sd_model_checkpoint"),
            clip_skip=overrides.get("CLIP_stop_at_last_layers"),
            sd_vae=overrides.get("sd_vae"),
            given=frozenset(body.model_fields_set),
        )
        result = service.img2img(params)
        # A1111 leaves the (large) images out of the echo unless asked.
        echoed = body.model_dump() if body.include_init_images else body.model_dump(exclude={"init_images", "mask"})
        return m.Txt2ImgResponse(
            images=result.images if body.send_images else None,
            parameters=echoed_parameters(echoed, params, result.info),
            info=json.dumps(result.info),
        )

    @router.get("/progress", response_model=m.ProgressResponse)
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return service.progress(skip_current_image)

    @router.post("/interrupt", responses=m.NULL_REPLY)
    def interrupt() -> None:
        service.interrupt()

    @router.post("/skip", responses=m.NULL_REPLY)
    def skip() -> None:
        service.skip()

    @router.get("/options", responses=m.OPTIONS_REPLY)
    def get_options() -> dict[str, Any]:
        return service.options()

    @router.post("/options", responses=m.NULL_REPLY)
    def set_options(body: Annotated[dict[str, Any], Body(examples=[m.OPTIONS_EXAMPLE])]) -> None:
        service.set_options(body)

    @router.get("/cmd-flags", responses=m.CMD_FLAGS_REPLY)
    def cmd_flags() -> dict[str, Any]:
        return service.cmd_flags()

    @router.get("/sd-models", response_model=list[m.SDModelItem])
    def sd_models() -> list[dict[str, Any]]:
        return [entry.__dict__ for entry in service.sd_models()]

    @router.post("/refresh-checkpoints", responses=m.NULL_REPLY)
    def refresh_checkpoints() -> None:
        service.sd_models()  # the folder is listed afresh on every call

    @router.get("/samplers", response_model=list[m.SamplerItem])
    def samplers() -> list[m.SamplerItem]:
        # The loaded model family's (Flux, SD 3.5: flow-matching ones); no model loaded: the SD ones.
        return [m.SamplerItem(name=name, aliases=[], options={}) for name in service.sampler_names()]

    @router.get("/schedulers", response_model=list[m.SchedulerItem])
    def schedulers() -> list[m.SchedulerItem]:
        return [m.SchedulerItem(name=name, label=label) for name, label in SCHEDULES.items()]

    # GET /upscalers and POST /extra-single-image: lorapg.api.upscale.

    @router.get("/latent-upscale-modes", response_model=list[m.LatentUpscalerModeItem])
    def latent_upscale_modes() -> list[m.LatentUpscalerModeItem]:
        return [m.LatentUpscalerModeItem(name=name) for name in LATENT_MODES]  # hr_upscaler's latent choices

    @router.get("/sd-vae", response_model=list[m.SDVaeItem])
    def sd_vae() -> list[m.SDVaeItem]:
        return []  # the model's own VAE ("Automatic") is the only one

    @router.get("/loras", response_model=list[m.LoraItem])
    def loras() -> list[dict[str, Any]]:
        return service.loras()

    @router.post("/refresh-loras", responses=m.NULL_REPLY)
    def refresh_loras() -> None:
        service.refresh_loras()

    @router.get("/embeddings", response_model=m.EmbeddingsResponse)
    def embeddings() -> m.EmbeddingsResponse:
        return m.EmbeddingsResponse(loaded={}, skipped={})

    @router.get("/scripts", response_model=m.ScriptsList)
    def scripts() -> m.ScriptsList:
        return m.ScriptsList(txt2img=[], img2img=[])

    @router.post("/png-info", response_model=m.PNGInfoResponse)
    def png_info(body: m.PNGInfoRequest) -> dict[str, Any]:
        return service.png_info(body.image)

    @router.get("/memory", response_model=m.MemoryResponse)
    def memory() -> dict[str, Any]:
        return service.memory()

    return router
