"""The one API that the UI, the CLI and the REST endpoints call. Never imports gradio.

Every method either returns plain data or raises ``UserError`` with a message a user can act on.
GPU work (loading a model, generating) goes through the job queue, so callers get a job id to
watch, and concurrent callers run in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from lorapg.config import Settings
from lorapg.diffusion.engine import DiffusionEngine, GenerationResult
from lorapg.diffusion.families import NATIVE_SIZE, SD1, family_label
from lorapg.diffusion.lora_library import LoraInfo, LoraLibrary
from lorapg.diffusion.model_source import resolve_model_source
from lorapg.diffusion.request import GenerationRequest, extract_lora_tags, validate
from lorapg.diffusion.samplers import SAMPLERS
from lorapg.errors import UserError
from lorapg.jobs import DONE, ERROR, Job, JobQueue

log = logging.getLogger(__name__)

# Called with each finished generation; returns the saved files (the gallery plugs in here).
ResultSink = Callable[[GenerationResult, Job], list]


@dataclass(frozen=True)
class ModelStatus:
    ref: str | None
    family: str | None
    native_size: int | None
    loaded: bool

    def describe(self) -> str:
        if not self.loaded:
            return "No base model loaded yet."
        return f"{self.ref} — {family_label(self.family)}, native {self.native_size}px"


@dataclass(frozen=True)
class LoraListing:
    loras: list[LoraInfo]
    problems: list[str]


class PlaygroundService:
    def __init__(
        self,
        settings: Settings,
        engine: DiffusionEngine,
        library: LoraLibrary,
        jobs: JobQueue,
        result_sink: ResultSink | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.library = library
        self.jobs = jobs
        self.result_sink = result_sink
        self._loading_job: Job | None = None

    # --- models and LoRAs --------------------------------------------------------------------

    def model_status(self) -> ModelStatus:
        model = self.engine.model
        if model is None:
            return ModelStatus(None, None, None, False)
        return ModelStatus(model.source.ref, model.family, model.native_size, True)

    def submit_load_model(self, ref: str | None = None) -> Job:
        """Queue loading ``ref`` (default: the configured model); bad paths fail before queueing."""
        ref = (ref or self.settings.model or "").strip()
        resolve_model_source(ref, allow_pickle=self.settings.allow_pickle)

        def work(job: Job) -> ModelStatus:
            self.engine.load_model(ref, on_status=lambda message: job.report(0, 0, message=message))
            job.report(1, 1, message=f"Loaded {ref}")
            return self.model_status()

        self._loading_job = self.jobs.submit("load-model", work)
        return self._loading_job

    def loading_message(self) -> str | None:
        """What the latest model load is doing, or why it failed; None once it succeeded."""
        job = self._loading_job
        if job is None or job.status == DONE:
            return None
        if job.status == ERROR:
            return f"Loading the model failed: {job.error}"
        return job.message or f"Loading model (job {job.id}, queued)…"

    def load_model(self, ref: str | None = None) -> ModelStatus:
        return self._wait(self.submit_load_model(ref))

    def model_choices(self) -> list[str]:
        """The configured model, the loaded one, and local models found under the models folder:
        diffusers folders (model_index.json) and single .safetensors checkpoints (LoRAs excluded)."""
        choices = [self.settings.model]
        if self.engine.model is not None:
            choices.append(self.engine.model.source.ref)
        root = self.settings.models_dir
        loras = self.settings.lora_dir.resolve()
        if root.is_dir():
            for index in sorted(root.glob("*/model_index.json")) + sorted(root.glob("*/*/model_index.json")):
                choices.append(str(index.parent))
            for checkpoint in sorted(root.glob("*.safetensors")) + sorted(root.glob("checkpoints/*.safetensors")):
                if not checkpoint.resolve().is_relative_to(loras):
                    choices.append(str(checkpoint))
        return list(dict.fromkeys(c for c in choices if c))

    def list_loras(self) -> LoraListing:
        """Re-scan the LoRA folder (headers only), so files added while the app runs appear."""
        infos, problems = self.library.scan()
        return LoraListing(infos, problems)

    @staticmethod
    def sampler_names() -> list[str]:
        return list(SAMPLERS)

    # --- GPU memory ----------------------------------------------------------------------------

    def memory_status(self) -> str:
        residency = self.engine.residency
        if residency is None:
            return f"Running on {self.engine.device.type.upper()}: there is no GPU memory to manage."
        return residency.describe()

    def free_gpu_memory(self) -> str:
        residency = self.engine.residency
        if residency is None:
            return self.memory_status()
        freed = residency.free_all()
        moved = f"Moved off the GPU: {', '.join(freed)}." if freed else "Nothing to move: models in use stay."
        return f"{moved}\n\n{residency.describe()}"

    # --- generation --------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Move ``<lora:…>`` prompt tags into the LoRA list and check LoRAs before queueing."""
        prompt, tagged = extract_lora_tags(request.prompt or "")
        request = replace(request, prompt=prompt, loras=tuple(request.loras) + tagged)
        model = self.engine.model
        validate(request, model.native_size if model else NATIVE_SIZE[SD1])  # the real check runs on the model
        self.engine.resolve_loras(request)  # unknown / outside-folder / bad scale: fail now, not in the queue
        return request

    def submit_generation(self, request: GenerationRequest) -> Job:
        request = self.prepare(request)
        if self.engine.model is None and not self.settings.model:
            raise UserError("No base model is loaded yet. Choose a model and press Load.")

        def work(job: Job) -> GenerationResult:
            if self.engine.model is None:
                job.report(0, 0, message=f"Loading {self.settings.model}…")
                self.engine.load_model(self.settings.model, on_status=lambda m: job.report(0, 0, message=m))
            result = self.engine.generate(
                request,
                on_step=lambda step, total, preview: job.report(step, total, preview),
                should_cancel=job.cancel_requested,
            )
            if self.result_sink is not None and not result.cancelled:
                result.saved = self.result_sink(result, job)
            return result

        return self.jobs.submit("generate", work)

    def generate(
        self, request: GenerationRequest, on_progress: Callable[[Job], None] | None = None
    ) -> GenerationResult:
        """Submit and wait: the CLI's and the REST API's synchronous call."""
        return self._wait(self.submit_generation(request), on_progress)

    def cancel(self, job_id: str) -> Job:
        return self.jobs.cancel(job_id)

    def _wait(self, job: Job, on_progress: Callable[[Job], None] | None = None):
        while not job.wait(0.1):
            if on_progress is not None:
                on_progress(job)
        if on_progress is not None:
            on_progress(job)
        if job.status == DONE or (job.status == "cancelled" and job.result is not None):
            return job.result
        if job.error:
            raise UserError(job.error)
        raise UserError(f"Job {job.id} was {job.status}.")
