"""Loading a Stable Diffusion pipeline (SD 1.x, SD 2.x, SDXL) from a resolved model source."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from lorapg.diffusion.families import SD1, SD2, SDXL
from lorapg.diffusion.model_source import FOLDER, HUB, ModelSource
from lorapg.errors import UserError

log = logging.getLogger(__name__)

_SINGLE_FILE_CLASS = {SD1: StableDiffusionPipeline, SD2: StableDiffusionPipeline, SDXL: StableDiffusionXLPipeline}


def load_pipeline(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    *,
    single_file_config: str | None = None,
    on_status: Callable[[str], None] | None = None,
    keep_on_cpu: bool = False,
) -> tuple[DiffusionPipeline, str]:
    """Load, move to ``device`` and configure attention; returns the pipeline and its family.

    ``keep_on_cpu``: leave the weights in CPU RAM; the residency manager moves them when used.
    """
    status = on_status or (lambda message: None)
    if source.kind == HUB:
        status(f"Downloading {source.ref} from the Hugging Face hub (progress in the console)…")
        folder = download_from_hub(source.ref, device)
        pipe = _from_folder(folder, dtype)
    elif source.kind == FOLDER:
        status(f"Loading {source.display_name}…")
        pipe = _from_folder(str(source.path), dtype)
    else:
        status(f"Loading single-file checkpoint {source.display_name}…")
        pipe = _from_single_file(source, dtype, single_file_config)
    family = pipeline_family(pipe)
    pipe.set_progress_bar_config(disable=True)
    if not keep_on_cpu:
        pipe.to(device)
    _configure_attention(pipe, device)
    return pipe, family


def pipeline_family(pipe: DiffusionPipeline) -> str:
    if isinstance(pipe, StableDiffusionXLPipeline):
        return SDXL
    if isinstance(pipe, StableDiffusionPipeline):
        # SD 2.x text encoders (OpenCLIP ViT-H) are 1024 wide; SD 1.x (CLIP ViT-L) 768.
        return SD2 if pipe.unet.config.cross_attention_dim == 1024 else SD1
    raise UserError(f"{type(pipe).__name__} is not a Stable Diffusion 1.x/2.x or SDXL text-to-image pipeline.")


def download_from_hub(repo_id: str, device: torch.device) -> str:
    """Download into the standard HF cache (tqdm bars in the console) and return the folder."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    variant = "fp16" if device.type == "cuda" else None
    try:
        try:
            return DiffusionPipeline.download(repo_id, use_safetensors=True, variant=variant)
        except ValueError:
            # Not every repo publishes an fp16 variant; the full-precision files work everywhere.
            return DiffusionPipeline.download(repo_id, use_safetensors=True)
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated on the Hugging Face hub: accept its license on the model page and "
            "log in with `hf auth login`, then try again."
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} was not found on the Hugging Face hub. Check the spelling.") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, OSError) as exc:
        raise UserError(
            f"Could not download {repo_id}: the Hugging Face hub cannot be reached ({type(exc).__name__}). "
            "Check your network, or use a local diffusers folder or .safetensors file."
        ) from None


def _from_folder(folder: str, dtype: torch.dtype) -> DiffusionPipeline:
    try:
        return DiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None)
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load the diffusers model in {folder}: {exc}") from None


def _from_single_file(source: ModelSource, dtype: torch.dtype, config: str | None) -> DiffusionPipeline:
    pipeline_class = _SINGLE_FILE_CLASS.get(source.family or SD1, StableDiffusionPipeline)
    kwargs: dict = {"dtype": dtype}
    if config:
        kwargs.update(config=config, local_files_only=True)
    try:
        return pipeline_class.from_single_file(str(source.path), **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"Could not load {source.path.name}: {exc}. A single-file checkpoint needs its family's "
            "configuration files from the Hugging Face hub the first time it is loaded (a few KB); "
            "connect once, or use a diffusers folder."
        ) from None


def _configure_attention(pipe: DiffusionPipeline, device: torch.device) -> None:
    """PyTorch SDPA is diffusers' default; xformers is used on CUDA only when installed."""
    if device.type != "cuda" or importlib.util.find_spec("xformers") is None:
        return
    try:
        pipe.enable_xformers_memory_efficient_attention()
        log.info("xformers attention enabled")
    except Exception as exc:  # a broken xformers build must not stop generation: SDPA still works
        log.warning("xformers is installed but unusable (%s); using PyTorch SDPA", exc)
