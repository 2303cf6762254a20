"""Transformer families (Flux.1, SD 3.5): what differs from Stable Diffusion's UNet path.

A diffusion transformer has no UNet, reads T5 besides CLIP (so no A1111 prompt chunking or clip
skip), and is sampled by flow matching. Flux.1 dev is guidance-distilled: its ``guidance_scale`` is
an input of the transformer, not classifier-free guidance, and there is no negative prompt (Forge
ignores one at CFG 1; so does this, with a warning). Flux.1 schnell has no guidance input at all.
SD 3.5 uses real classifier-free guidance with a negative prompt, like SD.

The engine asks this module for the family's defaults, checks the request against what the family
can do, and for the pipeline's keyword arguments; everything else (LoRAs, residency, cancel) is shared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from lorapg.diffusion.families import FLUX, NATIVE_SIZE, SD3, family_label, is_transformer_family
from lorapg.diffusion.prompt_syntax import is_plain
from lorapg.diffusion.samplers import DEFAULT_FLOW_SAMPLER, DEFAULT_SAMPLER, FLOW_SAMPLERS, SAMPLERS
from lorapg.errors import UserError
from lorapg.limits import CFG_SCALE, STEPS

log = logging.getLogger(__name__)

# Flux packs 2x2 latent patches into one token, so a side must be a multiple of VAE scale (8) x 2.
FLUX_SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class FamilyDefaults:
    """What the model's authors recommend; the UI and API start from these."""

    size: int
    steps: int
    guidance_scale: float
    sampler: str
    negative_prompt: bool  # whether the family reads a negative prompt
    note: str = ""


# Sources: the FLUX.1-dev and FLUX.1-schnell model cards on the Hugging Face hub and diffusers'
# FluxPipeline docs (dev: 1024 px, 28-50 steps, guidance 3.5; schnell: 4 steps, guidance 0,
# max_sequence_length 256). The SD values are this app's existing defaults (lorapg.limits).
FLUX_DEV = FamilyDefaults(1024, 28, 3.5, DEFAULT_FLOW_SAMPLER, False, "guidance is Flux dev's distilled guidance")
FLUX_SCHNELL = FamilyDefaults(1024, 4, 0.0, DEFAULT_FLOW_SAMPLER, False, "schnell takes no guidance")
# The stable-diffusion-3.5-large / -large-turbo / -medium model cards' diffusers examples: Large 28 steps
# at CFG 3.5, Large Turbo 4 steps at CFG 0, Medium 40 steps at CFG 4.5. Turbo has Large's shapes, so it
# cannot be told apart from the weights: it starts from Large's values (set 4 steps, CFG 0 for it).
SD35_LARGE = FamilyDefaults(1024, 28, 3.5, DEFAULT_FLOW_SAMPLER, True, "Large Turbo: 4 steps, CFG 0")
SD35_MEDIUM = FamilyDefaults(1024, 40, 4.5, DEFAULT_FLOW_SAMPLER, True)
# A1111 1.10's API defaults (modules/api/models.py: steps 20, cfg_scale 7, 512x512, sampler_index
# "Euler"), whatever SD model is loaded: /sdapi/v1 clients that leave a field out get these on SD.
A1111_SD = FamilyDefaults(512, 20, 7.0, "Euler", True, "A1111's API defaults")


def family_defaults(family: str | None, pipe: DiffusionPipeline | None = None, size: int = 0) -> FamilyDefaults:
    """The recommended settings for a loaded family (``size``: its native size, when known)."""
    if family == FLUX:
        defaults = FLUX_DEV if is_guidance_distilled(pipe) else FLUX_SCHNELL
    elif family == SD3:
        defaults = SD35_MEDIUM if _is_sd35_medium(pipe) else SD35_LARGE
    else:
        defaults = FamilyDefaults(
            NATIVE_SIZE.get(family or "", 512), int(STEPS.default), CFG_SCALE.default, DEFAULT_SAMPLER, True
        )
    return replace(defaults, size=size) if size else defaults


def _is_sd35_medium(pipe: DiffusionPipeline | None) -> bool:
    """SD 3.5 Medium (MMDiT-X) has dual-attention layers; Large and Large Turbo have none."""
    transformer = getattr(pipe, "transformer", None)
    return bool(transformer is not None and getattr(transformer.config, "dual_attention_layers", ()))


def is_guidance_distilled(pipe: DiffusionPipeline | None) -> bool:
    """Flux dev has a guidance embedding; schnell does not (its ``guidance_embeds`` is False)."""
    transformer = getattr(pipe, "transformer", None)
    return transformer is None or bool(getattr(transformer.config, "guidance_embeds", True))


def takes_distilled_guidance(family: str | None, pipe: DiffusionPipeline | None) -> bool:
    """Flux dev: its guidance is distilled guidance (written as Forge does), at any value, 0 included."""
    return family == FLUX and is_guidance_distilled(pipe)


def native_size(pipe: DiffusionPipeline, family: str) -> int:
    """The VAE's sample size (1024 for FLUX.1's VAE; a tiny test model says its own)."""
    return int(getattr(pipe.vae.config, "sample_size", 0) or NATIVE_SIZE[family])


def adapt_request(request, family: str, pipe: DiffusionPipeline) -> tuple[object, list[str]]:
    """``request`` (validated) with what the family cannot use removed, and one warning per removal.

    Refused (UserError): what would give a wrong image silently (a size the packing cannot take,
    variation noise drawn in the UNet's latent shape).
    """
    warnings: list[str] = []
    label = family_label(family)
    for name, size in (("Width", request.width), ("Height", request.height)):
        if size % FLUX_SIZE_MULTIPLE:
            nearest = max(FLUX_SIZE_MULTIPLE, round(size / FLUX_SIZE_MULTIPLE) * FLUX_SIZE_MULTIPLE)
            raise UserError(
                f"{name} must be a multiple of {FLUX_SIZE_MULTIPLE} for {label}, got {size} (try {nearest})."
            )
    if request.variation_strength:
        raise UserError(f"Variation strength must be 0 for {label} models (variation seeds are SD-only for now).")
    changes: dict = {}
    if family == FLUX and request.negative_prompt.strip():
        warnings.append(f"{label} has no negative prompt; it was ignored (as Forge does at CFG 1).")
        changes["negative_prompt"] = ""
    if request.clip_skip > 1:
        warnings.append(f"Clip skip applies to SD 1.x models only; it was ignored for {label}.")
        changes["clip_skip"] = 1
    if request.sampler not in FLOW_SAMPLERS and request.sampler in SAMPLERS:
        # The request's default sampler is an SD one; a flow-matching model needs its own.
        warnings.append(f"Sampler {request.sampler} does not apply to {label}; {DEFAULT_FLOW_SAMPLER} was used.")
        changes["sampler"] = DEFAULT_FLOW_SAMPLER
    if not is_plain(request.prompt):
        warnings.append(f"Prompt weights like (word:1.2) are not applied for {label}; the text is read as written.")
    if family == FLUX and not is_guidance_distilled(pipe) and request.guidance_scale:
        warnings.append(
            f"This {label} model (schnell) takes no guidance; CFG scale {request.guidance_scale:g} was ignored."
        )
        changes["guidance_scale"] = 0.0
    return (replace(request, **changes) if changes else request), warnings


def pipeline_kwargs(pipe: DiffusionPipeline, request) -> dict:
    """The family's own keyword arguments for ``pipe(...)`` besides steps, size, generators and callback."""
    kwargs = {"prompt": request.prompt, "guidance_scale": request.guidance_scale}
    if hasattr(pipe, "tokenizer_3"):  # SD 3.x: CLIP L + CLIP G + T5 (256 tokens by default), real CFG
        kwargs["negative_prompt"] = request.negative_prompt or None
        limit = getattr(pipe.tokenizer_3, "model_max_length", 256) or 256
        kwargs["max_sequence_length"] = min(256, int(limit))
        return kwargs
    tokenizer_2 = getattr(pipe, "tokenizer_2", None)
    limit = getattr(tokenizer_2, "model_max_length", 512) or 512
    # FLUX.1 reads up to 512 T5 tokens (schnell 256); a smaller tokenizer bounds it to what it can count.
    kwargs["max_sequence_length"] = min(512 if is_guidance_distilled(pipe) else 256, int(limit))
    return kwargs


def encode_prompts(pipe: DiffusionPipeline, request, device: torch.device) -> dict:
    """The text encoders' outputs as ``pipe(...)`` keyword arguments, replacing ``pipeline_kwargs``' prompts.

    Encoded apart from the denoising call so the text encoders (T5 above all) need to be on the GPU only
    for this step (the engine's per-component residency). The same calls the pipeline makes itself with
    ``prompt=``, so the image does not change; the embeddings come repeated for the batch already, so the
    pipeline is then called with ``num_images_per_prompt=1``.
    """
    kwargs = pipeline_kwargs(pipe, request)
    prompt, length, batch = kwargs.pop("prompt"), kwargs.pop("max_sequence_length"), request.batch_size
    with torch.no_grad():
        if hasattr(pipe, "tokenizer_3"):  # SD 3.x: the negative prompt only under real CFG, as the pipeline does
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                prompt_3=None,
                negative_prompt=kwargs.pop("negative_prompt"),
                do_classifier_free_guidance=request.guidance_scale > 1,
                device=device,
                num_images_per_prompt=batch,
                max_sequence_length=length,
            )
            kwargs.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        else:
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=batch, max_sequence_length=length
            )
    return dict(kwargs, prompt_embeds=embeds, pooled_prompt_embeds=pooled)


def latents_to_preview(latents: torch.Tensor, pipe: DiffusionPipeline, width: int, height: int) -> Image.Image:
    """The first image of a latent batch, decoded by the VAE.

    Flux's callback latents are packed (batch, tokens, channels x 4); they are unpacked to the VAE's
    (channels, h, w) first. No published linear latent-to-RGB fit is used: the decode is exact and,
    at one preview every few steps, cheap beside a transformer step.
    """
    with torch.no_grad():
        spatial = latents[:1]
        if spatial.ndim == 3:  # Flux: (batch, tokens, channels x 4); SD 3's are already (batch, c, h, w)
            spatial = pipe._unpack_latents(spatial, height, width, pipe.vae_scale_factor)
        config = pipe.vae.config
        spatial = spatial / config.scaling_factor + (config.shift_factor or 0.0)
        image = pipe.vae.decode(spatial.to(pipe.vae.dtype), return_dict=False)[0]
    array = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


__all__ = [
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "FamilyDefaults",
    "adapt_request",
    "encode_prompts",
    "family_defaults",
    "is_transformer_family",
    "latents_to_preview",
    "native_size",
    "pipeline_kwargs",
]
