"""Cheap previews of latents during denoising, without running the VAE.

A fixed linear map from the four latent channels to RGB gives a blurry but recognisable picture
in microseconds; a full VAE decode every few steps would cost more than a denoising step on CPU.
The coefficients are the published least-squares fits for the SD 1.x and SDXL latent spaces.
"""

from __future__ import annotations

import torch
from PIL import Image

from lorapg.diffusion.families import SDXL

_SD1_FACTORS = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
_SDXL_FACTORS = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]


def latents_to_preview(latents: torch.Tensor, family: str) -> Image.Image:
    """The first image of a latent batch as a small RGB picture."""
    factors = torch.tensor(_SDXL_FACTORS if family == SDXL else _SD1_FACTORS, dtype=torch.float32)
    latent = latents[0].detach().float().cpu()[:4]  # (4, h, w)
    rgb = torch.einsum("chw,cr->hwr", latent, factors)
    rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(rgb, mode="RGB").resize((latent.shape[2] * 8, latent.shape[1] * 8), Image.NEAREST)
