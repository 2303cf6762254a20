"""LoRA training over HTTP, ``/api/v1/training``: start (multipart upload or a dataset), list, watch
(Server-Sent Events), cancel, sample images, presets; the run history and queue under ``/runs``
(list, one run, queue by JSON, remove a queued run) and ``/compare``.

Routes parse, call one ``TrainingJobs`` method (lorapg/services/training_jobs.py) and shape the
reply; errors are shaped by ``lorapg.api.errors``. Unknown run ids are 404s, resolved by the
``known_run`` dependency before a route (or an event stream) starts.
"""

# No ``from __future__ import annotations``: FastAPI must see ``Depends(known_run)`` (a local) evaluated.

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, File, Form, HTTPException, Path, Query, Response, UploadFile
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from lorapg.api import training_models as tm
from lorapg.api.auth import ApiAccess
from lorapg.api.grids import EpochGridCreate, GridAccepted, grid_job_url
from lorapg.api.routing import api_router, unknown_as_404
from lorapg.limits import TRAINING
from lorapg.services.training_jobs import RunQueueRequest, TrainingJobs, TrainingStart, UnknownRun, Upload
from lorapg.training.run_store import STATUSES

PREFIX = "/api/v1/training"
# The multipart form as a whole, for /docs (FastAPI documents each form field, not the request).
START_EXAMPLE = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "example": {
                    "name": "zqx_fox",
                    "trigger_word": "zqx_fox",
                    "preset": "concept",
                    "max_steps": 300,
                    "images": ["(img00.png)", "(img00.txt)", "(img01.png)"],
                }
            }
        }
    }
}
POLL_SECONDS = 0.2  # how often an event stream looks at its run (reads only: no busy loop)


def _bounded(key: str, example: Any, description: str) -> Any:
    """An optional form field limited to TrainConfig's range for ``key`` (422 naming it otherwise)."""
    limits = TRAINING[key]
    return Form(ge=limits.minimum, le=limits.maximum, examples=[example], description=description)


def training_router(jobs: TrainingJobs, access: ApiAccess) -> APIRouter:
    router = api_router(PREFIX, "Training (api/v1)", access)

    def known_run(job_id: Annotated[str, Path(examples=["3f9c2a1b7d4e"])]) -> str:
        with unknown_as_404(UnknownRun):
            jobs.run(job_id)
        return job_id

    def known_history_run(run_id: Annotated[str, Path(examples=["3f9c2a1b7d4e"])]) -> str:
        with unknown_as_404(UnknownRun):
            return jobs.history_id(run_id)

    # The history's routes come before "/{job_id}", which would otherwise take "runs" for a job id.
    @router.get("/runs", response_model=list[tm.RunHistoryItem])
    def history(
        status: Annotated[str | None, Query(description=f"Only runs in this status: {', '.join(STATUSES)}")] = None,
    ) -> list[dict[str, Any]]:
        """Every run of the history (this app's and earlier ones'), in queue order, with its settings."""
        return jobs.history(status)

    @router.post("/runs", status_code=202, response_model=tm.TrainingStarted)
    def queue_run(body: tm.RunQueueBody) -> dict[str, Any]:
        """Queue a run on an existing dataset, or train again from a run (``again_from``) with changed
        ``settings``; it starts when the runs queued before it have ended."""
        return jobs.queue_run(RunQueueRequest(**body.model_dump()))

    @router.get("/runs/{run_id}", response_model=tm.RunHistoryDetail)
    def history_run(run_id: Annotated[str, Depends(known_history_run)]) -> dict[str, Any]:
        """One run of the history, with its loss curve."""
        return jobs.history_detail(run_id)

    @router.delete("/runs/{run_id}", response_model=tm.RunHistoryItem)
    def remove_run(run_id: Annotated[str, Depends(known_history_run)]) -> dict[str, Any]:
        """Take a queued run out of the queue (it never starts), or a finished one out of the history.
        A running run is refused: cancel it first."""
        return jobs.remove(run_id)

    @router.get(
        "/runs/{run_id}/samples/{n}.png",
        response_class=FileResponse,
        responses={200: {"description": "The sample image", "content": {"image/png": {"example": "(PNG bytes)"}}}},
    )
    def history_sample(
        run_id: Annotated[str, Depends(known_history_run)], n: Annotated[int, Path(ge=1, examples=[1])]
    ) -> FileResponse:
        """Kept sample ``n`` of a run (1: the first epoch's)."""
        path = jobs.history_sample(run_id, n)
        if path is None:
            raise HTTPException(404, f"Training run {run_id} has no sample {n}.")
        return FileResponse(path, media_type="image/png")

    @router.get("/compare", response_model=tm.RunComparison)
    def compare(
        ids: Annotated[list[str], Query(description="Two or more run ids: ids=a,b or ids=a&ids=b")],
    ) -> dict[str, Any]:
        """The loss curves and per-epoch samples of two or more runs, side by side."""
        with unknown_as_404(UnknownRun):
            return jobs.compare(ids)

    @router.get("/presets", response_model=list[tm.TrainingPresetItem])
    def presets() -> list[dict[str, str]]:
        """The training presets (character, style, concept) and what each is for."""
        return jobs.presets()

    @router.post("", status_code=202, response_model=tm.TrainingStarted, openapi_extra=START_EXAMPLE)
    def start(
        name: Annotated[str, Form(examples=["zqx_fox"], description="The LoRA's name")],
        trigger_word: Annotated[str, Form(examples=["zqx_fox"], description="A rare word that calls up the LoRA")],
        images: Annotated[
            list[UploadFile] | None,
            File(description="Images (PNG, JPEG, WebP) with optional .txt captions, or one .zip of them"),
        ] = None,
        dataset: Annotated[str, Form(examples=[""], description="An existing dataset's name, instead of images")] = "",
        preset: Annotated[str, Form(examples=["character"], description="character, style or concept")] = "",
        epochs: Annotated[int | None, _bounded("epochs", 10, "Passes over the images")] = None,
        max_steps: Annotated[int | None, _bounded("max_steps", 0, "Stop after this many steps; 0: all")] = None,
        learning_rate: Annotated[float | None, _bounded("unet_lr", 1e-4, "The UNet's learning rate")] = None,
        rank: Annotated[int | None, _bounded("rank", 16, "LoRA rank")] = None,
        resolution: Annotated[int | None, _bounded("resolution", 512, "Training size; 0: native")] = None,
        batch_size: Annotated[int | None, _bounded("batch_size", 1, "Images per step")] = None,
        sample_steps: Annotated[
            int | None, _bounded("sample_steps", 20, "Steps of each epoch's sample; 0: none")
        ] = None,
        shuffle_tags: Annotated[
            bool | None, Form(examples=[False], description="Shuffle each caption's comma-separated tags every step")
        ] = None,
        keep_tokens: Annotated[
            int | None, _bounded("keep_tokens", 1, "Tags kept in place when shuffling (1: the trigger)")
        ] = None,
        caption_dropout: Annotated[
            float | None, _bounded("caption_dropout", 0.1, "Chance per image and step of an empty caption")
        ] = None,
        quantize: Annotated[
            str | None,
            Form(
                examples=["nf4"],
                description="Flux.1 / SD 3.5: the frozen base in NF4 (nf4) or not (none); empty: the app's setting. "
                "fp8 is for generation only.",
            ),
        ] = None,
        overwrite: Annotated[bool, Form(examples=[False], description="Replace a LoRA of the same name")] = False,
        resume: Annotated[
            bool, Form(examples=[True], description="Continue from this name's checkpoint (false: start over)")
        ] = True,
    ) -> dict[str, Any]:
        """Queue a training run (202); follow it at ``/api/v1/training/{job_id}/events``."""
        overrides = {
            "epochs": epochs,
            "max_steps": max_steps,
            "unet_lr": learning_rate,
            "rank": rank,
            "resolution": resolution,
            "batch_size": batch_size,
            "sample_steps": sample_steps,
            "shuffle_tags": shuffle_tags,
            "keep_tokens": keep_tokens,
            "caption_dropout": caption_dropout,
            "quantize": quantize,  # checked by the service (TrainConfig's choices): fp8 is refused naming it
            "overwrite": overwrite,
            "resume": resume,
        }
        request = TrainingStart(name, trigger_word, preset, dataset, overrides)
        return jobs.start(request, [Upload(f.filename or "", f.file) for f in images or []])

    @router.get("", response_model=list[tm.TrainingRunSummary])
    def runs() -> list[dict[str, Any]]:
        """Every training run since the app started, oldest first, with status and progress."""
        return jobs.runs()

    @router.get("/{job_id}", response_model=tm.TrainingRunDetail)
    def run(job_id: Annotated[str, Depends(known_run)]) -> dict[str, Any]:
        """One run: progress, the loss per step, sample image URLs, the LoRA once written."""
        return jobs.detail(job_id)

    @router.post("/{job_id}/cancel", response_model=tm.TrainingRunSummary)
    def cancel(job_id: Annotated[str, Depends(known_run)]) -> dict[str, Any]:
        """Stop the run after its current step; a checkpoint is kept, so posting the same run resumes."""
        return jobs.cancel(job_id)

    @router.post("/{job_id}/grid", status_code=202, response_model=GridAccepted)
    def epochs_grid(
        job_id: Annotated[str, Depends(known_run)],
        body: Annotated[EpochGridCreate | None, Body(examples=[{"scales": [0.5, 0.75, 1.0], "steps": 20}])] = None,
    ) -> GridAccepted:
        """Queue the finished run's epochs × scales grid: its per-epoch LoRAs and the final one (columns)
        × scales (rows), on its sample prompt; follow it at ``/api/v1/grids/{grid job_id}``."""
        body = body or EpochGridCreate()
        job = jobs.epochs_grid(job_id, body.scales, **body.overrides())
        return GridAccepted(job_id=job.id, status=job.status, cells=job.total, url=grid_job_url(job.id))

    @router.get(
        "/{job_id}/events",
        response_class=EventSourceResponse,
        responses={
            200: {"description": "Server-Sent Events", "content": {"text/event-stream": {"example": tm.EVENTS_EXAMPLE}}}
        },
    )
    async def events(job_id: Annotated[str, Depends(known_run)]) -> AsyncIterator[ServerSentEvent]:
        """``progress`` events (the current state first, then each change), then ``complete``,
        ``error`` or ``cancelled``. Disconnecting does not stop the run."""
        async for name, data in jobs.events(job_id, POLL_SECONDS):
            yield ServerSentEvent(event=name, data=data)

    @router.get(
        "/{job_id}/samples/{n}.png",
        response_class=Response,
        responses={200: {"description": "The sample image", "content": {"image/png": {"example": "(PNG bytes)"}}}},
    )
    def sample(job_id: Annotated[str, Depends(known_run)], n: Annotated[int, Path(ge=1, examples=[1])]) -> Response:
        """Sample image ``n`` of the run (1: the first one drawn, at the end of an epoch)."""
        png = jobs.sample_png(job_id, n)
        if png is None:
            raise HTTPException(404, f"Training run {job_id} has no sample {n}.")
        return Response(png, media_type="image/png")

    return router
