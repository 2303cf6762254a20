"""Managing LoRAs over HTTP: ``/api/v1/loras/{name}/info|preview.png|rename|restore|test``, ``DELETE
/api/v1/loras/{name}`` (into the trash) and ``GET /api/v1/loras/.trash``.

Registered before the library router: its ``GET /api/v1/loras/{name:path}`` would otherwise take
``…/info`` and ``…/preview.png`` for LoRA names. ``.trash`` can never be a LoRA's name (names have
no hidden parts). Routes parse, call one ``LoraManager`` method and reply; unknown names are 404,
refusals (a taken name, a LoRA in use) 400 naming the field.
"""

from __future__ import annotations

import mimetypes
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from lorapg.api.auth import ApiAccess
from lorapg.api.library import _LORA_EXAMPLE, LoraItem
from lorapg.api.routing import api_router, unknown_as_404
from lorapg.errors import shorten
from lorapg.services.lora_manager import LoraManager, UnknownLora

PREFIX = "/api/v1/loras"

_EPOCH = {"name": "fox_epochs/fox-e0001", "size_bytes": 1245312, "hash": "9c1d2e3f4a5b"}
_MANAGED = {**_LORA_EXAMPLE, "preview": "/home/me/lorapg/models/loras/triggered.preview.png", "epochs": [_EPOCH]}
_DETAILS = {
    **_MANAGED,
    "sha256": "4b2c0e1f9a3d" + "0" * 52,
    "metadata": {"ss_base_model_version": "sd_v1", "ss_tag_frequency": '{"10_zqstyle": {"zqstyle": 12}}'},
    "groups": {
        "training": {"ss_base_model_version": "sd_v1"},
        "modelspec": {},
        "other": {},
        "tag_frequency": [{"tag": "zqstyle", "count": 12}],
    },
    "civitai": None,
    "samples": ["/home/me/lorapg/models/training/triggered/samples/epoch-0001.png"],
}
_TRASHED = {
    "id": "20261201-214700-a1b2c3",
    "name": "triggered",
    "deleted_at": 1764625620.5,
    "files": ["triggered.safetensors", "triggered.preview.png"],
}
TEST_EXAMPLE = {"steps": 20, "seed": 1234}
IMAGE_DOC = {
    200: {
        "description": "The LoRA's preview: a sidecar image (NAME.preview.png, NAME.png, …) or a training sample.",
        "content": {"image/png": {"example": "(PNG bytes)"}},
    }
}


class EpochFile(BaseModel):
    name: str = Field(description="Its own LoRA name; select it like any LoRA.")
    size_bytes: int
    hash: str | None


class ManagedLora(LoraItem):
    model_config = ConfigDict(json_schema_extra={"examples": [_MANAGED]})

    preview: str | None = Field(description="Preview image file; GET …/preview.png serves it. Null: none.")
    epochs: list[EpochFile] = Field(description="Per-epoch files its training run wrote (NAME_epochs/).")


class TagCount(BaseModel):
    tag: str
    count: int


class MetadataGroups(BaseModel):
    training: dict[str, str] = Field(description="kohya's ss_* training settings.")
    modelspec: dict[str, str]
    other: dict[str, str]
    tag_frequency: list[TagCount] = Field(description="ss_tag_frequency summed over folders, most frequent first.")


class CivitaiInfo(BaseModel):
    model: str | None
    version: str | None
    base_model: str | None
    trained_words: list[str]
    description: str | None
    model_id: int | None
    version_id: int | None
    url: str | None


class LoraDetails(ManagedLora):
    model_config = ConfigDict(json_schema_extra={"examples": [_DETAILS]})

    sha256: str = Field(description="SHA-256 of the whole file (what civitai looks files up by).")
    groups: MetadataGroups
    civitai: CivitaiInfo | None = Field(description="From NAME.civitai.info when there is one.")
    samples: list[str] = Field(description="Per-epoch sample images of the training run that wrote it.")


class TrashEntry(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_TRASHED]})

    id: str = Field(description="Restore by this id (or by name: its latest deletion).")
    name: str
    deleted_at: float = Field(description="Unix time.")
    files: list[str] = Field(description="The files moved, relative to the LoRA folder.")


class RenameBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"new_name": "styles/inkwash"}]})

    new_name: str = Field(description="A name inside the LoRA folder ('/'-separated, without .safetensors).")


class TestBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [TEST_EXAMPLE]})

    steps: int | None = Field(None, description="Default: the app's default steps.")
    seed: int | None = Field(None, description="Default: random.")


class TestQueued(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"job_id": "3f9c2a7d41be", "status": "queued", "position": 0}]}
    )

    job_id: str = Field(description="Follow it with GET /api/v1/jobs/{job_id}; the image lands in the gallery.")
    status: str
    position: int


def lora_manager_router(manager: LoraManager, access: ApiAccess) -> APIRouter:
    router = api_router(PREFIX, "LoRA manager", access)

    @router.get("/.trash", response_model=list[TrashEntry], summary="Deleted LoRAs that can be restored")
    def trash() -> list[dict[str, Any]]:
        return manager.trash()

    @router.get("/{name:path}/info", response_model=LoraDetails, summary="One LoRA in full, metadata grouped")
    def info(name: str) -> dict[str, Any]:
        with unknown_as_404(UnknownLora):
            return manager.info(name)

    @router.get(
        "/{name:path}/preview.png", response_class=FileResponse, responses=IMAGE_DOC, summary="The preview image"
    )
    def preview(name: str) -> Response:
        with unknown_as_404(UnknownLora):
            path = manager.preview(name)
        if path is None:
            raise HTTPException(404, f"LoRA {shorten(name)!r} has no preview image; POST …/test makes one.")
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    @router.post("/{name:path}/rename", response_model=ManagedLora, summary="Rename it with its sidecar files")
    def rename(name: str, body: RenameBody) -> dict[str, Any]:
        with unknown_as_404(UnknownLora):
            return manager.rename(name, body.new_name)

    @router.post("/{name:path}/restore", response_model=ManagedLora, summary="Restore it from the trash")
    def restore(name: str) -> dict[str, Any]:
        with unknown_as_404(UnknownLora):
            return manager.restore(name)

    @router.post(
        "/{name:path}/test",
        response_model=TestQueued,
        status_code=202,
        summary="Queue an image with it at 1.0 and its trigger words",
    )
    def test(name: str, body: Annotated[TestBody | None, Body(examples=[TEST_EXAMPLE])] = None) -> dict[str, Any]:
        body = body or TestBody()
        with unknown_as_404(UnknownLora):
            job = manager.test(name, steps=body.steps, seed=body.seed)
        return {"job_id": job.id, "status": job.status, "position": manager.generation.jobs.position(job)}

    @router.delete("/{name:path}", response_model=TrashEntry, summary="Move it (and its files) into the trash")
    def delete(name: str) -> dict[str, Any]:
        with unknown_as_404(UnknownLora):
            return manager.delete(name)

    return router
