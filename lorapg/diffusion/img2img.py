"""img2img and inpainting: the request's options, their checks, and the image work around the pipeline.

The engine runs diffusers' img2img or inpaint pipeline made with ``from_pipe`` from the loaded one
(the same modules, so fused LoRAs apply); this module decides what goes in (the init image resized
by A1111's resize mode, the mask blurred, or the mask's box for "only masked") and what comes out
(the generated pixels composited over the init image, so unmasked pixels stay as they were).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from lorapg.coercion import checked_flag, checked_number, checked_whole, shown
from lorapg.diffusion import inpaint_mask
from lorapg.diffusion.resize_modes import LATENT_RESIZE, RESIZE_AND_FILL, check_resize_mode, resize_image
from lorapg.errors import UserError
from lorapg.limits import DENOISING_STRENGTH, INPAINT_PADDING, INPAINTING_FILLS, MASK_BLUR, SIZE_MULTIPLE

if TYPE_CHECKING:  # torch is imported only where latents are made: the CLI and API build options without it
    import torch

ImageInput = Image.Image | str | Path | bytes
FILL, ORIGINAL = 0, 1  # A1111's inpainting_fill values this app runs


@dataclass(frozen=True)
class Img2ImgOptions:
    """An init image and how to use it; with a mask, inpainting. Names follow A1111's API."""

    image: ImageInput  # a PIL image, a file path or the file's bytes
    strength: float = DENOISING_STRENGTH.default  # A1111's denoising_strength
    resize_mode: int = 0  # lorapg.limits.RESIZE_MODES
    mask: ImageInput | None = None  # white = repaint, black = keep
    mask_blur: int = int(MASK_BLUR.default)
    mask_invert: bool = False  # A1111's inpainting_mask_invert: repaint the black part instead
    inpainting_fill: int = ORIGINAL  # A1111's "Masked content": 0 fill, 1 original
    only_masked: bool = False  # A1111's inpaint_full_res: work on the mask's box at full size
    only_masked_padding: int = int(INPAINT_PADDING.default)


# --- checks -------------------------------------------------------------------------------------


def check_options(options: Img2ImgOptions, max_pixels: int = 0) -> Img2ImgOptions:
    """The options with images decoded (RGB init, mask as given) and every number in range.

    ``max_pixels``: Settings.max_image_pixels (0 = no limit). Idempotent: checked options pass again.
    """
    image = load_image("Init image", options.image, max_pixels).convert("RGB")
    mask = None
    if options.mask is not None:
        mask = load_image("Mask", options.mask, max_pixels)
        if mask.size != image.size:
            # A1111 stretches such a mask silently, which repaints the wrong place: refuse it.
            raise UserError(
                f"Mask is {mask.width}×{mask.height} but the init image is {image.width}×{image.height}; "
                "send a mask of the init image's size (white = repaint)."
            )
    strength = checked_number("Denoising strength", options.strength)
    if strength not in DENOISING_STRENGTH:
        raise UserError(f"Denoising strength must be {DENOISING_STRENGTH.describe()}, got {strength:g}.")
    blur = checked_whole("Mask blur", options.mask_blur)
    if blur not in MASK_BLUR:
        raise UserError(f"Mask blur must be {MASK_BLUR.describe()} pixels, got {blur}.")
    padding = checked_whole("Only masked padding", options.only_masked_padding)
    if padding not in INPAINT_PADDING:
        raise UserError(f"Only masked padding must be {INPAINT_PADDING.describe()} pixels, got {padding}.")
    fill = checked_whole("Masked content (inpainting_fill)", options.inpainting_fill)
    if fill not in (FILL, ORIGINAL):
        named = ", ".join(f"{n} {INPAINTING_FILLS[n]}" for n in (FILL, ORIGINAL))
        raise UserError(f"Masked content (inpainting_fill) must be {named} here, got {shown(options.inpainting_fill)}.")
    resize_mode = check_resize_mode(options.resize_mode)
    if mask is not None and resize_mode == LATENT_RESIZE:
        raise UserError("Resize mode 3 (latent upscale) works without a mask; pick resize mode 0, 1 or 2 to inpaint.")
    return replace(
        options,
        image=image,
        mask=mask,
        strength=strength,
        resize_mode=resize_mode,
        mask_blur=blur,
        mask_invert=checked_flag("Invert mask (inpainting_mask_invert)", options.mask_invert),
        inpainting_fill=fill,
        only_masked=checked_flag("Only masked (inpaint_full_res)", options.only_masked),
        only_masked_padding=padding,
    )


def load_image(label: str, value: ImageInput, max_pixels: int = 0) -> Image.Image:
    """A decoded image from a PIL image, a path or bytes; a UserError naming ``label`` otherwise."""
    if isinstance(value, Image.Image):
        _check_pixels(label, value.width, value.height, max_pixels)
        return value
    if isinstance(value, str | Path):
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"{label}: no file at {shown(str(value))}; give the path of a PNG or JPEG.")
        data = path.read_bytes()
    elif isinstance(value, bytes | bytearray):
        data = bytes(value)
    else:
        raise UserError(f"{label} must be an image, got {type(value).__name__}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(io.BytesIO(data))
            _check_pixels(label, image.width, image.height, max_pixels)
            image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise UserError(f"{label} has more pixels than Pillow opens; scale it down.") from None
        raise UserError(f"{label} is not an image this app can read (PNG, JPEG or WEBP); send an image file.") from None
    return image


def _check_pixels(label: str, width: int, height: int, max_pixels: int) -> None:
    if max_pixels > 0 and width * height > max_pixels:
        raise UserError(
            f"{label} is {width}×{height} ({width * height / 1e6:.1f} megapixels), over the limit of "
            f"{max_pixels / 1e6:g} megapixels (setting max_image_pixels); scale it down."
        )


def effective_steps(steps: int, strength: float) -> int:
    """The denoising steps img2img runs: diffusers (and A1111 by default) run int(steps × strength)."""
    return min(int(steps * strength), steps)


# --- the plan: what goes into the pipeline, and how its output comes back ------------------------


@dataclass
class Plan:
    """One img2img or inpainting run, prepared for the pipeline.

    ``init``: the pipeline's image (width x height); ``mask``: its mask, None for plain img2img;
    ``original``/``overlay``: the image the result is composited over and how much of the new
    pixels each place takes; ``box``: "only masked"'s region of ``original`` (None: the whole).
    """

    init: Image.Image
    mask: Image.Image | None
    original: Image.Image | None = None
    overlay: Image.Image | None = None
    box: inpaint_mask.Box | None = None
    latent_source: Image.Image | None = None  # resize mode 3: encoded at its own size, latents resized

    def finish(self, generated: Image.Image) -> Image.Image:
        """The pipeline's output as the user's result: pasted back and composited over the init image."""
        if self.mask is None:
            return generated
        if self.box is not None:
            generated = inpaint_mask.paste_back(generated, self.original, self.box)
        return inpaint_mask.composite(generated, self.original, self.overlay)


def plan(options: Img2ImgOptions, width: int, height: int) -> Plan:
    """Resize, mask and crop as A1111 does; ``options`` from ``check_options``."""
    if options.resize_mode == LATENT_RESIZE:
        return Plan(
            init=resize_image(LATENT_RESIZE, options.image, width, height), mask=None, latent_source=options.image
        )
    if options.mask is None:
        return Plan(init=resize_image(options.resize_mode, options.image, width, height), mask=None)
    mask = inpaint_mask.prepare_mask(options.mask, invert=options.mask_invert, blur=options.mask_blur)
    if options.only_masked and not inpaint_mask.is_empty(mask):
        return _only_masked_plan(options, mask, width, height)
    image = resize_image(options.resize_mode, options.image, width, height)
    mask = resize_image(options.resize_mode, mask, width, height)
    init = inpaint_mask.fill_masked(image, mask) if options.inpainting_fill == FILL else image
    return Plan(init=init, mask=mask, original=image, overlay=inpaint_mask.overlay_mask(mask, only_masked=False))


def _only_masked_plan(options: Img2ImgOptions, mask: Image.Image, width: int, height: int) -> Plan:
    """Generate the mask's box (plus padding) at the full request size, then paste it back."""
    box = inpaint_mask.crop_region(mask, options.only_masked_padding, width, height)
    # The result keeps the init image's own size: only the box is repainted.
    image = options.image
    crop = resize_image(RESIZE_AND_FILL, image.crop(box), width, height)
    crop_mask = resize_image(RESIZE_AND_FILL, mask.crop(box), width, height)
    init = inpaint_mask.fill_masked(crop, crop_mask) if options.inpainting_fill == FILL else crop
    return Plan(
        init=init,
        mask=crop_mask,
        original=image,
        overlay=inpaint_mask.overlay_mask(mask, only_masked=True),
        box=box,
    )


def latent_resize(pipe, image: Image.Image, width: int, height: int, generator: torch.Generator) -> torch.Tensor:
    """Resize mode 3: the image encoded at its own size (rounded to the VAE's multiple), the latents
    resized bilinearly to width x height / 8, scaled as diffusers' img2img expects its latents."""
    import torch

    source_w = max(SIZE_MULTIPLE, round(image.width / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    source_h = max(SIZE_MULTIPLE, round(image.height / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    pixels = pipe.image_processor.preprocess(image, height=source_h, width=source_w)
    vae = pipe.vae
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = (height // factor, width // factor)
    return torch.nn.functional.interpolate(latents, size=size, mode="bilinear")
