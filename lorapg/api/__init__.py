"""REST API served beside the UI on Gradio's FastAPI app: A1111's ``/sdapi/v1`` (see sdapi.py)
and the app's own ``/api/v1`` (one router module per area)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorapg.api.docs import finish_api

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from lorapg.api.auth import ApiAccess
    from lorapg.services.build import Services


@finish_api  # last: the body limit on every route, then /openapi.json and /docs over them all
def api_routes(runtime: Services, access: ApiAccess) -> list[BaseRoute]:
    """The API's routes for Gradio's app (``launch(app_kwargs={"routes": ...})``): registered before
    the server starts, so no request ever finds the UI up and the API missing."""
    from lorapg.api.controlnet_ext import controlnet_router
    from lorapg.api.dataset_crops import dataset_crops_router
    from lorapg.api.datasets import datasets_router
    from lorapg.api.gallery import gallery_router
    from lorapg.api.gallery_reuse import gallery_reuse_router
    from lorapg.api.generations import generation_jobs, generations_router
    from lorapg.api.grids import grids_router
    from lorapg.api.library import library_router
    from lorapg.api.lora_manager import lora_manager_router
    from lorapg.api.prompts import prompts_router
    from lorapg.api.sdapi import sdapi_router
    from lorapg.api.training import training_router
    from lorapg.api.upscale import upscale_router
    from lorapg.services.a1111 import A1111Service
    from lorapg.services.dataset_crops import DatasetCropService
    from lorapg.services.grid import GridService
    from lorapg.services.lora_manager import build_lora_manager
    from lorapg.services.training_jobs import TrainingJobs

    service = A1111Service(
        runtime.settings, runtime.service, runtime.gallery_service, max_upload_bytes=runtime.policy.max_upload_bytes
    )
    grids = GridService(runtime.settings, runtime.service)
    training = TrainingJobs(runtime.training, max_upload_bytes=service.max_upload_bytes, grids=grids)
    return [
        *sdapi_router(service, access).routes,
        *upscale_router(runtime.upscale, access, service.max_upload_bytes).routes,
        *controlnet_router(runtime.engine.controlnets, access).routes,
        *generations_router(generation_jobs(runtime.service), access).routes,
        *gallery_router(runtime.gallery_service, access).routes,
        *gallery_reuse_router(
            runtime.gallery_service,
            access,
            current_model=runtime.service.chosen_model,
            max_upload_bytes=service.max_upload_bytes,
        ).routes,
        # Before the library's GET /api/v1/loras/{name:path}, which would take …/info and …/preview.png.
        *lora_manager_router(build_lora_manager(runtime), access).routes,
        *library_router(runtime, access).routes,
        *prompts_router(runtime.prompts, access).routes,
        *training_router(training, access).routes,
        *grids_router(grids, access).routes,
        *(datasets_router(runtime.captions, access).routes if runtime.captions is not None else []),
        *dataset_crops_router(DatasetCropService(runtime.training), access).routes,
    ]
