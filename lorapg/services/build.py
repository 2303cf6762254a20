"""Composition: build the engines and the service from settings (used by app.py and the CLI)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from lorapg.config import Settings
from lorapg.devices import pick_device, pick_dtype, set_cpu_threads
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.errors import UserError
from lorapg.gallery.store import GalleryStore
from lorapg.jobs import JobQueue
from lorapg.outputs import record_in_gallery
from lorapg.prompt_service import PromptService
from lorapg.residency import GB, POLICIES, ResidencyManager, format_bytes, parse_size
from lorapg.services import PlaygroundService
from lorapg.space_mode import SpacePolicy, space_policy
from lorapg.spaces_gpu import zero_gpu_enabled
from lorapg.training.service import TrainingService


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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


@dataclass
class Runtime:
    settings: Settings
    library: LoraLibrary
    engine: DiffusionEngine
    jobs: JobQueue
    service: PlaygroundService
    gallery: GalleryStore
    prompts: PromptService | None = None  # prompt tools (LLM enhance / rewrite presets)
    training: TrainingService | None = None  # the Train tab's service (same job queue: never overlaps generation)
    policy: SpacePolicy | None = None  # what hosting for visitors (a Space) changes; see lorapg/space_mode.py


def build_runtime(settings: Settings, *, record_results: bool = True) -> Runtime:
    """``record_results``: save every finished generation into the gallery (the UI does; the CLI
    writes ``--out`` first and records afterwards unless told not to)."""
    policy = space_policy(settings)
    set_cpu_threads(settings.threads)
    device = pick_device(settings.device)
    library = LoraLibrary(settings.lora_dir)
    engine = DiffusionEngine(
        library,
        device,
        pick_dtype(device, settings.dtype),
        allow_pickle=settings.allow_pickle,
        single_file_config=settings.single_file_config,
        preview_every=settings.preview_every,
        residency=build_residency(settings, device),
    )
    jobs = JobQueue()
    gallery = GalleryStore(settings.gallery_db, settings.gallery_images, keep=settings.gallery_keep)
    sink = (lambda result, job: record_in_gallery(gallery, result, job.id, job.owner)) if record_results else None
    locked = policy.settings_locked
    service = PlaygroundService(settings, engine, library, jobs, result_sink=sink, offered_models_only=locked)
    # Shares the job queue so an in-process LLM never computes on the GPU next to diffusion.
    prompts = PromptService(settings, library, jobs, engine=engine, settings_locked=locked)
    training = TrainingService(settings, jobs, engine, max_steps=policy.train_max_steps)
    return Runtime(settings, library, engine, jobs, service, gallery, prompts=prompts, training=training,
                   policy=policy)


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
