"""Checking generation parameters and parsing LoRA lists and A1111 prompt tags."""

from __future__ import annotations

import pytest

from lorapg.diffusion.adapters import check_scale
from lorapg.diffusion.request import (
    MAX_SEED,
    GenerationRequest,
    LoraRequest,
    check_text,
    extract_lora_tags,
    parse_lora_list,
    parse_seed,
    validate,
)
from lorapg.errors import UserError


def checked(**fields) -> GenerationRequest:
    return validate(GenerationRequest(**{"prompt": "x", **fields}), native_size=512)


def test_defaults_fill_in_native_size_and_a_seed():
    request = checked()
    assert (request.width, request.height, request.steps) == (512, 512, 30)
    assert 0 <= request.seed <= MAX_SEED


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": 0}, "Steps must be 1–50, got 0"),
        ({"steps": 51}, "Steps must be 1–50, got 51"),
        ({"steps": "many"}, "Steps must be a whole number"),
        ({"width": 20}, "Width must be 32–2048"),
        ({"width": 100}, "multiple of 8, got 100 .try 96"),
        ({"height": 99999}, "Height must be 32–2048"),
        ({"seed": 2**32}, "outside 0–4294967295"),
        ({"seed": -2}, "outside 0–4294967295"),
        ({"seed": "abc"}, "not a whole number"),
        ({"seed": 1.5}, "not a whole number"),
        ({"batch_size": 5}, "Batch size must be 1–4"),
        ({"guidance_scale": "x"}, "CFG scale must be a number"),
        ({"guidance_scale": float("nan")}, "CFG scale must be a number, got nan"),
        ({"guidance_scale": float("inf")}, "CFG scale must be a number, got inf"),
        ({"guidance_scale": 30.5}, "CFG scale must be 0–30, got 30.5"),
        ({"steps": float("nan")}, "Steps must be a whole number, got nan"),
        ({"steps": True}, "Steps must be a whole number, got True"),
        ({"width": [64]}, r"Width must be a whole number, got \[64\]"),
        ({"seed": "9" * 500}, r"Seed '9+… \(\d+ characters\) is not a whole number"),
        ({"sampler": ["Euler a"]}, "Sampler must be text"),
        ({"prompt": None}, "Prompt must be text, got null"),
        ({"prompt": ["a", "cat"]}, "Prompt must be text, got list"),
        ({"prompt": "a\ud83d cat"}, r"Prompt contains a lone UTF-16 surrogate \(U\+D83D\) at position 1"),
        ({"prompt": "a\x00cat"}, r"Prompt contains a null character \(U\+0000\) at position 1"),
        ({"negative_prompt": {"a": 1}}, "Negative prompt must be text, got dict"),
        ({"sampler": "Magic"}, "Unknown sampler 'Magic'"),
        ({"seed": MAX_SEED, "batch_size": 2}, "runs past"),
    ],
)
def test_bad_parameters_give_clear_messages(fields, message):
    with pytest.raises(UserError, match=message):
        checked(**fields)


def test_seed_forms():
    assert parse_seed(None) is None and parse_seed("") is None and parse_seed(-1) is None
    assert parse_seed("42") == 42 and parse_seed(42.0) == 42 and parse_seed(MAX_SEED) == MAX_SEED


@pytest.mark.parametrize("scale", [-0.1, 1.51, "high"])
def test_lora_scale_range(scale):
    with pytest.raises(UserError, match="LoRA style: scale"):
        check_scale("style", scale)
    assert check_scale("style", 1.5) == 1.5 and check_scale("style", 0) == 0.0


def test_lora_lists_and_prompt_tags():
    assert parse_lora_list("a:0.7, b, sub/c:1.25") == (
        LoraRequest("a", 0.7),
        LoraRequest("b", 1.0),
        LoraRequest("sub/c", 1.25),
    )
    text, loras = extract_lora_tags("a castle, <lora:ink:0.6> at night <lora:glow>")
    assert text == "a castle, at night"
    assert loras == (LoraRequest("ink", 0.6), LoraRequest("glow", 1.0))
    with pytest.raises(UserError, match="not a number"):
        extract_lora_tags("<lora:ink:strong>")


def test_every_range_maximum_is_a_valid_request():
    """What the widgets offer and Reuse fills in, validation takes: one range, everywhere."""
    request = checked(steps=50, guidance_scale=30, width=2048, height=2048, batch_size=4, seed=MAX_SEED - 3)
    assert (request.steps, request.guidance_scale, request.width, request.batch_size) == (50, 30.0, 2048, 4)
    assert checked(guidance_scale=25).guidance_scale == 25.0
    assert check_scale("style", 1.5) == 1.5


def test_prompt_length_limit_names_the_setting_and_counts_both_prompts():
    assert validate(GenerationRequest(prompt="a" * 100, negative_prompt="b" * 100), 512, max_prompt_chars=100)
    limit = r"Prompt is 101 characters, over the limit of 100 \(setting max_prompt_chars\)"
    with pytest.raises(UserError, match=limit):
        validate(GenerationRequest(prompt="a" * 101), 512, max_prompt_chars=100)
    with pytest.raises(UserError, match="Negative prompt is 101 characters"):
        validate(GenerationRequest(prompt="a", negative_prompt="b" * 101), 512, max_prompt_chars=100)
    assert validate(GenerationRequest(prompt="a" * 10_000), 512).prompt == "a" * 10_000  # 0: no limit


def test_text_checks_keep_ordinary_text_and_refuse_long_values_shortly():
    assert check_text("Prompt", "café, 猫, emoji 🦊\nline two\ttab") == "café, 猫, emoji 🦊\nline two\ttab"
    assert check_text("Negative prompt", None, optional=True) == ""
    with pytest.raises(UserError) as refused:
        checked(steps="x" * 10_000_000)
    assert len(str(refused.value)) < 100  # a 10 MB value is not echoed back
