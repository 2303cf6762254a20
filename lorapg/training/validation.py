"""Checks on training images, one verdict per file with the reasons a user can act on.

Every file is opened fully (``load()``), so truncated downloads are caught here and not in the
middle of a training run; the pixel count is checked from the header first, so a decompression bomb
is an invalid file with its name and never decoded. Exact duplicates (same bytes or same pixels) are
invalid. Near duplicates (a resized or re-encoded copy) are only reported: the user decides, since
a similar-looking image may be meant. The measure is a colour thumbnail, so the same layout in other
colours (a recoloured image is a different training image) is not a near duplicate.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lorapg.config import Settings

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MIN_SIDE = 256  # below this an SD 1.x bucket (≥ 256 px) would have to upscale the image
MAX_ASPECT = 3.0  # kohya's buckets stop near 1:4 at 512²; past 3:1 most of the picture is cropped away
THUMBNAIL_SIDE = 16  # colour thumbnail the near-duplicate measure compares
# Mean difference per channel (0-255) on the thumbnail. Resized / re-encoded JPEG copies measure
# under 3; distinct smooth images over 50; the same stripes in another colour over 35.
NEAR_DUPLICATE_LEVELS = 8.0
DEFAULT_MAX_PIXELS = Settings.max_image_pixels


@dataclass
class ImageCheck:
    file: str  # name inside the dataset folder
    ok: bool
    reasons: list[str] = field(default_factory=list)
    width: int = 0
    height: int = 0
    sha256: str = ""
    pixels_sha256: str = ""  # of the decoded RGBA pixels: the same picture saved another way
    thumbnail: np.ndarray | None = field(default=None, repr=False, compare=False)
    near_duplicate_of: str = ""  # kept, but reported: the user decides
    near_distance: float = 0.0

    @property
    def near_duplicate_note(self) -> str:
        return (
            f"{self.file} looks like {self.near_duplicate_of} (mean colour difference "
            f"{self.near_distance:.1f} of 255 on a {THUMBNAIL_SIDE}×{THUMBNAIL_SIDE} thumbnail)"
        )


@dataclass
class ValidationReport:
    checks: list[ImageCheck]

    @property
    def valid(self) -> list[ImageCheck]:
        return [c for c in self.checks if c.ok]

    @property
    def invalid(self) -> list[ImageCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def near_duplicates(self) -> list[ImageCheck]:
        """Usable images that look like an earlier one; training keeps them unless told to drop them."""
        return [c for c in self.checks if c.ok and c.near_duplicate_of]

    def trainable(self, *, drop_near_duplicates: bool = False) -> list[ImageCheck]:
        return [c for c in self.valid if not (drop_near_duplicates and c.near_duplicate_of)]

    def summary(self) -> str:
        lines = [f"{len(self.valid)} of {len(self.checks)} image(s) usable for training."]
        lines += [f"- {c.file}: {'; '.join(c.reasons)}" for c in self.invalid]
        if self.near_duplicates:
            lines.append(
                f"{len(self.near_duplicates)} near duplicate(s), kept for training; remove them "
                "(Remove near duplicates) unless each is meant as a separate image:"
            )
            lines += [f"- {c.near_duplicate_note}" for c in self.near_duplicates]
        return "\n".join(lines)


def colour_thumbnail(image: Image.Image) -> np.ndarray:
    """Box-averaged RGB thumbnail: sees colour and layout, and hardly changes when re-encoded or resized."""
    small = image.convert("RGB").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.int16)


def thumbnail_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    """The reason a width×height image is refused, or "" (``max_pixels`` ≤ 0: no limit)."""
    if max_pixels <= 0 or width * height <= max_pixels:
        return ""
    return (
        f"too many pixels: {width}×{height} is {width * height / 1e6:.0f} megapixels, over the limit of "
        f"{max_pixels / 1e6:g} (setting max_image_pixels, LORAPG_MAX_IMAGE_PIXELS); scale it down"
    )


def pillow_refusal(exc: Image.DecompressionBombError, max_pixels: int) -> str:
    """The reason for an image over Pillow's own hard limit, which refuses it before we see its size."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    megapixels = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "more pixels than Pillow opens"
    limit = f"{max_pixels / 1e6:g}" if max_pixels > 0 else f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} (Pillow's)"
    return (
        f"too many pixels: {megapixels}, over the limit of {limit} megapixels (setting max_image_pixels, "
        "LORAPG_MAX_IMAGE_PIXELS); scale it down"
    )


def header_size(path: Path) -> tuple[int, int]:
    """Width and height from the file's header, without decoding a pixel."""
    with warnings.catch_warnings():
        # Our own limit decides; PIL's warning (or error past twice its limit) would hide the file's name.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return image.size


def _decode(path: Path, check: ImageCheck, max_pixels: int) -> bool:
    """Header first (pixel limit), then every pixel; False with a reason when the file is refused."""
    try:
        check.width, check.height = header_size(path)
        bomb = too_many_pixels(check.width, check.height, max_pixels)
        if bomb:
            check.reasons.append(bomb)
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decodes every pixel: truncated files fail here
                check.pixels_sha256 = hashlib.sha256(
                    repr(image.size).encode() + image.convert("RGBA").tobytes()
                ).hexdigest()
                check.thumbnail = colour_thumbnail(image)
    except UnidentifiedImageError:
        check.reasons.append("not an image (the file's contents are not PNG, JPEG or WebP)")
        return False
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit: twice its MAX_IMAGE_PIXELS
        check.reasons.append(pillow_refusal(exc, max_pixels))
        return False
    except (OSError, SyntaxError, ValueError) as exc:
        check.reasons.append(f"unreadable or truncated ({exc})")
        return False
    return True


def check_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    check = ImageCheck(file=path.name, ok=False)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        kind = path.suffix or "no suffix"
        check.reasons.append(f"not an image type used for training ({kind}); use PNG, JPEG or WebP")
        return check
    data = path.read_bytes()
    check.sha256 = hashlib.sha256(data).hexdigest()
    if not _decode(path, check, max_pixels):
        return check
    short, long = sorted((check.width, check.height))
    if short < MIN_SIDE:
        check.reasons.append(f"too small: {check.width}×{check.height}, needs at least {MIN_SIDE} px on each side")
    if long / max(short, 1) > MAX_ASPECT:
        check.reasons.append(f"extreme aspect ratio {long / max(short, 1):.1f}:1 (at most {MAX_ASPECT:g}:1)")
    check.ok = not check.reasons
    return check


def validate_images(paths: list[Path], max_pixels: int = DEFAULT_MAX_PIXELS) -> ValidationReport:
    """Check every file. The later of two exact duplicates is invalid; the later of two near
    duplicates stays usable and is marked ``near_duplicate_of`` the earlier one."""
    checks = [check_image(path, max_pixels) for path in sorted(paths, key=lambda p: p.name)]
    kept: list[ImageCheck] = []
    for check in checks:
        if not check.ok:
            continue
        for earlier in kept:
            if check.sha256 == earlier.sha256 or check.pixels_sha256 == earlier.pixels_sha256:
                check.ok = False
                check.reasons.append(f"exact duplicate of {earlier.file}")
                break
        if not check.ok:
            continue
        nearest = min(kept, key=lambda earlier: thumbnail_distance(check.thumbnail, earlier.thumbnail), default=None)
        if nearest is not None:
            distance = thumbnail_distance(check.thumbnail, nearest.thumbnail)
            if distance <= NEAR_DUPLICATE_LEVELS:
                check.near_duplicate_of, check.near_distance = nearest.file, distance
        kept.append(check)
    return ValidationReport(checks)
