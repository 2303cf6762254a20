"""How much of a prompt the CLIP text encoder actually reads.

SD 1.5 and SDXL encode 77 tokens: BOS, 75 content tokens, EOS. Anything past 75 is cut off
silently by diffusers, so the words at the end of a long prompt simply do nothing. We count with
the pipeline's own tokenizer (any transformers ``CLIPTokenizer``) and, when trimming, drop whole
comma-separated phrases from the back: prompts put the important words first, and half a phrase
("dramatic rim" without "lighting") is worse than none.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from lorapg.diffusion.prompt_syntax import tokenizer_chunks

CLIP_CONTENT_LIMIT = 75

# A1111-style LoRA tags are read by the UI, not by the text encoder, so they cost no tokens.
_LORA_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>", re.IGNORECASE)


def count_clip_tokens(text: str, tokenizer: Any) -> int:
    """Content tokens in ``text`` (without BOS/EOS), the number to compare with 75."""
    text = _LORA_TAG.sub(" ", text)
    if not text.strip():
        return 0
    # verbose=False: counting a long prompt is the point here, not a mistake worth a warning.
    encoded = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)
    return len(encoded["input_ids"])


def count_prompt_chunks(text: str, tokenizer: Any) -> tuple[int, int]:
    """(content tokens, chunks) as generation encodes ``text``: A1111 syntax read, 75 tokens a chunk.

    Brackets and weights cost no tokens there, and BREAK starts a new chunk, so this can differ from
    :func:`count_clip_tokens`, which counts the raw text.
    """
    chunks = tokenizer_chunks(_LORA_TAG.sub(" ", text), tokenizer)
    return sum(len(chunk.tokens) for chunk in chunks), len(chunks)


def split_phrases(text: str) -> list[str]:
    """Comma-separated phrases, trimmed, empty ones dropped."""
    return [p.strip() for p in text.split(",") if p.strip()]


def join_phrases(phrases: Sequence[str]) -> str:
    return ", ".join(phrases)


def fit_phrases(
    phrases: Sequence[str],
    tokenizer: Any,
    limit: int = CLIP_CONTENT_LIMIT,
    *,
    protected: Callable[[str], bool] | None = None,
) -> tuple[list[str], list[str]]:
    """Keep phrases from the front while the joined text fits ``limit``; return (kept, dropped).

    Phrases for which ``protected`` is true (LoRA trigger words) are always kept, even when they
    alone exceed the limit: without its trigger a LoRA does nothing, which is worse than a few
    encoder-ignored words at the end. Once one unprotected phrase does not fit, every later
    unprotected phrase is dropped too, so what survives is a prefix in importance order.
    """
    is_protected = protected or (lambda _phrase: False)
    kept: list[str] = []
    dropped: list[str] = []
    full = False
    for phrase in phrases:
        if is_protected(phrase):
            kept.append(phrase)
            continue
        if not full and count_clip_tokens(join_phrases([*kept, phrase]), tokenizer) <= limit:
            kept.append(phrase)
        else:
            full = True
            dropped.append(phrase)
    # Protected phrases added after the limit was reached can push earlier ones out.
    while count_clip_tokens(join_phrases(kept), tokenizer) > limit:
        victim = next((i for i in range(len(kept) - 1, -1, -1) if not is_protected(kept[i])), None)
        if victim is None:
            break
        dropped.insert(0, kept.pop(victim))
    if not kept and dropped:
        # One giant phrase with no commas: keep its first words rather than nothing.
        first = _cut_words(dropped[0], tokenizer, limit)
        if first:
            kept, dropped = [first], dropped[1:]
    return kept, dropped


def truncate_to_clip(text: str, tokenizer: Any, limit: int = CLIP_CONTENT_LIMIT) -> str:
    """``text`` cut to what the encoder reads, keeping whole phrases from the front."""
    if count_clip_tokens(text, tokenizer) <= limit:
        return text
    kept, _ = fit_phrases(split_phrases(text), tokenizer, limit)
    return join_phrases(kept)


def _cut_words(phrase: str, tokenizer: Any, limit: int) -> str:
    """The longest run of leading words of ``phrase`` that fits ``limit``.

    Galloping then bisecting over the word count: O(log k) tokenizer calls on at most 2k words,
    where k is the answer (about ``limit`` words), however long the phrase. Dropping one word at
    a time from the back re-tokenized the whole phrase per word: quadratic, minutes for 32 KB.
    The count grows with the word count (tokens come per word; LoRA tags add none), so the
    search finds the same cut as that loop did.
    """
    words = phrase.split()

    def fits(n: int) -> bool:
        return count_clip_tokens(" ".join(words[:n]), tokenizer) <= limit

    good, bad = 0, None  # fits(good) holds (0 words: 0 tokens); fits(bad) does not
    probe = 1
    while probe <= len(words):
        if not fits(probe):
            bad = probe
            break
        good, probe = probe, probe * 2
    if bad is None:
        if fits(len(words)):
            return " ".join(words)
        bad = len(words)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return " ".join(words[:good])
