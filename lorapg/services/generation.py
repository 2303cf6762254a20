"""GenerationService: models and image generation for the UI, the CLI and the REST endpoints. Never imports gradio.

Every method either returns plain data or raises ``UserError`` with a message a user can act on.
GPU work (loading a model, generating) goes through the job queue, so callers get a job id to
watch, and concurrent callers run in order. On a ZeroGPU Space the generation itself runs inside a
``spaces.GPU`` call (``GpuTask``); the model is loaded here first, so every GPU process starts with it.
With several devices (``--devices``; lorapg/services/workers.py) a generation runs on whichever worker
is free, with that worker's engine; every worker follows the model the user chose last.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from lorapg.config import Settings
from lorapg.diffusion.controlnet import ControlUnit, check_units
from lorapg.diffusion.engine import DiffusionEngine, GenerationResult
from lorapg.diffusion.families import NATIVE_SIZE, SD1, SDXL, is_transformer_family
from lorapg.diffusion.flux import A1111_SD, FamilyDefaults, family_defaults
from lorapg.diffusion.hires import HiresOptions
from lorapg.diffusion.img2img import Img2ImgOptions, check_options
from lorapg.diffusion.lora_library import LoraInfo, LoraLibrary
from lorapg.diffusion.model_source import model_files, resolve_model_source
from lorapg.diffusion.request import A1111_DEFAULTS, GenerationRequest, check_prompts, extract_lora_tags, validate
from lorapg.diffusion.samplers import samplers_for
from lorapg.errors import UserError, shorten
from lorapg.hashing import cached_lora_hash, lora_hash
from lorapg.hosting.gpu_estimates import generation_seconds
from lorapg.hosting.space_policy import local_model_roots
from lorapg.hosting.zerogpu import GpuTask
from lorapg.jobs import ANY_WORKER, CANCELLED, DONE, Job, JobQueue, WorkerLost, WorkerUnfit
from lorapg.limits import HIRES_UPSCALERS, STEPS
from lorapg.services.img2img_inputs import options_from_form
from lorapg.services.workers import Worker, WorkerPool

log = logging.getLogger(__name__)

# Called with each finished generation; returns the saved files (the gallery plugs in here).
ResultSink = Callable[[GenerationResult, Job], list]


@dataclass(frozen=True)
class ModelStatus:
    ref: str | None
    family: str | None
    native_size: int | None
    loaded: bool


@dataclass(frozen=True)
class MemoryStatus:
    """Where GPU memory stands; the UI and the CLI phrase it."""

    device: str  # "cpu", "cuda", "mps"
    report: str | None  # the residency manager's report; None where no GPU memory is managed
    freed: list[str] | None = None  # models just moved off the GPU (after free_gpu_memory); None: not asked


@dataclass(frozen=True)
class WorkerStatus:
    """One generation worker as the app lists it: a local device or a remote one (``ray:NAME/DEVICE``)."""

    index: int
    device: str
    model: str | None  # the model resident there (a remote worker: as it last reported)
    state: str  # "idle", "running", "out of rotation" (could not load the chosen model) or "lost" (gone)
    job: str | None  # the id of the job it runs now


@dataclass(frozen=True)
class LoraListing:
    loras: list[LoraInfo]
    problems: list[str]


def _defaults_of(model) -> FamilyDefaults:
    """The recommended settings for a loaded model (None: SD's, this app's defaults)."""
    if model is None:
        return family_defaults(None)
    reported = getattr(model, "defaults", None)  # a remote worker's, for the model it has loaded
    if reported and reported.get("ref") == model.source.ref:
        return FamilyDefaults(**{key: value for key, value in reported.items() if key != "ref"})
    return family_defaults(model.family, getattr(model, "pipe", None), model.native_size or 0)


def fill_defaults(request: GenerationRequest, defaults: FamilyDefaults, *, sized: bool = False) -> GenerationRequest:
    """``request`` with steps, CFG scale and sampler left out (None) taken from ``defaults``.

    A flow-matching family's default sampler is its own, so a caller who chose none gets no
    "sampler does not apply" warning; schnell's guidance 0 means no CFG, so no "ignored" warning.
    ``sized``: width and height left out take ``defaults.size`` too (else they stay None: native).
    """
    wanted = {"steps": defaults.steps, "guidance_scale": defaults.guidance_scale, "sampler": defaults.sampler}
    if sized:
        wanted |= {"width": defaults.size, "height": defaults.size}
    changes = {name: value for name, value in wanted.items() if getattr(request, name) is None}
    return replace(request, **changes) if changes else request


def defaults_for_request(request: GenerationRequest, model) -> GenerationRequest:
    """``request`` filled for ``model`` (None: none loaded, SD). An /sdapi/v1 request (``A1111_DEFAULTS``)
    takes A1111's API defaults on SD, 512 px included, as its clients expect; on Flux / SD 3.5, whose
    A1111 values would be wrong (CFG 7, 512 px), the family's. Decided here, when the model is known."""
    family = model.family if model is not None else None
    if request.extra.get(A1111_DEFAULTS) and not is_transformer_family(family):
        return fill_defaults(request, A1111_SD, sized=True)
    return fill_defaults(request, _defaults_of(model))


class GenerationService:
    def __init__(
        self,
        settings: Settings,
        engine: DiffusionEngine,
        library: LoraLibrary,
        jobs: JobQueue,
        result_sink: ResultSink | None = None,
        *,
        offered_models_only: bool = False,
        gpu_relay: bool | None = None,
        gpu_decorator: Callable | None = None,
        workers: WorkerPool | None = None,
    ):
        """``offered_models_only``: load only the models ``model_choices`` lists (a public Space:
        visitors must not make the app download any hub repo or probe the server's files).
        ``gpu_relay`` / ``gpu_decorator``: see ``GpuTask`` (tests force the ZeroGPU path with them).
        ``workers``: one engine per device, ``engine`` first (default: ``engine`` alone)."""
        self.settings = settings
        self.engine = engine  # the primary worker's: model loads, status and checks use it
        self.workers = workers or WorkerPool.single(engine)
        # The model the user chose last (a load submitted): the one every worker generates with.
        self._chosen_ref: str | None = None
        self.library = library
        self.jobs = jobs
        self.result_sink = result_sink
        self.offered_models_only = offered_models_only
        self._loading_job: Job | None = None
        self._ref_before_load: str | None = None  # the choice a failed or cancelled load falls back to
        self._retired_on: set[str] = set()  # the models retired workers could not load (see _rejoin)
        self._joining = threading.Lock()  # workers join one at a time: pool and queue number them alike
        self._generation = GpuTask(
            self._generate_on_device, self._generation_seconds, relay=gpu_relay, decorator=gpu_decorator
        )

    # --- models and LoRAs --------------------------------------------------------------------

    def model_status(self) -> ModelStatus:
        model = self.engine.model
        if model is None:
            return ModelStatus(None, None, None, False)
        return ModelStatus(model.source.ref, model.family, model.native_size, True)

    def submit_load_model(self, ref: str | None = None) -> Job:
        """Queue loading ``ref`` (default: the configured model); bad paths fail before queueing."""
        ref = self.check_model_ref(ref)

        def work(job: Job) -> ModelStatus:
            try:
                self.engine.load_model(ref, on_status=lambda message: job.report(0, 0, message=message))
            except BaseException:
                self._drop_choice(job)
                raise
            self.jobs.restore()  # a new model: a device that failed to load the last one tries this one
            job.report(1, 1, message=f"Loaded {ref}")
            return self.model_status()

        self._ref_before_load = self.chosen_model()
        self._chosen_ref = ref  # generations submitted from now on use it, on whichever worker they run
        self._loading_job = self.jobs.submit("load-model", work)
        return self._loading_job

    def _drop_choice(self, job: Job) -> None:
        """A load that failed or was cancelled: later generations go back to the model still in use
        (the primary worker's, else the one chosen before), never to the configured default, which
        every worker would otherwise load over the model it holds."""
        if self._loading_job is job:  # a newer load is the user's choice now; it stays
            loaded = self.engine.model
            self._chosen_ref = loaded.source.ref if loaded is not None else self._ref_before_load

    def check_model_ref(self, ref: str | None) -> str:
        """``ref`` (default: the configured model) if this app may load it; bad paths fail here, before queueing."""
        ref = (ref or self.settings.model or "").strip()
        if self.offered_models_only and ref not in self.model_choices():
            raise UserError(
                f"This app offers only the models in its list; {shorten(ref)!r} is not one of them. "
                "(Its owner adds models with the LORAPG_MODEL setting or under the models folder.)"
            )
        roots = local_model_roots(self.settings)  # reachable by others: only the models folder
        resolve_model_source(ref, allow_pickle=self.settings.allow_pickle, allowed_roots=roots)
        return ref

    def loading_job(self) -> Job | None:
        """The latest model load (queued, running, failed or done); None before the first one."""
        return self._loading_job

    def load_model(self, ref: str | None = None) -> ModelStatus:
        return self._wait(self.submit_load_model(ref))

    def model_choices(self) -> list[str]:
        """The configured model, the loaded one, and local models found under the models folder:
        diffusers folders (model_index.json), single .safetensors checkpoints (LoRAs excluded) and .gguf
        Flux.1 / SD 3.5 transformers; the language models' GGUFs (models/llm) are not among them."""
        choices = [self.settings.model]
        if self.engine.model is not None:
            choices.append(self.engine.model.source.ref)
        root = self.settings.models_dir
        loras = self.settings.lora_dir.resolve()
        if root.is_dir():
            for index in sorted(root.glob("*/model_index.json")) + sorted(root.glob("*/*/model_index.json")):
                choices.append(str(index.parent))
            for checkpoint in model_files(root) + model_files(root / "checkpoints"):
                if not checkpoint.resolve().is_relative_to(loras):
                    choices.append(str(checkpoint))
        return list(dict.fromkeys(c for c in choices if c))

    def list_loras(self) -> LoraListing:
        """Re-scan the LoRA folder (headers only), so files added while the app runs appear."""
        infos, problems = self.library.scan()
        return LoraListing(infos, problems)

    def sampler_names(self) -> list[str]:
        """The samplers that apply to the loaded model's family (the SD ones before a model is loaded)."""
        model = self.engine.model
        return list(samplers_for(model.family if model else None))

    def generation_defaults(self) -> FamilyDefaults:
        """Steps, guidance, sampler and size the loaded model's authors recommend (SD: this app's defaults)."""
        return _defaults_of(self.engine.model)

    def with_defaults(self, request: GenerationRequest, engine=None) -> GenerationRequest:
        """``request`` with the fields its caller left out (None) set to the family's defaults.

        The one place the CLI, ``/api/v1`` and ``/sdapi/v1`` get per-family defaults: ``engine``'s
        model decides (default: the primary worker's; none loaded: SD's). An explicit value always
        wins; width and height left out stay None, which the engine reads as the model's native size
        (the family's default size, as the Generate tab shows it).
        """
        model = (engine or self.engine).model
        if model is not None and getattr(model, "pipe", None) is None:
            # A remote worker's model has no pipeline here: the primary one's, when it is the same
            # model, tells Flux dev from schnell.
            primary = self.engine.model
            if primary is not None and primary.source.ref == model.source.ref:
                model = primary
        return defaults_for_request(request, model)

    def worker_status(self) -> list[WorkerStatus]:
        """Every generation worker, its model and its load (what it runs now), in queue order."""
        running = {job.worker: job.id for job in self.jobs.running_jobs()}
        retired, lost = set(self.jobs.retired()), set(self.jobs.lost())
        listing = []
        for worker in list(self.workers.workers):  # a copy: a worker may join meanwhile
            model = worker.engine.model
            state = "lost" if worker.index in lost else "out of rotation" if worker.index in retired else None
            state = state or ("running" if worker.index in running else "idle")
            ref = model.source.ref if model is not None else None
            listing.append(WorkerStatus(worker.index, worker.device, ref, state, running.get(worker.index)))
        return listing

    def add_worker(self, engine) -> int:
        """A worker that joined while the app runs (a remote one: lorapg/services/ray_workers.py); its
        index. In the pool first, so the queue never hands a job to a worker the pool lacks; on the queue
        it takes queued jobs at once. One that joins under the name of a lost worker whose thread has
        ended takes that worker's slot: a worker restarting in a loop leaves no trail of threads and rows."""
        with self._joining:
            reused = self.jobs.reusable(engine.device)  # a lost worker's slot under its name (a restart)
            if reused is not None:
                self.workers.replace(Worker(reused, engine.device, engine))
                return self.jobs.add_worker(engine.device, reused)
            index = len(self.workers)
            self.workers.add(Worker(index, engine.device, engine))
            try:
                queued = self.jobs.add_worker(engine.device)
            except RuntimeError:  # the queue is closing (the app shuts down): the pool stays as the queue is
                self.workers.workers.pop()
                raise
        if queued != index:  # only this method adds workers: the two lists grow together
            raise RuntimeError(f"worker {engine.device} is {index} in the pool but {queued} on the queue")
        return index

    def lose_worker(self, index: int) -> None:
        """Worker ``index`` is gone (found outside a job): listed as lost, it takes no job any more."""
        self.jobs.lose(index)

    # --- GPU memory ----------------------------------------------------------------------------

    def memory_status(self) -> MemoryStatus:
        residency = self.engine.residency
        return MemoryStatus(self.engine.device.type, residency.describe() if residency is not None else None)

    def free_gpu_memory(self) -> MemoryStatus:
        """Move every model not in use off the GPU; a no-op where no GPU memory is managed."""
        residency = self.engine.residency
        if residency is None:
            return self.memory_status()
        freed = residency.free_all()
        return MemoryStatus(self.engine.device.type, residency.describe(), list(freed))

    # --- generation --------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Move ``<lora:…>`` prompt tags into the LoRA list and check LoRAs before queueing."""
        # A list, null, 10 MB or undecodable prompt is refused before anything parses it.
        request = check_prompts(request, self.settings.max_prompt_chars)
        prompt, tagged = extract_lora_tags(request.prompt)
        request = replace(request, prompt=prompt, loras=tuple(request.loras) + tagged)
        if request.img2img is not None:  # decoded once here, within the upload's pixel limit
            request = replace(request, img2img=check_options(request.img2img, self.settings.max_image_pixels))
        if request.controlnet:  # the units' images too
            request = replace(request, controlnet=check_units(request.controlnet, self.settings.max_image_pixels))
        model = self.engine.model
        # The real check runs on the model; this one fails before the queue. Fields left out (None)
        # stay so: the job fills them from the model it runs (not loaded yet for the CLI's first call).
        native, family = (model.native_size, model.family) if model else (NATIVE_SIZE[SD1], None)
        settings = self.settings
        checked = self.with_defaults(request)
        validate(checked, native, settings.max_prompt_chars, family=family, max_image_pixels=settings.max_image_pixels)
        # Unknown / outside-folder / bad scale: fail now, not in the queue.
        selections = self.engine.resolve_loras(request)
        # Each LoRA by its library name (relative to the LoRA folder): a path typed here means nothing on a
        # remote worker, which resolves the name in its own folder, and routing compares library names.
        pairs = zip(request.loras, selections, strict=True)
        named = tuple(replace(lora, name=chosen.info.name) for lora, chosen in pairs)
        request = replace(request, loras=named)
        if request.hires is not None:  # an upscaler model that is not in the folder: fail now too
            self.engine.check_hires_upscaler(request.hires.upscaler)
        for unit in request.controlnet:  # an unknown ControlNet, or one for another family: fail now too
            info = self.engine.controlnets.resolve(unit.model)
            if family is not None:
                self.engine.controlnets.check_family(info, family)
        return request

    @staticmethod
    def hires_options(enabled, upscaler, scale, steps, strength) -> HiresOptions | None:
        """The hires fix from a form (A1111's enable_hr and hr_* fields); None when it is off."""
        if not enabled:
            return None
        given = {"scale": scale, "steps": steps, "strength": strength, "upscaler": upscaler}
        return HiresOptions(**{key: value for key, value in given.items() if value is not None})  # None: default

    def hires_upscalers(self) -> list[str]:
        """The hires fix's upscalers: the built-in ones (latent and resizers), then the upscaler models
        in the folder now (re-read, so a file added while the app runs appears)."""
        upscalers = self.engine.upscalers
        models = [item.name for item in upscalers.files()] if upscalers is not None else []
        return [*HIRES_UPSCALERS, *models]

    def controlnet_names(self) -> list[str]:
        """The ControlNet models in the models folder now (re-read, so files added while the app runs appear)."""
        return self.engine.controlnets.names()

    @staticmethod
    def controlnet_units(
        model,
        image,
        module="none",
        weight=1.0,
        guidance_start=0.0,
        guidance_end=1.0,
        *,
        resize_mode=None,
        threshold_a=None,
        threshold_b=None,
    ) -> tuple:
        """One unit from a form (() when no model is picked: "None"); the request checks the values.
        The resize mode and canny thresholds: None keeps ControlUnit's defaults (the extension's)."""
        if model in (None, "", "None"):
            return ()
        more = {"resize_mode": resize_mode, "threshold_a": threshold_a, "threshold_b": threshold_b}
        given = {key: value for key, value in more.items() if value is not None}
        return (
            ControlUnit(
                model=model,
                image=image,
                module=module or "none",
                weight=weight,
                guidance_start=guidance_start,
                guidance_end=guidance_end,
                **given,
            ),
        )

    @staticmethod
    def img2img_options(image, **form) -> Img2ImgOptions | None:
        """img2img options from a form's init image, painted strokes or mask (lorapg.services.img2img_inputs)."""
        return options_from_form(image, **form)

    def submit_generation(self, request: GenerationRequest, owner: str | None = None, *, record: bool = True) -> Job:
        """Queue a generation; ``owner`` (the visitor) owns its gallery images. ``record=False``: not
        saved to the gallery (A1111's API saves only when asked, ``save_images``)."""
        request = self.prepare(request)
        if self.engine.model is None and not self.settings.model:
            raise UserError(
                "No base model is loaded yet; load one first (a hub id, a diffusers folder or a .safetensors file)."
            )

        # One worker for good: the job runs there (as the app did before --devices). With --ray workers may
        # join later: never pinned to the first one, or a backlog would not move to a worker that joins.
        if len(self.workers) == 1 and not self.jobs.may_grow:

            def work(job: Job) -> GenerationResult:
                return self.run_in_job(request, job, record=record)

            return self.jobs.submit("generate", work, owner=owner)
        # Several workers: the model is fixed now, so the image is the same whichever worker runs it.
        ref = self.chosen_model()
        self._rejoin(ref)

        def work_anywhere(job: Job) -> GenerationResult:
            return self.run_in_job(request, job, model_ref=ref, record=record)

        # Workers whose LoRA folder lacks a LoRA it names run it only when no other one can (then its
        # error names the worker and the file).
        able = self._able_for(request)
        prefer = self.workers.holding(ref)  # where the model is resident already: no load before it runs
        prefer = prefer if able is None else prefer & able
        return self.jobs.submit("generate", work_anywhere, owner=owner, worker=ANY_WORKER, prefer=prefer, able=able)

    def _able_for(self, request: GenerationRequest) -> frozenset[int] | None:
        """The workers that have every LoRA ``request`` names (from ``prepare``), the same files as the
        app's; None: it names none."""
        if not request.loras:
            return None
        return self.workers.having(self._lora_files(request, hashed=False))

    def _lora_files(self, request: GenerationRequest, *, hashed: bool) -> dict[str, dict]:
        """The app's copy of each LoRA ``request`` names (library names, from ``prepare``): its size and
        LoRA hash (``hashed=False``: only where known already: routing never reads whole files)."""
        files = {}
        for lora in request.loras:
            info = self.library.resolve(lora.name)
            digest = lora_hash(info.path) if hashed else cached_lora_hash(info.path)
            files[info.name] = {"size": info.size_bytes, "hash": digest}
        return files

    def _rejoin(self, ref: str) -> None:
        """Retired workers try again once the chosen model is another than the one they failed on
        (not only after a load on the first worker has succeeded)."""
        if self._retired_on and ref not in self._retired_on and self.jobs.retired():
            self._retired_on.clear()
            self.jobs.restore()

    def chosen_model(self) -> str:
        """The model generations submitted now use: the one the user chose last (a load that failed or
        was cancelled does not count), else the primary worker's loaded one, else the configured one."""
        job = self._loading_job
        if job is not None and job.status == CANCELLED:  # cancelled while queued: its work never ran
            self._drop_choice(job)
        loaded = self.engine.model
        return self._chosen_ref or (loaded.source.ref if loaded is not None else None) or self.settings.model

    def run_in_job(
        self,
        request: GenerationRequest,
        job: Job,
        *,
        model_ref: str | None = None,
        report: Callable[..., None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        record: bool = True,
    ) -> GenerationResult:
        """One generation inside a job already running on the queue: a generate job, or a grid's
        cells one after another. ``request``: from ``prepare``; ``model_ref``: a checked model
        (``check_model_ref``) to use instead of the loaded one; ``report`` / ``should_cancel``
        default to the job's own."""
        report, should_cancel = report or job.report, should_cancel or job.cancel_requested
        engine = self.workers.engine(job.worker)
        if engine is not self.engine:
            return self._run_on_worker(engine, request, job, model_ref, report, should_cancel, record)
        if model_ref is not None or self.engine.model is None:
            ref = model_ref or self.settings.model
            if self.engine.model is None:
                report(0, 0, None, f"Loading {ref}…")
            # Loaded here first, so a ZeroGPU process starts with it (a no-op when it is loaded already).
            self.engine.load_model(ref, on_status=lambda message: report(0, 0, None, message))
        result = self._generation.run(
            self.engine.model.source.ref,
            self.with_defaults(request),
            report=report,
            should_cancel=should_cancel,
        )
        if record and self.result_sink is not None and not result.cancelled:
            result.saved = self.result_sink(result, job)
        return result

    def _run_on_worker(self, engine, request, job, model_ref, report, should_cancel, record) -> GenerationResult:
        """``run_in_job`` on a worker other than the primary one: its own engine, loaded with the chosen model.
        (Not through ``GpuTask``: several devices and ZeroGPU's one GPU per call never go together.)"""
        ref = model_ref or self.chosen_model()
        if engine.model is None or engine.model.source.ref != ref:
            report(0, 0, None, f"Loading {ref} on {engine.device}…")
            try:
                engine.load_model(ref, on_status=lambda message: report(0, 0, None, message))
            except WorkerLost:
                raise  # the queue runs the job on another worker
            except Exception as exc:
                # This device is out of the rotation until another model is loaded; the others serve on.
                self.jobs.retire(job.worker)
                self._retired_on.add(ref)
                log.warning("device %s could not load %s", engine.device, ref, exc_info=True)
                reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                raise UserError(
                    f"Device {engine.device} could not load the model {shorten(ref)}: {shorten(reason, 200)}. "
                    "This job failed; submit it again and another device runs it."
                ) from None
        request = self.with_defaults(request, engine)
        if getattr(engine, "remote", False):  # another machine (lorapg/services/ray_workers.py)
            try:
                # Hashed here, in the job (once per file version): the worker refuses a differing copy.
                loras = self._lora_files(request, hashed=True)
                result = engine.generate(
                    request,
                    on_step=report,
                    should_cancel=should_cancel,
                    model_ref=ref,
                    family=self._family_of(ref),
                    loras=loras,
                )
            except WorkerUnfit:  # out of the rotation for this model, as a device that could not load it
                self.jobs.retire(job.worker)
                self._retired_on.add(ref)
                log.warning("worker %s cannot run %s; retired until another model is chosen", engine.device, ref)
                raise
        else:
            result = engine.generate(request, on_step=report, should_cancel=should_cancel)
        if record and self.result_sink is not None and not result.cancelled:
            result.saved = self.result_sink(result, job)
        return result

    def _family_of(self, ref: str) -> str | None:
        """The family ``prepare`` checked requests for when ``ref`` is the primary worker's model; else None."""
        model = self.engine.model
        return model.family if model is not None and model.source.ref == ref else None

    def _generate_on_device(
        self,
        model_ref: str,
        request: GenerationRequest,
        *,
        report: Callable[..., None],
        should_cancel: Callable[[], bool],
    ) -> GenerationResult:
        """The generation itself: on ZeroGPU it runs in a GPU process, whose memory may lag the app's."""
        if self.engine.model is None or self.engine.model.source.ref != model_ref:
            # A GPU process kept from an earlier call still holds the model it had then.
            report(0, 0, None, f"Loading {model_ref}…")
            self.engine.load_model(model_ref, on_status=lambda message: report(0, 0, None, message))
        return self.engine.generate(request, on_step=report, should_cancel=should_cancel)

    def _generation_seconds(self, model_ref: str, request: GenerationRequest) -> float:
        loaded = self.engine.model
        # Unset sizes mean the model's native size; before a model is loaded assume the largest (SDXL).
        size = loaded.native_size if loaded is not None else NATIVE_SIZE[SDXL]
        # Called with the request as the user gave it (validated, not normalised): numbers may be floats.
        return generation_seconds(
            int(float(request.steps if request.steps is not None else STEPS.default)),
            int(float(request.width or size)),
            int(float(request.height or size)),
            int(float(request.batch_size)),
        )

    def generate(
        self, request: GenerationRequest, on_progress: Callable[[Job], None] | None = None, *, record: bool = True
    ) -> GenerationResult:
        """Submit and wait: the CLI's and the REST API's synchronous call."""
        return self._wait(self.submit_generation(request, record=record), on_progress)

    def cancel(self, job_id: str, owner: str | None = None) -> Job:
        """``owner``: the visitor asking; another visitor's job is reported as unknown, never cancelled."""
        job = self.jobs.get(job_id)
        if owner is not None and job.owner != owner:
            raise UserError(f"Unknown job id {job_id!r}.")  # the same words as a job that never existed
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
