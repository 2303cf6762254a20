"""Shared fixtures: tiny models and LoRAs built once per test session, saved like a user's files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub; a test that needs it says so
# Tiny models on a 2-core machine run fastest, and most predictably, on one thread.
torch.set_num_threads(1)

from lorapg.diffusion.lora_formats import peft_to_kohya  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    build_sd15_pipeline,
    build_sdxl_pipeline,
    random_lora_state_dict,
    save_diffusers_lora,
)

ARTIFACTS = Path(__file__).parent / "artifacts"  # screenshots a human may want to look at


# The modules that take longest (measured with --durations), longest first. scripts/test.sh hands
# modules to its xdist workers in collection order (--dist loadfile --no-loadscope-reorder): started
# first, they run beside the many short modules instead of being the last thing a worker still does.
LONGEST_MODULES = (
    "test_demo_model.py",
    "test_cli_exit.py",
    "test_api_fuzz.py",
    "test_training_distributed.py",
    "test_ray_workers.py",
    "test_browser_spaces.py",
    "test_prompting_backends.py",
    "test_prompt_service.py",
    "test_app_shutdown.py",
    "test_training_export.py",
    "test_cli.py",
)


def _longest_first(items) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_MODULES)}
    # sort is stable: within a module, and among the other modules, the collection order stays.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_collection_modifyitems(config, items) -> None:
    """Longest modules first; tests marked ``gpu`` skip, saying why, where torch sees no CUDA device."""
    _longest_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD 1.x and SDXL diffusers folders plus a LoRA folder.

    LoRAs: ``style`` (diffusers layout) and ``style_kohya`` (the same weights in kohya layout),
    ``other`` (a second SD 1.x LoRA), ``xl_style`` (an SDXL LoRA), ``triggered`` (kohya metadata
    with trigger words), ``broken`` (a corrupt file) and ``notes`` with a sidecar JSON.
    """
    root = tmp_path_factory.mktemp("tiny")
    sd15 = build_sd15_pipeline(root / "sd15")
    sdxl = build_sdxl_pipeline(root / "sdxl")
    loras = root / "loras"
    state, config = random_lora_state_dict(sd15, rank=4, alpha=2.0, seed=1)
    save_diffusers_lora(loras / "style.safetensors", sd15, state, config)
    save_file(peft_to_kohya(state, 2.0, "sd1"), str(loras / "style_kohya.safetensors"))
    other, other_config = random_lora_state_dict(sd15, rank=4, alpha=4.0, seed=2)
    save_diffusers_lora(loras / "other.safetensors", sd15, other, other_config)
    xl_state, xl_config = random_lora_state_dict(sdxl, rank=4, alpha=4.0, seed=3)
    save_diffusers_lora(loras / "xl" / "xl_style.safetensors", sdxl, xl_state, xl_config)
    save_file(
        peft_to_kohya(other, 4.0, "sd1"),
        str(loras / "triggered.safetensors"),
        metadata={
            "ss_base_model_version": "sd_v1",
            "ss_tag_frequency": json.dumps({"10_zqstyle": {"zqstyle": 12, "1girl": 7, "outdoors": 3}}),
        },
    )
    save_file(peft_to_kohya(other, 4.0, "sd1"), str(loras / "notes.safetensors"))
    (loras / "notes.json").write_text(json.dumps({"activation text": "inkwash, brush", "description": "ink"}))
    (loras / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return {"sd15": root / "sd15", "sdxl": root / "sdxl", "loras": loras, "root": root}
