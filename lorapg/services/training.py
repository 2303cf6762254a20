"""TrainingService: LoRA training for the Train tab, the CLI and the REST endpoints.

Never imports gradio. Training runs as a job on the shared GPU queue, so it never overlaps a
generation; before it starts, the inference pipeline leaves the GPU, and it comes back afterwards.
On a ZeroGPU Space the run itself happens inside one ``spaces.GPU`` call (``GpuTask``), its progress
relayed back; ``max_steps`` bounds it there (and on a free CPU Space). With private visitors
(``owner`` given) each visitor has their own datasets and sees only their own runs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lorapg.config import Settings
from lorapg.errors import UserError, shorten
from lorapg.hosting.gpu_estimates import planned_training_steps, training_seconds
from lorapg.hosting.visitors import visitor_key
from lorapg.hosting.zerogpu import GpuTask
from lorapg.jobs import ERROR, Job, JobQueue
from lorapg.notifications import WebhookNotifier, training_finished
from lorapg.residency import out_of_memory_as_user_error
from lorapg.training import distributed
from lorapg.training.config import TrainConfig, build_config, check, validate_name, write_config
from lorapg.training.dataset import Dataset, DatasetImage, DatasetLimits, DatasetStore
from lorapg.training.presets import PRESETS_DIR, load_preset, preset_names
from lorapg.training.trainer import Trainer, TrainProgress, TrainResult, remove_run_outputs
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
    ):
        """``max_steps``: the longest run this app allows (None: no limit). ``gpu_relay`` /
        ``gpu_decorator``: see ``GpuTask``. ``notifier``: told when each run ends (``--notify-webhook``)."""
        self.settings = settings
        self.jobs = jobs
        self.engine = engine  # the DiffusionEngine whose pipeline leaves the GPU while training
        self.presets_dir = presets_dir or PRESETS_DIR
        self.datasets = DatasetStore(Path(settings.models_dir) / "datasets", DatasetLimits.from_settings(settings))
        self.max_steps = max_steps
        self.notifier = notifier
        self._runs: dict[str, TrainingRun] = {}
        self._lock = threading.Lock()
        self._training = GpuTask(
            self._train_on_device, self._training_seconds, relay=gpu_relay, decorator=gpu_decorator
        )

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

    def dataset_set_captions(self, name: str, captions: dict[str, str], owner: str | None = None) -> None:
        dataset = self.dataset_store(owner).get(name)
        for file, caption in captions.items():
            dataset.set_caption(file, caption)

    def dataset_folder(self, name: str, owner: str | None = None) -> Path:
        return self.dataset_store(owner).get(name).folder

    # --- configs -------------------------------------------------------------------------------

    def preset_names(self) -> list[str]:
        return preset_names(self.presets_dir)

    def preset_description(self, name: str) -> str:
        return load_preset(name, self.presets_dir).description

    def config_for(self, values: dict[str, Any]) -> TrainConfig:
        """A checked config from the UI's field values (defaults < preset < values)."""
        return build_config(values, presets_dir=self.presets_dir)

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
        model = (
            config.model
            or (self.engine.model.source.ref if self.engine and self.engine.model else "")
            or self.settings.model
        )
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

        def work(job: Job) -> TrainResult:
            run = holder["run"]
            run.started_at = time.time()

            def progress(update: TrainProgress) -> None:
                run.progress = update
                if update.phase == "train" and update.loss is not None:
                    run.losses.append((update.step, update.loss))
                if update.sample is not None:
                    run.samples.append((f"epoch {update.epoch}", update.sample))
                job.report(update.step, update.total_steps, preview=update.sample, message=update.describe())
                if on_progress is not None:
                    on_progress(update)

            try:
                return self._training.run(config, report=progress, should_cancel=job.cancel_requested)
            finally:
                run.finished_at = time.time()

        job = self.jobs.submit("train", work, owner=owner)
        run = holder["run"] = TrainingRun(job, config, config_path)
        with self._lock:
            self._runs[job.id] = run
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
        run = self.run(job_id, owner)
        self.jobs.cancel(job_id)
        return run

    def runs(self, owner: str | None = None) -> list[TrainingRun]:
        """Every run this process started (``owner``'s alone when given), oldest first."""
        with self._lock:
            return [run for run in self._runs.values() if owner is None or run.job.owner == owner]

    def latest_run(self, owner: str | None = None) -> TrainingRun | None:
        runs = self.runs(owner)
        return runs[-1] if runs else None

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
        model = self.engine.model if self.engine is not None else None
        native = model.native_size if model is not None and model.source.ref == config.model else 1024
        images = len(Dataset(Path(config.images)).images()) if config.images else 1
        steps = planned_training_steps(images, config.repeats, config.epochs, config.batch_size, config.max_steps)
        return training_seconds(
            steps, config.resolution or native, config.batch_size, config.epochs, config.sample_steps
        )

    # --- the job's work ------------------------------------------------------------------------

    def _train(self, config: TrainConfig, on_progress, should_cancel) -> TrainResult:
        from lorapg.devices import pick_device

        device = pick_device(self.settings.device)
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
        )
        residency = self.engine.residency if self.engine is not None else None
        if residency is None:  # CPU: no GPU memory is shared, nothing to clear
            return trainer.run()
        # Every model leaves the GPU and nothing else is placed there until training ends; the
        # models come back on their next use.
        with (
            residency.exclusive("LoRA training", 0),
            out_of_memory_as_user_error(
                "while training, with every other model off the GPU",
                "Lower the resolution or the batch size, or turn text-encoder training off.",
                torch.cuda.empty_cache,
            ),
        ):
            return trainer.run()
