"""Checks on training images, one verdict per file with the reasons a user can act on.

Every file is opened fully (``load()``), so truncated downloads are caught here and not in the
middle of a training run. Near duplicates are found with a 64-bit difference hash (dHash): two
images whose hashes differ in at most ``NEAR_DUPLICATE_BITS`` bits look the same at thumbnail size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MIN_SIDE = 256  # below this an SD 1.x bucket (≥ 256 px) would have to upscale the image
MAX_ASPECT = 3.0  # kohya's buckets stop near 1:4 at 512²; past 3:1 most of the picture is cropped away
NEAR_DUPLICATE_BITS = 4  # of 64: resized, recompressed or slightly edited copies land here


@dataclass
class ImageCheck:
    file: str  # name inside the dataset folder
    ok: bool
    reasons: list[str] = field(default_factory=list)
    width: int = 0
    height: int = 0
    sha256: str = ""
    dhash: int | None = None


@dataclass
class ValidationReport:
    checks: list[ImageCheck]

    @property
    def valid(self) -> list[ImageCheck]:
        return [c for c in self.checks if c.ok]

    @property
    def invalid(self) -> list[ImageCheck]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        lines = [f"{len(self.valid)} of {len(self.checks)} image(s) usable for training."]
        lines += [f"- {c.file}: {'; '.join(c.reasons)}" for c in self.invalid]
        return "\n".join(lines)


def difference_hash(image: Image.Image) -> int:
    """dHash: 9×8 grey thumbnail, one bit per horizontal neighbour pair (brighter to the left)."""
    small = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    pixels = list(small.getdata())
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (pixels[row * 9 + col] > pixels[row * 9 + col + 1])
    return bits


def check_image(path: Path) -> ImageCheck:
    check = ImageCheck(file=path.name, ok=False)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        kind = path.suffix or "no suffix"
        check.reasons.append(f"not an image type used for training ({kind}); use PNG, JPEG or WebP")
        return check
    data = path.read_bytes()
    check.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: truncated files fail here
            check.width, check.height = image.size
            check.dhash = difference_hash(image)
    except UnidentifiedImageError:
        check.reasons.append("not an image (the file's contents are not PNG, JPEG or WebP)")
        return check
    except (OSError, SyntaxError, ValueError) as exc:
        check.reasons.append(f"unreadable or truncated ({exc})")
        return check
    short, long = sorted((check.width, check.height))
    if short < MIN_SIDE:
        check.reasons.append(f"too small: {check.width}×{check.height}, needs at least {MIN_SIDE} px on each side")
    if long / max(short, 1) > MAX_ASPECT:
        check.reasons.append(f"extreme aspect ratio {long / max(short, 1):.1f}:1 (at most {MAX_ASPECT:g}:1)")
    check.ok = not check.reasons
    return check


def validate_images(paths: list[Path]) -> ValidationReport:
    """Check every file; the later of two (near) duplicates is the one marked invalid."""
    checks = [check_image(path) for path in sorted(paths, key=lambda p: p.name)]
    kept: list[ImageCheck] = []
    for check in checks:
        if not check.ok:
            continue
        for earlier in kept:
            if check.sha256 == earlier.sha256:
                check.reasons.append(f"exact duplicate of {earlier.file}")
                break
            distance = bin(check.dhash ^ earlier.dhash).count("1")
            if distance <= NEAR_DUPLICATE_BITS:
                check.reasons.append(f"near duplicate of {earlier.file} ({distance} of 64 hash bits differ)")
                break
        check.ok = not check.reasons
        if check.ok:
            kept.append(check)
    return ValidationReport(checks)
