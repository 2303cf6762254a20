"""CLIP token counting and phrase-wise trimming, with a real CLIPTokenizer on a tiny BPE vocab."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from lorapg.prompting.tokens import (
    CLIP_CONTENT_LIMIT,
    count_clip_tokens,
    fit_phrases,
    split_phrases,
    truncate_to_clip,
)

# Whole-word merges for a few words, so "cat" is one token and "zebra" is five.
_WORDS = ["cat", "dog", "red", "fox", "sks"]


def make_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIPTokenizer over letters, digits and a few merged words.

    Built with ``from_pretrained`` on a folder: in transformers 5 the ``vocab_file=`` /
    ``merges_file=`` constructor arguments are silently ignored and give a 2-token vocab.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.!-'():")
    vocab: dict[str, int] = {}
    for sym in symbols:
        vocab.setdefault(sym, len(vocab))
    for sym in symbols:
        vocab.setdefault(sym + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        # Left-to-right merges: c+a -> ca, ca+t</w> -> cat</w>.
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in dict.fromkeys(merges))]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return make_clip_tokenizer(tmp_path_factory.mktemp("clip"))


def test_fixture_tokenizer_really_has_the_vocab(clip_tok: CLIPTokenizer) -> None:
    assert len(clip_tok) > 80
    assert clip_tok.tokenize("cat, dog") == ["cat</w>", ",</w>", "dog</w>"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cat", 1),
        ("cat, dog", 3),
        ("zebra", 5),  # no merges: one token per letter
        ("Red  FOX", 2),  # CLIP lowercases and ignores repeated spaces
        ("", 0),
        ("   ", 0),
    ],
)
def test_count_content_tokens(clip_tok: CLIPTokenizer, text: str, expected: int) -> None:
    assert count_clip_tokens(text, clip_tok) == expected


def test_count_excludes_bos_and_eos(clip_tok: CLIPTokenizer) -> None:
    text = "red fox, cat, sitting on a wall"
    with_specials = len(clip_tok(text)["input_ids"])
    assert count_clip_tokens(text, clip_tok) == with_specials - 2


def test_lora_tags_cost_no_tokens(clip_tok: CLIPTokenizer) -> None:
    assert count_clip_tokens("cat, <lora:anime_v2:0.7> dog", clip_tok) == 3


def test_short_prompt_is_unchanged(clip_tok: CLIPTokenizer) -> None:
    text = "cat, dog, red fox"
    assert truncate_to_clip(text, clip_tok) == text


def test_truncate_keeps_whole_phrases_from_the_front(clip_tok: CLIPTokenizer) -> None:
    phrases = [f"cat dog {n}" for n in range(40)]  # 3 tokens each (+1 per comma)
    text = ", ".join(phrases)
    assert count_clip_tokens(text, clip_tok) > CLIP_CONTENT_LIMIT

    cut = truncate_to_clip(text, clip_tok)

    kept = split_phrases(cut)
    assert kept == phrases[: len(kept)]  # a prefix, no phrase cut in half
    assert count_clip_tokens(cut, clip_tok) <= CLIP_CONTENT_LIMIT
    # ...and the longest such prefix: one more phrase would not fit.
    assert count_clip_tokens(", ".join(phrases[: len(kept) + 1]), clip_tok) > CLIP_CONTENT_LIMIT


def test_protected_phrase_survives_at_the_end(clip_tok: CLIPTokenizer) -> None:
    phrases = [f"zebra {n}" for n in range(30)] + ["sks style"]
    kept, dropped = fit_phrases(phrases, clip_tok, protected=lambda p: "sks" in p)
    assert kept[-1] == "sks style"
    assert dropped and "sks style" not in dropped
    assert count_clip_tokens(", ".join(kept), clip_tok) <= CLIP_CONTENT_LIMIT
    assert kept[:-1] == phrases[: len(kept) - 1]


def test_one_giant_phrase_is_cut_by_words(clip_tok: CLIPTokenizer) -> None:
    text = " ".join(["zebra"] * 40)  # 200 tokens, no comma to cut at
    cut = truncate_to_clip(text, clip_tok)
    assert cut and text.startswith(cut)
    assert count_clip_tokens(cut, clip_tok) <= CLIP_CONTENT_LIMIT


def test_smaller_limit(clip_tok: CLIPTokenizer) -> None:
    assert truncate_to_clip("cat, dog, red, fox", clip_tok, limit=3) == "cat, dog"


class CountingTokenizer:
    """Wraps the real tokenizer and counts the calls and the characters it is given."""

    def __init__(self, tokenizer: CLIPTokenizer) -> None:
        self.tokenizer, self.calls, self.chars = tokenizer, 0, 0

    def __call__(self, text: str, **kwargs):
        self.calls += 1
        self.chars += len(text)
        return self.tokenizer(text, **kwargs)


def _work_to_cut(clip_tok: CLIPTokenizer, words: int) -> CountingTokenizer:
    counting = CountingTokenizer(clip_tok)
    cut = truncate_to_clip("red " * words, counting)
    assert count_clip_tokens(cut, clip_tok) == CLIP_CONTENT_LIMIT  # "red" is one token: 75 words kept
    return counting


def test_cutting_one_long_phrase_costs_linear_work(clip_tok: CLIPTokenizer) -> None:
    # The /enhance hang: cutting "red red red …" dropped one word at a time and re-tokenized the
    # rest each time, so twice the text cost four times the work. Count the work, not the clock.
    small, large = _work_to_cut(clip_tok, 2000), _work_to_cut(clip_tok, 4000)
    assert large.calls <= small.calls + 3
    assert large.chars <= 2.2 * small.chars  # linear: whole-text counts plus a bounded search


def _cut_one_word_at_a_time(phrase: str, tokenizer: CLIPTokenizer, limit: int) -> str:
    """The old, quadratic cut: the reference for what the fast one must return."""
    words = phrase.split()
    while words and count_clip_tokens(" ".join(words), tokenizer) > limit:
        words.pop()
    return " ".join(words)


@pytest.mark.parametrize("limit", [1, 2, 7, 75])
@pytest.mark.parametrize(
    "phrase",
    [
        "zebra cat dog " * 20,
        "cat <lora:anime_v2:0.7> dog zebra " * 15,
        "supercalifragilistic cat",
        "cat dog red fox",
    ],
)
def test_fast_word_cut_matches_the_old_cut(clip_tok: CLIPTokenizer, phrase: str, limit: int) -> None:
    assert truncate_to_clip(phrase, clip_tok, limit) == _cut_one_word_at_a_time(phrase, clip_tok, limit)
