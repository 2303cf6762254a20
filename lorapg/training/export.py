"""Writing the trained LoRA as a kohya-format ``.safetensors`` with ``ss_*`` and ``modelspec.*`` metadata.

kohya's layout is what AUTOMATIC1111, Forge, ComfyUI and diffusers all load (DESIGN.md §5). The
metadata is what those tools (and civitai) show: base model, rank, alpha, trigger phrase, tag
frequency. The file is written under a temporary name and renamed, so a crash never leaves a
half-written LoRA in the list.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save as safetensors_bytes

from lorapg.atomic_files import atomic_write_bytes
from lorapg.diffusion.families import SD1, SD2, SDXL
from lorapg.diffusion.lora_formats import peft_to_kohya

BASE_MODEL_VERSION = {SD1: "sd_v1", SD2: "sd_v2", SDXL: "sdxl_base_v1-0"}
ARCHITECTURE = {
    SD1: "stable-diffusion-v1/lora",
    SD2: "stable-diffusion-v2-512/lora",
    SDXL: "stable-diffusion-xl-v1-base/lora",
}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def peft_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """``{"unet": unet, "text_encoder": te}`` -> ``unet.<path>.lora_A.weight`` … (diffusers/peft layout)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for key, tensor in get_peft_model_state_dict(module).items():
            state[f"{prefix}.{key}"] = tensor.detach().to("cpu", torch.float32)
    return state


def tag_frequency(captions: list[str], folder_key: str) -> str:
    """kohya's ``ss_tag_frequency``: ``{"<repeats>_<name>": {tag: count}}`` from comma-separated captions."""
    counts: Counter[str] = Counter()
    for caption in captions:
        # Each tag once per caption, in caption order (not a set's hash order): ties keep their first
        # appearance, so the same dataset gives the same metadata bytes in every process.
        counts.update(list(dict.fromkeys(tag.strip() for tag in caption.split(",") if tag.strip())))
    return json.dumps({folder_key: dict(counts.most_common())}, ensure_ascii=False)


def build_metadata(
    *,
    name: str,
    family: str,
    rank: int,
    alpha: float,
    trigger: str,
    captions: list[str],
    repeats: int,
    epochs: int,
    steps: int,
    resolution: tuple[int, int],
    started_at: float,
    base_model: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    now = time.time()
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": BASE_MODEL_VERSION.get(family, family),
        "ss_v2": str(family == SD2),
        "ss_output_name": name,
        "ss_tag_frequency": tag_frequency(captions, f"{repeats}_{trigger}"),
        "ss_num_train_images": str(len(captions) * repeats),
        "ss_num_epochs": str(epochs),
        "ss_steps": str(steps),
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_training_started_at": f"{started_at:.0f}",
        "ss_training_finished_at": f"{now:.0f}",
        "ss_sd_model_name": Path(base_model.rstrip("/")).name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE.get(family, family),
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.trigger_phrase": trigger,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    metadata.update(extra or {})
    return metadata


def export_kohya(
    state: dict[str, torch.Tensor],
    path: Path,
    *,
    family: str,
    alpha: float,
    metadata: dict[str, str],
    save_precision: str = "fp16",
    unet_config: Mapping[str, Any] | None = None,
) -> Path:
    """Convert a peft-layout state to kohya keys and write it atomically to ``path``.

    ``unet_config`` (the trained UNet's config) is required for SDXL, whose module names are the
    original SGM ones sd-scripts writes, numbered from the config's block and layer counts.
    """
    # SD 2.x uses SD 1.x's kohya prefixes (lora_unet_, lora_te_); only SDXL numbers its encoders.
    kohya = peft_to_kohya(state, alpha, SDXL if family == SDXL else SD1, unet_config)
    # The per-module .alpha scalars keep fp32: in fp16 an alpha such as 0.3 would round.
    return _write_lora(kohya, path, metadata, save_precision, keep_suffixes=(".alpha",))


def export_transformer_lora(
    state: dict[str, torch.Tensor],
    path: Path,
    *,
    rank: int,
    alpha: float,
    metadata: dict[str, str],
    save_precision: str = "fp16",
) -> Path:
    """A Flux.1 / SD 3.5 LoRA in diffusers' peft layout (``transformer.<module>.lora_A.weight``), atomically.

    It is what ``FluxPipeline`` / ``StableDiffusion3Pipeline.load_lora_weights`` read (diffusers ignores
    kohya-named SD 3 keys), and what ComfyUI, Forge and ai-toolkit load for these families. The layout
    has no ``.alpha`` tensors and loaders then take alpha = rank, so the alpha ÷ rank scale is baked
    into ``lora_B``: every loader applies the LoRA at the strength it trained with.
    """
    scale = alpha / rank
    tensors = {key: (tensor * scale) if ".lora_B." in key else tensor for key, tensor in state.items()}
    # The file's own alpha is its rank now; the alpha trained with is kept for the record.
    metadata = {**metadata, "ss_network_alpha": str(rank), "lorapg.trained_alpha": str(alpha)}
    return _write_lora(tensors, path, metadata, save_precision)


def _write_lora(
    tensors: dict[str, torch.Tensor],
    path: Path,
    metadata: dict[str, str],
    save_precision: str,
    keep_suffixes: tuple[str, ...] = (),
) -> Path:
    """Cast the tensors (but those whose key ends with one of ``keep_suffixes``) and write them atomically."""
    dtype = SAVE_DTYPES[save_precision]
    cast = {key: (t if key.endswith(keep_suffixes) else t.to(dtype)).contiguous() for key, t in tensors.items()}
    # A hidden .tmp name (never *.safetensors), so the LoRA library never lists a half-written file.
    return atomic_write_bytes(path, safetensors_bytes(cast, metadata=metadata))
