"""Training runs as API jobs: start from uploaded files or a dataset, list, watch, cancel.

The REST API's ``/api/v1/training`` routes call this and nothing else; it wraps ``TrainingService``
(the Train tab's service), so a run started here is the same kind of job on the same GPU queue.

Uploads are written into a hidden staging folder under the datasets area, checked there (file
types, zip members that point outside the zip, the request's total size) and only then handed to
``DatasetStore.add_files``, which enforces the image count, unpacked-size and pixel limits before
anything reaches a dataset. The dataset is named after the run and the uploaded bytes, so posting
the same files with the same name again finds the same dataset, and the trainer resumes from the
checkpoint a cancelled run kept.

Never imports gradio or fastapi.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import logging
import shutil
import tempfile
import zipfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from lorapg.errors import UserError, shorten
from lorapg.jobs import CANCELLED, DONE, ERROR
from lorapg.services.training import TrainingRun, TrainingService
from lorapg.training.config import validate_name
from lorapg.training.dataset import check_name
from lorapg.training.run_store import RunRecord
from lorapg.training.validation import IMAGE_SUFFIXES, header_size

if TYPE_CHECKING:
    from lorapg.jobs import Job
    from lorapg.services.grid import GridService

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_UPLOAD_SUFFIXES = IMAGE_SUFFIXES | {".txt", ".zip"}
_ACCEPTED = "PNG, JPEG or WebP images, .txt captions, or one .zip of them"
# Settings a JSON request may not set: the request's own fields name these, and folders and model paths
# on the server are the app's business (a client names a dataset, not a path).
_NOT_SETTINGS = ("name", "trigger", "preset", "images", "regularization_images", "out", "work_dir", "model")
# Names the upload dataset gets: the run's name (cut so the whole stays a valid name) + a content hash.
_NAME_PART, _HASH_PART = 100, 10


class UnknownRun(LookupError):
    """No training run with this id (the API answers 404)."""


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the client sent and its bytes."""

    filename: str
    file: IO[bytes]


@dataclass(frozen=True)
class RunQueueRequest:
    """A run queued by JSON: on a dataset, or "train again" from ``again_from`` with ``settings`` changed."""

    name: str = ""
    trigger_word: str = ""
    dataset: str = ""
    preset: str = ""
    settings: dict[str, Any] | None = None  # TrainConfig fields
    again_from: str = ""  # a run id from the history


@dataclass(frozen=True)
class TrainingStart:
    """What a client asks for; ``overrides`` are TrainConfig fields (``unet_lr``, ``epochs``, ...)."""

    name: str
    trigger_word: str
    preset: str = ""
    dataset: str = ""
    overrides: dict[str, Any] | None = None


class TrainingJobs:
    def __init__(
        self,
        training: TrainingService,
        *,
        max_upload_bytes: int | None = None,
        sample_url: str = "/api/v1/training/{job_id}/samples/{n}.png",
        grids: GridService | None = None,
        history_sample_url: str = "/api/v1/training/runs/{run_id}/samples/{n}.png",
    ):
        """``max_upload_bytes``: all files of one request together (None: no limit). ``sample_url``:
        the template of a sample image's URL, filled with the job id and the sample's number.
        ``grids``: makes a finished run's epochs × scales grid (None: not offered)."""
        self.training = training
        self.max_upload_bytes = max_upload_bytes
        self.sample_url = sample_url
        self.history_sample_url = history_sample_url
        self.grids = grids

    # --- presets -------------------------------------------------------------------------------

    def presets(self) -> list[dict[str, str]]:
        return [{"name": n, "description": self.training.preset_description(n)} for n in self.training.preset_names()]

    # --- starting a run --------------------------------------------------------------------------

    def start(self, request: TrainingStart, uploads: list[Upload]) -> dict[str, Any]:
        """Queue a run on the uploads or on ``request.dataset``; the reply of ``POST /training``."""
        validate_name(request.name)
        if uploads and request.dataset:
            raise UserError("Send either images (files or a zip) or dataset (an existing dataset's name), not both.")
        if not uploads and not request.dataset:
            raise UserError(f"images: no files; upload {_ACCEPTED}, or set dataset to an existing dataset's name.")
        if request.dataset:
            return self._submit(request, self.training.dataset_folder(request.dataset), created=False)
        folder, created = self._dataset_from_uploads(request.name, uploads)
        return self._submit(request, folder, created=created)

    def _submit(self, request: TrainingStart, folder: Path, *, created: bool) -> dict[str, Any]:
        values = {
            **(request.overrides or {}),
            "name": request.name,
            "trigger": request.trigger_word,
            "preset": request.preset,
            "images": str(folder),
        }
        try:
            config = self.training.config_for(values)
            run = self.training.submit(config, owner=None)  # API callers are the owner
        except UserError:
            if created:  # a refused run leaves no dataset behind that nobody asked for
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return self._started(run, folder.name)

    def _started(self, run: TrainingRun, dataset: str) -> dict[str, Any]:
        measured = self.training.estimate(run.config)
        return {
            "job_id": run.job.id,
            "status": run.job.status,
            "estimated_duration_seconds": round(self.training.estimated_seconds(run.config), 1),
            "dataset": dataset,
            "measured_estimate_seconds": None if measured.seconds is None else round(measured.seconds, 1),
            "estimate": measured.text(),
        }

    def _dataset_from_uploads(self, name: str, uploads: list[Upload]) -> tuple[Path, bool]:
        """The dataset holding exactly these uploads, and whether it was made just now."""
        store = self.training.dataset_store()
        store.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".api-upload-", dir=store.root))  # hidden: not a dataset
        try:
            staged, digest = self._stage(uploads, staging)
            dataset_name = f"{name[:_NAME_PART]}-{digest[:_HASH_PART]}"
            existing = store.get(dataset_name, must_exist=False)
            if existing.folder.is_dir():  # the same files were posted before: train (or resume) on them
                log.info("training %s: uploads match dataset %s", name, dataset_name)
                return existing.folder, False
            dataset, notes = store.add_files(dataset_name, staged)
            for note in notes:
                log.info("training %s: %s", name, note)
            return dataset.folder, True
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _stage(self, uploads: list[Upload], staging: Path) -> tuple[list[Path], str]:
        """Write and check every upload; the staged paths and a hash of names and bytes."""
        budget = _UploadBudget(self.max_upload_bytes)
        hashes: dict[str, str] = {}
        paths: list[Path] = []
        for upload in uploads:
            base = _upload_name(upload.filename)
            if base in hashes:
                raise UserError(f"images: two files are named {shorten(base, 60)}; rename one and upload again.")
            target = staging / base
            hashes[base] = _copy_counted(upload.file, target, budget)
            suffix = target.suffix.lower()
            if suffix == ".zip":
                _check_zip(target, base)
            elif suffix in IMAGE_SUFFIXES:
                _check_image(target, base)
            paths.append(target)
        digest = hashlib.sha256("\n".join(f"{n}:{h}" for n, h in sorted(hashes.items())).encode()).hexdigest()
        return paths, digest

    # --- the queue and the history ----------------------------------------------------------------

    def queue_run(self, request: RunQueueRequest) -> dict[str, Any]:
        """Queue a run by JSON (``POST /training/runs``): on a dataset, or again from a run with changes."""
        settings = dict(request.settings or {})
        refused = [key for key in settings if key in _NOT_SETTINGS]
        if refused:
            raise UserError(
                f"settings: {shorten(refused[0], 40)} cannot be set here; use the request's name, trigger_word, "
                "dataset and preset fields (folders and the base model are the app's)."
            )
        if request.again_from:
            try:
                base = dataclasses.asdict(self.training.config_of(request.again_from))
            except UserError as exc:
                raise UserError(f"again_from: {exc}") from None
            values = {**base, "preset": "", **settings}  # every field is set: the preset would add nothing
            if request.name:
                values["name"] = request.name
            if request.trigger_word:
                values["trigger"] = request.trigger_word
            if request.dataset:
                values["images"] = str(self.training.dataset_folder(request.dataset))
        else:
            if not request.dataset:
                raise UserError("dataset: give an existing dataset's name (or again_from: a run id to train again).")
            validate_name(request.name)
            values = {
                **settings,
                "name": request.name,
                "trigger": request.trigger_word,
                "preset": request.preset,
                "images": str(self.training.dataset_folder(request.dataset)),
            }
        run = self.training.submit(self.training.config_for(values), owner=None)
        return self._started(run, Path(run.config.images).name)

    def history(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every recorded run, oldest first (``status``: only those)."""
        return [self.history_item(record) for record in self.training.history_runs(status)]

    def history_detail(self, run_id: str) -> dict[str, Any]:
        record = self.training.history_run(self.history_id(run_id))
        return {**self.history_item(record), "losses": self._loss_points(self.training.live_losses(record))}

    def remove(self, run_id: str) -> dict[str, Any]:
        """Take a queued run out of the queue, or a finished one out of the history."""
        return self.history_item(self.training.remove(self.history_id(run_id)))

    def compare(self, run_ids: list[str]) -> dict[str, Any]:
        ids = [part.strip() for value in run_ids for part in value.split(",") if part.strip()]
        for run_id in ids:
            self.history_id(run_id)
        curves = self.training.compare(ids)
        return {
            "runs": [
                {
                    "id": curve.id,
                    "name": curve.name,
                    "status": curve.status,
                    "losses": self._loss_points(curve.losses),
                    "samples": [
                        {"label": label, "url": self.history_sample_url.format(run_id=curve.id, n=n)}
                        for n, (label, _) in enumerate(curve.samples, start=1)
                    ],
                }
                for curve in curves
            ]
        }

    def history_sample(self, run_id: str, n: int) -> Path | None:
        """Kept sample ``n`` (1 = the first epoch's) of a recorded run; None when there is none."""
        samples = self.training.history_run(self.history_id(run_id)).samples
        if not 1 <= n <= len(samples):
            return None
        path = Path(samples[n - 1][1])
        return path if path.is_file() else None

    def history_item(self, record: RunRecord) -> dict[str, Any]:
        live = self._live(record)
        return {
            "id": record.id,
            "name": record.name,
            "status": record.status,
            "dataset": Path(str(record.config.get("images", ""))).name,
            "created_at": record.created_at,
            "started_at": record.started_at,
            "finished_at": record.finished_at,
            "duration_seconds": None if record.duration_s is None else round(record.duration_s, 3),
            "step": live.progress.step if live is not None and live.progress else record.steps,
            "total_steps": live.progress.total_steps if live is not None and live.progress else record.total_steps,
            "final_loss": record.final_loss,
            "lora_path": record.lora_path,
            "epoch_loras": record.epoch_loras,
            "sample_urls": [
                self.history_sample_url.format(run_id=record.id, n=n) for n in range(1, len(record.samples) + 1)
            ],
            "error": record.error,
            "config": record.config,
        }

    def _live(self, record: RunRecord) -> TrainingRun | None:
        """The in-memory run while it is under way in this process (its progress is not stored)."""
        if record.finished:
            return None
        try:
            return self.training.run(record.id)
        except UserError:
            return None

    def history_id(self, run_id: str) -> str:
        """The id of a run in the history; ``UnknownRun`` (a 404) otherwise."""
        try:
            return self.training.history_run(run_id).id
        except UserError:
            raise UnknownRun(f"No training run {shorten(run_id, 40)!r} in the history.") from None

    @staticmethod
    def _loss_points(losses: list[tuple[int, float]]) -> list[dict[str, float]]:
        return [{"step": step, "loss": loss} for step, loss in losses]

    # --- watching runs ---------------------------------------------------------------------------

    def run(self, job_id: str) -> TrainingRun:
        try:
            return self.training.run(job_id)
        except UserError:
            raise UnknownRun(f"No training run {shorten(job_id, 40)!r}.") from None

    def runs(self) -> list[dict[str, Any]]:
        """Every run this process knows, oldest first."""
        return [self.run_state(run) for run in self.training.runs()]

    def detail(self, job_id: str) -> dict[str, Any]:
        run = self.run(job_id)
        result = run.result
        return {
            **self.run_state(run),
            "losses": [{"step": step, "loss": loss} for step, loss in list(run.losses)],
            "sample_urls": [self._sample_url(run, n) for n in range(1, len(run.samples) + 1)],
            "lora_name": run.config.name if result and result.lora_path else None,
            "lora_path": str(result.lora_path) if result and result.lora_path else None,
            "checkpoint": str(result.checkpoint) if result and result.checkpoint else None,
            "resumed_from": result.resumed_from if result else 0,
            "error": run.job.error,
        }

    def epochs_grid(self, job_id: str, scales: list[float], **overrides: Any) -> Job:
        """Queue the epochs × scales grid of finished run ``job_id`` (its per-epoch LoRAs × ``scales``);
        ``overrides``: GenerationRequest fields, None for the run's own (see GridService.submit_epochs)."""
        if self.grids is None:
            raise UserError("This app makes no grids; start it with the generation engine.")
        return self.grids.submit_epochs(self.run(job_id), scales, **overrides)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask the run to stop; it keeps a checkpoint at the step it reached (the trainer saves one)."""
        self.run(job_id)
        return self.run_state(self.training.cancel(job_id))

    def sample_png(self, job_id: str, n: int) -> bytes | None:
        """Sample image ``n`` (1 = the first one drawn) as PNG bytes; None when there is none."""
        samples = list(self.run(job_id).samples)
        if not 1 <= n <= len(samples):
            return None
        buffer = io.BytesIO()
        samples[n - 1][1].save(buffer, format="PNG")
        return buffer.getvalue()

    def run_state(self, run: TrainingRun) -> dict[str, Any]:
        job = run.job
        return {
            "job_id": job.id,
            "name": run.config.name,
            "dataset": Path(run.config.images).name,
            "status": job.status,
            **self._progress(run),
            "message": job.message,
            "created_at": job.created_at,
            "started_at": run.started_at,
            "finished_at": run.finished_at,
        }

    def _progress(self, run: TrainingRun) -> dict[str, Any]:
        progress, losses = run.progress, list(run.losses)
        step = progress.step if progress else 0
        total = progress.total_steps if progress else 0
        done = run.job.status == DONE
        eta = progress.eta_s if progress and progress.phase == "train" else None
        return {
            "epoch": progress.epoch if progress else 0,
            "epochs": progress.epochs if progress else 0,
            "step": step,
            "total_steps": total,
            "loss": losses[-1][1] if losses else None,
            "percent": 100.0 if done else round(100.0 * step / total, 1) if total else 0.0,
            "eta_seconds": 0.0 if done else round(eta, 1) if eta is not None else None,
        }

    def _sample_url(self, run: TrainingRun, n: int) -> str:
        return self.sample_url.format(job_id=run.job.id, n=n)

    async def events(self, job_id: str, poll_s: float = 0.2) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """``(event, data)`` pairs: the current progress first, then each change, then the outcome.

        Polls the run (cheap attribute reads) every ``poll_s`` seconds; a client that stops
        listening only ends this generator, never the run.
        """
        run = self.run(job_id)
        last: dict[str, Any] | None = None
        while True:
            finished = run.job.finished  # read first: the progress read after it is then final
            progress = self._progress_event(run)
            if progress != last:
                yield "progress", progress
                last = progress
            if finished:
                yield self._outcome_event(run)
                return
            await asyncio.sleep(poll_s)

    def _progress_event(self, run: TrainingRun) -> dict[str, Any]:
        event = {"status": run.job.status, **self._progress(run), "message": run.job.message}
        if run.samples:
            event["sample_url"] = self._sample_url(run, len(run.samples))
        return event

    def _outcome_event(self, run: TrainingRun) -> tuple[str, dict[str, Any]]:
        job, result = run.job, run.result
        if job.status == DONE and result is not None and result.lora_path is not None:
            return "complete", {
                "lora_name": run.config.name,
                "lora_path": str(result.lora_path),
                "steps": result.steps,
                "resumed_from": result.resumed_from,
            }
        if job.status == CANCELLED:
            return "cancelled", {
                "step": result.steps if result else 0,
                "checkpoint": str(result.checkpoint) if result and result.checkpoint else None,
                "message": "Cancelled; post the same run again (same name and settings) to resume.",
            }
        message = job.error if job.status == ERROR and job.error else f"Training ended without a LoRA ({job.status})."
        return "error", {"message": message}


# --- upload checks ---------------------------------------------------------------------------------


class _UploadBudget:
    """Bytes the request's files may still take (``max_upload_mb``); counted as they are written."""

    def __init__(self, limit: int | None):
        self.limit, self.used = limit, 0

    def spend(self, count: int) -> None:
        self.used += count
        if self.limit and self.used > self.limit:
            raise UserError(
                f"images: the files are larger than {self.limit // (1024 * 1024)} MB together, the upload limit "
                "(setting max_upload_mb); upload fewer or smaller files."
            )


def _upload_name(filename: str | None) -> str:
    """The file's own name (a client may send a path); refused unless it is a safe, accepted name."""
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    check_name(base, "images: file name")
    if Path(base).suffix.lower() not in _UPLOAD_SUFFIXES:
        raise UserError(f"images: {shorten(base, 60)} is not an image; upload {_ACCEPTED}.")
    return base


def _copy_counted(source: IO[bytes], target: Path, budget: _UploadBudget) -> str:
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        while chunk := source.read(_CHUNK):
            budget.spend(len(chunk))
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _check_image(path: Path, label: str) -> None:
    """The header must be an image's; the pixel limit is checked by the dataset store."""
    try:
        header_size(path)
    except Image.DecompressionBombError:
        return  # an image, just too large: DatasetStore refuses it with the limit's message
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UserError(
            f"images: {shorten(label, 60)} is not a readable image; upload {_ACCEPTED} (re-export it)."
        ) from None


def _check_zip(path: Path, label: str) -> None:
    """Every member a safe relative path to an image or caption; otherwise nothing is added."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m.filename for m in archive.infolist() if not m.is_dir()]
    except zipfile.BadZipFile:
        raise UserError(f"images: {shorten(label, 60)} is not a readable zip file; make the zip again.") from None
    for member in _data_members(members):
        inner = PurePosixPath(member.replace("\\", "/"))
        if inner.is_absolute() or ".." in inner.parts or (inner.parts and ":" in inner.parts[0]):
            raise UserError(
                f"images: {shorten(label, 60)} holds {shorten(member, 60)!r}, a path outside the zip's folder; "
                "nothing was added. Zip the image folder's contents instead."
            )
        if inner.suffix.lower() not in IMAGE_SUFFIXES | {".txt"}:
            raise UserError(
                f"images: {shorten(label, 60)} holds {shorten(member, 60)!r}, which is not an image; "
                "zip only PNG, JPEG or WebP images and .txt captions."
            )


def _data_members(members: Iterable[str]) -> list[str]:
    """Members that are meant as data (macOS resource forks and hidden files are skipped, as on upload)."""
    kept = []
    for member in members:
        parts = PurePosixPath(member.replace("\\", "/")).parts
        if "__MACOSX" in parts or (parts and parts[-1].startswith(".") and ".." not in parts):
            continue
        kept.append(member)
    return kept
