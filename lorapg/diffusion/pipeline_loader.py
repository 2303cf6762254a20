"""Loading a pipeline (SD 1.x, SD 2.x, SDXL, SD 3.5, Flux.1) from a resolved model source."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from lorapg.diffusion.families import FLUX, SD1, SD2, SD3, SDXL, family_label, is_transformer_family
from lorapg.diffusion.model_source import (
    FOLDER,
    GGUF_SUFFIX,
    HUB,
    ModelSource,
    gguf_module,
    gguf_tensor_names,
    is_gguf,
    refuse_gguf_training,
)
from lorapg.diffusion.quantization import NONE, QuantizePlan, check_machine, check_plan, quantize_pipeline
from lorapg.errors import UserError

log = logging.getLogger(__name__)

# diffusers builds a model's modules under accelerate's init_empty_weights, which swaps
# nn.Module.register_parameter for the whole process: another pipeline built meanwhile on another thread
# (a second worker's first job, a training run) gets meta tensors and fails ("Cannot copy out of meta
# tensor"). So pipelines are built one at a time; downloads, quantization and moves to a device are not held.
_BUILDING = threading.Lock()

_SINGLE_FILE_CLASS = {SD1: StableDiffusionPipeline, SD2: StableDiffusionPipeline, SDXL: StableDiffusionXLPipeline}


def load_pipeline(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    *,
    single_file_config: str | None = None,
    on_status: Callable[[str], None] | None = None,
    keep_on_cpu: bool = False,
    quantize: QuantizePlan | None = None,
    app_wide_quantize: bool = False,
    training: bool = False,
    transformer_dtype: torch.dtype | None = None,
) -> tuple[DiffusionPipeline, str]:
    """Load, move to ``device`` and configure attention; returns the pipeline and its family.

    ``keep_on_cpu``: leave the weights in CPU RAM; the residency manager moves them when used.
    ``quantize``: how Flux.1 / SD 3.5's transformer and T5 encoder are stored (``--quantize``).
    ``app_wide_quantize``: ``quantize`` is the app's setting rather than a request for this load, so an
    SD 1.x/2.x/SDXL model (which it does not apply to) loads unquantized instead of being refused.
    ``training``: a training run loads (its errors name the run's setting).
    ``transformer_dtype``: the dtype of Flux.1 / SD 3.5 models when it differs from ``dtype`` (``--dtype auto``
    on a GPU with bf16: see devices.pick_dtype); the family is read from the file or model_index.json first.
    """
    status = on_status or (lambda message: None)
    if training and is_gguf(source):
        refuse_gguf_training(str(source.path))  # the run would fail later on a dtype cast, in diffusers' words
    plan = _without_gguf_transformer(quantize or QuantizePlan(), source, status)
    plan = _plan_for(plan, source.family, app_wide_quantize, status)
    # What the machine or a single file's family rules out is refused before gigabytes are read
    # (an app-wide plan only once the family is known: it may not apply to this model at all).
    if source.family is not None or not app_wide_quantize:
        check_machine(plan)
    if source.family is not None:
        check_plan(plan, source.family)
    if source.kind == HUB:
        status(f"Downloading {source.ref} from the Hugging Face hub (progress in the console)…")
        folder = download_from_hub(source.ref, device)
        dtype = _dtype_for(folder_family(folder), dtype, transformer_dtype)
        with _BUILDING:
            pipe = _from_folder(folder, dtype)
    elif source.kind == FOLDER:
        status(f"Loading {source.display_name}…")
        dtype = _dtype_for(folder_family(str(source.path)), dtype, transformer_dtype)
        with _BUILDING:
            pipe = _from_folder(str(source.path), dtype, allow_pickle=source.allow_pickle)
    else:
        status(f"Loading single-file checkpoint {source.display_name}…")
        dtype = _dtype_for(source.family, dtype, transformer_dtype)
        with _BUILDING:
            pipe = _from_single_file(source, dtype, single_file_config)
    family = pipeline_family(pipe)
    pipe.set_progress_bar_config(disable=True)
    plan = _plan_for(plan, family, app_wide_quantize, status)
    if plan.active:
        status(f"Quantizing {source.display_name} ({plan.describe()})…")
        quantize_pipeline(pipe, family, plan, device, dtype, keep_on_cpu=keep_on_cpu, training=training)
    if not keep_on_cpu:
        pipe.to(device)
    _configure_attention(pipe, device)
    return pipe, family


def _dtype_for(family: str | None, dtype: torch.dtype, transformer_dtype: torch.dtype | None) -> torch.dtype:
    return transformer_dtype if transformer_dtype is not None and is_transformer_family(family) else dtype


def folder_family(folder: str) -> str | None:
    """Flux.1 or SD 3.5 from a diffusers folder's model_index.json (its pipeline class); None otherwise."""
    try:
        class_name = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None  # loading reports an unreadable folder itself
    if not isinstance(class_name, str):
        return None
    return FLUX if class_name.startswith("Flux") else SD3 if class_name.startswith("StableDiffusion3") else None


def _plan_for(plan: QuantizePlan, family: str | None, app_wide: bool, status: Callable[[str], None]) -> QuantizePlan:
    """``plan``, or no quantization where an app-wide plan meets a UNet model (SD 1.x/2.x/SDXL).

    An app-wide ``--quantize`` must not lock every UNet model out until a restart; a plan asked for this
    very load (a training run's ``quantize``) is refused for them by ``check_plan`` instead.
    """
    if not (app_wide and plan.active and family is not None) or is_transformer_family(family):
        return plan
    _note_app_wide_skip(plan.describe())
    status(f"quantize applies to Flux.1 and SD 3.5 only; {family_label(family)} loads unquantized.")
    return QuantizePlan()


def _without_gguf_transformer(plan: QuantizePlan, source: ModelSource, status: Callable[[str], None]) -> QuantizePlan:
    """``plan`` without its transformer part when the transformer is a GGUF file: already quantized
    (Q8_0, Q4_K_S, …), it cannot be stored as NF4/fp8 on top. The T5 encoder (from --model-config) still is."""
    if not is_gguf(source) or plan.transformer == NONE:
        return plan
    _note_gguf_skip(plan.transformer)
    status(f"quantize={plan.transformer} skipped for the transformer: {source.path.name} is already GGUF-quantized.")
    return dataclasses.replace(plan, transformer=NONE)


@functools.cache
def _note_gguf_skip(mode: str) -> None:
    """Logged once per setting, as the SD families' note is."""
    log.info("quantize (%s) skipped for GGUF transformers: they are already quantized", mode)


@functools.cache
def _note_app_wide_skip(described: str) -> None:
    """Logged once per setting: every SD model loaded would otherwise repeat it."""
    log.info("quantize (%s) applies to Flux.1 and SD 3.5 models only; SD 1.x/2.x/SDXL load unquantized", described)


def pipeline_family(pipe: DiffusionPipeline) -> str:
    if isinstance(pipe, FluxPipeline):
        return FLUX
    if isinstance(pipe, StableDiffusion3Pipeline):
        return SD3
    if isinstance(pipe, StableDiffusionXLPipeline):
        return SDXL
    if isinstance(pipe, StableDiffusionPipeline):
        # SD 2.x text encoders (OpenCLIP ViT-H) are 1024 wide; SD 1.x (CLIP ViT-L) 768.
        return SD2 if pipe.unet.config.cross_attention_dim == 1024 else SD1
    raise UserError(
        f"{type(pipe).__name__} is not a Stable Diffusion 1.x/2.x, SDXL, SD 3.5 or Flux.1 text-to-image pipeline; "
        "load one of those."
    )


def download_from_hub(repo_id: str, device: torch.device) -> str:
    """Download into the standard HF cache (tqdm bars in the console) and return the folder."""
    variant = "fp16" if device.type == "cuda" else None
    with hub_errors(repo_id):
        try:
            return DiffusionPipeline.download(repo_id, use_safetensors=True, variant=variant)
        except ValueError:
            # Not every repo publishes an fp16 variant (Flux's do not); the full-precision files work everywhere.
            return DiffusionPipeline.download(repo_id, use_safetensors=True)


@contextlib.contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub's errors for ``repo_id`` into messages that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        yield
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: first
        raise UserError(
            f"{repo_id} is gated on the Hugging Face hub: accept its licence at https://huggingface.co/{repo_id} "
            "while logged in, then log in here with `hf auth login` (or set HF_TOKEN) and try again."
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} was not found on the Hugging Face hub. Check the spelling.") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, OSError) as exc:
        raise UserError(
            f"Could not download {repo_id}: the Hugging Face hub cannot be reached ({type(exc).__name__}). "
            "Check your network, or use a local diffusers folder or .safetensors file."
        ) from None


def _from_folder(folder: str, dtype: torch.dtype, *, allow_pickle: bool = False) -> DiffusionPipeline:
    # SD pipelines would load a safety checker; Flux has none, and diffusers warns about the argument.
    kwargs = {"safety_checker": None} if _has_component(folder, "safety_checker") else {}
    try:
        # Without --allow-pickle only .safetensors weights load: a folder's .bin files are pickles.
        # With it, diffusers' default (None): safetensors where present, .bin otherwise.
        only_safetensors = None if allow_pickle else True
        return DiffusionPipeline.from_pretrained(folder, dtype=dtype, use_safetensors=only_safetensors, **kwargs)
    except (OSError, ValueError) as exc:
        if not allow_pickle and any(Path(folder).glob("*/*.bin")):
            raise UserError(
                f"The diffusers model in {folder} has pickled .bin weights, which are not loaded silently: "
                "convert them to .safetensors, or start with --allow-pickle if you trust the files."
            ) from None
        raise UserError(f"Could not load the diffusers model in {folder}: {exc}") from None


def _has_component(folder: str, name: str) -> bool:
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # what loading did before: diffusers reports an unreadable folder itself
    return name in index


def _from_single_file(source: ModelSource, dtype: torch.dtype, config: str | None) -> DiffusionPipeline:
    if is_transformer_family(source.family):
        return _from_transformer_file(source, dtype, config)
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


# The repos whose text encoders, tokenizers and VAE complete a transformer-only file.
FLUX_DEV_REPO, FLUX_SCHNELL_REPO = "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"
SD35_LARGE_REPO = "stabilityai/stable-diffusion-3.5-large"
_TRANSFORMER_CLASSES = {
    FLUX: (FluxTransformer2DModel, FluxPipeline),
    SD3: (SD3Transformer2DModel, StableDiffusion3Pipeline),
}


def _from_transformer_file(source: ModelSource, dtype: torch.dtype, config: str | None) -> DiffusionPipeline:
    """A transformer file (original names or diffusers') + the other parts from ``config``.

    ``config`` (``--model-config``): a diffusers folder or hub id of the same family. Without one the
    family's reference repo is used (Flux: dev when the file has a guidance input, else schnell),
    which needs the hub.
    """
    name, label = source.path.name, family_label(source.family)
    transformer_class, pipeline_class = _TRANSFORMER_CLASSES[source.family]
    # A GGUF file's weights stay quantized in memory (diffusers' GGUFLinear) and are dequantized to the
    # app's dtype one layer at a time as it runs; diffusers has a torch fallback, so this runs on CPU too.
    quantized = {"quantization_config": _gguf_config(dtype)} if is_gguf(source) else {}
    if config:
        repo = config
    elif source.family == FLUX:
        repo = FLUX_DEV_REPO if _has_guidance_input(source.path) else FLUX_SCHNELL_REPO
    else:
        repo = SD35_LARGE_REPO
    local = os.path.isdir(repo)
    if not local and _hub_offline():
        raise UserError(
            f"{name} holds only a {label} transformer; its text encoders and VAE come from --model-config, and "
            f"the hub is offline. Pass --model-config with a {label} diffusers folder (e.g. a download of {repo})."
        )
    if config is None:
        log.info("%s: text encoders and VAE from %s (pass --model-config to choose)", name, repo)
    context = contextlib.nullcontext() if local else hub_errors(repo)
    with context:
        try:
            weights = _gguf_state_dict(source) if is_gguf(source) else str(source.path)
            transformer = transformer_class.from_single_file(
                weights, config=repo, subfolder="transformer", dtype=dtype, **quantized
            )
            return pipeline_class.from_pretrained(repo, transformer=transformer, dtype=dtype)
        except (ValueError, KeyError, RuntimeError) as exc:  # shapes or names that do not fit the config
            raise UserError(
                f"Could not load {name} with the parts of {repo} ({str(exc).splitlines()[0][:200]}). "
                f"Pass --model-config with the diffusers folder of the {label} model this file was made from."
            ) from None


def _gguf_state_dict(source: ModelSource) -> dict:
    """The GGUF file's tensors from diffusers' own GGUF reader, handed over as a state dict: diffusers picks
    its reader by the file name's suffix case-sensitively, so ``X.GGUF`` would go to torch.load (reading the
    whole file, then failing with an OSError)."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(source.path))
    except (OSError, ValueError) as exc:  # unreadable or changed since its header was checked
        raise UserError(
            f"Setting model: could not read {source.path.name} ({str(exc).splitlines()[0][:200]}); "
            "download it again or pick another file."
        ) from None


def _gguf_config(dtype: torch.dtype):
    gguf_module()  # a UserError saying `pip install gguf` before diffusers' ImportError
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=dtype)


def _has_guidance_input(path: Path) -> bool:
    """Flux dev (guidance-distilled) has a guidance embedder; schnell has none."""
    from safetensors import safe_open

    if path.suffix.lower() == GGUF_SUFFIX:
        keys = gguf_tensor_names(path)[0]
    else:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    return any("guidance_in." in key or "guidance_embedder." in key for key in keys)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _configure_attention(pipe: DiffusionPipeline, device: torch.device) -> None:
    """PyTorch SDPA is diffusers' default; xformers is used on CUDA only when installed."""
    if device.type != "cuda" or importlib.util.find_spec("xformers") is None:
        return
    try:
        pipe.enable_xformers_memory_efficient_attention()
        log.info("xformers attention enabled")
    except Exception as exc:  # a broken xformers build must not stop generation: SDPA still works
        log.warning("xformers is installed but unusable (%s); using PyTorch SDPA", exc)
