"""The app's own API for LoRAs, base models, jobs and GPU memory: ``/api/v1/{loras,models,jobs,memory}``.

Routes parse, call one ``LibraryService`` method and reply; the data is shaped in
``lorapg.services.library``. Errors come back in A1111's shape (``lorapg.api.errors``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from lorapg.api.auth import ApiAccess
from lorapg.api.routing import api_router
from lorapg.errors import shorten
from lorapg.services.library import LibraryService

if TYPE_CHECKING:
    from lorapg.services.build import Services

PREFIX = "/api/v1"

_LORA_EXAMPLE = {
    "name": "triggered",
    "family": "sd1",
    "format": "LoRA",
    "layout": "kohya",
    "trigger_words": ["zqstyle"],
    "description": "",
    "size_bytes": 1245312,
    "hash": "4b2c0e1f9a3d",
    "path": "/home/me/lorapg/models/loras/triggered.safetensors",
    "metadata": {"ss_base_model_version": "sd_v1", "ss_network_dim": "4"},
}
_JOB_EXAMPLE = {
    "id": "3f9c2a7d41be",
    "kind": "load-model",
    "status": "running",
    "step": 0,
    "total": 0,
    "message": "Loading models/sdxl-turbo…",
    "error": None,
    "position": 0,
    "created_at": 1764612345.5,
}


class LoraItem(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_LORA_EXAMPLE]})

    name: str = Field(description="Path inside the LoRA folder without .safetensors ('/'-separated).")
    family: str | None = Field(description="sd1, sd2 or sdxl; null when the file does not say.")
    format: str = Field(
        description="What the file holds: LoRA, LoCon, LoHa, LoKr, DoRA, IA3, Full diff, Norm diff; OFT is "
        "listed but refused when selected."
    )
    layout: str = Field(description="Key layout: kohya or diffusers.")
    trigger_words: list[str]
    description: str
    size_bytes: int
    hash: str | None = Field(description="A1111's LoRA hash (12 hex characters of the tensor data's SHA-256).")
    path: str
    metadata: dict[str, str] = Field(description="A summary here; the whole header on GET /api/v1/loras/{name}.")


class LoraList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "loras": [_LORA_EXAMPLE],
                    "problems": ["LoRA file broken.safetensors is corrupt or not a safetensors file (…)."],
                }
            ]
        }
    )

    loras: list[LoraItem]
    problems: list[str] = Field(description="One line per file in the folder that could not be read.")


class ModelChoice(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"ref": "models/tiny-xl", "name": "tiny-xl", "loaded": False, "configured": False}]
        }
    )

    ref: str = Field(description="What to send to POST /api/v1/models/load.")
    name: str
    loaded: bool
    configured: bool = Field(description="The model the app was started with.")


class JobState(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_JOB_EXAMPLE]})

    id: str
    kind: str = Field(description="generate, load-model, prompt, train, …")
    status: str = Field(description="queued, running, done, error or cancelled.")
    step: int
    total: int
    message: str
    error: str | None
    position: int = Field(description="Jobs ahead of this one in the queue (0 once it runs).")
    created_at: float = Field(description="Unix time the job was queued.")


class CurrentModel(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ref": "models/sd15",
                    "family": "sd1",
                    "native_size": 512,
                    "loaded": True,
                    "load_job": {**_JOB_EXAMPLE, "status": "done", "message": "Loaded models/sd15"},
                }
            ]
        }
    )

    ref: str | None
    family: str | None
    native_size: int | None
    loaded: bool
    load_job: JobState | None = Field(description="The latest load, whatever its state; null before the first.")


class LoadModelRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "models/tiny-xl"}]})

    model: str = Field(description="A ref from GET /api/v1/models, a hub id, a diffusers folder or a .safetensors.")


class LoadAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"job_id": "3f9c2a7d41be", "status": "queued", "position": 1}]}
    )

    job_id: str = Field(description="Follow it with GET /api/v1/jobs/{job_id} or GET /api/v1/models/current.")
    status: str
    position: int = Field(description="Jobs ahead of this one in the queue.")


class ResidentModelState(BaseModel):
    name: str
    location: str = Field(description="gpu, cpu or unloaded.")
    size: str
    pinned: bool


class Residency(BaseModel):
    policy: str
    budget_bytes: int
    used_bytes: int
    models: list[ResidentModelState]


class MemoryState(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "device": "cuda",
                    "residency": {
                        "policy": "auto",
                        "budget_bytes": 10737418240,
                        "used_bytes": 2254857830,
                        "models": [{"name": "diffusion", "location": "gpu", "size": "2.10 GB", "pinned": False}],
                    },
                    "report": "Policy auto; GPU budget 10.00 GB, in use 2.10 GB.\n- diffusion: gpu (2.10 GB)",
                    "freed": None,
                }
            ]
        }
    )

    device: str = Field(description="cpu, cuda or mps.")
    residency: Residency | None = Field(description="Null where no GPU memory is managed (CPU, ZeroGPU).")
    report: str | None = Field(description="The same as text, as the UI shows it.")
    freed: list[str] | None = Field(description="Models just moved off the GPU (POST /memory/free); else null.")


class WorkerState(BaseModel):
    index: int = Field(description="The job queue's worker number; jobs report the device, not this.")
    device: str = Field(description="cpu, cuda:N, or ray:NAME:N/DEVICE for a worker on another machine.")
    model: str | None = Field(description="The model resident there (a remote worker: as it last reported).")
    state: str = Field(description="idle, running, out of rotation (could not load the chosen model) or lost.")
    job: str | None = Field(description="The id of the job it runs now (GET /api/v1/jobs/{id}).")


class WorkerList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "workers": [
                        {"index": 0, "device": "cuda:0", "model": "models/sdxl", "state": "running", "job": "a1b2"},
                        {"index": 1, "device": "ray:gpu-box:0/cuda", "model": None, "state": "idle", "job": None},
                    ]
                }
            ]
        }
    )

    workers: list[WorkerState]


def library_router(runtime: Services, access: ApiAccess) -> APIRouter:
    service = LibraryService(runtime.service)
    router = api_router(PREFIX, "LoRAs, models, jobs, memory", access)

    @router.get("/loras", response_model=LoraList, summary="Every LoRA in the folder (re-scanned)")
    def loras() -> dict[str, Any]:
        return service.loras()

    @router.post("/loras/refresh", response_model=LoraList, summary="Re-scan the LoRA folder")
    def refresh_loras() -> dict[str, Any]:
        return service.loras()  # every listing scans the folder afresh

    @router.get("/loras/{name:path}", response_model=LoraItem, summary="One LoRA with its whole metadata")
    def lora(name: str) -> dict[str, Any]:
        found = service.lora(name)
        if found is None:
            raise HTTPException(404, f"No LoRA {shorten(name)!r}; GET /api/v1/loras lists them.")
        return found

    @router.get("/models", response_model=list[ModelChoice], summary="Base models to choose from")
    def models() -> list[dict[str, Any]]:
        return service.models()

    @router.get("/models/current", response_model=CurrentModel, summary="The loaded model and the latest load")
    def current_model() -> dict[str, Any]:
        return service.current_model()

    @router.post(
        "/models/load",
        response_model=LoadAccepted,
        status_code=202,
        summary="Queue loading a base model; follow the job",
    )
    def load_model(body: LoadModelRequest) -> dict[str, Any]:
        return service.load_model(body.model)

    @router.get("/jobs/{job_id}", response_model=JobState, summary="Any job's state")
    def job(job_id: str) -> dict[str, Any]:
        found = service.job(job_id)
        if found is None:
            raise HTTPException(404, f"No job {shorten(job_id, 40)!r}; ids come from the routes that queue work.")
        return found

    @router.get("/workers", response_model=WorkerList, summary="Generation workers, their models and load")
    def workers() -> dict[str, Any]:
        return service.workers()

    @router.get("/memory", response_model=MemoryState, summary="GPU memory: device and residency")
    def memory() -> dict[str, Any]:
        return service.memory()

    @router.post("/memory/free", response_model=MemoryState, summary="Move every model not in use off the GPU")
    def free_memory() -> dict[str, Any]:
        return service.free_memory()

    return router
