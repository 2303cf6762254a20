"""The two ways people write "this LoRA at this scale", parsed in one place.

- ``<lora:name:0.7>`` inside a prompt (AUTOMATIC1111's syntax): the Generate tab and the API move the
  tags into the LoRA list, the gallery reads them from PNGs made elsewhere and strips them from stored
  prompts, the A1111 writer checks which LoRAs are already tagged.
- ``name:0.7, other`` (NAME:SCALE, scale 1 when left out): the CLI's ``--lora``, the Generate tab's
  LoRA field and the demo tool.

Never imports gradio or torch; the gallery (below the engines) and the diffusion engine both use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorapg.coercion import CoercionError, to_float
from lorapg.errors import UserError

# <lora:NAME[:ARG]...>; A1111 matches the network name case-sensitively, but people type <LoRA:…> and
# expect it to work, so any case is read. ':' '<' '>' cannot be part of a name (the writer drops them).
LORA_TAG = re.compile(r"<lora:([^:<>]+)((?::[^<>]*)?)>", re.IGNORECASE)
# A tag with the comma that joined it to the prompt, when it ends a line or precedes a comma.
_TAG_WITH_SEPARATOR = re.compile(
    r"(?:[ \t]*,)?[ \t]*<lora:[^:<>]+(?::[^<>]*)?>(?=[ \t]*(?:,|$))", re.MULTILINE | re.IGNORECASE
)
_TAG_WITH_SPACE = re.compile(r"[ \t]*<lora:[^:<>]+(?::[^<>]*)?>", re.IGNORECASE)
_NUMERIC = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:…>`` tag as written; ``scale`` is None when ``scale_text`` is not a finite number."""

    text: str  # the whole tag, for messages
    name: str
    scale_text: str
    scale: float | None


def find_lora_tags(prompt: str) -> list[LoraTag]:
    """Every ``<lora:…>`` tag in ``prompt``, in order.

    The scale is the first positional argument (A1111's text-encoder multiplier, which is also the UNet's
    unless a second one follows); ``<lora:name>`` means 1. Named arguments (``te=…``, ``dyn=…``) and a
    second multiplier are A1111 refinements this app does not apply, so they are skipped.
    """
    tags = []
    for match in LORA_TAG.finditer(prompt):
        positional = [arg.strip() for arg in match.group(2).split(":")[1:] if "=" not in arg]
        scale_text = positional[0] if positional and positional[0] else "1"
        try:
            scale: float | None = to_float(scale_text)
        except CoercionError:
            scale = None
        tags.append(LoraTag(match.group(0), match.group(1).strip(), scale_text, scale))
    return tags


def strip_lora_tags(prompt: str) -> str:
    """The prompt without ``<lora:…>`` tags and the separators that joined them.

    The rest is left byte-for-byte (inner spaces and line breaks too): the text is what the text encoder
    reads and what the gallery stores, and re-exporting must not write the tags twice.
    """
    if not LORA_TAG.search(prompt):
        return prompt
    text = _TAG_WITH_SEPARATOR.sub("", prompt)
    text = _TAG_WITH_SPACE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip()
    if LORA_TAG.match(prompt.lstrip()):
        text = re.sub(r"^,[ \t]*", "", text)  # the comma that followed a leading tag
    return text


def parse_lora_list(spec: str) -> list[tuple[str, float]]:
    """``"name:0.7, other, sub/c:1.25"`` as (name, scale) pairs; a missing scale is 1.

    Only a numeric tail is a scale, so a name holding ':' (``C:/loras/x``) still reads as a name.
    """
    result = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, scale_text = item.rpartition(":")
        if not sep or not name.strip() or not _NUMERIC.fullmatch(scale_text):
            name, scale_text = item, "1"
        try:
            result.append((name.strip(), to_float(scale_text)))
        except CoercionError:
            raise UserError(
                f"LoRA {item!r}: scale {scale_text.strip()!r} is not a finite number; use e.g. 0.7."
            ) from None
    return result
