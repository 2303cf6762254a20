"""AUTOMATIC1111's prompt syntax: attention weights, escapes, BREAK, and 75-token chunks.

``(word)`` multiplies the attention of ``word`` by 1.1, ``((word))`` by 1.21, ``(word:1.3)`` sets it to
1.3 times the enclosing weight, ``[word]`` divides by 1.1; ``\\(`` and friends are literal brackets; an
unclosed bracket applies to the rest of the prompt; ``BREAK`` (capitals, a word of its own) starts a new
chunk. The semantics follow A1111's ``parse_prompt_attention`` and ``tokenize_line`` so that a prompt
copied from an A1111 PNG means the same here. Pure Python: no torch, usable by the token counter too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

CHUNK_LENGTH = 75  # content tokens per chunk; BOS and EOS make CLIP's 77
ROUND_FACTOR = 1.1  # A1111's weight for one level of (...)
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack": move a trailing phrase to the next chunk

BREAK_MARK = "BREAK"  # a fragment ("BREAK", BREAK_WEIGHT) separates chunks, as in A1111's parser output
BREAK_WEIGHT = -1.0

# One lexical unit per match, in priority order: escapes, openers, a ":number)" closer, closers, plain runs.
_UNITS = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]?)
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (fragment, weight) pairs; neighbours of equal weight are merged.

    ``BREAK`` appears as ``("BREAK", -1.0)``. A weight that is not a number (``(a:b)``) leaves the
    text as written, as A1111 does; an unmatched closing bracket is literal text.
    """
    fragments: list[list] = []  # [text, weight]: mutable, the brackets rescale ranges of it
    round_open: list[int] = []  # where each unclosed "(" started in ``fragments``
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[1] != BREAK_WEIGHT:  # A1111 scales its BREAK marker too, turning BREAK into a word
                fragment[1] *= factor

    for unit in _UNITS.finditer(text):
        kind, value = unit.lastgroup, unit.group(0)
        if kind == "escape":  # a lone backslash escapes nothing and vanishes, as in A1111
            fragments.append([value[1:], 1.0])
        elif kind == "open":
            (round_open if value == "(" else square_open).append(len(fragments))
        elif kind == "weight" and round_open:
            weight = _number(unit.group("weight"))
            if weight is None:
                fragments.append([value, 1.0])
            else:
                scale_from(round_open.pop(), weight)
        elif kind == "close" and value == ")" and round_open:
            scale_from(round_open.pop(), ROUND_FACTOR)
        elif kind == "close" and value == "]" and square_open:
            scale_from(square_open.pop(), 1 / ROUND_FACTOR)
        else:
            _append_text(fragments, value)
    # Unclosed brackets apply to the end of the prompt (A1111 does the same).
    for start in round_open:
        scale_from(start, ROUND_FACTOR)
    for start in square_open:
        scale_from(start, 1 / ROUND_FACTOR)
    return _merged(fragments)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "1.2.3" matches the pattern but is no number
        return None


def _append_text(fragments: list[list], text: str) -> None:
    for i, part in enumerate(_BREAK.split(text)):
        if i > 0:
            fragments.append([BREAK_MARK, BREAK_WEIGHT])
        fragments.append([part, 1.0])


def _merged(fragments: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in fragments:
        if not text and weight != BREAK_WEIGHT:
            continue
        if merged and merged[-1][1] == weight and weight != BREAK_WEIGHT:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def is_plain(text: str) -> bool:
    """True when ``text`` has no syntax at all: the parser gives it back unchanged at weight 1."""
    return parse_prompt_attention(text) == [(text, 1.0)] or not text


@dataclass
class TokenChunk:
    """Up to 75 content token ids with their weights (no BOS/EOS, no padding)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk_prompt(
    text: str, tokenize: Callable[[Sequence[str]], list[list[int]]], comma_id: int | None
) -> list[TokenChunk]:
    """``text`` parsed and split into 75-token chunks as A1111's ``tokenize_line`` does.

    ``tokenize`` maps fragment texts to content token ids (no BOS/EOS). When a chunk fills up and its
    last comma is at most 20 tokens back, the words after that comma move to the next chunk, so a
    phrase is not split across two chunks. An empty prompt is one empty chunk.
    """
    fragments = parse_prompt_attention(text)
    token_lists = tokenize([fragment for fragment, _ in fragments])
    chunks: list[TokenChunk] = []
    chunk = TokenChunk()
    last_comma = -1

    def close_chunk() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = TokenChunk(), -1

    for tokens, (fragment, weight) in zip(token_lists, fragments, strict=True):
        if fragment == BREAK_MARK and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        for token in tokens:
            if token == comma_id:
                last_comma = len(chunk.tokens)
            elif (
                len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1 and CHUNK_LENGTH - last_comma <= COMMA_BACKTRACK
            ):
                cut = last_comma + 1
                moved = TokenChunk(chunk.tokens[cut:], chunk.weights[cut:])
                del chunk.tokens[cut:], chunk.weights[cut:]
                close_chunk()
                chunk = moved
            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        close_chunk()
    return chunks


def tokenizer_chunks(text: str, tokenizer) -> list[TokenChunk]:
    """:func:`chunk_prompt` with a transformers CLIP tokenizer."""

    def tokenize(texts: Sequence[str]) -> list[list[int]]:
        # verbose=False: long prompts are the point here, not a mistake worth a warning.
        return [
            tokenizer(t, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if t else []
            for t in texts
        ]

    return chunk_prompt(text, tokenize, comma_token_id(tokenizer))


COMMA_TOKEN = ",</w>"  # CLIP's lone comma


def comma_token_id(tokenizer) -> int | None:
    """The id of a lone comma (CLIP's ``,</w>``), or None when the vocabulary has none.

    Looked up by token, not with ``get_vocab()``: that copies the whole vocabulary into a new dict,
    about 30 ms for CLIP's 49,408 tokens, and it ran for the prompt and the negative prompt of every
    generation. A token the vocabulary lacks comes back as the unknown token's id (or None), which
    does not map back to the comma.
    """
    token_id = tokenizer.convert_tokens_to_ids(COMMA_TOKEN)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != COMMA_TOKEN:
        return None
    return token_id


def needs_chunked_encoding(text: str, tokenizer) -> bool:
    """True when ``text`` uses the syntax or is longer than one chunk (diffusers' own encoding would cut it)."""
    if not is_plain(text):
        return True
    chunks = tokenizer_chunks(text, tokenizer)
    return len(chunks) > 1
