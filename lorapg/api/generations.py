"""Generations as jobs, ``/api/v1/generations``: submit, state, live events (SSE), cancel, preview.

Routes parse, call one ``GenerationJobs`` method (lorapg/services/generation_jobs.py) and reply.
The events stream is an async generator: it waits between polls without holding a thread, and a
client that goes away ends only its stream, never the job.

Not ``from __future__ import annotations``: the routes' parameter types name a dependency built
inside ``generations_router``, which FastAPI can resolve only as a real object, not as a string.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, Field

from lorapg.api.auth import ApiAccess
from lorapg.api.gallery import image_url
from lorapg.api.routing import api_router, unknown_as_404
from lorapg.diffusion.samplers import DEFAULT_SAMPLER
from lorapg.jobs import Job
from lorapg.limits import (
    BATCH_SIZE,
    CFG_SCALE,
    CLIP_SKIP,
    CONTROL_PREPROCESSORS,
    CONTROL_THRESHOLD,
    CONTROL_WEIGHT,
    DENOISING_STRENGTH,
    HIRES_SCALE,
    HIRES_STRENGTH_DEFAULT,
    HIRES_UPSCALERS,
    INPAINT_PADDING,
    MASK_BLUR,
    STEPS,
    VARIATION_STRENGTH,
)
from lorapg.services.generation_jobs import GenerationJobs, GenerationParams, JobNotFound, Urls

PREFIX = "/api/v1/generations"
POLL_SECONDS = 0.2  # how often a stream looks at its job; only changes are sent


def preview_url(job_id: str) -> str:
    return f"{PREFIX}/{job_id}/preview.png"


class LoraIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, examples=["style"], description="A LoRA name as GET /sdapi/v1/loras lists it.")
    scale: float = Field(1.0, examples=[0.8])


class GenerationFields(BaseModel):
    """The fields of one generation, by the names users know (grids take the same ones)."""

    model_config = ConfigDict(extra="forbid")  # our own API: a misspelt field is an error, not silently ignored

    prompt: str
    negative_prompt: str = ""
    loras: list[LoraIn] = Field(default_factory=list)
    # Left out (or null): the loaded model family's defaults, as the Generate tab starts from.
    steps: int | None = Field(
        None, examples=[int(STEPS.default)], description="Omitted: the family's (Flux dev 28, schnell 4, SD 30)."
    )
    cfg_scale: float | None = Field(
        None,
        examples=[float(CFG_SCALE.default)],
        description="Omitted: the family's (Flux dev: distilled guidance 3.5; schnell: 0, no CFG; SD 7).",
    )
    sampler: str | None = Field(
        None,
        examples=[DEFAULT_SAMPLER],
        description="Omitted: the family's (SD: DPM++ 2M Karras; Flux, SD 3.5: Euler).",
    )
    width: int | None = Field(None, description="Pixels; omitted: the model's native size.")
    height: int | None = None
    seed: int | None = Field(-1, description="-1 or null: a random seed (reported in seeds).")
    clip_skip: int = Field(
        int(CLIP_SKIP.default), description="A1111's Clip skip (CLIP_stop_at_last_layers): 2 = penultimate; SD 1.x."
    )
    variation_seed: int | None = Field(
        -1, description="A1111's variation seed (subseed); -1 or null: random. Image i of a batch uses it + i."
    )
    variation_strength: float = Field(
        VARIATION_STRENGTH.default,
        description="A1111's variation strength (subseed_strength), 0-1: 0 = the seed's image exactly; "
        "over 0 every image of a batch keeps the seed.",
    )


class Img2ImgIn(BaseModel):
    """img2img: an init image; with a mask, inpainting (white = repaint)."""

    model_config = ConfigDict(extra="forbid")

    init_image: str = Field(description="A PNG or JPEG as base64, raw or as a data: URL.")
    mask: str | None = Field(None, description="Base64 mask of the init image's size: white = repaint.")
    denoising_strength: float = Field(DENOISING_STRENGTH.default, description="0 keeps the init image, 1 repaints it.")
    resize_mode: int = Field(0, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale.")
    mask_blur: int = int(MASK_BLUR.default)
    masked_content: str = Field("original", description="What the masked area starts from: original or fill.")
    mask_invert: bool = Field(False, description="Repaint the black part instead.")
    only_masked: bool = Field(False, description="Repaint the mask's box (plus padding) at full size, paste it back.")
    only_masked_padding: int = int(INPAINT_PADDING.default)


class HiresIn(BaseModel):
    """A1111's hires fix (txt2img): a second pass on the upscaled first one."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(HIRES_SCALE.default, description="Upscale factor 1-4; width and height stay the first pass's.")
    resize_x: int = Field(0, description="A target width instead of the scale (0: from the scale or the aspect).")
    resize_y: int = Field(0, description="A target height instead of the scale (0: from the scale or the aspect).")
    steps: int = Field(0, description="Second pass steps; 0 = as many as the first pass.")
    denoising_strength: float = Field(HIRES_STRENGTH_DEFAULT, description="The second pass's strength, 0-1.")
    upscaler: str = Field(HIRES_UPSCALERS[0], description='"Latent", "Latent (nearest)" or one of /sdapi/v1/upscalers.')


class ControlNetIn(BaseModel):
    """One ControlNet unit (SD 1.x / SDXL txt2img): a model, an image, and how it steers."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(examples=["control_v11p_sd15_canny"], description="A model GET /controlnet/model_list lists.")
    image: str = Field(description="The control image, or the preprocessor's source: PNG or JPEG as base64.")
    module: str = Field("none", description=f"The preprocessor: {', '.join(CONTROL_PREPROCESSORS)}.")
    weight: float = Field(CONTROL_WEIGHT.default, description=f"{CONTROL_WEIGHT.describe()}; 0 = no effect.")
    guidance_start: float = Field(0.0, description="Fraction of the steps where it starts steering, 0-1.")
    guidance_end: float = Field(1.0, description="Fraction of the steps where it stops steering, 0-1.")
    resize_mode: int | str = Field(1, description="0 Just Resize, 1 Crop and Resize, 2 Resize and Fill.")
    threshold_a: float = Field(CONTROL_THRESHOLD.default, description="canny's low threshold, 1-255.")
    threshold_b: float = Field(200.0, description="canny's high threshold, 1-255.")


class GenerationCreate(GenerationFields):
    """The generate request; ``<lora:name:weight>`` tags in the prompt work as in A1111."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a lighthouse at dusk <lora:style:0.8>",
                    "negative_prompt": "blurry",
                    "loras": [{"name": "other", "scale": 0.5}],
                    "steps": 20,
                    "cfg_scale": 7,
                    "sampler": "Euler a",
                    "width": 512,
                    "height": 512,
                    "seed": -1,
                    "batch_size": 1,
                }
            ]
        },
    )

    batch_size: int = int(BATCH_SIZE.default)
    img2img: Img2ImgIn | None = Field(None, description="Start from an image (img2img); with a mask, inpaint.")
    hires: HiresIn | None = Field(None, description="A1111's hires fix (txt2img only).")
    controlnet: list[ControlNetIn] = Field(default_factory=list, description="ControlNet units (txt2img).")

    def params(self) -> GenerationParams:
        fields = self.model_dump(exclude={"loras", "controlnet"})
        units = tuple(unit.model_dump() for unit in self.controlnet)
        return GenerationParams(**fields, loras=tuple((lora.name, lora.scale) for lora in self.loras), controlnet=units)


JOB_EXAMPLE = {
    "job_id": "3f2a9c1b7d4e",
    "status": "done",
    "position": 0,
    "step": 20,
    "total": 20,
    "message": "done",
    "seeds": [1234],
    "images": ["/api/v1/gallery/7/image"],
    "image_ids": [7],
    "preview_url": f"{PREFIX}/3f2a9c1b7d4e/preview.png",
    "error": None,
    "device": "cuda:0",
}


class GenerationJob(BaseModel):
    """A generation job's state; ``images`` are gallery image URLs once it is done."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    job_id: str
    status: str = Field(description="queued, running, done, error or cancelled")
    position: int = Field(description="Jobs ahead of this one in the queue (0 once it runs).")
    step: int
    total: int
    message: str
    seeds: list[int]
    images: list[str]
    image_ids: list[int]
    preview_url: str | None
    error: str | None
    variation_seeds: list[int] = Field(
        default_factory=list, description="Each image's variation seed; empty at variation strength 0."
    )
    device: str | None = Field(
        None, description="The device of the worker that runs it (--devices: one worker each); null while queued."
    )


class GenerationAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"job_id": "3f2a9c1b7d4e", "status": "queued", "position": 0}]}
    )

    job_id: str
    status: str
    position: int


SSE_DOC = {
    200: {
        "description": (
            "Server-Sent Events: `progress` {status, position, step, total, message, preview_url, device} on each "
            "change (the current state first), then one of `complete` {images, image_ids, seeds}, "
            "`error` {message} or `cancelled` {message}."
        ),
        "content": {
            "text/event-stream": {
                "example": 'event: progress\ndata: {"status": "running", "step": 5, "total": 20}\n\n'
                'event: complete\ndata: {"images": ["/api/v1/gallery/7/image"], "image_ids": [7], "seeds": [1234]}\n\n'
            }
        },
    }
}
PNG_DOC = {200: {"description": "The latest preview (PNG).", "content": {"image/png": {"example": "(PNG bytes)"}}}}


def generations_router(jobs: GenerationJobs, access: ApiAccess) -> APIRouter:
    router = api_router(PREFIX, "Generations", access)

    def generation_job(job_id: Annotated[str, Path(max_length=64, examples=["3f2a9c1b7d4e"])]) -> Job:
        # A dependency: an unknown id is a 404 before a stream's response has started.
        with unknown_as_404(JobNotFound):
            return jobs.job(job_id)

    JobArg = Annotated[Job, Depends(generation_job)]

    @router.post("", status_code=202, response_model=GenerationAccepted)
    def create(body: GenerationCreate) -> GenerationAccepted:
        state = jobs.submit(body.params())
        return GenerationAccepted(job_id=state.job_id, status=state.status, position=state.position)

    @router.get("/{job_id}", response_model=GenerationJob)
    def get(job: JobArg) -> GenerationJob:
        return GenerationJob(**asdict(jobs.state(job)))

    @router.get("/{job_id}/events", response_class=EventSourceResponse, responses=SSE_DOC)
    async def events(job: JobArg) -> AsyncIterator[ServerSentEvent]:
        for item in jobs.events(job):
            if item is None:
                await asyncio.sleep(POLL_SECONDS)
                continue
            name, data = item
            yield ServerSentEvent(event=name, data=data)

    @router.post("/{job_id}/cancel", response_model=GenerationJob)
    def cancel(job: JobArg) -> GenerationJob:
        return GenerationJob(**asdict(jobs.cancel(job)))

    @router.get("/{job_id}/preview.png", response_class=Response, responses=PNG_DOC)
    def preview(job: JobArg) -> Response:
        with unknown_as_404(JobNotFound):
            return Response(jobs.preview_png(job), media_type="image/png", headers={"Cache-Control": "no-store"})

    return router


def generation_jobs(generation) -> GenerationJobs:
    return GenerationJobs(generation, Urls(image=image_url, preview=preview_url))
