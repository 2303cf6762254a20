"""A bounded reader of a GGUF file's header: tensor names, tensor types and ``general.architecture``.

gguf's own ``GGUFReader`` trusts the counts in the header: a metadata array whose length runs past the end
of the file makes it loop once per claimed element, building numpy views of nothing (a 49-byte file claiming
2**40 bytes runs for days and eats memory). This reader checks every count and length against the bytes left
in the file, caps the counts that cost Python work per item, and skips numeric arrays without reading them,
so its time and memory are bounded whatever the file says. A file it accepts is one GGUFReader (which
diffusers runs to load the weights) parses in bounded time too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what gguf's reader handles (version 1 had 32-bit counts)
# Sizes of GGUF's fixed-size metadata value types (gguf.GGUFValueType): 8 is STRING, 9 is ARRAY.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, UINT32 = 8, 9, 4
# Caps far above real files, below what would take GGUFReader minutes or gigabytes: a Flux.1 transformer has
# ~780 tensors and a few metadata keys; a language model's vocabulary arrays hold up to ~800k items in all.
MAX_TENSORS = 100_000
MAX_FIELDS = 65_536
MAX_ARRAY_ITEMS = 1 << 20
MAX_NAME_BYTES = 65_535  # GGUF's limit for a key; ggml's tensor names are far shorter
MAX_DIMS = 8  # ggml has 4
MAX_NESTING = 4
DEFAULT_ALIGNMENT = 32


class GgufHeaderError(ValueError):
    """The header contradicts itself or the file's size; the message says how (no file name)."""


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GgufHeader:
    tensors: list[GgufTensorInfo]
    architecture: str  # general.architecture, "" when absent
    array_items: int  # metadata array elements in all (GGUFReader builds one numpy view per element)
    data_start: int  # where the tensor data section starts, after alignment
    file_size: int

    @property
    def names(self) -> list[str]:
        return [tensor.name for tensor in self.tensors]


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse ``path``'s header; GgufHeaderError when it is malformed or claims more than the file holds."""
    with open(path, "rb") as handle:
        return _HeaderParser(handle, path.stat().st_size).parse()


class _HeaderParser:
    def __init__(self, handle: BinaryIO, size: int):
        self.handle, self.size, self.endian = handle, size, "<"
        self.array_items = 0
        self.fields: dict[str, object] = {}

    def parse(self) -> GgufHeader:
        if self.handle.read(4) != GGUF_MAGIC:
            raise GgufHeaderError("no GGUF magic number at its start")
        version = self._unpack("I", 4)
        if version & 0xFFFF == 0:  # written on a big-endian machine (as gguf's reader tells them apart)
            self.endian, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in SUPPORTED_VERSIONS:
            raise GgufHeaderError(f"GGUF version {version} is not supported (2 and 3 are)")
        tensor_count, field_count = self._unpack("Q", 8), self._unpack("Q", 8)
        self._check_count(tensor_count, MAX_TENSORS, "tensors", minimum_bytes=24)
        self._check_count(field_count, MAX_FIELDS, "metadata entries", minimum_bytes=12)
        for _ in range(field_count):
            self._field()
        tensors = [self._tensor_info() for _ in range(tensor_count)]
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GgufHeaderError("its general.alignment is not a power of two")
        data_start = -(-self.handle.tell() // alignment) * alignment
        architecture = self.fields.get("general.architecture", "")
        return GgufHeader(
            tensors,
            architecture if isinstance(architecture, str) else "",
            self.array_items,
            data_start,
            self.size,
        )

    # --- primitives: every read is checked against the bytes left ----------------------------------

    def _left(self) -> int:
        return self.size - self.handle.tell()

    def _need(self, count: int) -> None:
        if count > self._left():
            left = self._left()
            raise GgufHeaderError(f"its header claims {count} bytes where {left} are left (truncated or corrupt)")

    def _read(self, count: int) -> bytes:
        self._need(count)
        return self.handle.read(count)

    def _skip(self, count: int) -> None:
        self._need(count)
        self.handle.seek(count, 1)

    def _unpack(self, code: str, size: int) -> int:
        return struct.unpack(self.endian + code, self._read(size))[0]

    def _check_count(self, count: int, cap: int, what: str, minimum_bytes: int) -> None:
        """A count must stay under ``cap`` and its items (``minimum_bytes`` each at least) fit in the file."""
        if count > cap or count * minimum_bytes > self._left():
            raise GgufHeaderError(f"its header claims {count} {what}, more than the file can hold (corrupt)")

    def _string(self, limit: int | None = MAX_NAME_BYTES) -> str | None:
        """A length-prefixed string; longer than ``limit`` (None: never read) is skipped and gives None."""
        length = self._unpack("Q", 8)
        if limit is None or length > limit:
            self._skip(length)
            return None
        return self._read(length).decode("utf-8", "replace")

    # --- metadata and tensor records ------------------------------------------------------------------

    def _field(self) -> None:
        key = self._string()
        if key is None:
            raise GgufHeaderError("a metadata key is longer than GGUF allows")
        value_type = self._unpack("I", 4)
        self.fields[key] = self._value(value_type, depth=0)

    def _value(self, value_type: int, depth: int) -> object:
        """The value for the keys this module reads (strings, uint32); everything else is skipped."""
        if value_type == STRING:
            return self._string(limit=4096)
        if value_type == UINT32:
            return self._unpack("I", 4)
        if value_type in _SCALAR_SIZES:
            self._skip(_SCALAR_SIZES[value_type])
            return None
        if value_type != ARRAY:
            raise GgufHeaderError(f"a metadata value has unknown type {value_type}")
        if depth >= MAX_NESTING:
            raise GgufHeaderError("its metadata nests arrays deeper than GGUF files do")
        item_type, length = self._unpack("I", 4), self._unpack("Q", 8)
        self.array_items += length
        if self.array_items > MAX_ARRAY_ITEMS:
            raise GgufHeaderError(f"its metadata arrays claim over {MAX_ARRAY_ITEMS} items (corrupt, or not a model)")
        if item_type in _SCALAR_SIZES:  # fixed-size items: skipped at once, never one by one
            self._skip(length * _SCALAR_SIZES[item_type])
            return None
        if item_type not in (STRING, ARRAY):
            raise GgufHeaderError(f"a metadata array has unknown item type {item_type}")
        self._check_count(length, MAX_ARRAY_ITEMS, "array items", minimum_bytes=8 if item_type == STRING else 12)
        for _ in range(length):
            if item_type == ARRAY:
                self._value(item_type, depth + 1)
            else:
                self._string(limit=None)
        return None

    def _tensor_info(self) -> GgufTensorInfo:
        name = self._string()
        if name is None:
            raise GgufHeaderError("a tensor name is longer than GGUF allows")
        dims = self._unpack("I", 4)
        if dims > MAX_DIMS:
            raise GgufHeaderError(f"tensor {name[:60]!r} claims {dims} dimensions")
        shape = tuple(self._unpack("Q", 8) for _ in range(dims))
        return GgufTensorInfo(name, self._unpack("I", 4), shape, self._unpack("Q", 8))


def check_tensor_extents(header: GgufHeader, quant_sizes: dict) -> None:
    """Every tensor's data must lie inside the file (a truncated download fails here, not in numpy).

    ``quant_sizes``: gguf.GGML_QUANT_SIZES (type -> (block size, bytes per block)).
    """
    for tensor in header.tensors:
        if tensor.type not in quant_sizes:
            raise GgufHeaderError(f"tensor {tensor.name[:60]!r} has unknown type {tensor.type}")
        block, block_bytes = quant_sizes[tensor.type]
        elements = 1
        for dim in tensor.shape:
            elements *= dim
        end = header.data_start + tensor.offset + elements * block_bytes // block
        if end > header.file_size:
            raise GgufHeaderError(
                f"tensor {tensor.name[:60]!r} runs {end - header.file_size} bytes past the end (truncated download?)"
            )
