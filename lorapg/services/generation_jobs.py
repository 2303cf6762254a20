"""Generations as jobs for the REST API (``/api/v1/generations``): submit, state, events, cancel.

A job's state and its event sequence are plain data here, so the routes only parse and reply.
Finished images are saved in the gallery by ``GenerationService`` (``record=True``); their URLs
point at the gallery's image route. The event sequence is a plain generator that never sleeps:
it yields ``None`` when nothing changed, and the caller waits its poll interval before asking
again (a stream waits without holding a thread). Never imports gradio or fastapi.
"""

from __future__ import annotations

import io
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lorapg.coercion import parse_seed
from lorapg.diffusion.hires import HiresOptions
from lorapg.diffusion.img2img import load_image
from lorapg.diffusion.request import MAX_BATCH, MAX_SEED, GenerationRequest, LoraRequest
from lorapg.diffusion.variation_noise import image_seeds, variation_seeds
from lorapg.errors import UserError, shorten
from lorapg.jobs import CANCELLED, DONE, ERROR, FINISHED, Job
from lorapg.limits import (
    BATCH_SIZE,
    CLIP_SKIP,
    DENOISING_STRENGTH,
    HIRES_STRENGTH_DEFAULT,
    VARIATION_STRENGTH,
)
from lorapg.services.a1111 import decode_image_field
from lorapg.services.generation import GenerationService
from lorapg.services.img2img_inputs import options_from_form

GENERATE = "generate"  # the job kind GenerationService submits
PROGRESS, COMPLETE = "progress", "complete"  # event names; the other terminal ones are ERROR, CANCELLED


class JobNotFound(UserError):
    """No generation job with that id (never was, or forgotten): the REST API answers 404."""


class PreviewNotFound(JobNotFound):
    """The job has no preview (yet): 404 as well."""


@dataclass(frozen=True)
class GenerationParams:
    """A generate request by the names users know (the A1111 names where they differ from ours)."""

    prompt: str
    negative_prompt: str = ""
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale); <lora:name:w> tags in the prompt add more
    # None: the model family's default (GenerationService.with_defaults)
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    width: int | None = None  # None: the model's native size
    height: int | None = None
    seed: int | None = None  # None or -1: random (picked at submit, so the seeds are known at once)
    batch_size: int = int(BATCH_SIZE.default)
    clip_skip: int = int(CLIP_SKIP.default)  # A1111's "Clip skip" (CLIP_stop_at_last_layers)
    variation_seed: int | None = None  # A1111's subseed; None or -1: random (picked at submit)
    variation_strength: float = VARIATION_STRENGTH.default  # A1111's subseed_strength; 0 = off
    # img2img / inpainting: init_image and mask as base64 plus the form's fields
    # (lorapg.services.img2img_inputs.options_from_form); None: txt2img
    img2img: dict | None = None
    hires: dict | None = None  # A1111's hires fix by lorapg.api.generations.HiresIn's names; None: off
    # ControlNet units by lorapg.api.generations.ControlNetIn's names (image as base64); empty: none
    controlnet: tuple[dict, ...] = ()


@dataclass(frozen=True)
class JobState:
    """What a client sees of one generation job (JSON-able with ``asdict``)."""

    job_id: str
    status: str  # queued, running, done, error, cancelled
    position: int  # jobs ahead of it in the queue (0 once it runs)
    step: int
    total: int
    message: str
    seeds: list[int]
    images: list[str] = field(default_factory=list)  # image URLs, once done
    image_ids: list[int] = field(default_factory=list)  # their gallery ids
    preview_url: str | None = None  # the latest preview, while one exists
    error: str | None = None
    variation_seeds: list[int] = field(default_factory=list)  # each image's; empty at variation strength 0
    device: str | None = None  # the device of the worker running (or that ran) it; None while queued


@dataclass(frozen=True)
class Urls:
    """Where the API serves a gallery image and a job's preview (the router knows its own paths)."""

    image: Callable[[int], str]
    preview: Callable[[str], str]


class GenerationJobs:
    def __init__(self, generation: GenerationService, urls: Urls):
        self.generation = generation
        self.urls = urls
        # Seeds are decided at submit; a job only knows them once its result exists.
        self._seeds: dict[str, tuple[list[int], list[int]]] = {}  # job id -> (seeds, variation seeds)
        self._lock = threading.Lock()  # routes run in several threads

    def submit(self, params: GenerationParams) -> JobState:
        """Check and queue; bad fields fail here (UserError), before anything is queued."""
        request = self._request(params)
        job = self.generation.submit_generation(request, owner=None, record=True)
        with self._lock:
            self._seeds[job.id] = planned_seeds(request)
            self._forget_seeds()
        return self.state(job)

    def _request(self, params: GenerationParams) -> GenerationRequest:
        seed = parse_seed(params.seed, "seed")
        if seed is None:
            # Room for the batch's seed + i, as the engine leaves it for its own random seeds.
            seed = random.randint(0, MAX_SEED - MAX_BATCH)
        return GenerationRequest(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            loras=tuple(LoraRequest(name, scale) for name, scale in params.loras),
            steps=params.steps,
            guidance_scale=params.cfg_scale,
            sampler=params.sampler or None,
            width=params.width,
            height=params.height,
            seed=seed,
            batch_size=params.batch_size,
            clip_skip=params.clip_skip,
            variation_seed=_variation_seed(params),
            variation_strength=params.variation_strength,
            img2img=self._img2img(params.img2img),
            hires=_hires(params.hires),
            controlnet=_controlnet(params.controlnet),
        )

    def _img2img(self, fields: dict | None):
        """The request's img2img options from the API's base64 images, named by their API fields."""
        if fields is None:
            return None
        fields = dict(fields)
        fields["strength"] = fields.pop("denoising_strength", DENOISING_STRENGTH.default)  # A1111's name in the API
        limit = self.generation.settings.max_image_pixels  # checked on the header, before decoding
        image = decode_image_field(fields.pop("init_image"), None, "img2img.init_image")
        mask = fields.pop("mask", None)
        if mask is not None:
            mask = load_image("img2img.mask", decode_image_field(mask, None, "img2img.mask"), limit)
        return options_from_form(load_image("img2img.init_image", image, limit), mask=mask, **fields)

    def _forget_seeds(self) -> None:
        """Keep seeds only for jobs the queue still knows (it forgets old finished ones)."""
        for job_id in list(self._seeds):
            try:
                self.generation.jobs.get(job_id)
            except UserError:
                del self._seeds[job_id]

    def job(self, job_id: str) -> Job:
        """The generation job ``job_id``; JobNotFound for an unknown id or another kind of job."""
        try:
            job = self.generation.jobs.get(job_id)
        except UserError:
            job = None
        if job is None or job.kind != GENERATE:
            raise JobNotFound(f"No generation job {shorten(job_id, 40)!r}; POST /api/v1/generations starts one.")
        return job

    def state(self, job: Job) -> JobState:
        status = job.status  # read once: the worker sets it last, after the result
        result = job.result if status in FINISHED else None
        saved = [record for record in getattr(result, "saved", None) or [] if getattr(record, "id", None)]
        with self._lock:
            planned, planned_variations = self._seeds.get(job.id, ([], []))
        seeds = list(result.seeds) if result is not None else planned
        variations = list(result.variation_seeds) if result is not None else planned_variations
        return JobState(
            job_id=job.id,
            status=status,
            position=self.generation.jobs.position(job),
            step=job.step,
            total=job.total,
            message=job.message,
            seeds=seeds,
            images=[self.urls.image(record.id) for record in saved],
            image_ids=[record.id for record in saved],
            preview_url=self.urls.preview(job.id) if job.preview is not None else None,
            error=job.error,
            variation_seeds=variations,
            device=job.device,
        )

    def cancel(self, job: Job) -> JobState:
        """Ask the job to stop: a queued job never starts, a running one stops after its step."""
        if not job.finished:
            self.generation.cancel(job.id)
        return self.state(job)

    def preview_png(self, job: Job) -> bytes:
        """The latest preview as PNG bytes; PreviewNotFound when there is none yet."""
        preview = job.preview
        if preview is None:
            raise PreviewNotFound(f"Job {job.id} has no preview yet; previews come every few steps of a running job.")
        buffer = io.BytesIO()
        preview.save(buffer, format="PNG")
        return buffer.getvalue()

    def events(self, job: Job) -> Iterator[tuple[str, dict] | None]:
        """The job's events: the current state first, then each change as ``progress``, then
        one terminal event (``complete``, ``error`` or ``cancelled``). ``None``: nothing new yet.

        A finished job yields only its terminal event. Stopping the iteration (a client that
        went away) leaves the job alone.
        """
        last = None
        while True:
            # Read before the status check: a job is finished only after its result is in place.
            state = self.state(job)
            if state.status in FINISHED:
                yield terminal_event(state)
                return
            progress = progress_data(state)
            if progress != last:
                last = progress
                yield PROGRESS, progress
            else:
                yield None


def _variation_seed(params: GenerationParams) -> int | None:
    """The variation seed, picked at submit when random and used (strength over 0), like the seed."""
    seed = parse_seed(params.variation_seed, "variation_seed")
    if seed is None and params.variation_strength:
        seed = random.randint(0, MAX_SEED - MAX_BATCH)
    return seed


def planned_seeds(request: GenerationRequest) -> tuple[list[int], list[int]]:
    """Each image's seed and variation seed, as the engine will use them (both were picked at submit)."""
    return image_seeds(request), variation_seeds(request)


def progress_data(state: JobState) -> dict:
    return {
        "status": state.status,
        "position": state.position,
        "step": state.step,
        "total": state.total,
        "message": state.message,
        "preview_url": state.preview_url,
        "device": state.device,
    }


def terminal_event(state: JobState) -> tuple[str, dict]:
    if state.status == DONE:
        done = {"images": state.images, "image_ids": state.image_ids, "seeds": state.seeds}
        return COMPLETE, done | ({"variation_seeds": state.variation_seeds} if state.variation_seeds else {})
    if state.status == ERROR:
        return ERROR, {"message": state.error or state.message}
    if state.status == CANCELLED:
        return CANCELLED, {"message": state.message, "images": state.images, "seeds": state.seeds}
    raise ValueError(f"job {state.job_id} is not finished ({state.status})")


def _controlnet(units) -> tuple:
    """The request's ControlNet units from the API's ``controlnet`` list (the request checks the values)."""
    from lorapg.diffusion.controlnet import ControlUnit

    made = []
    for index, fields in enumerate(units or ()):
        fields = dict(fields)
        # No size check here: the API's body limit bounds the upload, max_image_pixels the decoded image.
        image = decode_image_field(fields.pop("image"), None, f"controlnet[{index}].image")
        made.append(ControlUnit(image=image, **fields))
    return tuple(made)


def _hires(fields: dict | None) -> HiresOptions | None:
    """The request's hires options from the API's ``hires`` object (its strength is A1111's name)."""
    if fields is None:
        return None
    fields = dict(fields)
    fields["strength"] = fields.pop("denoising_strength", HIRES_STRENGTH_DEFAULT)
    return HiresOptions(**fields)
