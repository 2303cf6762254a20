"""PNG files with A1111 metadata: written atomically, read defensively.

A PNG is written to a hidden temp file next to its final name and renamed over it, so a crash or
a full disk never leaves a half-written image under a name the gallery (or the user) trusts.
Leftover temp files are recognisable by name and removed by ``GalleryStore.reconcile``.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from lorapg.atomic_files import atomic_write, is_temp_name
from lorapg.errors import UserError

logger = logging.getLogger(__name__)

PARAMETERS_KEY = "parameters"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# What PIL raises for damaged files varies by where the damage is (header, chunk CRC, zlib
# stream, missing IEND); all of them mean "this file is broken".
_DAMAGED_FILE_ERRORS = (
    OSError,
    SyntaxError,
    EOFError,
    ValueError,
    struct.error,
    zlib.error,
)


def is_temp_file(path: Path) -> bool:
    """True for the temp files ``save_png_atomically`` makes (``.<name>.png.<random>.tmp``)."""
    return is_temp_name(path.name) and ".png." in path.name


def save_png_atomically(
    image: Image.Image, path: str | os.PathLike[str], parameters_text: str
) -> Path:
    """Write ``image`` as a PNG with a ``parameters`` text chunk, all or nothing.

    Returns the final path. Text that is not Latin-1 (Japanese prompts, emoji) goes into an
    iTXt chunk; PIL does that on its own and readers see the same ``parameters`` key.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters_text)
    with atomic_write(final) as handle:
        image.save(handle, format="PNG", pnginfo=info)
    return final


def _describe(source: str | os.PathLike[str] | bytes) -> str:
    return (
        "The uploaded data" if isinstance(source, bytes | bytearray) else f"'{source}'"
    )


def _starts_like_png(source: str | os.PathLike[str] | bytes) -> bool:
    if isinstance(source, bytes | bytearray):
        return bytes(source[:8]) == PNG_SIGNATURE
    try:
        with open(source, "rb") as handle:
            return handle.read(8) == PNG_SIGNATURE
    except OSError:
        return False


def read_png_parameters(source: str | os.PathLike[str] | bytes) -> str | None:
    """The A1111 ``parameters`` text of a PNG, or None when the PNG carries none.

    Raises UserError for a missing file, a file that is not a PNG, or a damaged/truncated PNG.
    The whole image is decoded because truncation often only shows in the pixel data.
    """
    what = _describe(source)
    data = (
        io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray) else source
    )
    try:
        with Image.open(data) as img:
            if img.format != "PNG":
                raise UserError(
                    f"{what} is a {img.format or 'non-PNG'} image, not a PNG; "
                    "generation parameters can only be read from PNG files."
                )
            img.load()
            # .text covers tEXt, zTXt and iTXt chunks, before or after the pixel data.
            text = img.text.get(PARAMETERS_KEY)
    except FileNotFoundError:
        raise UserError(f"{what} does not exist.") from None
    except UnidentifiedImageError:
        if _starts_like_png(source):  # PIL gives up before IHDR: a cut-off PNG
            raise UserError(f"{what} is an incomplete PNG; cannot read it.") from None
        raise UserError(f"{what} is not an image file; choose a PNG.") from None
    except PermissionError:
        raise UserError(f"{what} cannot be read: permission denied.") from None
    except IsADirectoryError:
        raise UserError(f"{what} is a folder, not a PNG file.") from None
    except _DAMAGED_FILE_ERRORS as exc:
        logger.debug("damaged PNG %s: %s", what, exc)
        raise UserError(
            f"{what} is a damaged or incomplete PNG ({exc}); it cannot be read."
        ) from exc
    return None if text is None else str(text)
