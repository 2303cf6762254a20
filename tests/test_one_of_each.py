"""One of each (issue 14, item 4): each concept is implemented once and every caller agrees with it.

Each test feeds the same input to every caller that used to have its own copy and checks that they
accept and refuse the same things: settings vs training configs (coercion, TOML), the Generate request
vs the A1111 reader vs the gallery's stripping (``<lora:…>`` tags), the request vs the demo tool
(NAME:SCALE), the Generate seed vs the LLM seed, and every out-of-memory path.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorapg import coercion, hashing
from lorapg.config import _coerce as setting_coerce
from lorapg.config import load_settings, read_toml
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import LoraRequest, extract_lora_tags, parse_lora_list, parse_seed
from lorapg.errors import UserError
from lorapg.gallery import GalleryStore
from lorapg.gallery.a1111 import parse_parameters
from lorapg.gallery.records import strip_lora_tags
from lorapg.lora_tags import find_lora_tags
from lorapg.residency import OutOfMemory, ResidencyManager, out_of_memory_as_user_error
from lorapg.services.gallery import GalleryService
from lorapg.services.prompts import _seed as llm_seed
from lorapg.training.config import coerce as training_coerce
from lorapg.training.config import load_config, read_toml_file


def outcome(function, *args):
    """The value, or "refused" for a UserError: what two callers must agree on."""
    try:
        return function(*args)
    except UserError:
        return "refused"


# --- coercion ---------------------------------------------------------------------------------


def test_a_fractional_port_is_refused_not_truncated(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"Setting 'port': 7860\.9 is not a valid int; write a whole number"):
        load_settings(overrides={"port": 7860.9}, environ={})
    config = tmp_path / "lorapg.toml"
    config.write_text("port = 7860.9\n", encoding="utf-8")
    with pytest.raises(UserError, match="'port'"):
        load_settings(config, environ={})
    assert load_settings(overrides={"port": "7861"}, environ={}).port == 7861
    assert load_settings(overrides={"port": 7862.0}, environ={}).port == 7862


@pytest.mark.parametrize(
    "value",
    [7860, "7860", " 7860 ", 7860.0, "7860.0", 7860.9, "7860.9", "nan", math.nan, math.inf, True, "seven", [1], None],
)
def test_settings_and_training_configs_read_whole_numbers_alike(value: object) -> None:
    assert outcome(setting_coerce, "port", value) == outcome(training_coerce, "epochs", value)
    assert outcome(setting_coerce, "port", value) in (7860, "refused")


@pytest.mark.parametrize("value", [0.5, "0.5", 2, "1e-3", math.nan, "nan", "inf", -math.inf, False, "x", None])
def test_settings_and_training_configs_read_numbers_alike(value: object) -> None:
    assert outcome(setting_coerce, "llm_timeout", value) == outcome(training_coerce, "alpha", value)


@pytest.mark.parametrize(
    "value", [True, False, "true", "FALSE", "1", "0", 1, 0, "yes", "No", "on", "off", "maybe", 2, "", None, 1.0]
)
def test_settings_and_training_configs_read_yes_no_alike(value: object) -> None:
    assert outcome(setting_coerce, "share", value) == outcome(training_coerce, "overwrite", value)


def test_nan_is_refused_by_settings_and_training_configs(tmp_path: Path) -> None:
    settings_file, training_file = tmp_path / "lorapg.toml", tmp_path / "train.toml"
    settings_file.write_text("llm_timeout = nan\n", encoding="utf-8")
    training_file.write_text('name = "fox"\nalpha = nan\n', encoding="utf-8")
    with pytest.raises(UserError, match="'llm_timeout'.*write a finite number"):
        load_settings(settings_file, environ={})
    with pytest.raises(UserError, match="'alpha'.*write a finite number"):
        load_config(training_file)


def test_switch_words_are_the_same_everywhere(tmp_path: Path) -> None:
    training_file = tmp_path / "train.toml"
    training_file.write_text('name = "fox"\noverwrite = "on"\nresume = "off"\n', encoding="utf-8")
    config = load_config(training_file)
    assert (config.overwrite, config.resume) == (True, False)
    assert load_settings(overrides={"share": "on"}, environ={"LORAPG_LISTEN": "off"}).share is True
    with pytest.raises(UserError, match="'share'.*write true or false"):
        load_settings(overrides={"share": "maybe"}, environ={})


def test_a_list_is_not_text_anywhere() -> None:
    with pytest.raises(UserError, match="'auth'"):
        setting_coerce("auth", ["user", "pass"])
    with pytest.raises(UserError, match="'trigger'"):
        training_coerce("trigger", ["fox"])


# --- TOML --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.mkdir(), p)[1], "is a folder, not a TOML file"),
        (lambda p: (p.write_text("port = [", encoding="utf-8"), p)[1], "is not valid TOML"),
        (lambda p: (p.write_bytes(b"port = '\xff'\n"), p)[1], "is not UTF-8 text"),
    ],
)
def test_one_toml_reader_for_settings_training_configs_and_presets(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path / "config.toml")
    for read in (read_toml, read_toml_file, coercion.read_toml):
        with pytest.raises(UserError, match=message):
            read(path)


# --- the LoRA-hash cache -----------------------------------------------------------------------


def _write_lora(path: Path, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    save_file({"lora_unet_x.lora_down.weight": torch.randn(2, 4, generator=generator)}, str(path))


def test_the_gallery_keeps_no_hash_cache_of_its_own(tmp_path: Path) -> None:
    """A file rewritten with its size and mtime kept (a restored backup) is seen after hashing.clear_cache()."""
    hashing.clear_cache()
    library = LoraLibrary(tmp_path / "loras")
    library.folder.mkdir(parents=True)
    lora = library.folder / "ink.safetensors"
    _write_lora(lora, seed=1)
    service = GalleryService(GalleryStore(tmp_path / "g.sqlite3", tmp_path / "images", keep=0), library)
    first = service._hash_of(lora)
    stat = lora.stat()
    _write_lora(lora, seed=2)  # the same shapes, so the same size
    os.utime(lora, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert lora.stat().st_size == stat.st_size
    hashing.clear_cache()
    assert service._hash_of(lora) == hashing.lora_hash(lora) != first


# --- <lora:…> tags -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "loras", "text"),
    [
        ("a castle, <lora:ink:0.6> at night <lora:glow>", [("ink", 0.6), ("glow", 1.0)], "a castle, at night"),
        ("<LoRA:Ink:0.5>, a fox", [("Ink", 0.5)], "a fox"),  # any case, as people type it
        ("a fox <lora:ink:0.5:0.3>", [("ink", 0.5)], "a fox"),  # A1111's second (UNet) multiplier
        ("a fox, <lora:ink:dyn=8:0.7>", [("ink", 0.7)], "a fox"),  # named arguments are skipped
        ("two  spaces kept,\n<lora:ink:1>\nnext line", [("ink", 1.0)], "two  spaces kept,\n\nnext line"),
    ],
)
def test_one_tag_parser_for_requests_png_info_and_the_gallery(prompt: str, loras, text: str) -> None:
    assert [(tag.name, tag.scale) for tag in find_lora_tags(prompt)] == loras
    stripped, requested = extract_lora_tags(prompt)
    assert [(lora.name, lora.scale) for lora in requested] == loras
    assert parse_parameters(prompt).loras == loras
    assert stripped == strip_lora_tags(prompt) == text


@pytest.mark.parametrize("scale", ["strong", "nan", "inf", "1e999"])
def test_a_tag_whose_scale_is_not_a_finite_number_is_refused_or_reported(scale: str) -> None:
    prompt = f"a fox <lora:ink:{scale}>"
    with pytest.raises(UserError, match=f"LoRA tag <lora:ink:{scale}>: scale '{scale}' is not a number"):
        extract_lora_tags(prompt)
    parsed = parse_parameters(prompt)
    assert parsed.loras == [] and any("not a number" in problem for problem in parsed.problems)


# --- NAME:SCALE ----------------------------------------------------------------------------------


def test_one_name_scale_parser_for_the_cli_the_ui_and_the_demo_tool() -> None:
    from lorapg.demo.__main__ import _lora_argument

    assert parse_lora_list("a:0.7, b, sub/c:1.25, C:/loras/d") == (
        LoraRequest("a", 0.7),
        LoraRequest("b", 1.0),
        LoraRequest("sub/c", 1.25),
        LoraRequest("C:/loras/d", 1.0),
    )
    assert _lora_argument("demo-ring:0.8") == ("demo-ring", 0.8)
    for spec in ("ink:1e999", "ink:-1e400"):
        with pytest.raises(UserError, match="is not a finite number"):
            parse_lora_list(spec)
        with pytest.raises(Exception, match="is not a finite number"):
            _lora_argument(spec)


# --- seeds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        -1,
        "-1",
        " -1 ",
        "random",
        0,
        "42",
        42.0,
        "42.0",
        2**32 - 1,
        2**32,
        -2,
        1.5,
        "x",
        math.nan,
        math.inf,
        True,
        [1],
        "9" * 500,
    ],
)
def test_the_generate_seed_and_the_llm_seed_read_alike(value: object) -> None:
    assert outcome(parse_seed, value) == outcome(llm_seed, value)


def test_seed_messages_name_the_field_and_say_what_to_do() -> None:
    with pytest.raises(UserError, match=r"^LLM seed 'nan' is not a whole number; use 0–4294967295 or -1 for random"):
        llm_seed(math.nan)
    with pytest.raises(UserError, match=r"^Seed 4294967296 is outside 0–4294967295; use -1 for a random seed\.$"):
        parse_seed(2**32)


# --- out of memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [OutOfMemory("fake"), torch.cuda.OutOfMemoryError("CUDA out of memory")])
def test_one_out_of_memory_translation(error: Exception) -> None:
    emptied = []
    refused = pytest.raises(UserError, match=r"^Out of GPU memory while testing\. Use less\.$")
    with refused, out_of_memory_as_user_error("while testing", "Use less.", lambda: emptied.append(True)):
        raise error
    assert emptied == [True]
    passed = pytest.raises(ValueError, match="not memory")
    with passed, out_of_memory_as_user_error("while testing", "Use less.", lambda: emptied.append(True)):
        raise ValueError("not memory")
    assert emptied == [True]  # other errors pass through untouched


def test_residency_moves_use_the_shared_translation() -> None:
    def full() -> None:
        raise OutOfMemory("fake")

    emptied = []
    manager = ResidencyManager(10**9, empty_cache=lambda: emptied.append(True))
    manager.register("unet", 10, to_gpu=full)
    refused = pytest.raises(UserError, match=r"^Out of GPU memory while moving unet onto the GPU\. Free GPU memory")
    with refused, manager.use("unet"):
        pass
    with pytest.raises(UserError, match=r"^Out of GPU memory even with the other models moved off the GPU\. "):
        manager.run_with_oom_retry(full)
    assert emptied


@pytest.mark.parametrize("field", ["steps", "width", "batch_size", "guidance_scale", "seed"])
def test_a_4000_digit_number_is_refused_without_being_echoed(field: str) -> None:
    from lorapg.diffusion.request import GenerationRequest, validate

    with pytest.raises(UserError) as refused:
        validate(GenerationRequest(prompt="a fox", **{field: "9" * 4000}), 512)
    message = str(refused.value)
    assert "9" * 100 not in message and ("is not a whole number" in message or "must be a" in message)
