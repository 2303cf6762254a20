"""Inpainting masks the way A1111 treats them: white repaints, black keeps.

A mask is made binary (a painted RGBA layer counts by its alpha), optionally inverted, then
blurred so the repainted area blends in; "only masked" crops to the mask's box plus padding,
grown to the output's aspect ratio. After generation the kept pixels are composited back from the
init image, so everything outside the (blurred) mask is exactly what it was. Written from A1111's
behaviour (modules/processing.py, modules/masking.py), not its code.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)


def binary_mask(mask: Image.Image) -> Image.Image:
    """An "L" mask: a painted RGBA layer (some transparency) by its alpha, thresholded; else its grey."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda value: 255 if value > 128 else 0)
    return mask.convert("L")


def prepare_mask(mask: Image.Image, *, invert: bool, blur: int) -> Image.Image:
    """The mask as A1111 uses it: binary, inverted if asked, blurred by ``blur`` pixels (sigma)."""
    result = binary_mask(mask)
    if invert:
        result = ImageOps.invert(result)
    if blur > 0:
        result = result.filter(ImageFilter.GaussianBlur(blur))
    return result


def is_empty(mask: Image.Image) -> bool:
    return mask.getbbox() is None


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> Box:
    """The mask's box plus ``padding``, grown to the aspect ratio of width x height inside the image.

    Growing it (rather than stretching the crop later) keeps the repainted area undistorted.
    """
    left, top, right, bottom = mask.getbbox() or (0, 0, mask.width, mask.height)
    left, top = max(left - padding, 0), max(top - padding, 0)
    right, bottom = min(right + padding, mask.width), min(bottom + padding, mask.height)
    return _grow_to_ratio((left, top, right, bottom), width / height, mask.width, mask.height)


def _grow_to_ratio(box: Box, ratio: float, limit_w: int, limit_h: int) -> Box:
    left, top, right, bottom = box
    box_w, box_h = right - left, bottom - top
    if box_w / box_h < ratio:  # too narrow: widen
        left, right = _grow_span(left, right, round(box_h * ratio), limit_w)
    else:  # too flat: heighten
        top, bottom = _grow_span(top, bottom, round(box_w / ratio), limit_h)
    return left, top, right, bottom


def _grow_span(start: int, end: int, wanted: int, limit: int) -> tuple[int, int]:
    """[start, end) grown around its centre to ``wanted`` (at most ``limit``), shifted to stay inside."""
    wanted = min(max(wanted, end - start), limit)
    start = max(start - (wanted - (end - start)) // 2, 0)
    end = start + wanted
    if end > limit:
        start, end = limit - wanted, limit
    return start, end


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area starts as the surrounding colours, smeared in.

    A normalised blur of the kept pixels only (blur(image × keep) / blur(keep)), from wide to
    narrow, so every masked pixel takes the colours nearest to it. 8-bit blurs suffice: this is only
    where denoising starts.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    repaint = np.asarray(mask.convert("L")) > 127
    if repaint.all():
        return image.convert("RGB")
    keep = np.where(repaint, 0, 255).astype(np.uint8)
    premultiplied = Image.fromarray(np.where(repaint[..., None], 0, rgb).astype(np.uint8))
    result = rgb.astype(np.float32)
    for radius in (64, 16, 4, 1):
        weighted = np.asarray(premultiplied.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
        weight = np.asarray(Image.fromarray(keep).filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
        known = repaint & (weight >= 1)
        result[known] = weighted[known] * 255 / weight[known][:, None]
    return Image.fromarray(np.clip(result, 0, 255).round().astype(np.uint8))


def overlay_mask(mask: Image.Image, *, only_masked: bool) -> Image.Image:
    """How much of each generated pixel the final composite takes (255 = all of it).

    Whole-picture inpainting doubles the blurred mask, as A1111 does, so its soft edge leans to the
    new pixels; "only masked" uses it as it is.
    """
    if only_masked:
        return mask
    return mask.point(lambda value: min(value * 2, 255))


def composite(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """``generated`` where ``mask`` is white, ``original`` where it is black, blended between.

    Where the mask is 0 the result is the original pixel exactly (PIL's composite is exact there).
    """
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask.convert("L"))


def paste_back(generated: Image.Image, original: Image.Image, box: Box) -> Image.Image:
    """ "Only masked": the generated crop scaled back to the box and pasted into the original."""
    left, top, right, bottom = box
    result = original.convert("RGB").copy()
    result.paste(generated.convert("RGB").resize((right - left, bottom - top), Image.Resampling.LANCZOS), (left, top))
    return result
