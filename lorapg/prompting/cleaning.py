"""Turn whatever an instruct LLM said into one line that can go straight into a prompt box.

Small and quantized models rarely answer with just the prompt: they wrap it in quotes or markdown,
announce it ("Sure! Here is your prompt:"), leak chat tokens, or explain themselves afterwards.
``clean_llm_output`` removes all of that, and returns "" when nothing usable is left so the caller
can fall back to the rules backend instead of showing the user a refusal or an empty string.
"""

from __future__ import annotations

import re

DEFAULT_MAX_WORDS = 75

# Tokens that end a turn: anything after them is the model talking to itself, never the answer.
_END_OF_TURN = re.compile(
    r"<\|im_end\|>|<\|eot_id\|>|<\|end\|>|<\|endoftext\|>|<\|end_of_text\|>|</s>|<eos>"
    r"|<end_of_turn>|<\|user\|>|<\|im_start\|>\s*user\b",
    re.IGNORECASE,
)
# Tokens that only mark structure; the role word after "<|im_start|>" belongs to the token.
_SPECIAL = re.compile(
    r"<\|im_start\|>\s*(?:system|user|assistant)?|<\|start_header_id\|>.*?<\|end_header_id\|>"
    r"|<\|[a-z_]+\|>|</?s>|<(?:bos|eos|pad|unk)>|<(?:start|end)_of_turn>(?:model|user)?"
    r"|\[/?INST\]|<</?SYS>>",
    re.IGNORECASE,
)
# Reasoning models think out loud first; an unfinished block means there is no answer yet.
_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|$)", re.IGNORECASE | re.DOTALL)

# Chatty openings: a line starting like this is the model talking to the user, not the prompt.
_CHATTY = re.compile(
    r"^(?:sure|certainly|of course|absolutely|okay|alright|here(?:'s|’s| is| are)"
    r"|below is|this is (?:an?|the|your)|i(?:'ve| have| will|'ll)|let me"
    # Small models drift into storytelling or advice instead of writing the prompt.
    r"|the story (?:of|is)|this story|once upon a time|to create (?:an?|the|your))\b",
    re.IGNORECASE,
)
# A label in front of the prompt, e.g. "Prompt:", "**Enhanced prompt:**", "Rewritten prompt -".
_LABEL = re.compile(
    r"^(?:(?:final|enhanced|rewritten|improved|new|updated|revised|positive|stable diffusion|sd)\s+)*"
    r"(?:prompt|output|result|answer|keywords)\s*(?:\([^)]*\))?\s*[:\-–]\s*",
    re.IGNORECASE,
)
# Lines where the model starts explaining what it did.
_EXPLANATION = re.compile(
    r"^(?:this prompt|the prompt|this version|this rewrite|note|notes|explanation|why|changes"
    r"|i (?:added|changed|kept|removed|focused|emphasi[sz]ed|included)|feel free|let me know"
    r"|hope this|negative prompt)\b",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|sorry,|i apologi[sz]e|as an ai|i cannot|i can'?t|i am unable|i'm unable)",
    re.IGNORECASE,
)
_BULLET = re.compile(r"^\s*(?:[-*•+]|\d{1,2}[.)])\s+")
_HEADING = re.compile(r"^\s*#{1,6}\s*")
_FENCE = re.compile(r"^\s*```[\w-]*\s*$")
_QUOTES = '"“”„«»`'
_EDGE_QUOTES = "\"'“”‘’„«»`"


def clean_llm_output(text: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """Return the prompt inside an LLM reply as one comma-separated line, or "" if there is none."""
    if not text:
        return ""
    text = _THINK_BLOCK.sub("", text)
    text = _first_turn(text)
    text = _SPECIAL.sub(" ", text)

    lines = _prompt_lines(text.replace("\r", "").split("\n"))
    if not lines:
        return ""
    line = ", ".join(lines)
    line = _strip_markdown(line)
    line = _tidy(line)
    if not line or _REFUSAL.match(line) or not re.search(r"[^\W\d_]", line):
        return ""
    return _bound(line, max_words)


def _first_turn(text: str) -> str:
    """Keep the first non-empty stretch of text between end-of-turn tokens."""
    for part in _END_OF_TURN.split(text):
        if _SPECIAL.sub("", part).strip():
            return part
    return ""


def _prompt_lines(raw_lines: list[str]) -> list[str]:
    """Drop preambles and labels, keep the first paragraph, stop at explanations."""
    lines = [ln.strip() for ln in raw_lines if not _FENCE.match(ln)]
    kept: list[str] = []
    started = False
    for line in lines:
        if not line:
            if started:
                break  # a blank line after the prompt: what follows is commentary
            continue
        bare = _strip_markdown(line).strip()
        if not started:
            bare, is_preamble = _drop_preamble(bare)
            if is_preamble and not bare:
                continue
        elif _EXPLANATION.match(bare) or _CHATTY.match(bare):
            break
        bare = _BULLET.sub("", bare)
        bare = _LABEL.sub("", bare).strip()
        if not bare:
            continue
        kept.append(bare)
        started = True
    return kept


def _drop_preamble(line: str) -> tuple[str, bool]:
    """Remove "Sure! Here is the prompt:" style openers; return (rest, was_preamble)."""
    bare = _BULLET.sub("", line)
    if _LABEL.match(bare):
        return _LABEL.sub("", bare).strip(), True
    if _CHATTY.match(bare):
        # "Here is your prompt: a cat, ..." keeps what follows the colon.
        _, sep, rest = bare.partition(":")
        if sep and rest.strip():
            return rest.strip(), True
        return "", True  # the opener alone: whatever follows (if anything) is the prompt
    return line, False


def _strip_markdown(line: str) -> str:
    line = _HEADING.sub("", line)
    line = line.replace("**", "").replace("__", "")
    # Single-asterisk emphasis, but not the "*" some prompts use as a literal.
    line = re.sub(r"(?<!\w)\*(\S[^*]*?)\*(?!\w)", r"\1", line)
    return line


def _tidy(line: str) -> str:
    line = line.strip().strip(_EDGE_QUOTES).strip()
    line = _LABEL.sub("", line)
    line = "".join(ch for ch in line if ch not in _QUOTES)
    line = re.sub(r"\s+", " ", line)
    line = re.sub(r"\s*,\s*(?:,\s*)*", ", ", line)  # "a , , b" -> "a, b"
    line = re.sub(r"([.!?;:])\s*,", ",", line)  # "sentence., next" -> "sentence, next"
    return line.strip(" ,;:-–").rstrip(".").strip().strip(_EDGE_QUOTES).strip()


def _bound(line: str, max_words: int) -> str:
    """Cut to ``max_words``, at the last comma before the limit when there is one."""
    words = line.split(" ")
    if len(words) <= max_words:
        return line
    cut = " ".join(words[:max_words])
    head, sep, _ = cut.rpartition(",")
    if sep and len(head.split(" ")) >= max_words // 2:
        return head.strip()
    return cut.rstrip(" ,")
