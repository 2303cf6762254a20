"""A real CLIP BPE tokenizer whose merges make each caption word one token.

The vocabulary is CLIP's 256-character byte alphabet (so any text still tokenizes, one token per
character, as unknown words such as a LoRA's trigger do) plus one token per caption word.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from lorapg.demo.shapes import COLOURS, SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # Stable Diffusion 1.x's context length; the pipeline pads every prompt to it


def caption_words() -> list[str]:
    return ["a", "on", "background", *COLOURS, *SHAPES]


def byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode table: printable bytes map to themselves, the rest above U+0100."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as tokenizers runs it: repeatedly join the adjacent pair with the lowest merge rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))]
        known = [(rank, i) for rank, i in pairs if rank is not None]
        if not known:
            break
        _, i = min(known)
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that turn every word into a single token.

    Each word gets merges appended after all earlier ones, joining whatever pieces the earlier
    merges leave. Appended merges have the highest ranks, so they never fire inside an earlier word
    before that word's own merges have finished: earlier words stay single tokens.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return merges


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and the special tokens; load back with ``from_pretrained``."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
    merges = build_merges(caption_words())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    for left, right in merges:
        joined = left + right
        if joined not in tokens:
            tokens.append(joined)
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}), encoding="utf-8"
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)
    for word in caption_words():
        pieces = tokenizer.tokenize(word)
        if pieces != [word + "</w>"]:
            raise RuntimeError(f"tokenizer splits {word!r} into {pieces}")
    return tokenizer
