"""Training datasets over HTTP, ``/api/v1/datasets``: list, captions (get, put one or many), tag
counts, find/replace, add/remove a tag, and auto-captioning as a job with per-image progress.

Routes parse, call one ``CaptionService`` method and shape the reply. An unknown dataset or caption
job is a 404; a refusal (a bad option, a captioner that cannot load) a 400 naming the field.
"""

# No ``from __future__ import annotations``: FastAPI must see ``Depends(known_dataset)`` (a local) evaluated.

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from lorapg.api.auth import ApiAccess
from lorapg.api.routing import api_router
from lorapg.captioning.base import DEFAULT_MAX_LENGTH, MAX_LENGTH_LIMIT, SENTENCE, CaptionOptions
from lorapg.errors import UserError, shorten
from lorapg.services.captions import CaptionService

PREFIX = "/api/v1/datasets"
JOB_EXAMPLE = {
    "job_id": "3f9c2a1b7d4e",
    "status": "done",
    "done": 2,
    "total": 2,
    "message": "done",
    "error": None,
    "result": {
        "written": {"img00.png": "zqx_fox, 1girl, red hair"},
        "kept": ["img01.png"],
        "skipped": {},
        "cancelled": False,
        "summary": "1 captioned, 1 kept",
    },
}
CAPTION_EXAMPLE = {"captioner": "wd14", "style": "tags", "trigger": "zqx_fox", "overwrite": False}


class DatasetItem(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "zqx_fox", "images": 12, "captioned": 9}]})

    name: str
    images: int
    captioned: int = Field(description="Images with a non-empty .txt caption.")


class CaptionItem(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"file": "img00.png", "caption": "zqx_fox, red fox"}]})

    file: str
    caption: str = Field(description="'' when the image has no caption file.")


class CaptionBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"caption": "zqx_fox, red fox, snow"}]})

    caption: str = Field(description="The new caption; '' removes the caption file.")


class CaptionsBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"captions": {"img00.png": "zqx_fox, red fox"}}]})

    captions: dict[str, str] = Field(description="Image file -> new caption; all are checked before any is written.")


class Changed(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"changed": ["img00.png", "img03.png"]}]})

    changed: list[str] = Field(description="The image files whose captions changed.")


class ReplaceBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"find": "red fox", "replace": "fox", "regex": False}]})

    find: str = Field(min_length=1)
    replace: str = ""
    regex: bool = Field(False, description="find is a Python regular expression")


class TagBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"tag": "snow", "position": "end"}]})

    tag: str = Field(min_length=1, description="One tag (no commas).")
    position: str = Field("end", description="start or end (adding only)")


class TagCount(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"tag": "zqx_fox", "count": 12}]})

    tag: str
    count: int


class CaptionStart(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [CAPTION_EXAMPLE]})

    captioner: str = Field(description="blip, blip2, florence2, wd14 or a model folder name in models/captioners")
    style: str = Field(SENTENCE, description="sentence or tags")
    trigger: str = Field("", description="Put first in every caption")
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=1, le=MAX_LENGTH_LIMIT, description="Most words or tags")
    overwrite: bool = Field(False, description="Replace existing captions (default: only images without one)")
    batch_size: int = Field(4, ge=1, le=64)


class CaptionJob(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    job_id: str
    status: str = Field(description="queued, running, done, error or cancelled")
    done: int = Field(description="Images captioned or skipped so far")
    total: int = Field(description="Images in the dataset")
    message: str
    error: str | None
    result: dict[str, Any] | None = Field(
        description="When finished: written (file -> caption), kept, skipped (file -> reason), cancelled, summary."
    )


def datasets_router(service: CaptionService, access: ApiAccess) -> APIRouter:
    router = api_router(PREFIX, "Datasets (api/v1)", access)

    def known_dataset(name: Annotated[str, Path(examples=["zqx_fox"])]) -> str:
        try:
            service.dataset(name)
        except UserError as exc:
            raise HTTPException(404, f"name: {exc}") from None
        return name

    def job_reply(job_id: str) -> dict[str, Any]:
        try:
            job = service.job(job_id)
        except UserError as exc:
            raise HTTPException(404, f"job_id: {exc}") from None
        result = job.result.as_dict() if job.finished and job.result is not None else None
        return {
            "job_id": job.id,
            "status": job.status,
            "done": job.step,
            "total": job.total,
            "message": job.message,
            "error": job.error,
            "result": result,
        }

    @router.get("", response_model=list[DatasetItem], summary="Every dataset with its image and caption counts")
    def datasets() -> list[dict[str, Any]]:
        items = []
        for name in service.names():
            rows = service.captions(name)
            items.append({"name": name, "images": len(rows), "captioned": sum(1 for r in rows if r["caption"])})
        return items

    @router.get("/caption-jobs/{job_id}", response_model=CaptionJob, summary="A captioning job's progress")
    def caption_job(job_id: str) -> dict[str, Any]:
        return job_reply(job_id)

    @router.post("/caption-jobs/{job_id}/cancel", response_model=CaptionJob, summary="Stop after the current batch")
    def cancel_caption_job(job_id: str) -> dict[str, Any]:
        job_reply(job_id)  # an unknown id is a 404 before anything is cancelled
        service.jobs.cancel(job_id)
        return job_reply(job_id)

    @router.get("/{name}/captions", response_model=list[CaptionItem], summary="Every image and its caption")
    def captions(name: Annotated[str, Depends(known_dataset)]) -> list[dict[str, str]]:
        return service.captions(name)

    @router.put("/{name}/captions", response_model=Changed, summary="Set several captions at once")
    def put_captions(name: Annotated[str, Depends(known_dataset)], body: CaptionsBody) -> dict[str, Any]:
        return {"changed": _field("captions", lambda: service.set_captions(name, body.captions))}

    @router.put("/{name}/captions/{file}", response_model=CaptionItem, summary="Set one image's caption")
    def put_caption(name: Annotated[str, Depends(known_dataset)], file: str, body: CaptionBody) -> dict[str, str]:
        if file not in {row["file"] for row in service.captions(name)}:
            raise HTTPException(404, f"file: no image {shorten(file)!r} in dataset {name}.")
        return _field("caption", lambda: service.set_caption(name, file, body.caption))

    @router.get("/{name}/tags", response_model=list[TagCount], summary="Tag counts (ss_tag_frequency's numbers)")
    def tags(
        name: Annotated[str, Depends(known_dataset)],
        trigger: Annotated[str, Query(description="The run's trigger word: counted as training would")] = "",
        repeats: Annotated[int, Query(ge=1, le=1000)] = 1,
    ) -> list[dict[str, Any]]:
        return [{"tag": tag, "count": count} for tag, count in service.tag_frequency(name, trigger, repeats)]

    @router.post("/{name}/captions/replace", response_model=Changed, summary="Find and replace in every caption")
    def replace(name: Annotated[str, Depends(known_dataset)], body: ReplaceBody) -> dict[str, Any]:
        try:
            changed = service.find_replace(name, body.find, body.replace, body.regex)
        except UserError as exc:  # a bad replacement template names "replace"; everything else "find"
            raise UserError(f"{'replace' if str(exc).startswith('Replace ') else 'find'}: {exc}") from None
        return {"changed": changed}

    @router.post("/{name}/tags/add", response_model=Changed, summary="Add a tag to every caption lacking it")
    def add_tag(name: Annotated[str, Depends(known_dataset)], body: TagBody) -> dict[str, Any]:
        return {"changed": _field("tag", lambda: service.add_tag(name, body.tag, body.position))}

    @router.post("/{name}/tags/remove", response_model=Changed, summary="Remove a tag from every caption")
    def remove_tag(name: Annotated[str, Depends(known_dataset)], body: TagBody) -> dict[str, Any]:
        return {"changed": _field("tag", lambda: service.remove_tag(name, body.tag))}

    @router.post("/{name}/caption", status_code=202, response_model=CaptionJob, summary="Auto-caption (a job)")
    def caption(
        name: Annotated[str, Depends(known_dataset)], body: Annotated[CaptionStart, Body(examples=[CAPTION_EXAMPLE])]
    ) -> dict[str, Any]:
        """Queue captioning; follow it at ``/api/v1/datasets/caption-jobs/{job_id}``. The model loads
        (or downloads) inside the job: a captioner that cannot load ends the job with its error."""
        options = CaptionOptions(body.style, body.trigger, body.max_length, body.overwrite, body.batch_size)
        _field("captioner", lambda: service.check_captioner(body.captioner))
        job = _field("options", lambda: service.start(name, body.captioner, options))
        return job_reply(job.id)

    return router


def _field(field: str, call):
    """Run ``call``; a refusal comes back as a 400 whose message starts with the field's name."""
    try:
        return call()
    except UserError as exc:
        raise UserError(f"{field}: {exc}") from None
