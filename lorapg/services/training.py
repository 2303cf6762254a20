"""TrainingService: LoRA training for the Train tab, the CLI and the REST endpoints.

Never imports gradio. Training runs as a job on the shared GPU queue, so it never overlaps a
generation; before it starts, the inference pipeline leaves the GPU, and it comes back afterwards.
On a ZeroGPU Space the run itself happens inside one ``spaces.GPU`` call (``GpuTask``), its progress
relayed back; ``max_steps`` bounds it there (and on a free CPU Space). With private visitors
(``owner`` given) each visitor has their own datasets and sees only their own runs.

Queue and history: every run is queued on the one GPU queue in the order it was submitted (one
runs at a time; the next starts when the previous ends) and recorded in a ``RunStore`` from queued
to its end, so the history (settings, duration, loss curve, samples, LoRA files) outlives the
process, and finished runs measure this machine's speed for the duration estimate of the next.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lorapg.atomic_files import atomic_write
from lorapg.config import Settings
from lorapg.diffusion.families import NATIVE_SIZE, is_transformer_family
from lorapg.diffusion.model_source import refuse_gguf_training
from lorapg.errors import UserError, shorten
from lorapg.hosting.gpu_estimates import planned_training_steps, training_seconds
from lorapg.hosting.visitors import visitor_key
from lorapg.hosting.zerogpu import GpuTask
from lorapg.jobs import ERROR, QUEUED, Job, JobQueue
from lorapg.jobs import RUNNING as JOB_RUNNING
from lorapg.notifications import WebhookNotifier, training_finished
from lorapg.residency import out_of_memory_as_user_error
from lorapg.training import distributed
from lorapg.training.config import FIELDS, TrainConfig, build_config, check, validate_name, write_config
from lorapg.training.cropping import bucket_step, buckets_for
from lorapg.training.dataset import Dataset, DatasetImage, DatasetLimits, DatasetStore
from lorapg.training.estimate import DurationEstimate, estimate_duration
from lorapg.training.flow_matching import family_geometry, pipeline_geometry, refuse_unusable_settings
from lorapg.training.presets import PRESETS_DIR, guess_family, load_preset, preset_names
from lorapg.training.run_store import CANCELLED, DONE, FAILED, RUNNING, RunOutcome, RunRecord, RunStore, history_dir
from lorapg.training.trainer import (
    Trainer,
    TrainProgress,
    TrainResult,
    bucket_groups,
    planned_sizes,
    planned_steps,
    remove_run_outputs,
    training_geometry,
)
from lorapg.training.validation import ValidationReport

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """What a watcher of one run sees: the latest progress, the loss curve, the samples."""

    job: Job
    config: TrainConfig
    config_path: Path
    progress: TrainProgress | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[str, Image.Image]] = field(default_factory=list)  # (label, image)
    started_at: float | None = None  # when the queue began the work (time.time())
    finished_at: float | None = None  # when the work returned or failed; None if it never ran

    @property
    def result(self) -> TrainResult | None:
        return self.job.result if isinstance(self.job.result, TrainResult) else None


@dataclass(frozen=True)
class RunCurves:
    """One run in a comparison: its loss curve and its per-epoch samples (label, PNG path)."""

    id: str
    name: str
    status: str
    losses: list[tuple[int, float]]
    samples: list[tuple[str, str]]


def finished_payload(run: TrainingRun) -> dict[str, Any]:
    """The ``training.finished`` notification for a run that has ended."""
    result = run.result
    losses = run.losses or (result.losses if result is not None else [])
    ran = run.started_at is not None and run.finished_at is not None
    return training_finished(
        run=run.config.name,
        job_id=run.job.id,
        status=run.job.status,
        lora_path=str(result.lora_path) if result is not None and result.lora_path is not None else None,
        duration_seconds=run.finished_at - run.started_at if ran else None,
        final_loss=losses[-1][1] if losses else None,
        error=run.job.error,
    )


def _running(record: RunRecord) -> UserError:
    return UserError(f"Run {record.name!r} ({record.id}) is running; cancel it first, then remove it from the history.")


class TrainingService:
    def __init__(
        self,
        settings: Settings,
        jobs: JobQueue,
        engine: Any = None,
        *,
        presets_dir: Path | None = None,
        max_steps: int | None = None,
        gpu_relay: bool | None = None,
        gpu_decorator: Callable | None = None,
        notifier: WebhookNotifier | None = None,
        history: RunStore | None = None,
        device: str | None = None,
        worker: int = 0,
        models: Any = None,
    ):
        """``max_steps``: the longest run this app allows (None: no limit). ``gpu_relay`` /
        ``gpu_decorator``: see ``GpuTask``. ``notifier``: told when each run ends (``--notify-webhook``).
        ``history``: the run store (default: ``models/training_runs/runs.sqlite3``).
        ``device`` / ``worker``: with several devices (``--devices``), the one training runs on and the
        job queue's worker for it, which training holds while the others generate (default: ``device``, 0).
        ``models``: the GenerationService, whose chosen model and primary engine give the base model's
        defaults (``engine``, another worker's, may hold whatever it generated last; default: ``engine``)."""
        self.settings = settings
        self.jobs = jobs
        self.engine = engine  # the DiffusionEngine whose pipeline leaves the GPU while training
        self.device, self.worker = device, worker
        self.models = models
        self.presets_dir = presets_dir or PRESETS_DIR
        self.datasets = DatasetStore(Path(settings.models_dir) / "datasets", DatasetLimits.from_settings(settings))
        self.max_steps = max_steps
        self.notifier = notifier
        self._runs: dict[str, TrainingRun] = {}
        self._lock = threading.Lock()
        # Held from queueing a job to recording it, so the history's order is the GPU queue's.
        self._submit_lock = threading.Lock()
        self._history = history
        self._history_path = history_dir(settings.models_dir) / "runs.sqlite3"
        self._history_lock = threading.Lock()
        self._history_checked = False
        # Under accelerate launch every process runs the same run: the main one alone records it,
        # or the history would hold one run per process (and count its measured speed as many times).
        self._records_history = distributed.is_main_process()
        if self._records_history and (history is not None or self._history_path.exists()):
            self.history  # noqa: B018  (opened now: runs an earlier process left unfinished become failed)
        self._training = GpuTask(
            self._train_on_device, self._training_seconds, relay=gpu_relay, decorator=gpu_decorator
        )

    @property
    def history(self) -> RunStore:
        """The run store, opened on first use: an app that never trains writes nothing for it."""
        with self._history_lock:
            if not self._history_checked:
                self._history = self._history or RunStore(self._history_path)
                self._history.mark_interrupted()
                self._history_checked = True
            return self._history

    # --- datasets ------------------------------------------------------------------------------
    # ``owner``: the visitor whose datasets these are (None: the shared ``models/datasets``).

    def dataset_store(self, owner: str | None = None) -> DatasetStore:
        if owner is None:
            return self.datasets
        return DatasetStore(
            Path(self.settings.models_dir) / "visitor_datasets" / visitor_key(owner),
            DatasetLimits.from_settings(self.settings),
        )

    def dataset_names(self, owner: str | None = None) -> list[str]:
        return self.dataset_store(owner).names()

    def dataset_add(self, name: str, files: list[str | Path], owner: str | None = None) -> tuple[Dataset, list[str]]:
        if not files:
            raise UserError("No files to add: choose images (PNG, JPEG, WebP) or a zip of them.")
        return self.dataset_store(owner).add_files(name, files)

    def dataset_images(self, name: str, owner: str | None = None) -> list[DatasetImage]:
        return self.dataset_store(owner).get(name).images()

    def dataset_validate(self, name: str, owner: str | None = None) -> ValidationReport:
        return self.dataset_store(owner).get(name).validate()

    def dataset_remove(self, name: str, file: str, owner: str | None = None) -> None:
        self.dataset_store(owner).get(name).remove(file)

    def dataset_remove_near_duplicates(self, name: str, owner: str | None = None) -> list[str]:
        """Remove the images validation reports as near duplicates; the names removed."""
        return self.dataset_store(owner).get(name).remove_near_duplicates()

    def dataset_folder(self, name: str, owner: str | None = None) -> Path:
        return self.dataset_store(owner).get(name).folder

    def dataset_name_of(self, config: TrainConfig, owner: str | None = None) -> str | None:
        """The name of the dataset ``config`` trains on, when it is one of ``owner``'s (not a folder elsewhere)."""
        if not config.images:
            return None
        folder = Path(config.images)
        store = self.dataset_store(owner)
        return folder.name if folder.parent.resolve() == store.root.resolve() and folder.is_dir() else None

    # --- configs -------------------------------------------------------------------------------

    def preset_names(self) -> list[str]:
        return preset_names(self.presets_dir)

    def preset_description(self, name: str) -> str:
        # The version of the preset for the app model's family (Flux.1 and SD 3.5 have their own).
        return load_preset(name, self.presets_dir, guess_family(self._model_of(TrainConfig()))).description

    def model_family(self, config: TrainConfig | None = None) -> str | None:
        """The family of the model ``config`` trains (None: a run's default), when known without loading
        it (the Train tab shows Flux.1 / SD 3.5 settings, such as quantize, for those)."""
        return guess_family(self._model_of(config or TrainConfig()))

    def config_for(self, values: dict[str, Any]) -> TrainConfig:
        """A checked config from the UI's field values (defaults < preset < values)."""
        return build_config(values, presets_dir=self.presets_dir, preset_model=self._model_of(TrainConfig()))

    def work_dir(self, config: TrainConfig) -> Path:
        return Path(config.work_dir) if config.work_dir else Path(self.settings.models_dir) / "training" / config.name

    def lora_dir(self, config: TrainConfig) -> Path:
        return Path(config.out) if config.out else Path(self.settings.lora_dir)

    def prepare(self, config: TrainConfig) -> TrainConfig:
        """Fill in the app's defaults and refuse bad input before anything is queued."""
        check(config)
        validate_name(config.name)
        if not config.trigger.strip():
            raise UserError("A trigger word is required: a rare word (e.g. “zqx_fox”) that will call up the LoRA.")
        model = self._model_of(config)
        # Refused here, not after queueing behind other runs: a GGUF base can generate but not be trained.
        refuse_gguf_training(model, "model" if config.model else "model (the loaded model when empty)")
        self._check_for_family(config, model)
        if not config.images:
            raise UserError("No images: upload some to a dataset, or pass --images DIR.")
        images = Path(config.images).expanduser()
        if not images.is_dir():
            raise UserError(f"Image folder {config.images} does not exist.")
        Dataset(images, self.settings.max_image_pixels).require_trainable()
        config = dataclasses.replace(config, model=model, trigger=config.trigger.strip(), images=str(images.resolve()))
        if config.regularization_images:
            regularization = Path(config.regularization_images).expanduser()
            if not regularization.is_dir():
                raise UserError(f"Regularization folder {config.regularization_images} does not exist.")
            Dataset(regularization, self.settings.max_image_pixels).require_trainable()
            config = dataclasses.replace(config, regularization_images=str(regularization.resolve()))
        config = self._within_step_limit(config)
        target = self.lora_dir(config) / f"{config.name}.safetensors"
        if target.exists() and not config.overwrite:
            raise UserError(
                f"A LoRA named {config.name!r} already exists ({target}). Choose another name, or "
                "set overwrite = true (--overwrite) to replace it."
            )
        with self._lock:
            busy = [r for r in self._runs.values() if r.config.name == config.name and not r.job.finished]
        if busy:
            raise UserError(
                f"A training run named {config.name!r} is already queued or running (job {busy[0].job.id})."
            )
        return config

    @staticmethod
    def _check_for_family(config: TrainConfig, model: str) -> None:
        """Settings Flux.1 / SD 3.5 cannot train, refused before the download and load when the family
        is known now (a folder, a single file, a hub model already downloaded); the trainer checks again."""
        family = guess_family(model)
        if is_transformer_family(family):
            refuse_unusable_settings(config, family)

    def _within_step_limit(self, config: TrainConfig) -> TrainConfig:
        """Bound the run by ``max_steps``: "all epochs" becomes the limit, more than it is refused."""
        if not self.max_steps:
            return config
        if config.max_steps > self.max_steps:
            raise UserError(
                f"Max steps {config.max_steps} is over this app's limit of {self.max_steps} "
                "training steps; lower it (or fewer epochs)."
            )
        if config.max_steps == 0:
            log.info("training %s: limited to %d steps on this app", config.name, self.max_steps)
            return dataclasses.replace(config, max_steps=self.max_steps)
        return config

    def save_config(self, config: TrainConfig, path: Path | None = None) -> Path:
        return write_config(config, path or self.work_dir(config) / "config.toml")

    # --- runs ----------------------------------------------------------------------------------

    def submit(
        self, config: TrainConfig, on_progress: Callable[[TrainProgress], None] | None = None, owner: str | None = None
    ) -> TrainingRun:
        config = self.prepare(config)
        if owner is not None and config.overwrite and (self.lora_dir(config) / f"{config.name}.safetensors").exists():
            # LoRAs are shared by every visitor: one must not replace (or delete) another's, or the owner's.
            raise UserError(
                f"A LoRA named {config.name!r} already exists and this app does not replace LoRAs; choose another name."
            )
        # The trainer writes config.toml once it accepted the run (after its resume check): a refused
        # run must not overwrite the config of the run whose checkpoint is there.
        config_path = self.work_dir(config) / "config.toml"
        holder: dict[str, TrainingRun] = {}
        recorded = threading.Event()  # the run is in ``_runs`` and the history before its work begins

        def work(job: Job) -> TrainResult:
            recorded.wait()
            run = holder.get("run")
            if run is None:  # its submit failed (see below): cancelled, it must not train (nor overwrite)
                return None
            run.started_at = time.time()
            self._record_start(run)

            def progress(update: TrainProgress) -> None:
                run.progress = update
                if update.phase == "train" and update.loss is not None:
                    run.losses.append((update.step, update.loss))
                if update.sample is not None:
                    run.samples.append((f"epoch {update.epoch}", update.sample))
                job.report(update.step, update.total_steps, preview=update.sample, message=update.describe())
                if on_progress is not None:
                    on_progress(update)

            result = None
            try:
                result = self._training.run(config, report=progress, should_cancel=job.cancel_requested)
                return result
            except Exception as exc:
                # Recorded here, before the queue marks the job finished: whoever waits on the job
                # then finds the history final. The message is the one the queue shows.
                run.finished_at = time.time()
                self._record_end(run, None, str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
                raise
            finally:
                if run.finished_at is None:
                    run.finished_at = time.time()
                    self._record_end(run, result, None)

        with self._submit_lock:
            # Background: a generation asked for while runs are queued goes after the running run, not
            # after every queued one.
            job = self.jobs.submit("train", work, owner=owner, background=True, worker=self.worker)
            run = holder["run"] = TrainingRun(job, config, config_path)
            with self._lock:
                self._runs[job.id] = run
            try:
                if self._records_history:
                    self.history.add(self._queued_record(run))
            except BaseException:
                # Not recorded: the run must not go on to train while its caller is told it failed.
                self.jobs.cancel(job.id)
                holder.pop("run")
                with self._lock:
                    self._runs.pop(job.id, None)
                raise
            finally:
                recorded.set()
        if self.notifier is not None:
            # Every run comes through here (Train tab, CLI, API), and waiting on the job sees every
            # ending, a run cancelled while still queued included; the wait is on the notifier's thread.
            self.notifier.send_when(run.job.wait, lambda: finished_payload(run))
        return run

    def close_notifications(self, timeout: float = 30.0) -> bool:
        """Wait for the webhook deliveries still under way (a CLI, before it exits); True if none is left."""
        return self.notifier.close(timeout) if self.notifier is not None else True

    def train(self, config: TrainConfig, on_progress: Callable[[TrainProgress], None] | None = None) -> TrainResult:
        """Submit and wait (the CLI's call). A cancelled run returns its result with ``cancelled``."""
        run = self.submit(config, on_progress)
        run.job.wait()
        if run.job.status == ERROR:
            raise UserError(run.job.error or "Training failed.")
        return run.job.result

    def run(self, job_id: str, owner: str | None = None) -> TrainingRun:
        with self._lock:
            run = self._runs.get(job_id)
        if run is None or (owner is not None and run.job.owner != owner):
            raise UserError(f"No training run with job id {shorten(job_id, 40)!r}.")
        return run

    def cancel(self, job_id: str, owner: str | None = None) -> TrainingRun:
        """Stop a running run after its current step, or a queued one before it starts."""
        run = self.run(job_id, owner)
        self.jobs.cancel(job_id)
        if run.job.status == QUEUED and self._records_history:
            # It never reaches its work (the queue finishes it as cancelled): the history says so now.
            # Should the worker start it meanwhile, the work's own record of its end comes last.
            self.history.finish(job_id, RunOutcome(CANCELLED, error="cancelled before it started"))
        return run

    def remove(self, run_id: str, owner: str | None = None) -> RunRecord:
        """Take a run out of the queue (it never starts) or out of the history; not a running one."""
        record = self.history_run(run_id, owner)
        with self._lock:
            live = self._runs.get(record.id)
        if not record.finished and live is None:
            record = self._finished_elsewhere(record)
        if record.status == RUNNING:
            raise _running(record)
        if live is not None and not live.job.finished:
            self.jobs.cancel(record.id)
            # The worker may have taken the job between the check above and the cancel: then it runs
            # (and stops at its first step). Its work records its end; the row must stay for that.
            if live.job.status == JOB_RUNNING:
                raise _running(record)
        with self._lock:
            self._runs.pop(record.id, None)
        self.history.remove(record.id)
        shutil.rmtree(self._samples_dir(record.id), ignore_errors=True)
        return record

    def _finished_elsewhere(self, record: RunRecord) -> RunRecord:
        """An unfinished row this process did not queue: another process's (a CLI run sharing the
        folder) that still lives is refused; one whose process is gone is marked failed first."""
        self.history.mark_interrupted()
        current = self.history.get(record.id) or record
        if not current.finished:
            raise UserError(
                f"Run {current.name!r} ({current.id}) is {current.status} in another process (a CLI run "
                "using this folder); cancel it there, then remove it from the history."
            )
        return current

    def runs(self, owner: str | None = None) -> list[TrainingRun]:
        """Every run this process started (``owner``'s alone when given), oldest first."""
        with self._lock:
            return [run for run in self._runs.values() if owner is None or run.job.owner == owner]

    def latest_run(self, owner: str | None = None) -> TrainingRun | None:
        runs = self.runs(owner)
        return runs[-1] if runs else None

    # --- history, queue, comparison -------------------------------------------------------------

    def history_runs(self, status: str | None = None, owner: str | None = None) -> list[RunRecord]:
        """Every recorded run (this process's and earlier ones'), in queue order; ``status`` filters."""
        return self.history.runs(status, owner)

    def queue(self, owner: str | None = None) -> list[RunRecord]:
        """The running run and the queued ones, in the order they run."""
        return [record for record in self.history.runs(owner=owner) if not record.finished]

    def history_run(self, run_id: str, owner: str | None = None) -> RunRecord:
        record = self.history.get(str(run_id).strip())
        if record is None or (owner is not None and record.owner != owner):
            raise UserError(
                f"Run id {shorten(run_id, 40)!r} is not in the training history; pick one from the runs table."
            )
        return record

    def live_losses(self, record: RunRecord) -> list[tuple[int, float]]:
        """The loss curve so far: the in-memory one while the run is under way, else the stored one."""
        with self._lock:
            run = self._runs.get(record.id)
        return list(run.losses) if run is not None and not record.finished else record.losses

    def compare(self, run_ids: list[str], owner: str | None = None) -> list[RunCurves]:
        """Loss curves and per-epoch samples of two or more runs, in the order asked."""
        ids = list(dict.fromkeys(str(run_id).strip() for run_id in run_ids if str(run_id).strip()))
        if len(ids) < 2:
            raise UserError("Compare: choose at least two runs (their ids, from the runs table).")
        records = [self.history_run(run_id, owner) for run_id in ids]
        return [
            RunCurves(record.id, record.name, record.status, self.live_losses(record), record.samples)
            for record in records
        ]

    def config_of(self, run_id: str, owner: str | None = None) -> TrainConfig:
        """A run's config to train again with changes: the same settings under a name that is free."""
        record = self.history_run(run_id, owner)
        values = {key: value for key, value in record.config.items() if key in FIELDS}
        config = build_config({**values, "preset": ""})  # every field is there: the preset adds nothing
        # The preset's name stays, as a label of where the settings came from.
        preset = str(values.get("preset", ""))
        return dataclasses.replace(config, name=self._free_name(config), overwrite=False, preset=preset)

    def estimate(self, config: TrainConfig) -> DurationEstimate:
        """The run's expected duration on this machine, from the speed its finished runs measured."""
        if not config.images or not Path(config.images).expanduser().is_dir():
            raise UserError("Estimate: choose a dataset (the images to train on) first.")
        model = self._model_of(config)
        steps = self._planned_steps(config, model)
        return estimate_duration(
            steps, model, self._resolution(config, model), config.batch_size, self.history.measured()
        )

    def _planned_steps(self, config: TrainConfig, model: str) -> int:
        """The run's steps, counted as the trainer counts them: its images and regularization images
        that train, per bucket, each bucket's last batch rounded up. The app trains in one process, so
        a step's (global) batch is ``batch_size``."""
        images = Path(config.images).expanduser()
        regularization = Path(config.regularization_images).expanduser() if config.regularization_images else None
        if regularization is not None and not regularization.is_dir():
            raise UserError(f"Estimate: regularization folder {config.regularization_images} does not exist.")
        sized = dataclasses.replace(
            config, images=str(images), regularization_images=str(regularization) if regularization else ""
        )
        sizes = planned_sizes(sized, self.settings.max_image_pixels)
        resolution, step_px = self._bucket_geometry(config, model)
        groups = bucket_groups(sizes, buckets_for(resolution, step_px, config.bucketing))
        max_steps = config.max_steps or self.max_steps or 0
        return planned_steps(groups, config.repeats, config.batch_size, config.epochs, max_steps)[1]

    def _bucket_geometry(self, config: TrainConfig, model: str) -> tuple[int, int]:
        """(training side, bucket multiple): the loaded model's when it is the one trained (as the
        trainer computes it for its family); else, for a Flux.1 / SD 3.5 model known without loading,
        its native 1024 px in 16 px multiples; else the config's side (SD 1.x's 512 px when unset) in
        kohya's 64 px multiples."""
        loaded = self._loaded()
        pipe = loaded.pipe if loaded is not None and loaded.source.ref == model else None
        if pipe is not None and is_transformer_family(loaded.family):
            return pipeline_geometry(pipe, loaded.family, config.resolution)
        if pipe is not None and hasattr(pipe, "unet") and hasattr(pipe, "vae"):
            return training_geometry(pipe, config.resolution)
        family = guess_family(model)
        if is_transformer_family(family):
            return family_geometry(family, config.resolution, NATIVE_SIZE[family])
        resolution = config.resolution or 512
        return resolution, bucket_step(resolution)

    def _free_name(self, config: TrainConfig) -> str:
        """``config.name`` with the first ``-N`` suffix that no LoRA and no unfinished run has."""
        base = config.name.rsplit("-", 1)[0] if config.name.rsplit("-", 1)[-1].isdigit() else config.name
        busy = {record.name for record in self.history.runs() if not record.finished}
        for number in range(2, 1000):
            name = f"{base}-{number}"
            if name not in busy and not (self.lora_dir(config) / f"{name}.safetensors").exists():
                return name
        return config.name

    def _model_of(self, config: TrainConfig) -> str:
        if config.model:
            return config.model
        if self.models is not None:  # the model the user chose, not the training worker's last one
            return self.models.chosen_model()
        engine_model = self.engine.model.source.ref if self.engine and self.engine.model else ""
        return engine_model or self.settings.model

    def _loaded(self) -> Any:
        """The loaded model whose geometry the defaults read: the primary engine's (see ``models``)."""
        engine = self.models.engine if self.models is not None else self.engine
        return engine.model if engine is not None else None

    def _resolution(self, config: TrainConfig, model: str) -> int | None:
        """The trained size: the config's, or the base model's native one when the engine knows it."""
        if config.resolution:
            return config.resolution
        loaded = self._loaded()
        if loaded is not None and loaded.source.ref == model:
            return loaded.native_size
        family = guess_family(model)  # Flux.1 / SD 3.5 train at their native 1024 px, not SD's 512
        return NATIVE_SIZE[family] if is_transformer_family(family) else None

    def _samples_dir(self, run_id: str) -> Path:
        return self.history.db_path.parent / "samples" / run_id

    def _queued_record(self, run: TrainingRun) -> RunRecord:
        config = run.config
        return RunRecord(
            id=run.job.id,
            name=config.name,
            owner=run.job.owner,
            status=run.job.status if run.job.status != ERROR else FAILED,
            config=dataclasses.asdict(config),
            created_at=run.job.created_at,
            model=config.model,
            resolution=self._resolution(config, config.model),
            batch_size=config.batch_size,
        )

    def _record_start(self, run: TrainingRun) -> None:
        if not self._records_history:
            return
        try:
            self.history.start(run.job.id, run.started_at)
        except Exception:  # the history must never stop a run
            log.exception("training %s: could not record its start", run.config.name)

    def _record_end(self, run: TrainingRun, result: TrainResult | None, error: str | None) -> None:
        """Write the run's outcome and keep its samples (the work folder's are replaced by a rerun)."""
        if not self._records_history:
            return
        try:
            status = FAILED if error is not None else CANCELLED if result is None or result.cancelled else DONE
            session = result.steps - result.resumed_from if result is not None else 0
            rate = result.steps_per_s if result is not None else 0.0
            outcome = RunOutcome(
                status=status,
                steps=result.steps if result is not None else (run.progress.step if run.progress else 0),
                total_steps=result.total_steps if result is not None else 0,
                losses=list(run.losses) or (result.losses if result is not None else []),
                lora_path=str(result.lora_path) if result is not None and result.lora_path else None,
                epoch_loras=[str(path) for path in result.epoch_loras] if result is not None else [],
                samples=self._keep_samples(run),
                error=error,
                seconds_per_step=1.0 / rate if rate > 0 else None,
                session_steps=max(session, 0),
            )
            self.history.finish(run.job.id, outcome, run.finished_at)
        except Exception:  # the history must never turn a finished run into a failed one
            log.exception("training %s: could not record its end", run.config.name)

    def _keep_samples(self, run: TrainingRun) -> list[tuple[str, str]]:
        folder = self._samples_dir(run.job.id)
        kept = []
        for number, (label, image) in enumerate(list(run.samples), start=1):
            path = folder / f"{number:03d}-{label.replace(' ', '-')}.png"
            with atomic_write(path) as handle:
                image.save(handle, format="PNG")
            kept.append((label, str(path)))
        return kept

    # --- on the GPU ----------------------------------------------------------------------------

    def _train_on_device(
        self, config: TrainConfig, *, report: Callable[[TrainProgress], None], should_cancel: Callable[[], bool]
    ) -> TrainResult:
        """The run itself: on ZeroGPU in a GPU process; its files land on the shared disk."""
        return self._train(config, report, should_cancel)

    def estimated_seconds(self, config: TrainConfig) -> float:
        """The run's expected duration on a GPU slice (``gpu_estimates``), from its planned steps."""
        return self._training_seconds(config)

    def _training_seconds(self, config: TrainConfig) -> float:
        model = self._loaded()
        native = model.native_size if model is not None and model.source.ref == config.model else 1024
        images = len(Dataset(Path(config.images)).images()) if config.images else 1
        steps = planned_training_steps(images, config.repeats, config.epochs, config.batch_size, config.max_steps)
        return training_seconds(
            steps, config.resolution or native, config.batch_size, config.epochs, config.sample_steps
        )

    # --- the job's work ------------------------------------------------------------------------

    def _train(self, config: TrainConfig, on_progress, should_cancel) -> TrainResult:
        from lorapg.devices import device_context, pick_device

        device = pick_device(self.device or self.settings.device)
        work_dir, lora_dir = self.work_dir(config), self.lora_dir(config)
        # Under accelerate launch every process runs this; the main one alone removes the old files
        # (the others reach the checkpoints only after it, past DDP's start-up broadcast).
        if config.overwrite and distributed.is_main_process():
            remove_run_outputs(lora_dir, config.name, work_dir)
        trainer = Trainer(
            config,
            lora_dir=lora_dir,
            work_dir=work_dir,
            device=device,
            allow_pickle=self.settings.allow_pickle,
            single_file_config=self.settings.single_file_config,
            max_image_pixels=self.settings.max_image_pixels,
            on_progress=on_progress,
            should_cancel=should_cancel,
            default_quantize=default_training_quantize(self.settings),
        )
        residency = self.engine.residency if self.engine is not None else None
        if residency is None:  # CPU: no GPU memory is shared, nothing to clear
            with device_context(device):
                return trainer.run()
        # Every model leaves the GPU and nothing else is placed there until training ends; the
        # models come back on their next use.
        with (
            device_context(device),  # accelerate trains on plain "cuda": this thread's current GPU
            residency.exclusive("LoRA training", 0),
            out_of_memory_as_user_error(
                "while training, with every other model off the GPU",
                "Lower the resolution or the batch size, or turn text-encoder training off.",
                torch.cuda.empty_cache,
            ),
        ):
            return trainer.run()


def default_training_quantize(settings) -> str:
    """The app's quantize for the transformer (--quantize, then --quantize-components): what a run whose
    config leaves ``quantize`` empty stores its frozen base as (the trainer stores T5 alike)."""
    from lorapg.diffusion.quantization import parse_plan

    return parse_plan(settings.quantize, settings.quantize_components).transformer
