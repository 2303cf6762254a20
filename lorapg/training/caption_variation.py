"""Per-step caption variation for tag-style captions: shuffle tags, keep the first N, caption dropout.

kohya's ``shuffle_caption`` / ``keep_tokens`` / ``caption_dropout_rate``: a tag caption is an
unordered set, and always training on one order teaches the LoRA that order (and ties a concept to
the tags around it). Each step the caption's comma-separated tags (after the first ``keep_tokens``,
where the trigger word sits) are shuffled, and with probability ``dropout`` the whole caption is
dropped, which teaches the LoRA its look without any prompt. The choice for an image at a step is a
function of (seed, step, image index), so a resumed run makes the same choices as an unbroken one.
"""

from __future__ import annotations

import random


def step_caption(
    caption: str, *, shuffle: bool, keep_tokens: int, dropout: float, seed: int, step: int, index: int
) -> str:
    """The caption an image trains with at ``step`` (``index``: its place in the batch)."""
    if not shuffle and dropout <= 0:
        return caption
    rng = random.Random(f"{seed}:{step}:{index}")  # str seeds hash the same in every process
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)
