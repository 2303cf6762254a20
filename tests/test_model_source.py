"""Resolving a base model reference: hub ids, folders, single files, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.model_source import FOLDER, HUB, SINGLE_FILE, resolve_model_source
from lorapg.errors import UserError, shorten


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


def test_a_folder_with_pickled_bin_weights_loads_only_when_pickles_are_allowed(tiny_models, tmp_path):
    """A diffusers folder whose UNet is a .bin (a pickle) must not be unpickled behind the owner's back."""
    from safetensors.torch import load_file

    folder = tmp_path / "bin_model"
    shutil.copytree(tiny_models["sd15"], folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    refusing = DiffusionEngine(LoraLibrary(tmp_path), torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="pickled .bin weights.*--allow-pickle"):
        refusing.load_model(str(folder))
    allowing = DiffusionEngine(LoraLibrary(tmp_path), torch.device("cpu"), torch.float32, allow_pickle=True)
    assert allowing.load_model(str(folder)).family == "sd1"


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
    with pytest.raises(UserError, match="does not look like a Stable Diffusion or Flux checkpoint"):
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
        engine = DiffusionEngine(
            LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32, single_file_config=config
        )
        engine.load_model(ref)
        assert engine.model.family == expected
        result = engine.generate(GenerationRequest(prompt="a lighthouse", steps=2, seed=5))
        return np.asarray(result.images[0])

    from_single_file = image(str(checkpoint), str(tiny_models[family_key]))
    assert np.array_equal(from_single_file, image(str(tiny_models[family_key]), None))


# --- paths outside the models folder when others can reach the app (issue 13) -----------------------


def _refusal(ref: str, roots) -> str:
    with pytest.raises(UserError) as caught:
        resolve_model_source(ref, allowed_roots=roots)
    return str(caught.value)


def test_outside_paths_get_one_answer_whether_or_not_they_exist(tiny_models, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "secret").mkdir()  # exists, not a model: the owner would hear "no model_index.json"
    roots = (models,)
    answers = {
        ref: _refusal(ref, roots)
        for ref in [
            str(tmp_path / "secret"),
            str(tmp_path / "nothing"),
            str(tiny_models["sd15"]),
            str(models / ".." / "secret"),
            "/etc/passwd",
            "/no/such/file.safetensors",
        ]
    }
    for ref, answer in answers.items():
        # shorten(): a long path (pytest-xdist's deeper temp folders) is echoed cut, as any user value is.
        assert (
            answer == f"Model path {shorten(ref)} is outside this app's models folder. This app is reachable from "
            "other machines, so it loads local models only from there: pick one from the list."
        )
    # Inside the folder the usual checks and answers apply; a hub id stays a hub id.
    shutil.copytree(tiny_models["sd15"], models / "sd15")
    assert resolve_model_source(str(models / "sd15"), allowed_roots=roots).kind == FOLDER
    assert "does not exist" in _refusal(str(models / "missing"), roots)
    assert resolve_model_source("org/model", allowed_roots=roots).kind == HUB


def test_a_two_part_path_outside_is_a_hub_id_whether_or_not_it_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home" / "owner").mkdir(parents=True)  # "home/owner" exists relative to the working folder
    roots = (tmp_path / "models",)
    for ref in ("home/owner", "home/nobody"):
        source = resolve_model_source(ref, allowed_roots=roots)
        assert (source.kind, source.path) == (HUB, None)


def _service(tmp_path, **settings):
    from lorapg.config import load_settings
    from lorapg.services.build import build_services

    values = {
        "models_dir": str(tmp_path / "models"),
        "lora_dir": str(tmp_path / "models" / "loras"),
        "outputs": str(tmp_path / "out"),
        **settings,
    }
    return build_services(load_settings(None, values, environ={}))


def test_load_model_from_other_machines_does_not_reveal_which_paths_exist(tmp_path, monkeypatch):
    for name in ("SPACE_ID", "SYSTEM", "GRADIO_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "secret").mkdir()
    for exposed in ({"listen": True}, {"share": True, "auth": "a:b"}):
        runtime = _service(tmp_path, **exposed)
        try:
            answers = set()
            for ref in (str(tmp_path / "secret"), str(tmp_path / "nothing")):
                with pytest.raises(UserError, match="outside this app's models folder") as caught:
                    runtime.service.load_model(ref)
                answers.add(str(caught.value).replace(shorten(ref), "REF"))  # long temp paths are cut in the message
            assert len(answers) == 1
        finally:
            runtime.jobs.shutdown()
    # The owner on 127.0.0.1 may load any path, and hears what is wrong with it.
    runtime = _service(tmp_path)
    try:
        with pytest.raises(UserError, match="no model_index.json"):
            runtime.service.load_model(str(tmp_path / "secret"))
        with pytest.raises(UserError, match="does not exist"):
            runtime.service.load_model(str(tmp_path / "nothing"))
    finally:
        runtime.jobs.shutdown()


def test_a_server_name_other_than_the_loopback_counts_as_reachable():
    from lorapg.config import Settings
    from lorapg.hosting.space_policy import local_model_roots

    settings = Settings(models_dir=Path("m"), model="/owner/model")
    assert local_model_roots(settings, {}) is None
    assert local_model_roots(settings, {"GRADIO_SERVER_NAME": "127.0.0.1"}) is None
    assert local_model_roots(settings, {"GRADIO_SERVER_NAME": "0.0.0.0"}) == (Path("m"), Path("/owner/model"))
    assert local_model_roots(settings, {"SPACE_ID": "u/s", "SYSTEM": "spaces"}) is not None


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("a" * 5000, r"Base model is 5000 characters long; it can be at most 4096"),
        ("models/x\0y", "contains a control character"),
        ("org/\ud800model", "lone UTF-16 surrogate"),
        (["org/model"], "must be text"),
        ("/" + "a" * 300 + "/model", "cannot be read"),
    ],
)
def test_unusable_refs_are_refused_with_a_short_message(ref, message):
    with pytest.raises(UserError, match=message) as caught:
        resolve_model_source(ref)
    assert len(str(caught.value)) < 300  # never the whole 5000 characters back


def test_a_long_missing_path_is_shortened_in_the_message():
    ref = "/no/such/" + "x" * 3000
    with pytest.raises(UserError, match="does not exist") as caught:
        resolve_model_source(ref)
    assert len(str(caught.value)) < 200 and "3009 characters" in str(caught.value)
