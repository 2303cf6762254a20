"""Resolving a base model reference: hub ids, folders, single files, refusals."""

from __future__ import annotations

import pytest
import torch

from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.model_source import FOLDER, HUB, SINGLE_FILE, resolve_model_source
from lorapg.errors import UserError


def test_kinds(tiny_models):
    assert resolve_model_source(str(tiny_models["sd15"])).kind == FOLDER
    assert resolve_model_source("stable-diffusion-v1-5/stable-diffusion-v1-5").kind == HUB


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickled_checkpoints_are_refused_unless_allowed(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(UserError, match="pickled checkpoint.*--allow-pickle"):
        resolve_model_source(str(path))
    assert resolve_model_source(str(path), allow_pickle=True).kind == SINGLE_FILE


@pytest.mark.parametrize("ref", ["./models/nothing-here", "/no/such/model.safetensors", "models/a/b/c"])
def test_missing_paths_say_so(ref):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_source(ref)


def test_folder_without_model_index_and_empty_ref(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(UserError, match="No base model"):
        resolve_model_source("  ")


def test_corrupt_and_non_sd_single_files(tmp_path, tiny_models):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable .safetensors"):
        resolve_model_source(str(corrupt))
    with pytest.raises(UserError, match="does not look like a Stable Diffusion checkpoint"):
        resolve_model_source(str(tiny_models["loras"] / "style.safetensors"))


def test_unreachable_hub_is_a_clear_message(tiny_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="hub cannot be reached|not found on the Hugging Face hub"):
        engine.load_model("someone/not-a-cached-model")
    assert engine.model is None


@pytest.mark.parametrize(("family_key", "expected"), [("sd15", "sd1"), ("sdxl", "sdxl")])
def test_single_file_checkpoints_load_with_family_detected(tiny_models, tmp_path, family_key, expected):
    """A civitai-style single .safetensors file loads (configs from a local folder: we are offline)."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from lorapg.diffusion.request import GenerationRequest
    from tests.ldm_checkpoint import write_ldm_checkpoint

    original = DiffusionPipeline.from_pretrained(str(tiny_models[family_key]))
    checkpoint = write_ldm_checkpoint(original, tmp_path / "model.safetensors")
    source = resolve_model_source(str(checkpoint))
    assert source.kind == SINGLE_FILE and source.family == expected

    def image(ref: str, config: str | None):
        engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32,
                                 single_file_config=config)
        engine.load_model(ref)
        assert engine.model.family == expected
        result = engine.generate(GenerationRequest(prompt="a lighthouse", steps=2, seed=5))
        return np.asarray(result.images[0])

    from_single_file = image(str(checkpoint), str(tiny_models[family_key]))
    assert np.array_equal(from_single_file, image(str(tiny_models[family_key]), None))
