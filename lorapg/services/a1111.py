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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lorapg.config import Settings
from lorapg.diffusion.request import GenerationRequest, parse_seed
from lorapg.diffusion.samplers import SAMPLERS
from lorapg.errors import UserError, shorten
from lorapg.gallery.a1111 import format_parameters
from lorapg.hashing import model_hash
from lorapg.jobs import RUNNING
from lorapg.limits import BATCH_SIZE, SEED
from lorapg.outputs import image_record, record_in_gallery
from lorapg.services.gallery import GalleryService
from lorapg.services.generation import GenerationService

log = logging.getLogger(__name__)

AUTOMATIC = "automatic"
# A1111 1.10's schedule names (lower case in the API, a label in the UI) that this app can run.
SCHEDULES = {AUTOMATIC: "Automatic", "karras": "Karras"}
MAX_N_ITER = 16  # A1111's UI allows 100; a REST caller asking for more is most likely a mistake
# Settings whose values hold secrets: never echoed by cmd-flags.
SECRET_SETTINGS = {"auth", "api_auth", "llm_api_key"}


@dataclass(frozen=True)
class Txt2ImgParams:
    """The txt2img fields this app acts on, as A1111 names them (the route's model fills it)."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
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
    send_images: bool = True
    save_images: bool = False


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


def a1111_sampler_names() -> list[str]:
    """Sampler names as A1111 1.10 lists them: without the schedule ("DPM++ 2M", not "... Karras")."""
    return list(dict.fromkeys(sampler.a1111_sampler for sampler in SAMPLERS.values()))


def resolve_sampler(name: str | None, scheduler: str | None) -> str:
    """This app's sampler for A1111's sampler name + scheduler, e.g. ("DPM++ 2M", "karras").

    A1111 >= 1.8 also accepts the old combined names ("DPM++ 2M Karras") and then ignores
    ``scheduler`` "automatic"; so does this.
    """
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
        self._interrupts = 0  # bumped by interrupt(): a txt2img call seeing a change stops its batch
        self._job_timestamp = ""

    # --- txt2img -------------------------------------------------------------------------------

    def txt2img(self, params: Txt2ImgParams) -> Txt2ImgResult:
        """Run ``n_iter`` batches through the job queue, one job per batch, as A1111 does."""
        if params.n_iter not in range(1, MAX_N_ITER + 1):
            raise UserError(f"n_iter must be 1–{MAX_N_ITER}, got {params.n_iter}.")
        if params.sd_model_checkpoint:
            self.select_model(params.sd_model_checkpoint)
        base = self._first_request(params)
        with self._lock:
            self._active_calls += 1
            interrupts_at_start = self._interrupts
            self._job_timestamp = time.strftime("%Y%m%d%H%M%S")
        try:
            results = []
            for iteration in range(params.n_iter):
                request = replace(base, seed=base.seed + iteration * base.batch_size)
                result = self.generation.generate(request, record=False)
                results.append(result)
                if result.cancelled and self._interrupts != interrupts_at_start:
                    break  # interrupt stops the whole call; skip only the current batch
        finally:
            with self._lock:
                self._active_calls -= 1
        return self._reply(params, results, interrupted=self._interrupts != interrupts_at_start)

    def _first_request(self, params: Txt2ImgParams) -> GenerationRequest:
        sampler = resolve_sampler(params.sampler_name or params.sampler_index, params.scheduler)
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
            steps=params.steps,
            guidance_scale=params.cfg_scale,
            sampler=sampler,
            width=params.width,
            height=params.height,
            seed=seed,
            batch_size=params.batch_size,
        )
        return self.generation.prepare(request)  # every field checked before anything is queued

    def _reply(self, params: Txt2ImgParams, results: list, interrupted: bool) -> Txt2ImgResult:
        images, infotexts, seeds = [], [], []
        for result in results:
            records = [image_record(result, index) for index in range(len(result.images))]
            texts = [format_parameters(record) for record in records]
            if params.save_images and result.images:
                record_in_gallery(self.gallery.store, result)
            if params.send_images:
                images += [png_base64(image, text) for image, text in zip(result.images, texts, strict=True)]
            infotexts += texts
            seeds += list(result.seeds[: len(result.images)] or result.seeds)
        first = results[0]
        request = first.request
        model = self.generation.model_status()
        entry = self._entry_for_ref(model.ref) if model.ref else None
        info = {
            "prompt": request.prompt,
            "all_prompts": [request.prompt] * len(seeds),
            "negative_prompt": request.negative_prompt,
            "all_negative_prompts": [request.negative_prompt] * len(seeds),
            "seed": seeds[0] if seeds else request.seed,
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(seeds),
            "subseed_strength": 0,
            "width": request.width,
            "height": request.height,
            "sampler_name": SAMPLERS[request.sampler].a1111_sampler,
            "scheduler": SAMPLERS[request.sampler].a1111_schedule,
            "cfg_scale": request.guidance_scale,
            "steps": request.steps,
            "batch_size": request.batch_size,
            "n_iter": params.n_iter,
            "sd_model_name": entry.model_name if entry else None,
            "sd_model_hash": entry.hash if entry else None,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "clip_skip": 1,
            "restore_faces": False,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": self._job_timestamp,
            "interrupted": interrupted,
        }
        return Txt2ImgResult(images, info, interrupted)

    # --- progress, interrupt, skip -------------------------------------------------------------

    def progress(self, skip_current_image: bool = False) -> dict[str, Any]:
        """A1111's global progress: 0 and job_count 0 when idle (clients poll for exactly that)."""
        job = self.generation.jobs.running()
        with self._lock:
            active = self._active_calls
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
                "skipped": False,
                "interrupted": bool(job and job.cancel_requested()),
                "job": job.kind if job else "",
                "job_count": max(active, 1 if job is not None else 0),
                "job_timestamp": self._job_timestamp,
                "job_no": 0,
                "sampling_step": step,
                "sampling_steps": total,
            },
            "current_image": current,
            "textinfo": job.message if job else None,
        }

    def interrupt(self) -> None:
        """Stop the running generation after its current step, and the rest of its txt2img call."""
        with self._lock:
            self._interrupts += 1
        self._cancel_running()

    def skip(self) -> None:
        """Stop the running batch; a txt2img call with more batches (n_iter) goes on with the next."""
        self._cancel_running()

    def _cancel_running(self) -> None:
        job = self.generation.jobs.running()
        if job is not None and job.kind == "generate":
            self.generation.cancel(job.id)

    # --- models and options --------------------------------------------------------------------

    def sd_models(self) -> list[ModelEntry]:
        return [self._entry_for_ref(ref) for ref in self.generation.model_choices()]

    def _entry_for_ref(self, ref: str) -> ModelEntry:
        path = Path(ref)
        is_file = path.suffix.lower() in {".safetensors", ".ckpt"} and path.is_file()
        name = path.name if path.exists() else ref
        short = None
        if is_file:
            short = model_hash(path)
        title = f"{name} [{short}]" if short else name
        return ModelEntry(
            title=title,
            model_name=path.stem if is_file else name,
            hash=short,
            sha256=None,
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
            "CLIP_stop_at_last_layers": 1,
            "samples_format": "png",
            "samples_save": True,
            "outdir_samples": str(self.settings.gallery_images),
            "sd_lora": "None",
        }

    def set_options(self, values: dict[str, Any]) -> None:
        """Apply what this app has; other keys (Open WebUI posts the whole dict back) are ignored."""
        wanted = values.get("sd_model_checkpoint")
        if wanted:
            self.select_model(str(wanted))

    # --- listings ------------------------------------------------------------------------------

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
