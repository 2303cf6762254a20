"""The A1111 parameters text: what we write must be what A1111 writes, and what others wrote
must be read back even when parts of it are broken."""

from __future__ import annotations

import pytest

from lorapg.gallery import (
    ImageRecord,
    LoraUse,
    format_parameters,
    parse_parameters,
    record_from_parsed,
)
from lorapg.gallery.a1111 import format_number, tokenize_parameters_line

A1111_1_10 = (
    "masterpiece, 1girl <lora:add_detail:0.6>\n"
    "Negative prompt: lowres, bad hands\n"
    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
    "Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
    'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1'
)

# Fooocus 2.5 saving in the A1111 scheme: no LoRA tags, weights in their own field, full
# SHA-256 hashes, quoted tuples and multi-line raw prompts.
FOOOCUS_A1111 = (
    "a castle on a hill, dramatic light, highly detailed\n"
    "Negative prompt: blurry\n"
    "Steps: 30, Sampler: DPM++ 2M SDE Karras, Seed: 987654321, Size: 1152x896, "
    'CFG scale: 4, Sharpness: 2, ADM Guidance: "(1.5, 0.8, 0.3)", '
    "Model: juggernautXL_v8Rundiffusion, "
    "Model hash: aeb7e9e6897a1e58b10494bd989d001e3d4bc9b634633cd7b559838f612c2867, "
    "Performance: Speed, Scheduler: karras, VAE: Default (model), "
    'Raw prompt: "a castle on a hill,\\ndramatic light", Raw negative prompt: blurry, '
    'Lora hashes: "sd_xl_offset_example-lora_1.0: '
    '4852686128f953d0277d0793e2f0335352f96a919c9c16a09787d77f55cbdf6f", '
    'Lora weights: "sd_xl_offset_example-lora_1.0: 0.1", Version: Fooocus v2.5.5'
)


def record_with_loras() -> ImageRecord:
    return ImageRecord(
        prompt="a watercolor fox, autumn forest",
        negative_prompt="blurry, lowres",
        loras=[
            LoraUse("watercolor", 0.7, "0123456789ab"),
            LoraUse("fox_v2", 1.25, "89abcdef0123"),
            LoraUse("unused", 0.0, "ffffffffffff"),
        ],
        seed=42,
        steps=20,
        guidance_scale=7.5,
        sampler="Euler a",
        width=512,
        height=768,
        model_name="v1-5-pruned-emaonly",
        model_hash="6ce0161689",
        version="lorapg-0.1.0",
    )


def test_format_matches_a1111_layout() -> None:
    text = format_parameters(record_with_loras())
    assert text == (
        "a watercolor fox, autumn forest <lora:watercolor:0.7> <lora:fox_v2:1.25>\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
        'Lora hashes: "watercolor: 0123456789ab, fox_v2: 89abcdef0123", '
        "Version: lorapg-0.1.0"
    )


def test_tags_already_in_the_prompt_are_not_written_twice() -> None:
    record = ImageRecord(prompt="a fox <lora:ink:0.5>", loras=[LoraUse("ink", 0.5)])
    assert format_parameters(record).count("<lora:ink") == 1


def test_a1111_text_round_trips_byte_for_byte() -> None:
    parsed = parse_parameters(A1111_1_10)
    assert format_parameters(record_from_parsed(parsed)) == A1111_1_10


def test_round_trip_keeps_every_field_and_lora() -> None:
    original = record_with_loras()
    back = record_from_parsed(parse_parameters(format_parameters(original)))
    # LoRAs at scale 0 are not written (they do not change the image).
    assert back.loras == original.loras[:2]
    for name in (
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "guidance_scale",
        "sampler",
        "width",
        "height",
        "model_name",
        "model_hash",
        "version",
    ):
        assert getattr(back, name) == getattr(original, name), name


def test_multi_line_prompts_and_awkward_values_round_trip() -> None:
    original = ImageRecord(
        prompt='line one: a cat\nline two, with commas\n<not a tag> and "quotes"',
        negative_prompt="bad\nworse: yes",
        loras=[LoraUse("style", 0.5, None)],
        seed=0,
        steps=1,
        guidance_scale=1,
        sampler="DPM++ 2M SDE Karras",
        model_name='my "best": model, v2',
        version="lorapg-0.1.0",
    )
    text = format_parameters(original)
    assert 'Model: "my \\"best\\": model, v2"' in text
    assert "Sampler: DPM++ 2M SDE, Schedule type: Karras" in text
    parsed = parse_parameters(text)
    assert parsed.problems == []
    back = record_from_parsed(parsed)
    assert back.prompt == original.prompt
    assert back.negative_prompt == original.negative_prompt
    assert back.model_name == original.model_name
    assert back.sampler == "DPM++ 2M SDE Karras"
    assert back.loras == [LoraUse("style", 0.5, None)]


def test_parse_real_a1111_text() -> None:
    parsed = parse_parameters(A1111_1_10)
    assert parsed.prompt == "masterpiece, 1girl <lora:add_detail:0.6>"
    assert parsed.negative_prompt == "lowres, bad hands"
    assert parsed.loras == [("add_detail", 0.6)]
    assert parsed.lora_hashes == {"add_detail": "7c6bad76eb54"}
    assert parsed.steps == 25
    assert parsed.sampler == "DPM++ 2M Karras"
    assert parsed.schedule_type == "Karras"
    assert parsed.guidance_scale == 7.0
    assert parsed.seed == 1234567890
    assert (parsed.width, parsed.height) == (512, 768)
    assert parsed.model_hash == "6ce0161689"
    assert parsed.model_name == "v1-5-pruned-emaonly"
    assert parsed.version == "v1.10.1"
    assert parsed.extra == {} and parsed.problems == []
    assert record_from_parsed(parsed).prompt == "masterpiece, 1girl"


def test_parse_fooocus_text_in_a1111_scheme() -> None:
    parsed = parse_parameters(FOOOCUS_A1111)
    assert parsed.problems == []
    assert parsed.loras == [("sd_xl_offset_example-lora_1.0", 0.1)]
    assert parsed.sampler == "DPM++ 2M SDE Karras"
    assert (parsed.width, parsed.height) == (1152, 896)
    assert parsed.guidance_scale == 4.0
    assert parsed.extra["ADM Guidance"] == "(1.5, 0.8, 0.3)"
    assert parsed.extra["Raw prompt"] == "a castle on a hill,\ndramatic light"
    assert parsed.extra["Scheduler"] == "karras"
    record = record_from_parsed(parsed)
    assert record.model_hash == "aeb7e9e689"  # the A1111 short hash of the full SHA-256
    assert record.loras[0].file_hash is not None
    assert record.loras[0].file_hash.startswith("4852686128")


def test_parse_fooocus_json_scheme() -> None:
    text = (
        '{"prompt": "a red car", "negative_prompt": "", "steps": 30, "seed": "7", '
        '"resolution": "(1024, 1024)", "guidance_scale": 4.0, "sampler": "dpmpp_2m_sde_gpu", '
        '"base_model": "juggernautXL", "loras": [["detail", 0.5, "abcdef0123456789"]], '
        '"version": "Fooocus v2.5.5", "styles": "[\'Fooocus V2\']"}'
    )
    parsed = parse_parameters(text)
    assert parsed.prompt == "a red car"
    assert (parsed.steps, parsed.seed) == (30, 7)
    assert (parsed.width, parsed.height) == (1024, 1024)
    assert parsed.loras == [("detail", 0.5)]
    assert parsed.lora_hashes == {"detail": "abcdef0123456789"}
    assert parsed.extra["styles"] == "['Fooocus V2']"


def test_unknown_keys_escaped_quotes_and_unquoted_json_are_kept() -> None:
    text = (
        "a cat\n"
        'Steps: 20, Seed: 5, Hires prompt: "say \\"hi\\", then: go", '
        'Hashes: {"vae": "735e4c3a44", "model": "6ce0161689"}, Denoising strength: 0.4'
    )
    parsed = parse_parameters(text)
    assert parsed.extra == {
        "Hires prompt": 'say "hi", then: go',
        "Hashes": '{"vae": "735e4c3a44", "model": "6ce0161689"}',
    }
    # A Hires field says the hires fix ran: "Denoising strength" is its second pass's, not img2img's.
    assert parsed.hires.denoising_strength == 0.4 and parsed.img2img is None
    assert (parsed.steps, parsed.seed) == (20, 5)


def test_missing_negative_prompt_and_missing_parameters() -> None:
    parsed = parse_parameters("just a prompt\nover two lines\nSteps: 10, Seed: 3, Size: 64x64")
    assert parsed.prompt == "just a prompt\nover two lines"
    assert parsed.negative_prompt == ""
    assert parsed.steps == 10

    only_prompt = parse_parameters("style: anime, mood: calm")
    assert only_prompt.prompt == "style: anime, mood: calm"
    assert only_prompt.steps is None
    assert "only the prompt" in only_prompt.problems[0]


def test_negative_prompt_with_colons_is_not_taken_for_parameters() -> None:
    parsed = parse_parameters("a dog\nNegative prompt: a: b, c: d, e: f")
    assert parsed.negative_prompt == "a: b, c: d, e: f"
    assert parsed.extra == {}


@pytest.mark.parametrize(
    ("field", "line", "needle"),
    [
        ("steps", "Steps: abc", "Steps 'abc' is not a whole number"),
        ("steps", "Steps: 0", "Steps 0 is below 1"),
        ("seed", "Seed: -5", "Seed -5 is below 0"),
        ("seed", "Seed: 1.5", "Seed '1.5' is not a whole number"),
        ("width", "Size: 12", "Size '12' is not WIDTHxHEIGHT"),
        ("width", "Size: 0x512", "Size '0x512' is not WIDTHxHEIGHT"),
        ("guidance_scale", "CFG scale: high", "CFG scale 'high' is not a number"),
        ("guidance_scale", "CFG scale: nan", "not a usable number"),
        (
            "model_hash",
            "Model hash: xyz!",
            "Model hash 'xyz!' is not a hexadecimal hash",
        ),
    ],
)
def test_broken_fields_are_reported_not_raised(field: str, line: str, needle: str) -> None:
    parsed = parse_parameters(f"a cat\n{line}, Sampler: Euler a, Version: v1.10.1")
    assert getattr(parsed, field) is None
    assert any(needle in problem for problem in parsed.problems), parsed.problems
    # The rest of the line is still read.
    assert parsed.sampler == "Euler a"
    assert parsed.version == "v1.10.1"


def test_broken_lora_tags_and_hashes_are_reported() -> None:
    parsed = parse_parameters(
        "a <lora:good:0.8> <lora:bad:lots> <lora:plain> <lora:two:0.5:0.9>\n"
        'Steps: 5, Lora hashes: "good: 0123456789ab, broken, odd: not-hex", Seed: 1'
    )
    assert parsed.loras == [("good", 0.8), ("plain", 1.0), ("two", 0.5)]
    assert parsed.lora_hashes == {"good": "0123456789ab"}
    assert len(parsed.problems) == 3
    assert parsed.seed == 1


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "Negative prompt:", '"', 'Steps: "', ":,:,"])
def test_degenerate_texts_do_not_raise(text: str) -> None:
    parse_parameters(text)


def test_tokenizer_reports_whether_the_line_is_all_pairs() -> None:
    pairs, complete = tokenize_parameters_line('A b: 1, C: "x, y", D:')
    assert pairs == [("A b", "1"), ("C", "x, y"), ("D", "")]
    assert complete
    pairs, complete = tokenize_parameters_line("masterpiece, style: anime")
    assert pairs == [("style", "anime")]
    assert not complete


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.7, "0.7"),
        (1.0, "1"),
        (1.25, "1.25"),
        (-0.5, "-0.5"),
        (7, "7"),
        (0.1 + 0.2, "0.3"),
    ],
)
def test_numbers_are_written_compactly(value: float, text: str) -> None:
    assert format_number(value) == text


def test_windows_line_endings_are_read() -> None:
    parsed = parse_parameters(A1111_1_10.replace("\n", "\r\n"))
    assert parsed.negative_prompt == "lowres, bad hands"
    assert parsed.steps == 25


def test_clip_skip_is_written_as_a1111_does_and_read_back() -> None:
    # A1111 1.10 writes "Clip skip" after the model and before extension fields, only when it is > 1.
    text = A1111_1_10.replace("Model: v1-5-pruned-emaonly, ", "Model: v1-5-pruned-emaonly, Clip skip: 2, ")
    parsed = parse_parameters(text)
    assert parsed.clip_skip == 2 and parsed.extra == {} and parsed.problems == []
    assert format_parameters(record_from_parsed(parsed)) == text
    assert parse_parameters(A1111_1_10).clip_skip is None
    for no_skip in (None, 1):
        record = record_with_loras()
        record.clip_skip = no_skip
        assert "Clip skip" not in format_parameters(record)
    broken = parse_parameters(text.replace("Clip skip: 2", "Clip skip: two"))
    assert broken.clip_skip is None and any("Clip skip" in problem for problem in broken.problems)
