"""What every captioner shares: the interface, the caption options and how raw output becomes a caption.

A captioner turns a batch of PIL images into ``RawCaption``s: a sentence (BLIP, Florence-2) or
tags ordered by confidence (a WD14 tagger). ``format_caption`` then applies the user's options —
style, trigger-word prefix, length — the same way for every model, so switching captioners never
changes what the options mean.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from lorapg.errors import UserError

SENTENCE, TAGS = "sentence", "tags"
STYLES = (SENTENCE, TAGS)
MAX_LENGTH_LIMIT = 200  # words or tags; longer captions are cut by CLIP's 77 tokens anyway
DEFAULT_MAX_LENGTH = 40

# Words that join phrases in a generated sentence; where a sentence is split into tags.
_PHRASE_BREAKS = re.compile(r"\s*(?:,|;|\.|\band\b|\bwith\b)\s*", re.IGNORECASE)
_LEADING_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)


@dataclass(frozen=True)
class RawCaption:
    """A model's answer for one image: a sentence, or tags most confident first."""

    sentence: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaptionOptions:
    style: str = SENTENCE  # "sentence" or "tags"
    trigger: str = ""  # put first in every caption (kohya's keep_tokens convention); "" = none
    max_length: int = DEFAULT_MAX_LENGTH  # most words (sentence) or tags (tags) kept
    overwrite: bool = False  # replace existing captions; False = caption only images without one
    batch_size: int = 4  # images per model call

    def checked(self) -> CaptionOptions:
        if self.style not in STYLES:
            raise UserError(f"Caption style {self.style!r} is not one of {', '.join(STYLES)}; pick one of them.")
        if not 1 <= self.max_length <= MAX_LENGTH_LIMIT:
            raise UserError(
                f"Max length must be between 1 and {MAX_LENGTH_LIMIT} (words or tags); it is {self.max_length}."
            )
        if not 1 <= self.batch_size <= 64:
            raise UserError(f"Caption batch size must be between 1 and 64; it is {self.batch_size}.")
        trigger = " ".join(self.trigger.split())
        if "," in trigger or len(trigger) > 100:
            raise UserError("Trigger word may not contain commas and must be at most 100 characters; shorten it.")
        return CaptionOptions(self.style, trigger, self.max_length, self.overwrite, self.batch_size)


class Captioner(Protocol):
    """A captioning model, loaded on first use and released when the GPU is needed elsewhere."""

    kind: str  # "blip", "florence2" or "wd14"
    label: str  # for messages: the hub id or folder

    @property
    def loaded(self) -> bool: ...

    def ensure_loaded(self) -> None: ...

    def release(self) -> None: ...

    def estimated_bytes(self) -> int: ...

    def caption(self, images: Sequence[Image.Image], options: CaptionOptions) -> list[RawCaption]: ...


def format_caption(raw: RawCaption, options: CaptionOptions) -> str:
    """The caption text written to ``<stem>.txt``: styled, cut to ``max_length``, trigger first."""
    if options.style == TAGS:
        tags = list(raw.tags) or sentence_to_tags(raw.sentence)
        text = ", ".join(_dedupe(tags)[: options.max_length])
    else:
        # A tagger has no sentence: its tags, comma-separated, are the closest thing to one.
        text = raw.sentence.strip() or ", ".join(raw.tags)
        words = text.split()
        text = " ".join(words[: options.max_length]).rstrip(",")
    return with_trigger(options.trigger, text)


def sentence_to_tags(sentence: str) -> list[str]:
    """ "a red cat sitting on the grass with a ball" -> ["red cat sitting on the grass", "ball"]."""
    phrases = (_LEADING_ARTICLE.sub("", part.strip()) for part in _PHRASE_BREAKS.split(sentence or ""))
    return [phrase for phrase in phrases if phrase]


def with_trigger(trigger: str, text: str) -> str:
    """``trigger, text`` unless the text already uses the trigger as a word (as the trainer's
    ``build_caption`` treats it, so the caption file and the trained caption agree)."""
    text = " ".join(text.split())
    if not trigger:
        return text
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text, flags=re.IGNORECASE):
        return text
    return f"{trigger}, {text}" if text else trigger


def _dedupe(tags: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(tag.strip() for tag in tags if tag.strip()))
