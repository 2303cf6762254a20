"""The LoRA manager: list, inspect, rename, delete (into a trash folder), restore and test LoRAs.

Used by the LoRAs tab, ``python -m lorapg lora …`` and ``/api/v1/loras``. Every method returns
JSON-able dicts (the API sends them as they are) or raises ``UserError``; ``UnknownLora`` (a
``UserError``) for a name that is not in the folder, which the API answers with 404. Never imports
gradio or fastapi.

Files that belong to a LoRA ``NAME.safetensors`` move with it: the sidecars other tools write next
to it (``NAME.json``, ``NAME.civitai.info``, ``NAME.txt``, preview images) and the per-epoch files a
training run writes into ``NAME_epochs/``. Deleting moves them into ``<LoRA folder>/.trash/<id>/``,
which the library never scans; restoring moves them back.

What "in use" means (deleting or renaming is refused): the LoRA is in the Generate tab's selection
(the working-state file) or a queued or running training run writes it. A LoRA the engine has loaded
is not refused and not unloaded: its weights were read into memory, so moving the file changes no
image being made, and the engine keys adapters by name and file stamp, so a restored or renamed file
is read afresh when next selected.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from lorapg.atomic_files import atomic_write_bytes, atomic_write_text
from lorapg.diffusion.lora_library import LoraInfo, LoraLibrary
from lorapg.errors import UserError, check_ref_length, shorten
from lorapg.hashing import model_sha256
from lorapg.services.library import lora_summary

if TYPE_CHECKING:
    from lorapg.jobs import Job
    from lorapg.services.build import Services
    from lorapg.services.generation import GenerationService
    from lorapg.services.training import TrainingService

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TRASH = ".trash"
ENTRY_FILE = "entry.json"
# Preview images as AUTOMATIC1111 (NAME.preview.png) and the civitai helpers (NAME.png, …) save them.
PREVIEW_SUFFIXES = (".preview.png", ".preview.jpg", ".preview.jpeg", ".preview.webp", ".png", ".jpg", ".jpeg", ".webp")
SIDECAR_SUFFIXES = (".json", ".civitai.info", ".txt", *PREVIEW_SUFFIXES)
MAX_INFO_BYTES = 1 << 20  # a civitai .info is a few KB; a bigger one is not read into a reply
MAX_NAME_CHARS = 200
TEST_SCALE = 1.0
# One rename, delete or restore at a time in this process: the UI, the API (sync routes run in a
# thread pool) and the CLI each build their own manager, so the lock is the module's, not theirs.
_MOVES_LOCK = threading.Lock()
# Filesystems without hard links answer os.link with one of these; moves there fall back to a
# check-then-replace, which the lock still serialises within this process.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


class UnknownLora(UserError):
    """No LoRA by that name in the folder (or in the trash): a 404 for the API."""


def split_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """The header grouped for people: training settings (``ss_*``), modelspec, tag counts, the rest."""
    groups: dict[str, Any] = {"training": {}, "modelspec": {}, "other": {}}
    for key, value in sorted(metadata.items()):
        if key in ("ss_tag_frequency", "ss_dataset_dirs"):
            continue  # shown as counts below; dataset dirs repeat them per folder
        group = "training" if key.startswith("ss_") else "modelspec" if key.startswith("modelspec.") else "other"
        groups[group][key] = value
    groups["tag_frequency"] = tag_counts(metadata.get("ss_tag_frequency", ""))
    return groups


def tag_counts(raw: str) -> list[dict[str, Any]]:
    """kohya's ``ss_tag_frequency`` (``{folder: {tag: n}}``) summed over folders, most frequent first."""
    if not raw:
        return []
    counts: Counter[str] = Counter()
    try:
        for tags in json.loads(raw).values():
            counts.update({str(tag).strip(): int(n) for tag, n in tags.items() if str(tag).strip()})
    except (ValueError, AttributeError, TypeError):
        log.warning("ignoring unreadable ss_tag_frequency")
        return []
    return [{"tag": tag, "count": n} for tag, n in counts.most_common()]


def check_name(raw: object, field: str) -> str:
    """A LoRA name typed by a user: a '/'-separated path inside the folder, no hidden or '..' parts."""
    if not isinstance(raw, str) or not raw.strip():
        raise UserError(f"{field}: give a LoRA name (as `lora list` shows it).")
    check_ref_length(raw, field)
    name = raw.strip().removesuffix(SUFFIX)
    if len(name) > MAX_NAME_CHARS:
        raise UserError(f"{field}: at most {MAX_NAME_CHARS} characters; choose a shorter name.")
    if "\\" in name or name.startswith("/") or any(ord(c) < 32 for c in name):
        raise UserError(f"{field}: {shorten(name)!r} is not a name inside the LoRA folder; use letters, digits, '/'.")
    parts = name.split("/")
    if any(not part or part.startswith(".") for part in parts):
        raise UserError(f"{field}: {shorten(name)!r} has an empty, '..' or hidden part; use a plain name.")
    return name


class LoraManager:
    def __init__(
        self,
        library: LoraLibrary,
        *,
        models_dir: Path,
        generation: GenerationService | None = None,
        training: TrainingService | None = None,
        selection: Callable[[], list[str]] | None = None,
        read_only: bool = False,
    ):
        """``selection``: the names the Generate tab has selected now; ``read_only``: refuse changes
        (an app for visitors, who share the LoRA folder and must not rename or delete its files)."""
        self.library = library
        self.models_dir = Path(models_dir)
        self.generation = generation
        self.training = training
        self.selection = selection or (lambda: [])
        self.read_only = read_only

    @property
    def folder(self) -> Path:
        return self.library.folder

    @property
    def trash_dir(self) -> Path:
        return self.folder / TRASH

    # --- listing -------------------------------------------------------------------------------

    def list(self) -> dict[str, Any]:
        """Every LoRA with its preview and per-epoch files; epoch files are listed under their LoRA."""
        infos, problems = self.library.scan()
        names = {info.name for info in infos}
        loras = [
            self._summary(info) for info in infos if _epoch_parent(info.name) not in names
        ]  # an epoch file of a listed LoRA is shown with it, not on its own
        return {"loras": loras, "problems": problems}

    def info(self, name: str) -> dict[str, Any]:
        """One LoRA in full: metadata grouped, civitai data, hashes, preview, epochs and samples."""
        info = self._describe(name)
        return {
            **self._summary(info),
            "sha256": model_sha256(info.path),
            "metadata": dict(info.metadata),
            "groups": split_metadata(info.metadata),
            "civitai": _civitai_info(info.path),
            "samples": [str(path) for path in self._samples(info)],
        }

    def preview(self, name: str) -> Path | None:
        """The image that shows this LoRA: a sidecar preview, else its training run's last sample."""
        return self._preview(self._describe(name))

    def set_preview(self, name: str, image: Image.Image) -> Path:
        """Save ``image`` (e.g. a test generation) as ``NAME.preview.png``, the sidecar A1111 reads."""
        self._check_writable()
        info = self._describe(name)
        if not isinstance(image, Image.Image):
            raise UserError("image: generate a test image first, then use it as the preview.")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        target = _sidecar(info.path, PREVIEW_SUFFIXES[0])
        atomic_write_bytes(target, buffer.getvalue())
        log.info("saved a preview for LoRA %s", info.name)
        return target

    def _summary(self, info: LoraInfo) -> dict[str, Any]:
        preview = self._preview(info)
        return {
            **lora_summary(info),
            "preview": str(preview) if preview else None,
            "epochs": [
                {"name": epoch.name, "size_bytes": epoch.size_bytes, "hash": lora_summary(epoch)["hash"]}
                for epoch in self._epochs(info)
            ],
        }

    def _preview(self, info: LoraInfo) -> Path | None:
        for suffix in PREVIEW_SUFFIXES:
            candidate = _sidecar(info.path, suffix)
            # The API serves this file: a link that leads out of the LoRA folder is not a preview.
            if candidate.is_file() and _inside(candidate, self.folder):
                return candidate
        samples = self._samples(info)
        return samples[-1] if samples else None

    def _samples(self, info: LoraInfo) -> list[Path]:
        """Per-epoch samples of the training run that wrote this file (``models/training/NAME/samples``)."""
        for run_name in dict.fromkeys((info.path.stem, info.metadata.get("ss_output_name", ""))):
            if not run_name or "/" in run_name or run_name.startswith("."):
                continue
            folder = self.models_dir / "training" / run_name / "samples"
            samples = sorted(p for p in folder.glob("epoch-*.png") if p.is_file() and _inside(p, folder))
            if samples:
                return samples
        return []

    def _epochs(self, info: LoraInfo) -> list[LoraInfo]:
        folder = _epochs_dir(info.path)
        if not folder.is_dir():
            return []
        epochs = []
        for path in sorted(folder.glob(f"*{SUFFIX}")):
            try:
                epochs.append(self.library.describe(path))
            except UserError as exc:
                log.warning("skipping epoch file: %s", exc)
        return epochs

    def _describe(self, name: str, field: str = "name") -> LoraInfo:
        path = self._path(check_name(name, field))
        if not path.is_file():
            raise UnknownLora(f"{field}: no LoRA {shorten(name)!r} in {self.folder}; `lora list` shows the names.")
        return self.library.describe(path)

    def _path(self, name: str) -> Path:
        path = self.folder / f"{name}{SUFFIX}"
        # A link inside the folder may point anywhere: such a file is not managed here.
        if path.exists() and not path.resolve().is_relative_to(self.folder.resolve()):
            raise UserError(f"name: {shorten(name)!r} links outside the LoRA folder; manage that file by hand.")
        return path

    # --- rename, delete, restore ---------------------------------------------------------------

    def rename(self, name: str, new_name: str) -> dict[str, Any]:
        """Rename the file, its sidecars and its per-epoch files together."""
        self._check_writable()
        with _MOVES_LOCK:
            info = self._describe(name)
            target_name = check_name(new_name, "new_name")
            if target_name == info.name:
                raise UserError(f"new_name: {target_name!r} is the LoRA's name already; type another one.")
            target = self._path(target_name)
            moves = _bundle_moves(info.path, target)
            self._check_not_in_use(info, moves, "rename")
            taken = [dst for _, dst in moves if os.path.lexists(dst)]
            if taken:
                raise _name_taken(target_name, taken[0])
            # Another process (the CLI) may take a name after this check: the move refuses it then.
            _move_all(moves, lambda path: _name_taken(target_name, path))
            _remove_empty_dir(_epochs_dir(info.path))
            summary = self._summary(self.library.describe(target))
        log.info("renamed LoRA %s to %s", info.name, target_name)
        return summary

    def delete(self, name: str) -> dict[str, Any]:
        """Move the LoRA and its files into the trash; returns the trash entry (restore it by id or name)."""
        self._check_writable()
        with _MOVES_LOCK:
            info = self._describe(name)
            entry_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            entry = self.trash_dir / entry_id
            moves = _bundle_moves(info.path, entry / f"{info.name}{SUFFIX}")
            self._check_not_in_use(info, moves, "delete")
            if any(dst == entry / ENTRY_FILE for _, dst in moves):
                raise UserError(
                    f"name: LoRA {info.name!r} has a sidecar {ENTRY_FILE}, the name the trash keeps its record "
                    "under; rename the LoRA, then delete it."
                )
            record = {
                "id": entry_id,
                "name": info.name,
                "deleted_at": time.time(),
                "files": [dst.relative_to(entry).as_posix() for _, dst in moves],
            }
            # The record goes first: if the process dies part-way, the entry lists its files and
            # restore brings back those that reached the trash.
            entry.mkdir(parents=True)
            try:
                atomic_write_text(entry / ENTRY_FILE, json.dumps(record))
            except OSError as exc:
                _prune(entry)
                message = f"name: could not write the trash record ({exc.strerror or exc}); nothing was moved."
                raise UserError(message) from None
            try:
                _move_all(moves, lambda path: UserError(f"name: {path.name} is in the trash already; delete again."))
            except UserError:
                (entry / ENTRY_FILE).unlink(missing_ok=True)
                _prune(entry)  # nothing was moved: no entry is left behind
                raise
            _remove_empty_dir(_epochs_dir(info.path))
        log.info("moved LoRA %s to the trash (%s)", info.name, entry_id)
        return record

    def trash(self) -> list[dict[str, Any]]:
        """What can be restored, newest first; an entry whose record does not check out is skipped."""
        if not self.trash_dir.is_dir():
            return []
        entries = []
        for entry in self.trash_dir.iterdir():
            try:
                entries.append(self._trash_record(entry))
            except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
                log.warning("ignoring trash entry %s: %s", entry, exc)
        return sorted(entries, key=lambda r: r["deleted_at"], reverse=True)

    def _trash_record(self, entry: Path) -> dict[str, Any]:
        """``entry.json`` checked field by field: restore moves files where it says, so it must not
        lead out of the entry or the LoRA folder, and the listing sorts by ``deleted_at``."""
        if entry.is_symlink() or not entry.is_dir():
            raise ValueError("not a folder")
        record = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
        name = check_name(record["name"], "name")
        deleted_at = record["deleted_at"]
        if isinstance(deleted_at, bool) or not isinstance(deleted_at, int | float) or not math.isfinite(deleted_at):
            raise ValueError(f"deleted_at {shorten(repr(deleted_at))} is not a Unix time")
        files = record["files"]
        if not isinstance(files, list):
            raise ValueError("files is not a list")
        for rel in files:
            _check_trashed_file(rel, entry, self.folder)
        return {"id": entry.name, "name": name, "deleted_at": float(deleted_at), "files": list(files)}

    def restore(self, name_or_id: str) -> dict[str, Any]:
        """Move a trashed LoRA back: by trash id, or by name (its latest deletion)."""
        self._check_writable()
        key = check_name(name_or_id, "name")
        with _MOVES_LOCK:
            record = next((r for r in self.trash() if key in (r["id"], r["name"])), None)
            if record is None:
                raise UnknownLora(
                    f"name: nothing named {shorten(key)!r} in the trash; `lora trash` lists what is there."
                )
            entry = self.trash_dir / record["id"]
            moves = [
                (entry / rel, self.folder / rel)
                for rel in record["files"]
                if os.path.lexists(entry / rel) and not (entry / rel).is_dir()
            ]
            taken = [dst for _, dst in moves if os.path.lexists(dst)]
            if taken:
                raise _restore_taken(record["name"], taken[0])
            _move_all(moves, lambda path: _restore_taken(record["name"], path))
            (entry / ENTRY_FILE).unlink(missing_ok=True)
            _prune(entry)
            summary = self._summary(self._describe(record["name"]))
        log.info("restored LoRA %s from the trash (%s)", record["name"], record["id"])
        return summary

    def _check_writable(self) -> None:
        if self.read_only:
            raise UserError("This app's LoRAs are shared by every visitor; only its owner can rename or delete them.")

    def _check_not_in_use(self, info: LoraInfo, moves: list[tuple[Path, Path]], action: str) -> None:
        """Every file the move takes counts: a selected per-epoch file would vanish as well."""
        moved = [source for source, _ in moves]
        names = {p.relative_to(self.folder).as_posix().removesuffix(SUFFIX) for p in moved if p.name.endswith(SUFFIX)}
        selected = [n for n in (s.removesuffix(SUFFIX) for s in self.selection()) if n in names]
        if info.name in selected:
            raise UserError(
                f"name: LoRA {info.name!r} is in the current LoRA selection; remove it from the selection, "
                f"then {action} it."
            )
        if selected:
            raise UserError(
                f"name: LoRA {selected[0]!r}, a per-epoch file of {info.name!r}, is in the current LoRA selection; "
                f"remove it from the selection, then {action} {info.name!r}."
            )
        resolved = {p.resolve() for p in moved}
        for run in self.training.runs() if self.training is not None else []:
            writes = self.training.lora_dir(run.config).resolve() / f"{run.config.name}{SUFFIX}"
            owned = {writes, *(_epochs_dir(writes).glob(f"*{SUFFIX}"))}
            if not run.job.finished and resolved & owned:
                raise UserError(
                    f"name: training run {run.job.id} ({run.job.status}) writes LoRA {info.name!r}; "
                    f"wait for it to end or cancel it, then {action} it."
                )

    # --- test ----------------------------------------------------------------------------------

    def test_request(self, name: str, *, steps: int | None = None, seed: int | None = None):
        """A generation request with the LoRA at 1.0 and its trigger words as the prompt."""
        from lorapg.diffusion.request import GenerationRequest, LoraRequest

        info = self._describe(name)
        prompt = ", ".join(info.trigger_words) or info.path.stem.replace("_", " ")
        # None (steps unless given, CFG, sampler): the loaded family's defaults, filled in by the job
        # (GenerationService.with_defaults); GenerationRequest's own are SD's.
        return GenerationRequest(
            prompt=prompt,
            loras=(LoraRequest(info.name, TEST_SCALE),),
            seed=seed,
            steps=steps,
            guidance_scale=None,
            sampler=None,
        )

    def test(self, name: str, *, steps: int | None = None, seed: int | None = None, owner: str | None = None) -> Job:
        """Queue that request through the generation service (saved to the gallery like any image)."""
        if self.generation is None:
            raise UserError("Testing a LoRA needs the generation engine, which this command does not load.")
        return self.generation.submit_generation(self.test_request(name, steps=steps, seed=seed), owner=owner)


def build_lora_manager(runtime: Services) -> LoraManager:
    """The manager the UI, the API and the CLI use, on the services ``build_services`` made."""
    from lorapg.working_state import WorkingState

    policy = runtime.policy
    state = None if policy.private_visitors else WorkingState(runtime.settings.outputs / "working_state.json")
    return LoraManager(
        runtime.library,
        models_dir=runtime.settings.models_dir,
        generation=runtime.service,
        training=runtime.training,
        # The Generate tab's selection as the app saves it (read afresh: another process may run the app).
        selection=(lambda: state.load().lora_names) if state is not None else None,
        read_only=policy.settings_locked,
    )


def _inside(path: Path, folder: Path) -> bool:
    """``path`` with every link followed still lies in ``folder`` (itself resolved as the user set it up)."""
    return path.resolve().is_relative_to(folder.resolve())


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name.removesuffix(SUFFIX) + suffix)


def _epochs_dir(path: Path) -> Path:
    """Where training writes the per-epoch files of ``NAME.safetensors``: ``NAME_epochs/``."""
    return path.with_name(path.name.removesuffix(SUFFIX) + "_epochs")


def _epoch_parent(name: str) -> str | None:
    """``sub/x_epochs/x-e0001`` -> ``sub/x``: the LoRA whose per-epoch file this is, if it is one."""
    parts = name.split("/")
    if len(parts) < 2 or not parts[-2].endswith("_epochs"):
        return None
    return "/".join([*parts[:-2], parts[-2].removesuffix("_epochs")])


def _bundle_moves(path: Path, target: Path) -> list[tuple[Path, Path]]:
    """(source, destination) for the LoRA file, each sidecar and each per-epoch file, named after ``target``."""
    moves = [(path, target)]
    moves += [(_sidecar(path, s), _sidecar(target, s)) for s in SIDECAR_SUFFIXES if _sidecar(path, s).is_file()]
    old_stem, new_stem = path.name.removesuffix(SUFFIX), target.name.removesuffix(SUFFIX)
    epochs = _epochs_dir(path)
    if epochs.is_dir():
        for file in sorted(p for p in epochs.iterdir() if p.is_file()):
            # Training names them NAME-e0001.safetensors: they follow the new name.
            renamed = new_stem + file.name.removeprefix(old_stem) if file.name.startswith(old_stem) else file.name
            moves.append((file, _epochs_dir(target) / renamed))
    return moves


def _name_taken(target_name: str, path: Path) -> UserError:
    return UserError(
        f"new_name: a LoRA (or its files) named {target_name!r} exists already ({path.name}); "
        "choose another name or delete that one first."
    )


def _restore_taken(name: str, path: Path) -> UserError:
    return UserError(f"name: a LoRA named {name!r} exists again ({path.name}); rename or delete it, then restore.")


def _check_trashed_file(rel: object, entry: Path, folder: Path) -> None:
    """A path from ``entry.json``: relative, '/'-separated, no '.' or '..' parts, not into the trash,
    and inside both the entry and the LoRA folder once links are followed; else ``ValueError``."""
    if not isinstance(rel, str) or "\\" in rel or any(ord(c) < 32 for c in rel):
        raise ValueError(f"file {shorten(repr(rel))} is not a relative path")
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts) or parts[0] == TRASH:
        raise ValueError(f"file {shorten(rel)!r} is absolute or has an empty, '.' or '..' part")
    for root in (entry, folder):
        if not (root / rel).resolve().is_relative_to(root.resolve()):
            raise ValueError(f"file {shorten(rel)!r} leads outside {root}")


class _DestinationTaken(Exception):
    """A move found its destination taken (by another process since the caller looked)."""


def _move_no_clobber(source: Path, destination: Path) -> None:
    """Move one file, failing with ``_DestinationTaken`` rather than replacing an existing one.

    ``os.replace`` overwrites silently; a hard link fails when the name exists, atomically, so
    link-then-unlink is a rename that cannot clobber. Without hard links (some network or FAT
    filesystems) it checks, then renames: the lock keeps that safe within this process.
    """
    try:
        os.link(source, destination, follow_symlinks=False)
    except FileExistsError:
        raise _DestinationTaken(destination) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.path.lexists(destination):
            raise _DestinationTaken(destination) from None
        os.replace(source, destination)  # move-only
        return
    try:
        os.unlink(source)
    except OSError:
        os.unlink(destination)  # the file stays where it was
        raise


def _move_all(moves: list[tuple[Path, Path]], taken: Callable[[Path], UserError]) -> None:
    """Move every file, or (after a failure) none: those already moved go back. A destination that
    exists never gets overwritten: ``taken(destination)`` is raised instead."""
    done: list[tuple[Path, Path]] = []
    try:
        for source, destination in moves:
            destination.parent.mkdir(parents=True, exist_ok=True)
            _move_no_clobber(source, destination)  # same folder tree, same filesystem
            done.append((source, destination))
    except (OSError, _DestinationTaken) as exc:
        for moved_from, moved_to in reversed(done):
            os.replace(moved_to, moved_from)  # move-only
        if isinstance(exc, _DestinationTaken):
            raise taken(destination) from None
        raise UserError(f"Could not move {source.name} ({exc.strerror or exc}); nothing was changed.") from None


def _remove_empty_dir(folder: Path) -> None:
    """A per-epoch folder left empty by a move goes too; one that still holds files stays."""
    with contextlib.suppress(OSError):  # missing or not empty
        folder.rmdir()


def _prune(folder: Path) -> None:
    """Remove ``folder`` if it holds nothing but empty folders (a restored trash entry)."""
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _remove_empty_dir(sub)
    _remove_empty_dir(folder)


def _civitai_info(path: Path) -> dict[str, Any] | None:
    """The civitai helper's ``NAME.civitai.info`` (JSON), the fields people look at."""
    info = _sidecar(path, ".civitai.info")
    try:
        if not info.is_file() or info.stat().st_size > MAX_INFO_BYTES:
            return None
        data = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", info)
        return None
    if not isinstance(data, dict):
        return None
    # Hand-edited or other tools' files differ in types ("123", "a, b"): coerce to what the API promises.
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    model_id = _as_int(data.get("modelId"))
    return {
        "model": _as_str(model.get("name")),
        "version": _as_str(data.get("name")),
        "base_model": _as_str(data.get("baseModel")),
        "trained_words": _as_words(data.get("trainedWords")),
        "description": _as_str(data.get("description")),
        "model_id": model_id,
        "version_id": _as_int(data.get("id")),
        "url": f"https://civitai.com/models/{model_id}" if model_id is not None else None,
    }


def _as_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _as_int(value: object) -> int | None:
    """An id as civitai writes it (42) or as a string ("42"); anything else is no id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    digits = value.strip() if isinstance(value, str) else ""
    if digits.isascii() and digits.isdigit() and len(digits) <= 20:  # int() refuses huge strings
        return int(digits)
    return None


def _as_words(value: object) -> list[str]:
    """Trigger words: a list of strings, or one comma-separated string (as the library reads it)."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        return []
    return [word.strip() for word in value if isinstance(word, str) and word.strip()]
