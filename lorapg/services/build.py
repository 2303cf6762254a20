"""Composition: ``build_services(settings)`` builds every service and the objects they share.

The one place the objects that exist at run time are built: ``app.py``, the CLI and the REST API
all call it, then use only what it returns.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorapg.config import Settings
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.errors import UserError
from lorapg.gallery.store import GalleryStore
from lorapg.hosting.space_policy import SpacePolicy, space_policy
from lorapg.hosting.visitors import Visitors
from lorapg.hosting.zerogpu import zero_gpu_enabled
from lorapg.jobs import JobQueue
from lorapg.notifications import webhook_from_settings
from lorapg.residency import GB, POLICIES, ResidencyManager, format_bytes, parse_size
from lorapg.services.gallery import GalleryService
from lorapg.services.prompts import PromptService
from lorapg.services.workers import Worker, WorkerPool

if TYPE_CHECKING:  # these import torch and diffusers: only when engines are built
    from lorapg.diffusion.engine import DiffusionEngine
    from lorapg.services.captions import CaptionService
    from lorapg.services.generation import GenerationService
    from lorapg.services.training import TrainingService
    from lorapg.services.upscale import UpscaleService


def configure_logging(verbose: bool = False, *, tracebacks: bool = True) -> None:
    """``tracebacks=False`` (the CLI without --verbose): a failure logs one line; the CLI prints the
    error itself, and a user gets one line per problem."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not tracebacks:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_drop_traceback)
    # transformers prints a per-key "load report" table for every LoRA it injects; it is noise to users.
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    # Per-component "Loading weights" bars are noise; hub download bars (huggingface_hub) stay on.
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    # Loading a second LoRA into the same model is exactly what multi-LoRA means, not a mistake.
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    for noisy in ("httpx", "urllib3", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Adding an adapter to a model that already holds others makes diffusers list the others' keys
    # as "missing": expected with multi-LoRA, alarming to users.
    logging.getLogger("diffusers.loaders").setLevel(logging.ERROR)


def _drop_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


@dataclass
class Services:
    """Every service and every object they share. Field names ``service`` (generation) and
    ``gallery`` (the store) are the ones callers and tests used before the services moved here."""

    settings: Settings
    policy: SpacePolicy  # what hosting for visitors (a Space) changes; see lorapg/hosting/space_policy.py
    library: LoraLibrary
    jobs: JobQueue  # one queue: prompt writing and training never compute on the GPU next to generation
    gallery: GalleryStore
    gallery_service: GalleryService
    visitors: Visitors
    prompts: PromptService | None = None  # prompt tools (LLM enhance / rewrite); None when built with prompts=False
    engine: DiffusionEngine | None = None  # None when built with engines=False
    residency: ResidencyManager | None = None  # None on CPU and on ZeroGPU (nothing to share)
    service: GenerationService | None = None  # generation; None when built with engines=False
    training: TrainingService | None = None  # the Train tab's service; None when built with engines=False
    captions: CaptionService | None = None  # auto-captioning and caption editing; None with engines=False
    workers: WorkerPool | None = None  # one engine per device (--devices), ``engine`` first; None with engines=False
    upscale: UpscaleService | None = None  # upscaler models (A1111's Extras); None with engines=False
    # With --ray: the thread that adds workers joining the cluster while the app runs (WorkerDiscovery).
    discovery: Any = None

    def close(self, timeout: float | None = None) -> bool:
        """Stop the background threads: worker discovery, then the job queue (``JobQueue.close``: its
        jobs are cancelled), both within the one ``timeout``; True once every thread has exited."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stopped = self.discovery.stop(timeout) if self.discovery is not None else True
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.jobs.close(left) and stopped


def build_services(
    settings: Settings, *, record_results: bool = True, engines: bool = True, prompts: bool = True
) -> Services:
    """``record_results``: save every finished generation into the gallery (the UI does; the CLI
    writes ``--out`` first and records afterwards unless told not to). ``engines=False``: no
    diffusion engine, generation or training, and no torch import for them; ``prompts=False`` (only
    with ``engines=False``): no prompt tools either, whose "auto" backend choice asks torch for the
    device. The CLI's gallery commands build neither and stay quick."""
    policy = space_policy(settings)
    # Checked first: a bad --notify-webhook is refused at start-up, before minutes of model loading.
    notifier = webhook_from_settings(settings) if engines else None
    devices, train_worker = None, 0
    if engines:
        from lorapg.devices import set_cpu_threads

        # Before the job queue's threads start: torch's CPU thread count is set as it was before
        # any worker thread existed, so results match across runs.
        set_cpu_threads(settings.threads)
        devices, train_worker = worker_devices(settings)  # a device that does not exist: refused here
        if settings.devices is not None:
            # `devices` overrides `device`: whatever reads `device` (the prompt LLM, training) gets the first.
            settings.device = str(devices[0])
    library = LoraLibrary(settings.lora_dir)
    # Workers on other machines (--ray): found now, each a worker thread on the queue after the local ones.
    remote = remote_workers(settings) if engines else []
    # One worker thread per device, all on this one queue (lorapg/jobs.py).
    labels = [str(device) for device in devices] + [engine.device for engine in remote] if devices else None
    jobs = JobQueue(devices=labels, may_grow=bool(settings.ray) and engines)
    gallery = GalleryStore(settings.gallery_db, settings.gallery_images, keep=settings.gallery_keep)
    gallery_service = GalleryService(
        gallery,
        library,
        shared=policy.shared_gallery,
        max_query_chars=settings.max_prompt_chars,
        upscaler_models=upscaler_model_names(settings),
    )
    visitors = Visitors(private=policy.private_visitors)
    locked = policy.settings_locked
    if not engines:
        writer = PromptService(settings, library, jobs, settings_locked=locked) if prompts else None
        return Services(settings, policy, library, jobs, gallery, gallery_service, visitors, prompts=writer)
    from lorapg.outputs import record_in_gallery
    from lorapg.services.captions import CaptionService
    from lorapg.services.generation import GenerationService
    from lorapg.services.training import TrainingService
    from lorapg.services.upscale import UpscaleService

    # Each device its own engine (pipeline, LoRA state) under its own residency budget.
    pool = WorkerPool([Worker(i, str(d), build_engine(settings, library, d)) for i, d in enumerate(devices)])
    pool.workers += [Worker(len(devices) + i, engine.device, engine) for i, engine in enumerate(remote)]
    engine, device = pool.primary.engine, devices[0]
    residency = engine.residency
    if len(pool) > 1:
        logging.getLogger(__name__).info("generation workers: %s", ", ".join(pool.devices))
    sink = (lambda result, job: record_in_gallery(gallery, result, job.id, job.owner)) if record_results else None
    service = GenerationService(
        settings, engine, library, jobs, result_sink=sink, offered_models_only=locked, workers=pool
    )
    # Shares the job queue so an in-process LLM never computes on the GPU next to diffusion.
    writer = PromptService(settings, library, jobs, engine=engine, settings_locked=locked)
    # Training holds its device's worker (the first by default); the other workers keep generating.
    given = settings.devices is not None  # else training picks `device` itself, as before
    trainer_device = {"device": str(devices[train_worker]), "worker": train_worker} if given else {}
    # That worker's engine is only what training frees; its base model is the one the user chose.
    training = TrainingService(
        settings,
        jobs,
        pool.engine(train_worker),
        max_steps=policy.train_max_steps,
        notifier=notifier,
        models=service,
        **trainer_device,
    )
    # The same datasets (per visitor where visitors are kept apart) and the same GPU queue as training.
    # On ZeroGPU the GPU exists only inside a GPU call; the captioner runs on the CPU there.
    caption_device = "cpu" if zero_gpu_enabled() else str(device)
    captions = CaptionService(settings, training.dataset_store, jobs, residency=residency, device=caption_device)
    return Services(
        settings,
        policy,
        library,
        jobs,
        gallery,
        gallery_service,
        visitors,
        prompts=writer,
        discovery=worker_discovery(settings, service),
        engine=engine,
        residency=residency,
        service=service,
        training=training,
        captions=captions,
        workers=pool,
        # Through the GalleryService: a gallery image may be upscaled by whoever the Gallery shows it to.
        upscale=UpscaleService(settings, engine.upscalers, jobs, gallery_service),
    )


def remote_workers(settings: Settings) -> list:
    """The lorapg workers on the Ray cluster ``settings.ray`` (none without it; Ray is imported only then)."""
    if not settings.ray:
        return []
    from lorapg.services.ray_workers import remote_engines

    return remote_engines(settings.ray)


def worker_discovery(settings: Settings, service: GenerationService):
    """With ``--ray``: the started thread that adds workers joining the cluster while the app runs (and
    lists the ones that leave as lost); None without it."""
    if not settings.ray:
        return None
    from lorapg.services.ray_workers import WorkerDiscovery, connect

    return WorkerDiscovery(connect(settings.ray), service).start()


def upscaler_model_names(settings: Settings):
    """The names of the upscaler models in the folder the engines read (re-read on each call), so
    Reuse keeps a hires upscaler a PNG names when that model is here. Listing loads nothing."""
    from lorapg.diffusion.upscalers import UpscalerLibrary

    folder = UpscalerLibrary(settings.models_dir / "upscalers")
    return lambda: [item.name for item in folder.files()]


def worker_devices(settings: Settings) -> tuple[list, int]:
    """The generation workers' devices (``devices``, else the one ``device``) and the index of the one
    training runs on (``train_device``); a device that does not exist is refused, naming the setting."""
    from lorapg.devices import parse_devices, training_worker

    devices = parse_devices(settings.devices, settings.device)
    if len(devices) > 1 and zero_gpu_enabled():
        raise UserError("Setting devices lists several devices, but ZeroGPU lends one GPU per call; remove it.")
    if len(devices) > 1 and settings.compile_unet:  # each worker's first generation would compile at once
        raise UserError(
            "Settings compile_unet (--compile) and devices (several) do not go together: torch.compile is not "
            "thread-safe; drop --compile or list one device."
        )
    return devices, training_worker(settings.train_device, devices)


def build_worker_engine(settings: Settings, device) -> DiffusionEngine:
    """The engine of a worker on another machine (``python -m lorapg worker``): its own LoRA folder's
    library and one device, built as the app builds each of its own engines."""
    return build_engine(settings, LoraLibrary(settings.lora_dir), device)


def build_engine(settings: Settings, library: LoraLibrary, device) -> DiffusionEngine:
    """One device's diffusion engine, with that device's residency manager (None on CPU)."""
    from lorapg.devices import pick_dtype
    from lorapg.diffusion.controlnet_models import ControlNetLibrary
    from lorapg.diffusion.engine import DiffusionEngine
    from lorapg.diffusion.quantization import parse_plan
    from lorapg.diffusion.upscalers import UpscalerLibrary

    residency = build_residency(settings, device)
    # Upscaler models for the hires fix and the Upscale tab, on this engine's device and memory budget.
    upscalers = UpscalerLibrary(
        settings.models_dir / "upscalers",
        allow_pickle=settings.allow_pickle,
        device=str(device),
        residency=residency,
        tile=settings.upscale_tile,
    )
    return DiffusionEngine(
        library,
        device,
        pick_dtype(device, settings.dtype),
        allow_pickle=settings.allow_pickle,
        single_file_config=settings.single_file_config,
        preview_every=settings.preview_every,
        residency=residency,
        compile_unet=settings.compile_unet,
        controlnets=ControlNetLibrary(settings.models_dir / "controlnet", allow_pickle=settings.allow_pickle),
        annotators_dir=settings.models_dir / "annotators",
        upscalers=upscalers,
        max_image_pixels=settings.max_image_pixels,
        quantize=parse_plan(settings.quantize, settings.quantize_components),
        transformer_dtype=_transformer_dtype(settings, device),
    )


def _transformer_dtype(settings: Settings, device):
    """Flux.1 / SD 3.5's dtype: under ``--dtype auto`` bf16 on a GPU that has it (devices.pick_dtype).
    ZeroGPU lends only bf16-capable GPUs (A100, H200) and allows no CUDA query outside a GPU call: bf16."""
    import torch

    from lorapg.devices import pick_dtype
    from lorapg.diffusion.families import FLUX

    if zero_gpu_enabled() and settings.dtype == "auto" and device.type == "cuda":
        return torch.bfloat16
    return pick_dtype(device, settings.dtype, FLUX)


def build_upscale_service(settings: Settings) -> tuple[UpscaleService, JobQueue]:
    """The ``upscale`` command's service and its job queue alone: no diffusion engine, gallery or prompt
    tools, so the command starts quickly. The caller closes the queue."""
    from lorapg.devices import pick_device, set_cpu_threads
    from lorapg.diffusion.upscalers import UpscalerLibrary
    from lorapg.services.upscale import UpscaleService

    set_cpu_threads(settings.threads)
    library = UpscalerLibrary(
        settings.models_dir / "upscalers",
        allow_pickle=settings.allow_pickle,
        device=str(pick_device(settings.device)),
        tile=settings.upscale_tile,
    )
    jobs = JobQueue()
    return UpscaleService(settings, library, jobs), jobs


# Activations, the VAE decode and CUDA's own context need room beyond the weights.
ACTIVATION_RESERVE = 2 * GB


def build_residency(settings: Settings, device) -> ResidencyManager | None:
    """A residency manager on CUDA; on CPU there is no device memory to share, so none."""
    if settings.policy not in POLICIES:
        raise UserError(f"Unknown memory policy {settings.policy!r}; use one of {', '.join(POLICIES)}.")
    if settings.vram_budget != "auto":
        parse_size(settings.vram_budget)  # a typo is reported on any machine, not only on a GPU
    if device.type != "cuda":
        return None
    if zero_gpu_enabled():
        # ZeroGPU: each GPU call gets a whole GPU slice in its own process; there is nothing to share,
        # and asking CUDA for free memory outside a GPU call is not allowed there.
        return None
    import torch

    if settings.vram_budget == "auto":
        free, _total = torch.cuda.mem_get_info(device)
        budget = max(free - ACTIVATION_RESERVE, free // 2)
    else:
        budget = parse_size(settings.vram_budget)
    manager = ResidencyManager(budget, settings.policy, empty_cache=torch.cuda.empty_cache)
    logging.getLogger(__name__).info("GPU budget %s, policy %s", format_bytes(budget), settings.policy)
    return manager
