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
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from lorapg.atomic_files import atomic_write, is_temp_name
from lorapg.errors import UserError

logger = logging.getLogger(__name__)

PARAMETERS_KEY = "parameters"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# zlib level of saved PNGs. PIL's default (6) spent 70-130 ms on a 512 px image and 350 ms on a
# 1024 px one, on the GPU queue after every generation; 4 (ComfyUI's choice) takes about half
# that and makes files about 1% larger. Lossless either way: the pixels are the same.
PNG_COMPRESS_LEVEL = 4

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


def save_png_atomically(image: Image.Image, path: str | os.PathLike[str], parameters_text: str) -> Path:
    """Write ``image`` as a PNG with a ``parameters`` text chunk, all or nothing.

    Returns the final path. Text that is not Latin-1 (Japanese prompts, emoji) goes into an
    iTXt chunk; PIL does that on its own and readers see the same ``parameters`` key.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters_text)
    with atomic_write(final) as handle:
        image.save(handle, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return final


def _describe(source: str | os.PathLike[str] | bytes) -> str:
    return "The uploaded data" if isinstance(source, bytes | bytearray) else f"'{source}'"


# Reading: the chunks are walked without decoding a pixel. Decoding the image to reach a text
# chunk cost 640 MB for one 13000x13000 PNG; the text is all PNG Info and the gallery need.
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
# A1111 text is a few KB; this bound keeps a hostile file from holding memory. It is PIL's own
# limit for one text chunk (1 MB), so no PNG that PIL-based tools read is refused.
MAX_TEXT_CHUNK_BYTES = 1024 * 1024
_MAX_KEYWORD = 80  # PNG keywords are 1-79 bytes, then a NUL
_MAX_CHUNK_LENGTH = 2**31 - 1  # the PNG spec's limit for one chunk


class _Damaged(Exception):
    """The PNG's chunk structure is broken; the message says where."""


@dataclass(frozen=True)
class PngMetadata:
    """A PNG's size from its header and its A1111 ``parameters`` text (None if it has none)."""

    width: int
    height: int
    parameters: str | None


def read_png_parameters(source: str | os.PathLike[str] | bytes) -> str | None:
    """The A1111 ``parameters`` text of a PNG, or None when the PNG carries none.

    Raises UserError for a missing file, a file that is not a PNG, or a damaged/truncated PNG.
    """
    return read_png_metadata(source).parameters


def read_png_metadata(source: str | os.PathLike[str] | bytes) -> PngMetadata:
    """Size and parameters of a PNG, read from its chunks with bounded memory, pixels untouched.

    Truncation is still caught: every chunk must fit in the file and the file must reach IEND.
    The header and text chunks are CRC-checked; pixel chunks are skipped unread.
    """
    what = _describe(source)
    try:
        with _open_binary(source) as handle:
            head = handle.read(len(PNG_SIGNATURE))
            if head != PNG_SIGNATURE:
                if head and PNG_SIGNATURE.startswith(head):
                    raise _Damaged("it ends inside its signature")
                raise UserError(_not_png_message(what, source))
            return _walk_chunks(handle, _size_of(handle))
    except FileNotFoundError:
        raise UserError(f"{what} does not exist.") from None
    except PermissionError:
        raise UserError(f"{what} cannot be read: permission denied.") from None
    except IsADirectoryError:
        raise UserError(f"{what} is a folder, not a PNG file.") from None
    except (_Damaged, *_DAMAGED_FILE_ERRORS) as exc:
        logger.debug("damaged PNG %s: %s", what, exc)
        raise UserError(f"{what} is a damaged or incomplete PNG ({exc}); it cannot be read.") from None


def _open_binary(source: str | os.PathLike[str] | bytes) -> BinaryIO:
    if isinstance(source, bytes | bytearray):
        return io.BytesIO(bytes(source))
    return open(source, "rb")  # noqa: SIM115 - closed by the caller's with


def _size_of(handle: BinaryIO) -> int:
    here = handle.tell()
    size = handle.seek(0, io.SEEK_END)
    handle.seek(here)
    return size


def _not_png_message(what: str, source: str | os.PathLike[str] | bytes) -> str:
    """Name the format when PIL knows it (opening reads only the header, never pixels)."""
    data = io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(data) as img:
                kind = img.format
    except (UnidentifiedImageError, Image.DecompressionBombError, *_DAMAGED_FILE_ERRORS):
        kind = None
    if kind is None:
        return f"{what} is not an image file; choose a PNG."
    return f"{what} is a {kind} image, not a PNG; generation parameters can only be read from PNG files."


def _walk_chunks(handle: BinaryIO, size: int) -> PngMetadata:
    width = height = None
    parameters = None
    while True:
        header = handle.read(8)
        if len(header) < 8:
            raise _Damaged("it ends before its last chunk (IEND); the file is cut off")
        length, kind = struct.unpack(">I4s", header)
        if length > _MAX_CHUNK_LENGTH or handle.tell() + length + 4 > size:
            raise _Damaged(f"chunk {kind!r} runs past the end of the file")
        if width is None and (kind != b"IHDR" or length != 13):
            raise _Damaged("it does not start with a header chunk (IHDR)")
        if kind == b"IEND":
            break
        if kind in _TEXT_CHUNKS and length > MAX_TEXT_CHUNK_BYTES:
            _skip_oversized_text(handle, kind, length)
        elif kind == b"IHDR" or kind in _TEXT_CHUNKS:
            data = _read_checked(handle, kind, length)
            if kind == b"IHDR":
                width, height = struct.unpack(">II", data[:8])
            else:
                key, text = _decode_text_chunk(kind, data)
                if key == PARAMETERS_KEY and text is not None:
                    parameters = text  # a later chunk wins, as in PIL's ``img.text``
        else:  # pixels and anything else: skipped, never read into memory
            handle.seek(length + 4, io.SEEK_CUR)
    return PngMetadata(width, height, parameters)


def _skip_oversized_text(handle: BinaryIO, kind: bytes, length: int) -> None:
    """Skip a text chunk too large to read; refuse it when it is the parameters, which would
    otherwise look like a PNG without any."""
    keyword = handle.read(_MAX_KEYWORD).partition(b"\0")[0]
    if keyword == PARAMETERS_KEY.encode():
        raise _Damaged(
            f"its {kind.decode('latin-1')} parameters chunk is {length // 2**20} MB or more, "
            f"over the {MAX_TEXT_CHUNK_BYTES // 2**20} MB a PNG text chunk may hold"
        )
    handle.seek(length - _MAX_KEYWORD + 4, io.SEEK_CUR)


def _read_checked(handle: BinaryIO, kind: bytes, length: int) -> bytes:
    data = handle.read(length)
    (crc,) = struct.unpack(">I", handle.read(4))
    if zlib.crc32(kind + data) != crc:
        raise _Damaged(f"chunk {kind.decode('latin-1')} fails its checksum")
    return data


def _decode_text_chunk(kind: bytes, data: bytes) -> tuple[str, str | None]:
    """(keyword, text) of a tEXt, zTXt or iTXt chunk; text None when it cannot be decoded."""
    key, _, rest = data.partition(b"\0")
    keyword = key.decode("latin-1")
    if kind == b"tEXt":
        return keyword, rest.decode("latin-1")
    if kind == b"zTXt":
        return keyword, _inflate(rest[1:]).decode("latin-1")
    compressed, rest = rest[:1] == b"\1", rest[2:]
    _language, _, rest = rest.partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    if compressed:
        text = _inflate(text)
    return keyword, text.decode("utf-8", errors="replace")


def _inflate(data: bytes) -> bytes:
    """Decompress at most MAX_TEXT_CHUNK_BYTES: a tiny zTXt chunk can expand to gigabytes."""
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, MAX_TEXT_CHUNK_BYTES)
    if inflater.unconsumed_tail:
        raise _Damaged(f"a text chunk expands past {MAX_TEXT_CHUNK_BYTES // 2**20} MB of text")
    return text
