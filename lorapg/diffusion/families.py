"""Base model families and their defaults."""

from __future__ import annotations

SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"

FAMILY_LABELS = {SD1: "SD 1.x", SD2: "SD 2.x", SDXL: "SDXL"}
NATIVE_SIZE = {SD1: 512, SD2: 768, SDXL: 1024}


def family_label(family: str | None) -> str:
    return FAMILY_LABELS.get(family or "", "unknown")
