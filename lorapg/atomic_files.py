"""One way to replace a file all-or-nothing: ``atomic_write``.

Every file that must never be seen half-written (gallery PNGs, trained LoRAs, per-epoch files,
training configs, checkpoints, the working state, style notes) goes through here:

1. the data goes to a hidden temp file next to the target, ``.<name>.<random>.tmp``: unique per
   call (two threads or processes writing the same path never share it), and neither a
   ``*.png`` nor a ``*.safetensors`` name, so no library lister or gallery scan picks it up;
2. the temp file is flushed and fsynced, else a power cut can leave an empty file behind the
   rename;
3. it gets the mode a plain ``open()`` would have given (``0o666 & ~umask``: 0644 under umask
   022, 0664 under 002, 0600 under 077). Temp files are created private, and ``os.replace``
   keeps the temp file's mode, so without this step every file would stay 0600 and a web
   server, a shared folder or ComfyUI running as another user could not read it;
4. ``os.replace`` puts it in place, and the directory is fsynced so the rename survives too.

A write that fails (an exception in the caller's block, a full disk) leaves the previous file
untouched and removes the temp file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def temp_path_for(final: Path) -> Path:
    """A fresh hidden temp name next to ``final``: ``.<name>.<16 hex digits>.tmp``."""
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """True for names ``temp_path_for`` makes (used by cleaners of interrupted writes)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def current_umask(folder: str | os.PathLike[str] | None = None) -> int:
    """The process umask, read without changing it.

    ``os.umask(0)`` followed by ``os.umask(old)`` is the classic way, but between the two calls
    another thread creating a file would create it world-writable. Linux (4.7+) shows the umask
    in /proc/self/status; elsewhere a probe file in ``folder`` (default: the current folder) is
    created with mode 0o666 and the kernel's answer read back.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    return _umask_by_probe(Path(folder) if folder is not None else Path.cwd())


def _umask_by_probe(folder: Path) -> int:
    """The umask's read/write bits (all a file's mode needs), from a probe file made with mode 0o666."""
    probe = temp_path_for(folder / "umask-probe")
    try:
        fd = os.open(probe, _OPEN_FLAGS, 0o666)
    except OSError as exc:  # an unwritable folder: the write itself will report that
        log.debug("cannot probe the umask in %s (%s); assuming 022", folder, exc)
        return 0o022
    try:
        return ~os.fstat(fd).st_mode & 0o666
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def file_mode(folder: str | os.PathLike[str] | None = None) -> int:
    """The permission bits ``open(path, "w")`` gives a new file now: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask(folder)


def fsync_directory(folder: str | os.PathLike[str]) -> None:
    """Make a rename or creation in ``folder`` durable (a no-op where folders cannot be opened).

    The rename itself lives in the directory; without this a power cut can undo it. Windows
    cannot open directories, which is fine: NTFS journals the rename.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(final: Path) -> tuple[int, Path]:
    for _ in range(100):
        temp = temp_path_for(final)
        try:
            # Private while it is being written; widened to the umask's mode once complete.
            return os.open(temp, _OPEN_FLAGS, 0o600), temp
        except FileExistsError:  # 64 random bits: only a leftover from a crash can collide
            continue
    raise FileExistsError(f"no free temp name next to {final}")


def _set_mode(handle: IO[Any], temp: Path, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(handle.fileno(), mode)
    else:  # Windows before Python 3.13: only the read-only bit exists there anyway
        os.chmod(temp, mode)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Yield a file handle; when the block ends without error, its content replaces ``path``.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (text, UTF-8 unless ``encoding`` says otherwise).
    Missing parent folders are created. On an exception the old file stays as it was and the
    temp file is removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = _create_temp(final)
    try:
        text = mode == "w"
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if text else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            _set_mode(handle, temp, file_mode(final.parent))
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_directory(final.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path`` with ``data``, all or nothing (see ``atomic_write``)."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text``, all or nothing (see ``atomic_write``)."""
    with atomic_write(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)
