"""Training datasets on disk: ``models/datasets/NAME/`` with images and a ``.txt`` caption beside each.

The layout is the one kohya_ss and most captioning tools use, so a folder prepared elsewhere can be
trained on as is, and a dataset made here can be trained elsewhere. Every name a user supplies (the
dataset's, an image's, a path inside a zip) is checked so that nothing is written outside the
dataset's folder. Uploads are checked against the limits (image count, unpacked zip size, pixels
per image) before anything reaches the dataset: they are unpacked into a hidden staging folder,
byte-counted as they are written, and moved in only when every check passed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from PIL import Image, UnidentifiedImageError

from lorapg.atomic_files import atomic_write_text
from lorapg.config import Settings
from lorapg.errors import UserError
from lorapg.training.cropping import FocusPoints
from lorapg.training.validation import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ValidationReport,
    header_size,
    pillow_refusal,
    too_many_pixels,
    validate_images,
)

_CHUNK = 1024 * 1024
_FORBIDDEN = set('/\\:*?"<>|\0')


def check_name(name: str, what: str = "Name") -> str:
    """A single safe path component: no separators, no ``..``, no hidden or empty names."""
    name = (name or "").strip()
    if not name:
        raise UserError(f"{what} is empty.")
    if name in {".", ".."} or ".." in name or any(ch in _FORBIDDEN for ch in name) or name.startswith("."):
        raise UserError(f"{what} {name!r} may not contain / \\ : * ? \" < > | or '..', nor start with '.'.")
    if len(name) > 120:
        raise UserError(f"{what} is longer than 120 characters.")
    return name


@dataclass(frozen=True)
class DatasetImage:
    path: Path
    caption: str

    @property
    def file(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class DatasetLimits:
    """The upload limits of ``Settings`` (≤ 0: no limit)."""

    max_images: int = Settings.max_dataset_images
    max_unpacked_mb: int = Settings.max_unpacked_mb
    max_pixels: int = Settings.max_image_pixels

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetLimits:
        return cls(settings.max_dataset_images, settings.max_unpacked_mb, settings.max_image_pixels)


class Dataset:
    """One folder of images and captions."""

    def __init__(self, folder: Path, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.folder = Path(folder)
        self.max_pixels = max_pixels

    @property
    def name(self) -> str:
        return self.folder.name

    def image_paths(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def files(self) -> list[Path]:
        """Every file that is meant as an image (captions and our cache excluded), valid or not."""
        if not self.folder.is_dir():
            return []
        return sorted(
            p
            for p in self.folder.iterdir()
            if p.is_file() and p.suffix.lower() != ".txt" and not p.name.startswith(".")
        )

    def images(self) -> list[DatasetImage]:
        return [DatasetImage(p, self.caption(p.name)) for p in self.image_paths()]

    def _member(self, file: str) -> Path:
        path = self.folder / check_name(Path(file or "").name, "Image name")
        if not path.exists():
            raise UserError(f"No image {file!r} in dataset {self.name}.")
        return path

    def caption(self, file: str) -> str:
        text = (self.folder / file).with_suffix(".txt")
        return text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else ""

    def set_caption(self, file: str, caption: str) -> None:
        path = self._member(file)
        caption = " ".join((caption or "").split())
        target = path.with_suffix(".txt")
        if caption:
            atomic_write_text(target, caption + "\n")  # an editor or a trainer never reads half a caption
        elif target.exists():
            target.unlink()

    def remove(self, file: str) -> None:
        path = self._member(file)
        path.unlink()
        path.with_suffix(".txt").unlink(missing_ok=True)
        # Its crop focus point goes too: a later image of the same name starts centred.
        FocusPoints(self.folder).forget(path.name)

    def validate(self) -> ValidationReport:
        return validate_images(self.files(), self.max_pixels)

    def remove_near_duplicates(self) -> list[str]:
        """Remove every image validation marks as a near duplicate (the first of each look-alike stays)."""
        removed = [check.file for check in self.validate().near_duplicates]
        for file in removed:
            self.remove(file)
        return removed

    def require_trainable(self) -> ValidationReport:
        """The report, or a UserError saying why nothing here can be trained on."""
        report = self.validate()
        if not report.checks:
            raise UserError(f"Dataset {self.name} has no images. Upload PNG, JPEG or WebP files (or a zip).")
        if not report.valid:
            reasons = "; ".join(f"{c.file}: {', '.join(c.reasons)}" for c in report.invalid[:5])
            more = f"; and {len(report.invalid) - 5} more" if len(report.invalid) > 5 else ""
            raise UserError(f"No usable image in dataset {self.name}: every file was refused ({reasons}{more}).")
        return report


class DatasetStore:
    """All datasets under one folder (``models/datasets``)."""

    def __init__(self, root: Path, limits: DatasetLimits | None = None):
        self.root = Path(root)
        self.limits = limits or DatasetLimits()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def get(self, name: str, *, must_exist: bool = True) -> Dataset:
        dataset = Dataset(self.root / check_name(name, "Dataset name"), self.limits.max_pixels)
        if must_exist and not dataset.folder.is_dir():
            raise UserError(f"No dataset named {name!r} in {self.root}.")
        return dataset

    def add_files(self, name: str, files: list[str | Path]) -> tuple[Dataset, list[str]]:
        """Copy uploads (images, their ``.txt`` captions, zips of both) into dataset ``name``.

        Returns the dataset and one note per file that was skipped. Files that are not images are
        copied too, so that validation can list them with their reason. A refused upload (a limit)
        leaves the dataset exactly as it was.
        """
        dataset = self.get(name, must_exist=False)
        notes: list[str] = []
        with contextlib.ExitStack() as stack:
            entries: list[_Entry] = []
            for source in map(Path, files or []):
                if source.suffix.lower() == ".zip":
                    entries += _zip_entries(source, stack, self.limits.max_unpacked_mb, notes)
                else:
                    entries.append(_Entry(source.name, source.name, lambda s=source: s.open("rb")))
            planned = _plan_names(entries, dataset.folder, notes)
            self._check_count(dataset, planned)
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))  # hidden: not a dataset
            try:
                for entry, target in planned:
                    _write_counted(entry, staging / target)
                self._check_pixels(staging, planned)
                dataset.folder.mkdir(parents=True, exist_ok=True)
                for _, target in planned:
                    # A move, not a write: the staged file was written with open(), so it has the umask's mode.
                    os.replace(staging / target, dataset.folder / target)  # move-only
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return dataset, notes

    def _check_count(self, dataset: Dataset, planned: list[tuple[_Entry, str]]) -> None:
        limit = self.limits.max_images
        added = sum(1 for _, target in planned if Path(target).suffix.lower() != ".txt")
        total = len(dataset.files()) + added
        if 0 < limit < total:
            raise UserError(
                f"Dataset {dataset.name} would hold {total} images with these {added}; at most {limit} "
                "can be trained on (setting max_dataset_images, LORAPG_MAX_DATASET_IMAGES). Nothing "
                "was added: upload fewer."
            )

    def _check_pixels(self, staging: Path, planned: list[tuple[_Entry, str]]) -> None:
        """Each image's size from its header (no decoding): a decompression bomb never reaches the dataset."""
        for entry, target in planned:
            if Path(target).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                reason = too_many_pixels(*header_size(staging / target), self.limits.max_pixels)
            except Image.DecompressionBombError as exc:
                reason = pillow_refusal(exc, self.limits.max_pixels)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                continue  # not an image after all: copied, so validation lists it with its reason
            if reason:
                raise UserError(f"Image {entry.label}: {reason}. Nothing was added.")

    def delete(self, name: str) -> None:
        shutil.rmtree(self.get(name).folder)


@dataclass
class _Entry:
    """One file to add: its name, what to call it in messages, and how to read it."""

    name: str
    label: str
    open: Callable[[], IO[bytes]]
    budget: _Budget | None = None
    declared_size: int = 0


class _Budget:
    """Bytes one zip may still unpack to; the real count, since a zip's declared sizes can lie."""

    def __init__(self, zip_name: str, max_mb: int):
        self.zip_name, self.max_mb = zip_name, max_mb
        self.left = max_mb * 1024 * 1024

    def spend(self, count: int) -> None:
        self.left -= count
        if self.max_mb > 0 and self.left < 0:
            raise UserError(_too_big(self.zip_name, self.max_mb))


def _too_big(zip_name: str, max_mb: int) -> str:
    return (
        f"Zip {zip_name} unpacks to more than {max_mb} MB, the limit (setting max_unpacked_mb, "
        "LORAPG_MAX_UNPACKED_MB). Nothing was added: split it, or raise the limit."
    )


def _plan_names(entries: list[_Entry], folder: Path, notes: list[str]) -> list[tuple[_Entry, str]]:
    """The name each entry gets in the dataset: unsafe names skipped, clashes with images renamed."""
    taken = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    planned: list[tuple[_Entry, str]] = []
    for entry in entries:
        base = Path(entry.name).name
        try:
            check_name(base, "File name")
        except UserError as exc:
            notes.append(f"{entry.label}: skipped ({exc})")
            continue
        target = base
        if target in taken and Path(target).suffix.lower() != ".txt":  # a caption replaces the old one
            stem, suffix, n = Path(base).stem, Path(base).suffix, 2
            while target in taken:
                target, n = f"{stem}-{n}{suffix}", n + 1
            notes.append(f"{entry.label}: a file of that name exists; saved as {target}")
        taken.add(target)
        planned = [item for item in planned if item[1] != target]  # a later caption of the same name wins
        planned.append((entry, target))
    return planned


def _write_counted(entry: _Entry, target: Path) -> None:
    try:
        with entry.open() as source, open(target, "wb") as out:
            while chunk := source.read(_CHUNK):
                if entry.budget is not None:
                    entry.budget.spend(len(chunk))
                out.write(chunk)
    except zipfile.BadZipFile as exc:  # e.g. a CRC that does not match: the member is damaged
        raise UserError(f"{entry.label} is damaged ({exc}). Nothing was added: make the zip again.") from None


def _zip_entries(path: Path, stack: contextlib.ExitStack, max_mb: int, notes: list[str]) -> list[_Entry]:
    """Images and captions of a zip; members with absolute paths or ``..`` are refused (zip-slip).

    The members' declared sizes are checked against ``max_mb`` here, before anything is written."""
    try:
        archive = stack.enter_context(zipfile.ZipFile(path))
    except zipfile.BadZipFile:
        raise UserError(f"{path.name} is not a readable zip file.") from None
    budget = _Budget(path.name, max_mb)
    entries: list[_Entry] = []
    for member in archive.infolist():
        if member.is_dir():
            continue
        inner = PurePosixPath(member.filename.replace("\\", "/"))
        if inner.is_absolute() or ".." in inner.parts or (inner.parts and ":" in inner.parts[0]):
            notes.append(f"{member.filename}: refused (the path points outside the zip's folder)")
            continue
        if inner.name.startswith(".") or "__MACOSX" in inner.parts:
            continue  # macOS resource forks and hidden files are not training data
        # Folders inside the zip are flattened: the dataset is one folder.
        entries.append(
            _Entry(
                inner.name,
                f"{path.name}: {member.filename}",
                lambda m=member: archive.open(m),
                budget,
                member.file_size,
            )
        )
    if max_mb > 0 and sum(entry.declared_size for entry in entries) > max_mb * 1024 * 1024:
        raise UserError(_too_big(path.name, max_mb))
    return entries
