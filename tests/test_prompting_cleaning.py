"""clean_llm_output on the kinds of replies small instruct models actually give."""

from __future__ import annotations

import pytest

from lorapg.prompting.cleaning import clean_llm_output

PROMPT = "a red fox in a snowy forest, soft morning light, highly detailed"


@pytest.mark.parametrize(
    "raw",
    [
        PROMPT,
        f'"{PROMPT}"',
        f"“{PROMPT}”",
        f"'{PROMPT}'",
        f"`{PROMPT}`",
        f"```\n{PROMPT}\n```",
        f"```text\n{PROMPT}\n```",
        f"**{PROMPT}**",
        f"# {PROMPT}",
        f"Prompt: {PROMPT}",
        f"**Enhanced prompt:** {PROMPT}",
        f"Rewritten prompt (Cinematic style): {PROMPT}",
        f"Here is your prompt:\n{PROMPT}",
        f'Sure! Here\'s an enhanced prompt for you:\n\n"{PROMPT}"',
        f"Sure!\n{PROMPT}",
        f"Once upon a time:\n{PROMPT}",
        f"Certainly! Here is the rewritten prompt: {PROMPT}",
        f"{PROMPT}<|im_end|>",
        f"{PROMPT}<|im_end|>\n<|im_start|>user\nthanks<|im_end|>",
        f"<|im_start|>assistant\n{PROMPT}<|im_end|>",
        f"<|assistant|> {PROMPT} </s>",
        f"<s>[INST] {PROMPT} [/INST]",
        f"{PROMPT}<|eot_id|>Some more text",
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{PROMPT}<|eot_id|>",
        f"<start_of_turn>model\n{PROMPT}<end_of_turn>",
        f"<think>the user wants a fox</think>\n{PROMPT}",
        f"{PROMPT}\n\nThis prompt emphasizes the fox and the calm mood.",
        f"{PROMPT}\n\nNote: you can add a style.",
        f"{PROMPT}\nThis prompt keeps the subject first.",
        f"{PROMPT}.",
        f"\n\n   {PROMPT}   \n\n",
    ],
)
def test_wrapped_prompt_comes_out_clean(raw: str) -> None:
    assert clean_llm_output(raw) == PROMPT


def test_bullets_and_lines_become_one_comma_line() -> None:
    raw = "Here is the prompt:\n- a red fox\n- snowy forest\n* soft morning light\n1. highly detailed"
    assert clean_llm_output(raw) == "a red fox, snowy forest, soft morning light, highly detailed"


def test_multiline_paragraph_is_joined() -> None:
    raw = "a red fox in a snowy forest,\nsoft morning light,\nhighly detailed"
    assert clean_llm_output(raw) == PROMPT


def test_keeps_sd_syntax() -> None:
    raw = "(masterpiece:1.2), <lora:anime_v2:0.7> a girl's portrait, [red|blue] hair"
    assert clean_llm_output(raw) == raw


def test_result_is_one_line() -> None:
    out = clean_llm_output("a cat\non a wall\r\nat night")
    assert "\n" not in out and "\r" not in out
    assert out == "a cat, on a wall, at night"


def test_negative_prompt_section_is_dropped() -> None:
    assert clean_llm_output(f"{PROMPT}\nNegative prompt: blurry, lowres") == PROMPT


def test_length_is_bounded_at_a_comma() -> None:
    raw = ", ".join(f"detail number {i}" for i in range(100))
    out = clean_llm_output(raw, max_words=20)
    assert len(out.split()) <= 20
    assert out.endswith(tuple("0123456789"))  # cut between phrases, not after a dangling comma


def test_length_bound_without_commas() -> None:
    out = clean_llm_output(" ".join(["word"] * 200), max_words=10)
    assert out == " ".join(["word"] * 10)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   \n\n  ",
        "<|im_end|>",
        "</s></s>",
        '""',
        "```\n```",
        "Sure!",
        "Here is your prompt:",
        "I'm sorry, but I can't help with that.",
        "As an AI language model, I cannot create images.",
        "<think>still thinking about the fox",
        "..., ,,",
        "12345",
        "The story is about a cat that lives alone on a rainy street",
        "To create an immersive atmosphere for your story, use evocative language",
    ],
)
def test_nothing_usable_gives_empty_string(raw: str) -> None:
    assert clean_llm_output(raw) == ""
