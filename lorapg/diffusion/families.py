"""Base model families and their defaults."""

from __future__ import annotations

SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"
FLUX = "flux"
SD3 = "sd3"  # Stable Diffusion 3 / 3.5 (MMDiT)

FAMILY_LABELS = {SD1: "SD 1.x", SD2: "SD 2.x", SDXL: "SDXL", FLUX: "Flux.1", SD3: "SD 3.5"}
NATIVE_SIZE = {SD1: 512, SD2: 768, SDXL: 1024, FLUX: 1024, SD3: 1024}

# Families built around a diffusion transformer instead of a UNet: no clip skip, no A1111 prompt
# chunking, flow-matching schedulers only (lorapg.diffusion.flux).
TRANSFORMER_FAMILIES = frozenset({FLUX, SD3})


def family_label(family: str | None) -> str:
    return FAMILY_LABELS.get(family or "", "unknown")


def is_transformer_family(family: str | None) -> bool:
    return family in TRANSFORMER_FAMILIES
