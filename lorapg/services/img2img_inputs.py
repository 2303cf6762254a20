"""img2img options from what a form gives: an init image, strokes painted over it, or an uploaded mask.

The Generate tab (and any other form) hands over plain images; this decides what they mean, so
the UI holds no logic. Never imports gradio.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from lorapg.diffusion.img2img import FILL, ORIGINAL, ImageInput, Img2ImgOptions
from lorapg.errors import UserError
from lorapg.limits import DENOISING_STRENGTH, INPAINT_PADDING, MASK_BLUR

MASKED_CONTENT = {"original": ORIGINAL, "fill": FILL}  # the form's words for A1111's inpainting_fill


def painted_mask(layers: Sequence[Image.Image | None], size: tuple[int, int]) -> Image.Image | None:
    """White wherever any layer has paint (any opacity), black elsewhere; None when nothing is painted.

    The strokes' colour does not matter: a painted layer is transparent where it was not touched.
    """
    mask = Image.new("L", size, 0)
    for layer in layers:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != size:
            alpha = alpha.resize(size, Image.Resampling.NEAREST)
        mask.paste(255, mask=alpha.point(lambda value: 255 if value > 0 else 0))
    return mask if mask.getbbox() else None


def options_from_form(
    image: ImageInput | None,
    *,
    painted: Sequence[Image.Image | None] = (),
    mask: ImageInput | None = None,
    strength: object = DENOISING_STRENGTH.default,
    resize_mode: object = 0,
    mask_blur: object = MASK_BLUR.default,
    masked_content: str = "original",
    mask_invert: object = False,
    only_masked: object = False,
    only_masked_padding: object = INPAINT_PADDING.default,
) -> Img2ImgOptions | None:
    """The request's img2img options; None (txt2img) without an init image. An uploaded ``mask``
    wins over ``painted`` strokes. The values are checked with the request (lorapg.diffusion.img2img)."""
    if image is None:
        if mask is not None:
            raise UserError("Mask: add an init image first; the mask says which part of it to repaint.")
        return None
    if mask is None and isinstance(image, Image.Image):
        mask = painted_mask(painted, image.size)
    if masked_content not in MASKED_CONTENT:
        raise UserError(f"Masked content must be one of {', '.join(MASKED_CONTENT)}, got {str(masked_content)[:40]!r}.")
    return Img2ImgOptions(
        image=image,
        strength=strength,
        resize_mode=resize_mode,
        mask=mask,
        mask_blur=mask_blur,
        mask_invert=mask_invert,
        inpainting_fill=MASKED_CONTENT[masked_content],
        only_masked=only_masked,
        only_masked_padding=only_masked_padding,
    )
