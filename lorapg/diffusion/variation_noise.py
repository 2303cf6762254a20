"""A1111's variation seed: the initial noise of ``seed`` blended towards the noise of ``variation_seed``.

AUTOMATIC1111 calls these "subseed" and "subseed strength". When the strength is over 0 every image
of a batch keeps ``seed`` and image ``i`` uses ``variation_seed + i`` (A1111's ``process_images``
does the same: a batch is then several variations of one image); at strength 0 nothing here runs and
image ``i`` uses ``seed + i`` as always. Each image draws its noise from its seed exactly as the
pipeline would, draws a second noise from its variation seed,
and spherically interpolates between them by the strength: 0 is the seed's noise, 1 the variation
seed's. The blend is measured the way A1111 measures it (the angle between the two noises taken
per latent channel and column, along the height), so a PNG's "Variation seed strength: 0.2" means
the same blend here as in A1111.

Only the *initial* noise changes. The per-image generators stay those of the image's seed and continue
from where the base noise left them, as in A1111: at strength 1 a non-ancestral sampler gives the
image of ``seed = variation_seed``, while an ancestral one ("Euler a") still adds the seed's own
noise at later steps, so its image is a different one.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

# A1111 falls back to a straight blend when the two noises point almost the same way (sin(angle) ~ 0).
_PARALLEL = 0.9995


def slerp(strength: float, base: torch.Tensor, variation: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``base`` (strength 0) to ``variation`` (strength 1), per image.

    Tensors are ``(batch, channels, height, width)``; the angle is taken per (image, channel, column)
    along the height, as A1111 does with its per-image ``(channels, height, width)`` noise.
    """
    base32, variation32 = base.float(), variation.float()
    axis = 2  # height: A1111 normalises dim 1 of a (channels, height, width) tensor
    base_unit = base32 / base32.norm(dim=axis, keepdim=True)
    variation_unit = variation32 / variation32.norm(dim=axis, keepdim=True)
    cosine = (base_unit * variation_unit).sum(axis, keepdim=True).clamp(-1.0, 1.0)
    blended = []
    for index in range(base32.shape[0]):
        low, high, cos = base32[index], variation32[index], cosine[index]
        if cos.mean() > _PARALLEL:
            # Almost the same direction: the spherical weights divide by ~0; a straight blend is the limit.
            blended.append(torch.lerp(low, high, strength))
            continue
        omega = torch.acos(cos)
        sine = torch.sin(omega)
        # Weights first: at strength 1 the variation weight is sin(w)/sin(w) = 1 exactly, the base's 0.
        low_weight, high_weight = torch.sin((1.0 - strength) * omega) / sine, torch.sin(strength * omega) / sine
        blended.append(low_weight * low + high_weight * high)
    return torch.stack(blended).to(base.dtype)


def varies(request) -> bool:
    """Whether ``request`` (validated) blends in a variation seed's noise."""
    return bool(request.variation_strength) and request.variation_seed is not None


def image_seeds(request) -> list[int]:
    """The seed of each image of the batch: ``seed + i``, or ``seed`` for every image when it varies.

    A1111 keeps one seed for a whole batch of variations (only the variation seeds count up), so a
    batch is several variations of the same image.
    """
    if varies(request):
        return [request.seed] * request.batch_size
    return [request.seed + i for i in range(request.batch_size)]


def variation_seeds(request) -> list[int]:
    """The variation seed of each image of the batch (``variation_seed + i``); empty at strength 0."""
    if not varies(request):
        return []
    return [request.variation_seed + i for i in range(request.batch_size)]


def latent_shape(pipe, request) -> tuple[int, int, int, int]:
    """The shape of the pipeline's initial latents for ``request`` (as its ``prepare_latents`` makes it)."""
    factor = pipe.vae_scale_factor
    return (request.batch_size, pipe.unet.config.in_channels, request.height // factor, request.width // factor)


def initial_latents(pipe, request, generators: list[torch.Generator]) -> torch.Tensor | None:
    """The initial latents for ``request``, or None at strength 0 (the pipeline then draws its own).

    ``generators``: the per-image generators of ``seed + i`` that the pipeline receives next; the base
    noise is drawn from them with the pipeline's own call, so they advance exactly as they would in it.
    """
    seeds = variation_seeds(request)
    if not seeds:
        return None
    shape = latent_shape(pipe, request)
    device, dtype = pipe._execution_device, pipe.unet.dtype
    base = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    others = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    variation = randn_tensor(shape, generator=others, device=device, dtype=dtype)
    return slerp(float(request.variation_strength), base, variation)
