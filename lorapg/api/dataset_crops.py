"""Crops of a dataset over HTTP: ``GET /api/v1/datasets/{name}/crops`` (bucket + box per image),
``PUT|DELETE /api/v1/datasets/{name}/images/{file}/focus``, ``GET …/images/{file}/crop.png`` and
``POST /api/v1/datasets/{name}/crops/apply`` (cropped copies into a new dataset; originals untouched).

Routes parse, call one ``DatasetCropService`` method and reply; a refusal (a focus outside 0..1, an
image the dataset does not have, a name with folders in it) is a 400 naming the field.
"""

# No ``from __future__ import annotations``: FastAPI must see the Annotated query/body types evaluated.

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from lorapg.api.auth import ApiAccess
from lorapg.api.routing import api_router
from lorapg.services.dataset_crops import CropOptions, DatasetCropService

PREFIX = "/api/v1/datasets"


CROP_EXAMPLE = {
    "file": "fox01.png",
    "width": 800,
    "height": 400,
    "bucket": {"width": 704, "height": 384},
    "box": [0.0, 15.1, 733.3, 384.9],
    "source": "focus",
    "focus": [0.3, 0.5],
}


class Bucket(BaseModel):
    width: int
    height: int


class ImageCrop(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [CROP_EXAMPLE]})

    file: str
    width: int = Field(description="The image's width (EXIF rotation applied)")
    height: int
    bucket: Bucket = Field(description="The size it trains at")
    box: list[float] = Field(description="The part kept, in the image's pixels: left, top, right, bottom")
    source: str = Field(description="What placed the box: center, focus (set by hand) or face")
    focus: list[float] | None = Field(description="The focus point (x, y in 0..1), when one placed the box")


class AppliedCrops(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"dataset": "foxes_cropped", "files": ["fox01.png", "fox02.png"]}]}
    )

    dataset: str
    files: list[str]


class FocusPoint(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"x": 0.5, "y": 0.3}]})

    # Unchecked here on purpose: the service's check names the coordinate in a 400 the UI shares.
    x: float = Field(description="0 = left edge, 1 = right edge", examples=[0.5])
    y: float = Field(description="0 = top edge, 1 = bottom edge", examples=[0.3])


class ApplyCrops(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"new_name": "foxes_cropped", "resolution": 512}]})

    new_name: str = Field(description="The new dataset the cropped copies go into", examples=["foxes_cropped"])
    resolution: int = Field(0, description="Training resolution; 0: the model's native size")
    bucketing: bool = True
    face_crop: bool = False


def _options(resolution: int, bucketing: bool, face_crop: bool) -> CropOptions:
    return CropOptions(resolution=resolution, bucketing=bucketing, face_crop=face_crop)


def dataset_crops_router(crops: DatasetCropService, access: ApiAccess) -> APIRouter:
    router = api_router(PREFIX, "Datasets: crops (api/v1)", access)
    Resolution = Annotated[int, Query(description="Training resolution; 0: the model's native size")]
    Bucketing = Annotated[bool, Query(description="Aspect-ratio buckets (false: square crops)")]
    FaceCrop = Annotated[bool, Query(description="Centre crops without a focus point on the largest face")]

    @router.get("/{name}/crops", response_model=list[ImageCrop])
    def list_crops(
        name: str, resolution: Resolution = 0, bucketing: Bucketing = True, face_crop: FaceCrop = False
    ) -> list[dict[str, Any]]:
        """Every image training would use: its size, bucket and the box kept (original pixels: left, top,
        right, bottom), and what placed the box (center, focus or face)."""
        return [c.as_dict() for c in crops.crops(name, _options(resolution, bucketing, face_crop))]

    @router.put("/{name}/images/{file}/focus", response_model=ImageCrop)
    def put_focus(name: str, file: str, point: Annotated[FocusPoint, Body()]) -> dict[str, Any]:
        """Set the point the image's crop centres on; the reply is the image's new crop."""
        crops.set_focus(name, file, point.x, point.y)
        return crops.crop(name, file).as_dict()

    @router.delete("/{name}/images/{file}/focus", response_model=ImageCrop)
    def delete_focus(name: str, file: str) -> dict[str, Any]:
        """Back to the centred crop."""
        crops.clear_focus(name, file)
        return crops.crop(name, file).as_dict()

    @router.get(
        "/{name}/images/{file}/crop.png",
        response_class=Response,
        responses={200: {"description": "The preview", "content": {"image/png": {"example": "(PNG bytes)"}}}},
    )
    def crop_png(
        name: str, file: str, resolution: Resolution = 0, bucketing: Bucketing = True, face_crop: FaceCrop = False
    ) -> Response:
        """A thumbnail with the kept box outlined and the cut-away part dimmed."""
        png = crops.preview_png(name, file, _options(resolution, bucketing, face_crop))
        return Response(png, media_type="image/png")

    @router.post("/{name}/crops/apply", status_code=201, response_model=AppliedCrops)
    def apply(name: str, body: Annotated[ApplyCrops, Body()]) -> dict[str, Any]:
        """Write every trainable image, cropped and resized to its bucket, with its caption, into a new
        dataset; the original dataset is left as it is."""
        files = crops.apply(name, body.new_name, _options(body.resolution, body.bucketing, body.face_crop))
        return {"dataset": body.new_name, "files": files}

    return router
