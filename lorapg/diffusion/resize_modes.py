"""A1111's img2img resize modes: how an init image of any size becomes ``width`` x ``height``.

0 "Just resize" stretches; 1 "Crop and resize" scales to cover and cuts the overhang (centred);
2 "Resize and fill" scales to fit and fills the bars by stretching the image's edge rows or
columns; 3 "Just resize (latent upscale)" resizes the encoded latents instead of the pixels (the
engine does that part, ``img2img.latent_resize``; in pixel space it is mode 0, as A1111 treats it
for masks). Written from A1111's behaviour (modules/images.py ``resize_image``), not its code.
"""

from __future__ import annotations

from PIL import Image

from lorapg.errors import UserError
from lorapg.limits import RESIZE_MODES

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL, LATENT_RESIZE = 0, 1, 2, 3
LANCZOS = Image.Resampling.LANCZOS


def check_resize_mode(value: object) -> int:
    """``value`` as one of A1111's resize modes, or a UserError naming the field and the choices."""
    choices = ", ".join(f"{number} {label}" for number, label in RESIZE_MODES.items())
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UserError(f"Resize mode must be one of {choices}; got {type(value).__name__}.")
    text = str(value).strip()
    number = int(float(text)) if _is_whole(text) else None
    if number not in RESIZE_MODES:
        raise UserError(f"Resize mode must be one of {choices}; got {text[:20]!r}.")
    return number


def _is_whole(text: str) -> bool:
    try:
        return float(text).is_integer()
    except ValueError:
        return False


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` as ``width`` x ``height`` by resize ``mode`` (the pixel part of mode 3 is mode 0)."""
    if image.size == (width, height):
        return image.copy()
    if mode in (JUST_RESIZE, LATENT_RESIZE):
        return image.resize((width, height), resample=LANCZOS)
    if mode == CROP_AND_RESIZE:
        return _crop_and_resize(image, width, height)
    return _resize_and_fill(image, width, height)


def _scaled_size(image: Image.Image, width: int, height: int, cover: bool) -> tuple[int, int]:
    """The image's size scaled to cover (``cover``) or fit inside width x height, aspect kept."""
    wider = width / height > image.width / image.height  # the target is wider than the image
    if wider == cover:  # width decides
        return width, max(1, image.height * width // image.width)
    return max(1, image.width * height // image.height), height


def _crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    scaled_w, scaled_h = _scaled_size(image, width, height, cover=True)
    scaled = image.resize((scaled_w, scaled_h), resample=LANCZOS)
    left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def _resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    scaled_w, scaled_h = _scaled_size(image, width, height, cover=False)
    scaled = image.resize((scaled_w, scaled_h), resample=LANCZOS)
    result = Image.new(image.mode, (width, height))
    left, top = (width - scaled_w) // 2, (height - scaled_h) // 2
    result.paste(scaled, (left, top))
    # The bars repeat the image's outermost row or column, stretched across them (as A1111 does).
    if scaled_h < height:
        bottom = height - top - scaled_h
        if top:
            result.paste(scaled.crop((0, 0, width, 1)).resize((width, top)), (0, 0))
        if bottom:
            result.paste(scaled.crop((0, scaled_h - 1, width, scaled_h)).resize((width, bottom)), (0, top + scaled_h))
    elif scaled_w < width:
        right = width - left - scaled_w
        if left:
            result.paste(scaled.crop((0, 0, 1, height)).resize((left, height)), (0, 0))
        if right:
            result.paste(scaled.crop((scaled_w - 1, 0, scaled_w, height)).resize((right, height)), (left + scaled_w, 0))
    return result
