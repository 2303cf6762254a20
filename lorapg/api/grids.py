"""Comparison grids as jobs, ``/api/v1/grids``: submit (202), state with "cell k of N", the grid PNGs.

Routes parse, call ``GridService`` (lorapg/services/grid.py) and reply. A grid of more cells than
``max_grid_cells`` is refused with a 400 that gives the count.

Not ``from __future__ import annotations``: FastAPI resolves the routes' parameter types as objects.
"""

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from lorapg.api.auth import ApiAccess
from lorapg.api.gallery import image_url
from lorapg.api.generations import GenerationFields
from lorapg.api.routing import api_router, unknown_as_404
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.limits import LORA_SCALE
from lorapg.services.grid import GridService, GridState, UnknownGrid

PREFIX = "/api/v1/grids"
GRID_PNG_DOC = {
    200: {"description": "The grid for the number-th Z value (PNG).", "content": {"image/png": {"example": "(PNG)"}}}
}
AXIS_DOC = (
    "KIND=V1,V2,…; KIND: lora:NAME, lora-file, lora-scale (of the lora-file axis' LoRA), seed, steps, cfg, "
    "sampler, checkpoint or prompt-sr."
)
Scale = Annotated[float, Field(ge=LORA_SCALE.minimum, le=LORA_SCALE.maximum)]


def grid_job_url(job_id: str) -> str:
    return f"{PREFIX}/{job_id}"


def grid_png_url(job_id: str, index: int) -> str:
    return f"{PREFIX}/{job_id}/grid/{index + 1}.png"


class GridCreate(GenerationFields):
    """A grid: the base generation (as POST /api/v1/generations takes it, one image per cell) and its axes."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a lighthouse at dusk",
                    "x": "lora:style=0,0.5,1",
                    "y": "seed=1,2,3",
                    "steps": 20,
                    "cfg_scale": 7,
                    "sampler": "Euler a",
                    "width": 512,
                    "height": 512,
                    "seed": -1,
                }
            ]
        },
    )

    x: str = Field(max_length=100_000, examples=["lora:style=0,0.5,1"], description=f"Columns: {AXIS_DOC}")
    y: str | None = Field(None, max_length=100_000, examples=["seed=1,2,3"], description="Rows (optional).")
    z: str | None = Field(None, max_length=100_000, examples=["cfg=5,7"], description="One grid per value.")

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            loras=tuple(LoraRequest(lora.name, lora.scale) for lora in self.loras),
            steps=self.steps,
            guidance_scale=self.cfg_scale,
            sampler=self.sampler,
            width=self.width,
            height=self.height,
            seed=self.seed,
            clip_skip=self.clip_skip,
            variation_seed=self.variation_seed,
            variation_strength=self.variation_strength,
        )


class GridAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"job_id": "3f2a9c1b7d4e", "status": "queued", "cells": 9, "url": f"{PREFIX}/3f2a9c1b7d4e"}]
        }
    )

    job_id: str
    status: str
    cells: int
    url: str = Field(description="Where the grid job's state is: GET it until status is done.")


class EpochGridCreate(BaseModel):
    """A finished training run's epochs × scales grid (``POST /api/v1/training/{job_id}/grid``): every
    field optional; omitted ones are the run's sample image's (prompt with the trigger word, seed, size)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"scales": [0.5, 0.75, 1.0], "steps": 20}]},
    )

    scales: list[Scale] = Field(
        default_factory=lambda: [0.5, 0.75, 1.0], min_length=1, max_length=64, description="The rows: LoRA scales."
    )
    prompt: str | None = Field(None, max_length=100_000, description="Default: the run's sample prompt.")
    negative_prompt: str | None = Field(None, max_length=100_000)
    steps: int | None = Field(None, description="Default: the run's sample steps.")
    cfg_scale: float | None = None
    sampler: str | None = None
    width: int | None = Field(None, description="Default: the run's training resolution (or the native size).")
    height: int | None = None
    seed: int | None = Field(None, description="Default: the run's sample seed.")

    def overrides(self) -> dict:
        """GenerationRequest fields; None: the run's own."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance_scale": self.cfg_scale,
            "sampler": self.sampler,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
        }


class GridJob(BaseModel):
    """A grid job: ``cell`` of ``cells`` done; once finished, ``grids`` (one PNG per Z value) and the
    cells' gallery images."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "3f2a9c1b7d4e",
                    "status": "done",
                    "cell": 9,
                    "cells": 9,
                    "message": "9 of 9 cells",
                    "grids": [f"{PREFIX}/3f2a9c1b7d4e/grid/1.png"],
                    "images": ["/api/v1/gallery/7/image"],
                    "image_ids": [7],
                    "error": None,
                }
            ]
        }
    )

    job_id: str
    status: str = Field(description="queued, running, done, error or cancelled (stopped after a cell)")
    cell: int = Field(description="Cells finished so far.")
    cells: int
    message: str
    grids: list[str]
    images: list[str]
    image_ids: list[int]
    error: str | None


def grid_reply(state: GridState) -> GridJob:
    return GridJob(
        job_id=state.job_id,
        status=state.status,
        cell=state.cell,
        cells=state.cells,
        message=state.message,
        grids=[grid_png_url(state.job_id, index) for index in range(len(state.grids))],
        images=[image_url(image_id) for image_id in state.image_ids],
        image_ids=state.image_ids,
        error=state.error,
    )


def grids_router(grids: GridService, access: ApiAccess) -> APIRouter:
    router = api_router(PREFIX, "Grids", access)
    JobId = Annotated[str, Path(max_length=64, examples=["3f2a9c1b7d4e"])]

    @router.post("", status_code=202, response_model=GridAccepted)
    def create(body: GridCreate) -> GridAccepted:
        job = grids.submit(body.request(), body.x, body.y, body.z)
        return GridAccepted(job_id=job.id, status=job.status, cells=job.total, url=grid_job_url(job.id))

    @router.get("/{job_id}", response_model=GridJob)
    def get(job_id: JobId) -> GridJob:
        with unknown_as_404(UnknownGrid):
            return grid_reply(grids.state(job_id))

    @router.post("/{job_id}/cancel", response_model=GridJob)
    def cancel(job_id: JobId) -> GridJob:
        with unknown_as_404(UnknownGrid):
            return grid_reply(grids.cancel(job_id))

    @router.get("/{job_id}/grid/{number}.png", response_class=FileResponse, responses=GRID_PNG_DOC)
    def grid_png(job_id: JobId, number: Annotated[int, Path(ge=1, le=1000)]) -> FileResponse:
        with unknown_as_404(UnknownGrid):
            return FileResponse(grids.grid_file(job_id, number), media_type="image/png")

    return router
