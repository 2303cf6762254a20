"""The parts of a LoRA module a rename-only converter carries (down, up, alpha), and the error for any other.

``sd3_kohya`` and ``flux_kohya`` rename plain LoRA matrices. A DoRA magnitude (``dora_scale``,
``lora_magnitude_vector``), a Tucker core (``lora_mid``), a LoRA bias (``lora_B.bias``) or a LyCORIS factor
beside them changes what the module computes: dropping it would give a wrong image without a word, so such a
key stops the conversion and is named.
"""

from __future__ import annotations

DOWN = ("lora_down.weight", "lora_A.weight")
UP = ("lora_up.weight", "lora_B.weight")
ALPHA = ("alpha",)
_PARTS = (("down", DOWN), ("up", UP), ("alpha", ALPHA))

# A hint in the key -> what the part is, for the message (first match wins).
_WHAT = (
    ("dora_scale", "a DoRA magnitude"),
    ("lora_magnitude_vector", "a DoRA magnitude"),
    ("lora_mid", "a Tucker core"),
    ("hada_", "a LoHa factor"),
    ("lokr_", "a LoKr factor"),
    (".bias", "a LoRA bias"),
    (".diff", "a full weight difference"),
)


class UnsupportedPart(ValueError):
    """A key that is not a plain LoRA part, in a file converted by renaming; the message names it."""


def plain_part(key: str) -> tuple[str, str] | None:
    """(module, "down" / "up" / "alpha") for a plain LoRA key; None for any other key."""
    for part, suffixes in _PARTS:
        for suffix in suffixes:
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1], part
    return None


def unsupported(key: str, family: str) -> UnsupportedPart:
    """The error for ``key``; ``family`` is the loaded model's label (``Flux.1``, ``SD 3.5``)."""
    what = next((label for hint, label in _WHAT if hint in key), "not a plain LoRA part")
    return UnsupportedPart(
        f"its key {key} is {what}, which this app cannot apply to {family} LoRAs yet: use a plain LoRA version of it"
    )
