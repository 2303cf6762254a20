"""Turning a finished generation into PNG files with AUTOMATIC1111 metadata (CLI and gallery)."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import ImageOps

from lorapg.atomic_files import atomic_write
from lorapg.diffusion.engine import GenerationResult
from lorapg.diffusion.families import FLUX
from lorapg.diffusion.inpaint_mask import binary_mask
from lorapg.diffusion.model_source import SINGLE_FILE
from lorapg.gallery.a1111 import format_parameters
from lorapg.gallery.png import save_png_atomically
from lorapg.gallery.records import (
    ControlNetUse,
    HiresUse,
    ImageRecord,
    Img2ImgUse,
    LoraUse,
    attachment_path,
    control_attachment,
)
from lorapg.hashing import lora_hash, model_hash
from lorapg.limits import CONTROL_RESIZE_MODES, INPAINTING_FILLS

log = logging.getLogger(__name__)


def file_hashes(result: GenerationResult) -> dict:
    """The LoRA hashes (in ``result.loras`` order) and the single-file model hash of ``result``, read from
    the files where they were used. A remote worker sends them with its result (``result.file_hashes``):
    the app's paths to those files may differ, or be missing, and the images are made already."""
    source = result.model
    return {
        "loras": [lora_hash(s.info.path) for s in result.loras],
        # A1111's model hash is of the checkpoint file; a diffusers folder has no single file.
        "model": model_hash(source.path) if source.kind == SINGLE_FILE and source.path else None,
    }


def guidance_fields(result: GenerationResult) -> dict:
    """The record's guidance as Forge writes it: Flux dev's is distilled guidance ("CFG scale: 1",
    "Distilled CFG Scale: 3.5"); schnell (guidance 0 here, see flux.adapt_request) has none to write.
    Told apart by the model (``guidance_distilled``), not the value: Flux dev at 0 is not schnell."""
    guidance = result.request.guidance_scale
    if getattr(result, "family", None) != FLUX:
        return {"guidance_scale": guidance}
    if not getattr(result, "guidance_distilled", False):
        return {"guidance_scale": None}
    return {"guidance_scale": guidance, "distilled_guidance": True}


def image_record(result: GenerationResult, index: int, job_id: str | None = None) -> ImageRecord:
    """Everything needed to make image ``index`` of ``result`` again, as a gallery record."""
    request = result.request
    source = result.model
    hashes = getattr(result, "file_hashes", None) or file_hashes(result)
    return ImageRecord(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        loras=[LoraUse(s.info.name, s.scale, digest) for s, digest in zip(result.loras, hashes["loras"], strict=True)],
        seed=result.seeds[index],
        steps=request.steps,
        **guidance_fields(result),
        sampler=request.sampler,
        width=request.width,
        height=request.height,
        model_name=source.display_name,
        model_hash=hashes["model"],
        job_id=job_id,
        clip_skip=request.clip_skip if request.clip_skip > 1 else None,
        # Empty at strength 0: the image is the seed's own, and A1111 writes no variation then.
        variation_seed=result.variation_seeds[index] if result.variation_seeds else None,
        variation_strength=request.variation_strength if result.variation_seeds else None,
        img2img=img2img_use(request.img2img),
        hires=hires_use(request.hires),
        controlnet=controlnet_uses(result),
    )


def controlnet_uses(result: GenerationResult) -> list[ControlNetUse]:
    """What the record keeps of each ControlNet unit (checked); its image is kept beside the result."""
    hashes = result.control_hashes or [""] * len(result.request.controlnet)
    uses = []
    for unit, digest in zip(result.request.controlnet, hashes, strict=True):
        canny = unit.module == "canny"  # the only preprocessor here with thresholds
        uses.append(
            ControlNetUse(
                module=unit.module,
                model=unit.model,
                model_hash=digest or None,
                weight=unit.weight,
                resize_mode=CONTROL_RESIZE_MODES[unit.resize_mode],
                threshold_a=unit.threshold_a if canny else None,
                threshold_b=unit.threshold_b if canny else None,
                guidance_start=unit.guidance_start,
                guidance_end=unit.guidance_end,
            )
        )
    return uses


def hires_use(options) -> HiresUse | None:
    """What the record keeps of the request's (checked) hires options; None without a hires pass."""
    if options is None:
        return None
    sized = bool(options.resize_x or options.resize_y)
    return HiresUse(
        upscaler=options.upscaler,
        denoising_strength=options.strength,
        scale=None if sized else options.scale,
        resize_x=options.resize_x,
        resize_y=options.resize_y,
        steps=options.steps,
    )


def img2img_use(options) -> Img2ImgUse | None:
    """What the record keeps of the request's img2img options (checked ones); None for txt2img."""
    if options is None:
        return None
    masked = options.mask is not None
    return Img2ImgUse(
        denoising_strength=options.strength,
        resize_mode=options.resize_mode,
        mask_blur=options.mask_blur if masked else None,
        masked_content=INPAINTING_FILLS[options.inpainting_fill] if masked else None,
        only_masked=bool(masked and options.only_masked),
        only_masked_padding=options.only_masked_padding if masked and options.only_masked else None,
    )


def attachments(result: GenerationResult) -> dict:
    """The init image and the mask (as the user gave it, inverted if asked), and each ControlNet unit's
    image (as given: Reuse runs its preprocessor again), to keep beside each image."""
    kept = {control_attachment(index): unit.image for index, unit in enumerate(result.request.controlnet)}
    options = result.request.img2img
    if options is None:
        return kept
    kept["init"] = options.image
    if options.mask is not None:
        # Saved as used: Reuse then needs no "invert" flag.
        kept["mask"] = ImageOps.invert(binary_mask(options.mask)) if options.mask_invert else options.mask
    return kept


def write_result_pngs(result: GenerationResult, out: Path) -> list[Path]:
    """Write each image to ``out`` (a .png file; a batch adds -1, -2, …) or into folder ``out``
    (SEED.png; SEED-VARIATION_SEED.png where the batch's images share a seed, as variations do).

    The inputs the batch shares (init image, mask, control images) are written once, beside the
    batch's name: OUT.init.png, OUT.mask.png, OUT.control0.png, … (in a folder, OUT is the first
    image's name), as the gallery keeps them beside an image."""
    out = Path(out)
    paths = [
        save_png_atomically(image, path, format_parameters(image_record(result, index)))
        for index, (image, path) in enumerate(zip(result.images, _result_paths(result, out), strict=True))
    ]
    if paths:
        batch_name = out if out.suffix.lower() == ".png" else paths[0]
        for kind, attached in attachments(result).items():
            with atomic_write(attachment_path(batch_name, kind)) as handle:
                attached.save(handle, format="PNG")
    return paths


def _result_paths(result: GenerationResult, out: Path) -> list[Path]:
    """One distinct file per image: a batch of variations keeps one seed, so its variation seeds (or,
    failing those, the image's place in the batch) tell its files apart."""
    count = len(result.images)
    if out.suffix.lower() == ".png":
        return [out] if count == 1 else [out.with_name(f"{out.stem}-{index + 1}.png") for index in range(count)]
    seeds = [str(seed) for seed in result.seeds[:count]]
    if len(set(seeds)) == count:
        return [out / f"{seed}.png" for seed in seeds]
    variations = result.variation_seeds or []
    if len(variations) == count and len(set(zip(seeds, variations, strict=True))) == count:
        return [out / f"{seed}-{variation}.png" for seed, variation in zip(seeds, variations, strict=True)]
    return [out / f"{seed}-{index + 1}.png" for index, seed in enumerate(seeds)]


def record_in_gallery(
    store, result: GenerationResult, job_id: str | None = None, owner: str | None = None
) -> list[ImageRecord]:
    """Save every image of ``result`` into the gallery ``store`` (PNG + row) as ``owner``'s; returns the records."""
    kept = attachments(result)
    return [
        store.add(image_record(result, index, job_id), image, owner=owner, attachments=kept)
        for index, image in enumerate(result.images)
    ]
