"""Training datasets on disk: ``models/datasets/NAME/`` with images and a ``.txt`` caption beside each.

The layout is the one kohya_ss and most captioning tools use, so a folder prepared elsewhere can be
trained on as is, and a dataset made here can be trained elsewhere. Every name a user supplies (the
dataset's, an image's, a path inside a zip) is checked so that nothing is written outside the
dataset's folder.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lorapg.errors import UserError
from lorapg.training.validation import IMAGE_SUFFIXES, ValidationReport, validate_images

MAX_IMAGES = 200
MAX_ZIP_BYTES = 2 * 1024**3  # uncompressed; a zip bomb is refused before anything is written
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


class Dataset:
    """One folder of images and captions."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

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
        return sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() != ".txt"
                      and not p.name.startswith("."))

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
            target.write_text(caption + "\n", encoding="utf-8")
        elif target.exists():
            target.unlink()

    def remove(self, file: str) -> None:
        path = self._member(file)
        path.unlink()
        path.with_suffix(".txt").unlink(missing_ok=True)

    def validate(self) -> ValidationReport:
        return validate_images(self.files())

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

    def __init__(self, root: Path):
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def get(self, name: str, *, must_exist: bool = True) -> Dataset:
        dataset = Dataset(self.root / check_name(name, "Dataset name"))
        if must_exist and not dataset.folder.is_dir():
            raise UserError(f"No dataset named {name!r} in {self.root}.")
        return dataset

    def add_files(self, name: str, files: list[str | Path]) -> tuple[Dataset, list[str]]:
        """Copy uploads (images, their ``.txt`` captions, zips of both) into dataset ``name``.

        Returns the dataset and one note per file that was skipped. Files that are not images are
        copied too, so that validation can list them with their reason.
        """
        dataset = self.get(name, must_exist=False)
        dataset.folder.mkdir(parents=True, exist_ok=True)
        notes: list[str] = []
        for source in map(Path, files or []):
            if source.suffix.lower() == ".zip":
                notes += _extract_zip(source, dataset.folder)
            else:
                _copy_into(source.name, source.read_bytes(), dataset.folder, notes)
        count = len(dataset.files())
        if count > MAX_IMAGES:
            raise UserError(f"Dataset {name} now holds {count} files; at most {MAX_IMAGES} images can be trained on. "
                            "Remove some.")
        return dataset, notes

    def delete(self, name: str) -> None:
        shutil.rmtree(self.get(name).folder)


def _copy_into(file_name: str, data: bytes, folder: Path, notes: list[str]) -> None:
    base = Path(file_name).name
    try:
        check_name(base, "File name")
    except UserError as exc:
        notes.append(f"{file_name}: skipped ({exc})")
        return
    target = folder / base
    if target.resolve().parent != folder.resolve():
        notes.append(f"{file_name}: skipped (outside the dataset folder)")
        return
    if target.exists() and target.suffix.lower() != ".txt":
        stem, suffix, n = target.stem, target.suffix, 2
        while target.exists():
            target = folder / f"{stem}-{n}{suffix}"
            n += 1
        notes.append(f"{file_name}: a file of that name exists; saved as {target.name}")
    target.write_bytes(data)


def _extract_zip(path: Path, folder: Path) -> list[str]:
    """Extract images and captions only; members with absolute paths or ``..`` are refused (zip-slip)."""
    notes: list[str] = []
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(f"{path.name} is not a readable zip file.") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise UserError(f"{path.name} unpacks to more than {MAX_ZIP_BYTES // 1024**3} GB; refusing it.")
        for member in members:
            inner = PurePosixPath(member.filename.replace("\\", "/"))
            if inner.is_absolute() or ".." in inner.parts or (inner.parts and ":" in inner.parts[0]):
                notes.append(f"{member.filename}: refused (the path points outside the zip's folder)")
                continue
            if inner.name.startswith(".") or "__MACOSX" in inner.parts:
                continue  # macOS resource forks and hidden files are not training data
            # Folders inside the zip are flattened: the dataset is one folder.
            _copy_into(inner.name, archive.read(member), folder, notes)
    return notes
