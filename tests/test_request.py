"""Checking generation parameters and parsing LoRA lists and A1111 prompt tags."""

from __future__ import annotations

import pytest

from lorapg.diffusion.adapters import check_scale
from lorapg.diffusion.request import (
    MAX_SEED,
    GenerationRequest,
    LoraRequest,
    extract_lora_tags,
    parse_lora_list,
    parse_seed,
    validate,
)
from lorapg.errors import UserError


def checked(**fields) -> GenerationRequest:
    return validate(GenerationRequest(prompt="x", **fields), native_size=512)


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
        LoraRequest("a", 0.7), LoraRequest("b", 1.0), LoraRequest("sub/c", 1.25)
    )
    text, loras = extract_lora_tags("a castle, <lora:ink:0.6> at night <lora:glow>")
    assert text == "a castle, at night"
    assert loras == (LoraRequest("ink", 0.6), LoraRequest("glow", 1.0))
    with pytest.raises(UserError, match="not a number"):
        extract_lora_tags("<lora:ink:strong>")
