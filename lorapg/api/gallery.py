"""The gallery over HTTP, ``/api/v1/gallery``: list and search, one record, its PNG, star, delete.

Routes parse, call one ``GalleryService`` method and reply; API callers are the owner
(``owner=None``). An unknown image id is a 404. The image route serves the PNG file itself, so
the A1111 ``parameters`` chunk in it reaches the client unchanged.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from lorapg.api.auth import ApiAccess
from lorapg.api.routing import api_router, unknown_as_404
from lorapg.gallery.records import ImageRecord
from lorapg.services.gallery import GalleryService, ImageNotFound

PREFIX = "/api/v1/gallery"
MAX_PAGE = 500  # one listing; more with offset
MAX_OFFSET = 2**31  # past any gallery; a larger number would overflow SQLite's integer (a 500)


def image_url(image_id: int) -> str:
    return f"{PREFIX}/{image_id}/image"


class LoraUsed(BaseModel):
    name: str
    scale: float
    file_hash: str | None = None


RECORD_EXAMPLE = {
    "id": 7,
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "blurry",
    "loras": [{"name": "style", "scale": 0.8, "file_hash": "a1b2c3d4e5f6"}],
    "seed": 1234,
    "steps": 20,
    "cfg_scale": 7.0,
    "sampler": "Euler a",
    "width": 512,
    "height": 512,
    "model_name": "sd15",
    "model_hash": None,
    "job_id": "3f2a9c1b7d4e",
    "created_at": "2026-12-01T18:00:00+00:00",
    "starred": False,
    "image_url": "/api/v1/gallery/7/image",
}


class GalleryImage(BaseModel):
    """One gallery image: how it was made, and where its PNG is."""

    model_config = ConfigDict(json_schema_extra={"examples": [RECORD_EXAMPLE]})

    id: int
    prompt: str
    negative_prompt: str
    loras: list[LoraUsed]
    seed: int | None
    steps: int | None
    cfg_scale: float | None
    sampler: str | None
    width: int | None
    height: int | None
    model_name: str | None
    model_hash: str | None
    job_id: str | None
    created_at: datetime | None
    starred: bool
    image_url: str
    variation_seed: int | None = Field(None, description="A1111's variation seed; null: not a variation.")
    variation_strength: float | None = None

    @classmethod
    def of(cls, record: ImageRecord) -> GalleryImage:
        return cls(
            id=record.id,
            prompt=record.prompt,
            negative_prompt=record.negative_prompt,
            loras=[LoraUsed(name=lora.name, scale=lora.scale, file_hash=lora.file_hash) for lora in record.loras],
            seed=record.seed,
            steps=record.steps,
            cfg_scale=record.guidance_scale,
            sampler=record.sampler,
            width=record.width,
            height=record.height,
            model_name=record.model_name,
            model_hash=record.model_hash,
            job_id=record.job_id,
            created_at=record.created_at,
            starred=record.starred,
            image_url=image_url(record.id),
            variation_seed=record.variation_seed,
            variation_strength=record.variation_strength,
        )


class GalleryImageDetails(GalleryImage):
    """The record plus the A1111 ``parameters`` text inside its PNG (what other tools read)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                RECORD_EXAMPLE
                | {
                    "parameters": "a lighthouse at dusk <lora:style:0.8>\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, Model: sd15"
                }
            ]
        }
    )

    parameters: str


class GalleryList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"images": [RECORD_EXAMPLE], "offset": 0, "limit": 50}]})

    images: list[GalleryImage]
    offset: int
    limit: int


class StarBody(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"starred": True}]})

    starred: bool


class Deleted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": 7, "deleted": True}]})

    id: int
    deleted: bool


PNG_DOC = {
    200: {
        "description": "The PNG file as saved, with its A1111 `parameters` chunk.",
        "content": {"image/png": {"example": "(PNG bytes)"}},
    }
}
ImageId = Annotated[int, Path(ge=1, le=MAX_OFFSET, examples=[7], description="A gallery image id.")]


def gallery_router(gallery: GalleryService, access: ApiAccess) -> APIRouter:
    router = api_router(PREFIX, "Gallery", access)

    @router.get("", response_model=GalleryList)
    def list_images(
        q: Annotated[
            str | None, Query(description="Words that must all be in the prompt.", examples=["lighthouse"])
        ] = None,
        lora: Annotated[str | None, Query(description="Only images that used this LoRA.", examples=["style"])] = None,
        starred: Annotated[bool | None, Query(description="true: starred only; false: unstarred only.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> GalleryList:
        records = gallery.list(q, lora, limit, owner=None, starred=starred, offset=offset)
        return GalleryList(images=[GalleryImage.of(record) for record in records], offset=offset, limit=limit)

    @router.get("/{image_id}", response_model=GalleryImageDetails)
    def get(image_id: ImageId) -> GalleryImageDetails:
        with unknown_as_404(ImageNotFound):
            details = gallery.show(image_id, owner=None)
        return GalleryImageDetails(**GalleryImage.of(details.record).model_dump(), parameters=details.parameters)

    @router.get("/{image_id}/image", response_class=FileResponse, responses=PNG_DOC)
    def image(image_id: ImageId) -> Response:
        with unknown_as_404(ImageNotFound):
            path = gallery.image_path(image_id, owner=None)
        return FileResponse(path, media_type="image/png")

    @router.post("/{image_id}/star", response_model=GalleryImage)
    def star(image_id: ImageId, body: StarBody) -> GalleryImage:
        with unknown_as_404(ImageNotFound):
            return GalleryImage.of(gallery.star(image_id, body.starred, owner=None))

    @router.delete("/{image_id}", response_model=Deleted)
    def delete(image_id: ImageId) -> Deleted:
        with unknown_as_404(ImageNotFound):
            gallery.delete(image_id, owner=None)
        return Deleted(id=image_id, deleted=True)

    return router
