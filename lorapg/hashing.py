"""File hashes that other Stable Diffusion tools print, so they can find the same files.

- ``model_hash``: first 10 hex characters of the checkpoint's SHA-256 (A1111's "Model hash");
  ``model_sha256`` the whole digest.
- ``lora_hash``: first 12 hex characters of the SHA-256 of a safetensors file *after* its JSON
  header (A1111's "addnet" hash, shown in "Lora hashes"); editing metadata does not change it.

Hashing a multi-gigabyte checkpoint takes seconds, so results are cached by (path, size, mtime):
a file replaced in place gets a new mtime and is hashed again. This is the app's one hash cache (the
gallery's LoRA matching, the PNG writer and the CLI all call these functions): one entry per file,
which a new version replaces, so the bound only has to exceed the number of models and LoRAs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from lorapg.errors import UserError

logger = logging.getLogger(__name__)

_CHUNK_SIZE = 1 << 20
_CACHE_SIZE = 8192  # entries are ~200 bytes; larger than any LoRA library, so a full one stays cached

MODEL_HASH_LENGTH = 10
LORA_HASH_LENGTH = 12

# (kind, resolved path) -> (size, mtime_ns, hash)
_cache: OrderedDict[tuple[str, str], tuple[int, int, str]] = OrderedDict()
_cache_lock = threading.Lock()


def _stat(path: Path) -> os.stat_result:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise UserError(f"Cannot hash '{path}': the file does not exist.") from None
    except OSError as exc:
        raise UserError(f"Cannot hash '{path}': {exc.strerror or exc}.") from exc
    if not path.is_file():
        raise UserError(f"Cannot hash '{path}': it is not a file.")
    return stat


def _sha256_from(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK_SIZE)
    view = memoryview(buffer)
    with path.open("rb") as handle:
        handle.seek(offset)
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _safetensors_data_offset(path: Path, size: int) -> int:
    """Where the tensor bytes start: 8-byte little-endian header length N, then N header bytes."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
    if len(prefix) < 8:
        raise UserError(f"'{path.name}' is too short to be a .safetensors file.")
    header_length = int.from_bytes(prefix, "little")
    if 8 + header_length > size:
        raise UserError(
            f"'{path.name}' is not a valid .safetensors file (its header claims {header_length} "
            f"bytes but the file has {size}); re-download or re-export it."
        )
    return 8 + header_length


def _cached(kind: str, path: str | os.PathLike[str], compute: Callable[[Path, int], str]) -> str:
    resolved = Path(path).resolve()
    stat = _stat(resolved)
    key, version = (kind, str(resolved)), (stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None and cached[:2] == version:
            _cache.move_to_end(key)
            return cached[2]
    # Hash outside the lock: two threads may hash the same file once each, which is harmless,
    # while holding the lock would make every caller wait for the slowest checkpoint.
    value = compute(resolved, stat.st_size)
    with _cache_lock:
        _cache[key] = (*version, value)  # replaces the entry of an older version of the file
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    logger.debug("%s hash of %s: %s", kind, resolved, value)
    return value


def model_sha256(path: str | os.PathLike[str]) -> str:
    """The checkpoint file's full SHA-256 (A1111's ``sha256`` in its model list)."""
    return _cached("model", path, lambda p, _size: _sha256_from(p, 0))


def model_hash(path: str | os.PathLike[str]) -> str:
    """A1111's "Model hash": the first 10 hex characters of the file's SHA-256 (one cached hash for both)."""
    return model_sha256(path)[:MODEL_HASH_LENGTH]


def lora_hash(path: str | os.PathLike[str]) -> str:
    """A1111's LoRA hash: first 12 hex of the SHA-256 of a safetensors file after its header."""
    return _cached(
        "lora",
        path,
        lambda p, size: _sha256_from(p, _safetensors_data_offset(p, size))[:LORA_HASH_LENGTH],
    )


def clear_cache() -> None:
    """Forget cached hashes (tests; or after files were rewritten with preserved mtimes)."""
    with _cache_lock:
        _cache.clear()


def cached_lora_hash(path: str | os.PathLike[str]) -> str | None:
    """``lora_hash`` of ``path`` if this process has hashed this version of the file already, else None:
    never reads the file, so it may be asked for every file of a folder (a Ray worker's LoRA listing)."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return None
    with _cache_lock:
        cached = _cache.get(("lora", str(resolved)))
    return cached[2] if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns) else None
