"""AUTOMATIC1111's API vocabulary over the app's services (the REST API's ``/sdapi/v1`` calls this).

A1111 names things its own way: samplers and schedules are two fields ("DPM++ 2M" + "karras"),
models are chosen by a "title" (``name.safetensors [shorthash]``), progress is one global state,
``interrupt`` stops the current job and the rest of its batch. This module translates; the work
itself is done by ``GenerationService`` through the one job queue, so API jobs run in order with
the UI's and show in its status. Never imports gradio or fastapi.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lorapg.coercion import CoercionError, shown, to_bool, to_int
from lorapg.config import Settings
from lorapg.diffusion.families import is_transformer_family
from lorapg.diffusion.hires import HiresOptions
from lorapg.diffusion.img2img import Img2ImgOptions, load_image
from lorapg.diffusion.request import A1111_DEFAULTS, GenerationRequest, parse_seed
from lorapg.diffusion.samplers import FLOW_SAMPLERS, SAMPLERS, any_sampler, samplers_for
from lorapg.errors import UserError, shorten
from lorapg.gallery.a1111 import format_parameters
from lorapg.hashing import MODEL_HASH_LENGTH, model_sha256
from lorapg.jobs import RUNNING, Job
from lorapg.limits import BATCH_SIZE, CLIP_SKIP, HIRES_STRENGTH_DEFAULT, HIRES_UPSCALERS, SEED
from lorapg.outputs import image_record, record_in_gallery
from lorapg.services.a1111_controlnet import units_from_scripts
from lorapg.services.gallery import GalleryService
from lorapg.services.generation import GenerationService

log = logging.getLogger(__name__)

AUTOMATIC = "automatic"
# A1111 1.10's schedule names (lower case in the API, a label in the UI) that this app can run.
SCHEDULES = {AUTOMATIC: "Automatic", "karras": "Karras"}
MAX_REMEMBERED_INTERRUPTS = 64
MAX_N_ITER = 16  # A1111's UI allows 100; a REST caller asking for more is most likely a mistake
# Settings whose values hold secrets: never echoed by cmd-flags.
SECRET_SETTINGS = {"auth", "api_auth", "llm_api_key"}
# sd_vae values meaning "the model's own VAE" (A1111's "Automatic"; "None" also uses the model's).
OWN_VAE = {"automatic", "none", ""}


@dataclass(frozen=True)
class Txt2ImgParams:
    """The txt2img fields this app acts on, as A1111 names them (the route's model fills it)."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1  # the variation seed; -1: random
    subseed_strength: float = 0.0  # the variation strength; 0: off
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    sd_model_checkpoint: str | None = None  # from override_settings
    clip_skip: Any = None  # override_settings' CLIP_stop_at_last_layers; None: the options' value
    sd_vae: Any = None  # override_settings' sd_vae
    send_images: bool = True
    save_images: bool = False
    # A1111's hires fix (txt2img only): on with enable_hr; hr_resize_x/y (non-zero) replace hr_scale.
    enable_hr: Any = False
    hr_scale: Any = 2.0
    hr_resize_x: Any = 0
    hr_resize_y: Any = 0
    hr_upscaler: Any = None  # None or "": "Latent", as A1111's default
    hr_second_pass_steps: Any = 0  # 0: the first pass's steps
    denoising_strength: Any = None  # the second pass's; None: lorapg.limits.HIRES_STRENGTH_DEFAULT
    alwayson_scripts: Any = None  # the ControlNet extension's units (lorapg.services.a1111_controlnet)
    # The fields the client's JSON sent (None: all of them). Those of FAMILY_FIELDS it left out get the
    # loaded model family's defaults for Flux and SD 3.5, A1111's values above for SD.
    given: frozenset[str] | None = None


@dataclass(frozen=True)
class Img2ImgParams(Txt2ImgParams):
    """img2img's own fields, as A1111 names them (and its defaults for API callers)."""

    init_images: tuple = ()  # base64 images (raw or data: URLs); one is used
    denoising_strength: Any = 0.75
    resize_mode: Any = 0
    mask: str | None = None  # base64; white = repaint
    mask_blur: Any = 4
    inpainting_fill: Any = 0  # 0 fill, 1 original (2 and 3, latent noise / nothing, are not built)
    inpaint_full_res: Any = True  # "only masked"
    inpaint_full_res_padding: Any = 0
    inpainting_mask_invert: Any = 0
    include_init_images: bool = False


@dataclass
class Txt2ImgResult:
    images: list[str]  # raw base64 PNGs with the A1111 parameters chunk
    info: dict[str, Any]
    interrupted: bool


@dataclass(frozen=True)
class ModelEntry:
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    ref: str  # what GenerationService loads


# The fields whose defaults depend on the model family (GenerationService.with_defaults).
FAMILY_FIELDS = ("steps", "cfg_scale", "width", "height")
SAMPLER_FIELDS = frozenset({"sampler_name", "sampler_index"})


def left_out(params: Txt2ImgParams) -> set[str]:
    """The family-dependent fields the client did not send ("sampler": neither sampler field)."""
    if params.given is None:
        return set()
    missing = {name for name in FAMILY_FIELDS if name not in params.given}
    return missing | ({"sampler"} if not SAMPLER_FIELDS & params.given else set())


def echoed_parameters(sent: dict[str, Any], params: Txt2ImgParams, info: dict[str, Any]) -> dict[str, Any]:
    """The reply's ``parameters`` (A1111 echoes the request) with the fields the client left out set
    to what ran (``info``), not to A1111's placeholders: Flux got 28 steps, not the body's 20."""
    missing = left_out(params)
    ran = {name: info[name] for name in FAMILY_FIELDS if name in missing}
    if "sampler" in missing:
        ran |= {"sampler_name": info["sampler_name"], "sampler_index": info["sampler_name"]}
        if params.given is not None and "scheduler" not in params.given:
            ran["scheduler"] = info["scheduler"]
    return {**sent, **ran}


def a1111_sampler_names(family: str | None = None) -> list[str]:
    """Sampler names as A1111 1.10 lists them: without the schedule ("DPM++ 2M", not "... Karras").

    ``family``: the loaded model's; its own samplers (Flux, SD 3.5: the flow-matching ones, as
    Forge lists them); None (no model loaded): the Stable Diffusion ones."""
    return list(dict.fromkeys(sampler.a1111_sampler for sampler in samplers_for(family).values()))


def flow_sampler(name: str | None, scheduler: str | None) -> str | None:
    """The flow-matching sampler (Flux, SD 3.5) for Forge's sampler name + scheduler, e.g. ("Euler",
    "beta") -> "Euler Beta"; None when none matches (the SD names then apply, swapped with a warning)."""
    name, schedule = (name or "").strip().lower(), (scheduler or AUTOMATIC).strip().lower()
    for key, sampler in FLOW_SAMPLERS.items():
        named = name in (key.lower(), sampler.a1111_sampler.lower())
        if named and (schedule == AUTOMATIC or schedule == sampler.a1111_schedule.lower()):
            return key
    return None


def resolve_sampler(name: str | None, scheduler: str | None, family: str | None = None) -> str:
    """This app's sampler for A1111's sampler name + scheduler, e.g. ("DPM++ 2M", "karras").

    A1111 >= 1.8 also accepts the old combined names ("DPM++ 2M Karras") and then ignores
    ``scheduler`` "automatic"; so does this. ``family`` Flux or SD 3.5: Forge's flow-matching names
    and schedules ("Euler" + "simple" / "beta") first.
    """
    if is_transformer_family(family):
        flow = flow_sampler(name, scheduler)
        if flow is not None:
            return flow
    name = (name or "Euler a").strip()
    schedule = (scheduler or AUTOMATIC).strip().lower()
    if schedule not in SCHEDULES:
        raise UserError(
            f"scheduler: {shorten(scheduler, 40)!r} is not available here; use one of {', '.join(SCHEDULES)}."
        )
    by_lower = {key.lower(): key for key in SAMPLERS}
    combined = by_lower.get(name.lower())
    if combined is not None and (schedule == AUTOMATIC or SAMPLERS[combined].a1111_schedule.lower() == schedule):
        return combined
    for key, sampler in SAMPLERS.items():
        if sampler.a1111_sampler.lower() == name.lower() and sampler.a1111_schedule.lower() == schedule:
            return key
    if combined is not None or name.lower() in {n.lower() for n in a1111_sampler_names()}:
        raise UserError(
            f"sampler_name: {shorten(name, 40)!r} cannot run with scheduler {schedule!r} here; "
            "use scheduler 'automatic'."
        )
    raise UserError(
        f"sampler_name: unknown sampler {shorten(name, 40)!r}; use one of "
        f"{', '.join(a1111_sampler_names())} (GET /sdapi/v1/samplers)."
    )


def hires_options(params: Txt2ImgParams) -> HiresOptions | None:
    """txt2img's hires fix from A1111's fields (None unless enable_hr); the request checks the values."""
    try:
        enabled = to_bool(params.enable_hr)
    except CoercionError:
        raise UserError(f"enable_hr must be true or false, got {shown(params.enable_hr)}.") from None
    if not enabled:
        return None
    upscaler = params.hr_upscaler if params.hr_upscaler not in (None, "") else HIRES_UPSCALERS[0]
    strength = params.denoising_strength if params.denoising_strength is not None else HIRES_STRENGTH_DEFAULT
    return HiresOptions(
        scale=params.hr_scale,
        resize_x=params.hr_resize_x,
        resize_y=params.hr_resize_y,
        steps=params.hr_second_pass_steps,
        strength=strength,
        upscaler=upscaler,
    )


def check_vae(name: Any) -> None:
    """Only the model's own VAE exists here: "Automatic" or "None" (both mean it), else a UserError."""
    if name is None or (isinstance(name, str) and name.strip().lower() in OWN_VAE):
        return
    raise UserError(
        f"sd_vae: {shorten(name, 60)!r} is not available; only the model's own VAE exists here, "
        "so use 'Automatic' (or leave sd_vae out)."
    )


def check_clip_skip(value: Any) -> int:
    """CLIP_stop_at_last_layers as a whole number in A1111's range (the engine checks the model's layers)."""
    try:
        number = to_int(value)
    except CoercionError:
        number = None
    if number is None or number not in CLIP_SKIP:
        raise UserError(
            f"CLIP_stop_at_last_layers must be a whole number {CLIP_SKIP.describe()} (1 = no skip), "
            f"got {shorten(value, 40)!r}."
        )
    return number


def next_batch(base: GenerationRequest, iteration: int) -> GenerationRequest:
    """Batch ``iteration`` of an ``n_iter`` call, as A1111 numbers the images: seeds count up over the
    call, except that variations keep the seed and count the variation seed up instead."""
    offset = iteration * base.batch_size
    if base.variation_strength:
        return replace(base, variation_seed=base.variation_seed + offset)
    return replace(base, seed=base.seed + offset, variation_seed=base.variation_seed + offset)


def png_base64(image: Image.Image, parameters: str) -> str:
    """A raw base64 PNG (no ``data:`` prefix, as A1111 sends) carrying the ``parameters`` chunk."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image_field(value: str, max_bytes: int | None, field: str = "image") -> bytes:
    """Bytes of a base64 image as clients send it (raw, or ``data:image/png;base64,…``)."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{field}: send a PNG as base64 text (raw or a data: URL).")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    if max_bytes and len(text) * 3 // 4 > max_bytes:
        raise UserError(
            f"{field}: the image is over the upload limit of {max_bytes // (1024 * 1024)} MB "
            "(setting max_upload_mb); send a smaller file."
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{field}: not valid base64; send the PNG file's bytes base64-encoded.") from None


class A1111Service:
    """What ``/sdapi/v1`` needs, built from the generation and gallery services."""

    def __init__(
        self,
        settings: Settings,
        generation: GenerationService,
        gallery: GalleryService,
        *,
        max_upload_bytes: int | None = None,
    ):
        self.settings = settings
        self.generation = generation
        self.gallery = gallery
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()
        self._active_calls = 0  # txt2img calls not answered yet (queued or running)
        # Jobs stopped by interrupt() (the rest of their call stops too; skip() stops one batch).
        # Bounded: a UI job interrupted here never comes back to take its id out.
        self._interrupted_jobs: OrderedDict[str, bool] = OrderedDict()
        self._batches: dict[str, tuple[int, int]] = {}  # job id -> (batch number, n_iter) of its call
        # A1111's state.interrupted / state.skipped: set by interrupt / skip, cleared when the next
        # txt2img call begins, so a client polling progress after the reply still sees them.
        self._interrupted = False
        self._skipped = False
        self._clip_skip = 1  # options' CLIP_stop_at_last_layers (A1111 keeps it globally)
        self._job_timestamp = ""

    # --- txt2img -------------------------------------------------------------------------------

    def txt2img(self, params: Txt2ImgParams) -> Txt2ImgResult:
        """Run ``n_iter`` batches through the job queue, one job per batch, as A1111 does."""
        if params.n_iter not in range(1, MAX_N_ITER + 1):
            raise UserError(f"n_iter must be 1–{MAX_N_ITER}, got {params.n_iter}.")
        check_vae(params.sd_vae)
        if params.sd_model_checkpoint:
            self.select_model(params.sd_model_checkpoint)
        base = self._first_request(params)
        with self._lock:
            if self._active_calls == 0:  # A1111's state.begin(): a new call clears the last one's flags
                self._interrupted = self._skipped = False
            self._active_calls += 1
            self._job_timestamp = time.strftime("%Y%m%d%H%M%S")
        results, interrupted = [], False
        try:
            for iteration in range(params.n_iter):
                request = next_batch(base, iteration)
                result, interrupted = self._run_batch(request, iteration, params.n_iter)
                results.append(result)
                if interrupted:
                    break  # interrupt stops the whole call; skip only the current batch
        finally:
            with self._lock:
                self._active_calls -= 1
        # Interrupted or skipped batches still return the images they had (A1111 decodes the
        # current latents), plus every finished batch before them.
        return self._reply(params, results, interrupted=interrupted)

    def img2img(self, params: Img2ImgParams) -> Txt2ImgResult:
        """txt2img's call (batches, n_iter, progress, interrupt) with an init image and maybe a mask."""
        return self.txt2img(params)

    def _img2img_options(self, params: Img2ImgParams) -> Img2ImgOptions:
        """The engine's options from A1111's fields; the images decoded within the upload limits."""
        images = list(params.init_images or ())
        if len(images) != 1:
            raise UserError(
                f"init_images: send exactly one image (base64 PNG or JPEG); got {len(images)}. "
                "For several, make one call per image."
            )
        limit = self.settings.max_image_pixels
        data = decode_image_field(images[0], self.max_upload_bytes, "init_images[0]")
        image = load_image("init_images[0]", data, limit)
        mask = None
        if params.mask:
            mask = load_image("mask", decode_image_field(params.mask, self.max_upload_bytes, "mask"), limit)
        return Img2ImgOptions(
            image=image,
            strength=params.denoising_strength,
            resize_mode=params.resize_mode,
            mask=mask,
            mask_blur=params.mask_blur,
            mask_invert=params.inpainting_mask_invert,
            inpainting_fill=params.inpainting_fill,
            only_masked=params.inpaint_full_res,
            only_masked_padding=params.inpaint_full_res_padding,
        )

    def _run_batch(self, request: GenerationRequest, iteration: int, n_iter: int) -> tuple[Any, bool]:
        """One batch through the job queue; True with it if ``interrupt`` (not ``skip``) stopped it."""
        job_ids: list[str] = []

        def note(job) -> None:  # called while the job waits or runs, and once when it ends
            if not job_ids:
                job_ids.append(job.id)
                with self._lock:
                    self._batches[job.id] = (iteration, n_iter)

        try:
            result = self.generation.generate(request, on_progress=note, record=False)
        finally:
            with self._lock:
                for job_id in job_ids:
                    self._batches.pop(job_id, None)
        with self._lock:
            interrupted = bool(job_ids) and self._interrupted_jobs.pop(job_ids[0], False)
        return result, bool(interrupted and result.cancelled)

    def _first_request(self, params: Txt2ImgParams) -> GenerationRequest:
        # Fields the client left out stay None, marked for A1111's defaults: the job fills them once
        # its model is loaded (GenerationService.with_defaults: A1111's on SD, the family's on Flux /
        # SD 3.5), so nothing is loaded here and a bad body fails before any model loads.
        missing = left_out(params)
        family = self.generation.model_status().family  # None before a load: the SD names
        sampler = resolve_sampler(params.sampler_name or params.sampler_index, params.scheduler, family)

        def given(name: str, value: Any) -> Any:
            return None if name in missing else value

        # A1111 picks one random seed for the whole call; the images then use consecutive seeds.
        seed = parse_seed(params.seed)
        if seed is None:
            seed = random.randrange(int(SEED.maximum) + 1 - int(BATCH_SIZE.maximum) * MAX_N_ITER)
        elif seed + params.batch_size * params.n_iter - 1 > SEED.maximum:
            raise UserError(
                f"seed: {seed} plus the {params.batch_size * params.n_iter} images of this call "
                f"passes {SEED.maximum:g}; use a smaller seed or -1."
            )
        request = GenerationRequest(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            steps=given("steps", params.steps),
            guidance_scale=given("cfg_scale", params.cfg_scale),
            sampler=given("sampler", sampler),
            width=given("width", params.width),
            height=given("height", params.height),
            seed=seed,
            batch_size=params.batch_size,
            clip_skip=self._clip_skip if params.clip_skip is None else check_clip_skip(params.clip_skip),
            variation_seed=self._subseed(params),
            variation_strength=params.subseed_strength,
            img2img=self._img2img_options(params) if isinstance(params, Img2ImgParams) else None,
            hires=None if isinstance(params, Img2ImgParams) else hires_options(params),
            controlnet=units_from_scripts(
                params.alwayson_scripts, lambda value, field: decode_image_field(value, self.max_upload_bytes, field)
            ),
            extra={A1111_DEFAULTS: True} if missing else {},
        )
        return self.generation.prepare(request)  # every field checked before anything is queued

    @staticmethod
    def _subseed(params: Txt2ImgParams) -> int:
        """A1111 picks a random subseed for every call (reported in ``info`` even when unused)."""
        subseed = parse_seed(params.subseed, "subseed")
        count = params.batch_size * params.n_iter
        if subseed is None:
            return random.randrange(int(SEED.maximum) + 1 - int(BATCH_SIZE.maximum) * MAX_N_ITER)
        if subseed + count - 1 > SEED.maximum:
            raise UserError(
                f"subseed: {subseed} plus the {count} images of this call passes {SEED.maximum:g}; "
                "use a smaller subseed or -1."
            )
        return subseed

    def _reply(self, params: Txt2ImgParams, results: list, interrupted: bool) -> Txt2ImgResult:
        images, infotexts, seeds, subseeds = [], [], [], []
        for result in results:
            records = [image_record(result, index) for index in range(len(result.images))]
            texts = [format_parameters(record) for record in records]
            if params.save_images and result.images:
                record_in_gallery(self.gallery.store, result)
            if params.send_images:
                images += [png_base64(image, text) for image, text in zip(result.images, texts, strict=True)]
            infotexts += texts
            seeds += list(result.seeds[: len(result.images)] or result.seeds)
            # A1111 counts the subseed up over the call's images whether or not they vary.
            subseeds += [result.request.variation_seed + i for i in range(len(result.images) or len(result.seeds))]
        first = results[0]
        request = first.request
        # The family's own sampler by that name (Flux's "Euler" is Forge's Euler + Simple).
        sampler = samplers_for(getattr(first, "family", None)).get(request.sampler) or any_sampler(request.sampler)
        model = self.generation.model_status()
        entry = self._entry_for_ref(model.ref) if model.ref else None
        info = {
            "prompt": request.prompt,
            "all_prompts": [request.prompt] * len(seeds),
            "negative_prompt": request.negative_prompt,
            "all_negative_prompts": [request.negative_prompt] * len(seeds),
            "seed": seeds[0] if seeds else request.seed,
            "all_seeds": seeds,
            "subseed": subseeds[0] if subseeds else request.variation_seed,
            "all_subseeds": subseeds,
            "subseed_strength": request.variation_strength,
            "width": request.width,
            "height": request.height,
            "sampler_name": sampler.a1111_sampler,
            "scheduler": sampler.a1111_schedule,
            "cfg_scale": request.guidance_scale,
            "steps": request.steps,
            "batch_size": request.batch_size,
            "n_iter": params.n_iter,
            "sd_model_name": entry.model_name if entry else None,
            "sd_model_hash": entry.hash if entry else None,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "clip_skip": request.clip_skip,
            "restore_faces": False,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": self._job_timestamp,
            "interrupted": interrupted,
        }
        if request.hires is not None:  # A1111's txt2img info with the hires fix
            info.update(denoising_strength=request.hires.strength, hr_upscaler=request.hires.upscaler)
        if request.img2img is not None:  # A1111's img2img info adds these
            info.update(
                denoising_strength=request.img2img.strength,
                resize_mode=request.img2img.resize_mode,
                mask_blur=request.img2img.mask_blur if request.img2img.mask is not None else None,
            )
        return Txt2ImgResult(images, info, interrupted)

    # --- progress, interrupt, skip -------------------------------------------------------------

    def progress(self, skip_current_image: bool = False) -> dict[str, Any]:
        """A1111's global progress: 0 and job_count 0 when idle (clients poll for exactly that)."""
        job = self._running_generation() or self.generation.jobs.running()
        with self._lock:
            active = self._active_calls
            batch = self._batches.get(job.id) if job is not None else None
        job_no, job_count = batch if batch else (0, max(active, 1 if job is not None else 0))
        generating = job is not None and job.kind == "generate" and job.status == RUNNING
        step, total = (job.step, job.total) if generating else (0, 0)
        progress = step / total if total else 0.0
        elapsed = time.time() - job.created_at if generating else 0.0
        eta = elapsed / progress - elapsed if progress > 0 else 0.0
        current = None
        if generating and not skip_current_image and job.preview is not None:
            current = png_base64(job.preview.convert("RGB"), "") if hasattr(job.preview, "convert") else None
        return {
            "progress": progress,
            "eta_relative": eta,
            "state": {
                "skipped": self._skipped,
                "interrupted": self._interrupted,
                "job": job.kind if job else "",
                "job_count": job_count,
                "job_timestamp": self._job_timestamp,
                "job_no": job_no,
                "sampling_step": step,
                "sampling_steps": total,
                "device": job.device if generating else None,  # not A1111's: which worker (--devices) runs it
            },
            "current_image": current,
            "textinfo": job.message if job else None,
        }

    def interrupt(self) -> None:
        """Stop the running generations after their current step, and the rest of their txt2img calls."""
        with self._lock:
            self._interrupted = True
        for job in self._cancel_running():
            with self._lock:
                self._interrupted_jobs[job.id] = True
                while len(self._interrupted_jobs) > MAX_REMEMBERED_INTERRUPTS:
                    self._interrupted_jobs.popitem(last=False)

    def skip(self) -> None:
        """Stop the running batches; a txt2img call with more batches (n_iter) goes on with the next."""
        with self._lock:
            self._skipped = True
        self._cancel_running()

    def _cancel_running(self) -> list[Job]:
        """Cancel every running generation (the UI's or the API's; A1111's interrupt is global, and with
        several devices several run at once); return them."""
        jobs = [job for job in self.generation.jobs.running_jobs() if job.kind == "generate"]
        for job in jobs:
            self.generation.cancel(job.id)
        return jobs

    def _running_generation(self) -> Job | None:
        """The earliest running generation (with several devices, other jobs may run beside it)."""
        return next((job for job in self.generation.jobs.running_jobs() if job.kind == "generate"), None)

    # --- models and options --------------------------------------------------------------------

    def sd_models(self) -> list[ModelEntry]:
        return [self._entry_for_ref(ref) for ref in self.generation.model_choices()]

    def _entry_for_ref(self, ref: str) -> ModelEntry:
        path = Path(ref)
        is_file = path.suffix.lower() in {".safetensors", ".ckpt", ".gguf"} and path.is_file()  # hashed as A1111 does
        name = path.name if path.exists() else ref
        short = full = None
        if is_file:
            full = model_sha256(path)
            short = full[:MODEL_HASH_LENGTH]
        title = f"{name} [{short}]" if short else name
        return ModelEntry(
            title=title,
            model_name=path.stem if is_file else name,
            hash=short,
            sha256=full,
            filename=str(path.resolve()) if path.exists() else ref,
            ref=ref,
        )

    def select_model(self, title: str) -> None:
        """Load the model A1111 calls ``title`` (title, file name or model name), if not loaded yet."""
        wanted = str(title).strip()
        entries = self.sd_models()
        bare = wanted.rsplit(" [", 1)[0] if wanted.endswith("]") else wanted
        match = next(
            (
                e
                for e in entries
                if wanted in (e.title, e.model_name, e.ref) or bare in (e.model_name, Path(e.filename).name)
            ),
            None,
        )
        if match is None:
            raise UserError(
                f"sd_model_checkpoint: unknown model {shorten(wanted, 60)!r}; use a title from GET /sdapi/v1/sd-models."
            )
        current = self.generation.model_status()
        if current.loaded and current.ref == match.ref:
            return
        self.generation.load_model(match.ref)

    def options(self) -> dict[str, Any]:
        model = self.generation.model_status()
        entry = self._entry_for_ref(model.ref) if model.ref else None
        return {
            "sd_model_checkpoint": entry.title if entry else None,
            "sd_checkpoint_hash": entry.sha256 if entry else None,
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": self._clip_skip,
            "samples_format": "png",
            "samples_save": True,
            "outdir_samples": str(self.settings.gallery_images),
            "sd_lora": "None",
        }

    def set_options(self, values: dict[str, Any]) -> None:
        """Apply what this app has; other keys (Open WebUI posts the whole dict back) are ignored."""
        check_vae(values.get("sd_vae"))
        clip_skip = values.get("CLIP_stop_at_last_layers")
        if clip_skip is not None:
            clip_skip = check_clip_skip(clip_skip)
        wanted = values.get("sd_model_checkpoint")
        if wanted:
            self.select_model(str(wanted))
        if clip_skip is not None:
            self._clip_skip = clip_skip

    # --- listings ------------------------------------------------------------------------------

    def sampler_names(self) -> list[str]:
        """GET /samplers: the loaded model family's samplers by A1111's names (none loaded: SD's)."""
        return a1111_sampler_names(self.generation.model_status().family)

    def loras(self) -> list[dict[str, Any]]:
        return [
            {
                "name": info.name.rsplit("/", 1)[-1],
                "alias": info.name,
                "path": str(info.path),
                "metadata": dict(info.metadata),
            }
            for info in self.generation.list_loras().loras
        ]

    def refresh_loras(self) -> None:
        listing = self.generation.list_loras()
        for problem in listing.problems:
            log.info("LoRA folder: %s", problem)

    def png_info(self, image: str) -> dict[str, Any]:
        data = decode_image_field(image, self.max_upload_bytes)
        info = self.gallery.png_info(data)
        parsed = info.parsed
        items = {key: value for key, value in asdict(parsed).items() if value not in (None, [], {}, "")}
        return {"info": info.text or "", "items": {"parameters": info.text} if info.text else {}, "parameters": items}

    def cmd_flags(self) -> dict[str, Any]:
        flags = {}
        for key, value in asdict(self.settings).items():
            if key in SECRET_SETTINGS or key == "extra":
                continue
            flags[key] = str(value) if isinstance(value, os.PathLike) else value
        flags["api_auth"] = bool(self.settings.api_auth)
        return json.loads(json.dumps(flags, default=str))

    def memory(self) -> dict[str, Any]:
        return {"ram": _ram(), "cuda": _cuda(self.generation.engine.device)}


def _ram() -> dict[str, Any]:
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):
        return {"error": "not available on this system"}
    total = pages * page
    return {"free": free, "used": total - free, "total": total}


def _cuda(device) -> dict[str, Any]:
    if getattr(device, "type", "cpu") != "cuda":
        return {"error": f"running on {getattr(device, 'type', 'cpu')}: no CUDA memory"}
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": {"current": torch.cuda.memory_allocated(device), "peak": torch.cuda.max_memory_allocated(device)},
    }
