"""The diffusion engine: one loaded base model, its LoRA adapters, and ``generate()``."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from lorapg.diffusion import compile_mode, flux
from lorapg.diffusion.adapters import AdapterSet, LoraSelection, check_scale
from lorapg.diffusion.control_pipelines import RESIDENT_PREFIX, TXT2IMG, ControlRun, prepare_control_run
from lorapg.diffusion.controlnet_models import ControlNetLibrary
from lorapg.diffusion.families import NATIVE_SIZE, SD1, is_transformer_family
from lorapg.diffusion.image_pipelines import prepare_hires_run, prepare_image_run
from lorapg.diffusion.lora_library import LoraInfo, LoraLibrary
from lorapg.diffusion.model_source import ModelSource, resolve_model_source
from lorapg.diffusion.pipeline_loader import load_pipeline
from lorapg.diffusion.preview import latents_to_preview
from lorapg.diffusion.prompt_encoding import chunked_prompt_embeddings
from lorapg.diffusion.prompt_syntax import needs_chunked_encoding
from lorapg.diffusion.quantization import QuantizePlan, component, is_quantized
from lorapg.diffusion.request import GenerationRequest, validate
from lorapg.diffusion.samplers import scheduler_for
from lorapg.diffusion.upscalers import UpscaleCancelled, UpscalerLibrary
from lorapg.diffusion.variation_noise import image_seeds, initial_latents, variation_seeds
from lorapg.errors import UserError
from lorapg.residency import LOWVRAM, ResidencyManager

log = logging.getLogger(__name__)

RESIDENT_NAME = "diffusion pipeline"  # its name in the residency manager's status
# Flux.1 / SD 3.5 register each component apart: "diffusion pipeline: transformer", "…: text_encoder_2".
COMPONENT_PREFIX = RESIDENT_NAME + ": "

# on_step(step, total, preview_or_None); should_cancel() -> True to stop after the current step.
StepCallback = Callable[[int, int, Image.Image | None], None]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    request: GenerationRequest  # validated: concrete seed, size, steps
    loras: list[LoraSelection]
    model: ModelSource
    family: str
    cancelled: bool = False
    warnings: list[str] = field(default_factory=list)
    saved: list = field(default_factory=list)  # files written for this result (gallery, CLI)
    variation_seeds: list[int] = field(default_factory=list)  # per image; empty at variation strength 0
    control_images: list[Image.Image] = field(default_factory=list)  # what each ControlNet unit saw
    control_hashes: list[str] = field(default_factory=list)  # each unit's model's short hash
    # The model takes distilled guidance (Flux dev; schnell none): the PNG writes it as Forge does. A
    # property of the model, not of the value: Flux dev at guidance 0 is still dev.
    guidance_distilled: bool = False


@dataclass
class LoadedModel:
    source: ModelSource
    pipe: DiffusionPipeline
    family: str
    adapters: AdapterSet
    base_scheduler_config: dict
    native_size: int
    derived: dict = field(default_factory=dict)  # img2img / inpaint pipelines made from ``pipe`` (shared modules)


class DiffusionEngine:
    """Holds one base model at a time; every public call is serialised by a lock."""

    def __init__(
        self,
        lora_library: LoraLibrary,
        device: torch.device,
        dtype: torch.dtype,
        *,
        allow_pickle: bool = False,
        single_file_config: str | None = None,
        preview_every: int = 5,
        residency: ResidencyManager | None = None,
        compile_unet: bool = False,
        compile_backend: str = compile_mode.DEFAULT_BACKEND,
        controlnets: ControlNetLibrary | None = None,
        annotators_dir: Path | None = None,
        upscalers: UpscalerLibrary | None = None,
        max_image_pixels: int = 0,
        quantize: QuantizePlan | None = None,
        transformer_dtype: torch.dtype | None = None,
    ):
        self.library = lora_library
        self.device = device
        self.dtype = dtype
        # Flux.1 / SD 3.5's dtype when it differs (--dtype auto: bf16 on GPUs that have it; devices.pick_dtype).
        self.transformer_dtype = transformer_dtype
        self.allow_pickle = allow_pickle
        self.single_file_config = single_file_config
        self.preview_every = preview_every
        # On a GPU the pipeline shares the device with the LLM and the trainer under a budget;
        # without one (CPU) it simply stays where it was loaded.
        self.residency = residency
        # --compile: torch.compile the UNet, and apply every LoRA as a weight patch so none recompiles it.
        self.compile_unet = compile_unet
        self.compile_backend = compile_backend
        self._model: LoadedModel | None = None
        # The pipeline's names in the residency manager: component attribute -> name for Flux.1 / SD 3.5
        # (registered apart); {"": RESIDENT_NAME} for a pipeline registered whole.
        self._residents: dict[str, str] = {}
        self._lock = threading.RLock()
        # ControlNet models (models/controlnet) and the preprocessors' weights (models/annotators).
        self.controlnets = controlnets or ControlNetLibrary(Path("models/controlnet"), allow_pickle=allow_pickle)
        self.annotators_dir = annotators_dir or Path("models/annotators")
        # Upscaler models (models/upscalers) the hires fix may use besides its built-in upscalers.
        self.upscalers = upscalers
        self.max_image_pixels = max_image_pixels  # Settings.max_image_pixels, for a hires upscaler model's passes
        self.quantize = quantize or QuantizePlan()  # --quantize: Flux.1 / SD 3.5 transformer and T5 storage

    # --- model -----------------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def load_model(self, ref: str, on_status: Callable[[str], None] | None = None) -> LoadedModel:
        """Load ``ref`` (hub id, folder or .safetensors), replacing the current model on success."""
        source = resolve_model_source(ref, allow_pickle=self.allow_pickle)
        with self._lock:
            if self._model and self._model.source.ref == source.ref:
                return self._model
            self._release_current_from_gpu()
            pipe, family = load_pipeline(
                source,
                self.device,
                self.dtype,
                single_file_config=self.single_file_config,
                on_status=on_status,
                keep_on_cpu=self.residency is not None,
                quantize=self.quantize,
                app_wide_quantize=True,  # the app's --quantize: SD 1.x/SDXL models skip it
                transformer_dtype=self.transformer_dtype,
            )
            if self._uses_model_offload():
                # diffusers' model CPU offload keeps one component (the largest: the UNet) on the GPU
                # at a time and moves it in and out itself; the manager only reserves that much.
                pipe.enable_model_cpu_offload(device=self.device)
            # --compile covers the SD UNet; Flux / SD 3.5 transformers run as loaded (not built yet).
            compiled = self.compile_unet and not is_transformer_family(family)
            if compiled:
                compile_mode.compile_unet(pipe, self.compile_backend)
            elif self.compile_unet:
                log.warning("--compile applies to SD 1.x / SDXL UNets; %s runs uncompiled", family)
            adapters = AdapterSet(pipe, family, patch_everything=compiled)
            if is_quantized(getattr(pipe, "transformer", None)):
                # Merging a LoRA into 4-bit, GGUF or float8 weights re-rounds them, and unfusing could not give
                # the base back bit for bit: on a quantized base, LoRAs run unfused (two small matmuls a layer).
                adapters.fuser.enabled = False
            native = native_size(pipe, family)
            if self.residency is not None:
                # Last, after every step that may fail: a failed load leaves the manager with the
                # current model's entries, the ones its next generation uses.
                self._register_with_residency(pipe, family)
            previous, self._model = (
                self._model,
                LoadedModel(source, pipe, family, adapters, dict(pipe.scheduler.config), native),
            )
            del previous  # the old pipeline's memory is released once nothing refers to it
            gc.collect()
            log.info("loaded %s (%s, native %dpx) on %s", source.ref, family, native, self.device)
            return self._model

    def _release_current_from_gpu(self) -> None:
        """Move the current pipeline to CPU RAM before loading another, so two never share the GPU.

        If the new load fails the old model stays usable: the manager moves it back on next use.
        """
        if self.residency is None or self._model is None:
            return
        self.residency.free_all()
        gc.collect()

    def _uses_model_offload(self) -> bool:
        return self.residency is not None and self.residency.policy == LOWVRAM and self.device.type == "cuda"

    def _register_with_residency(self, pipe: DiffusionPipeline, family: str) -> None:
        for name in self._residents.values():  # the previous model's entries (moved off the GPU already)
            self.residency.unregister(name)
        self._residents = {"": RESIDENT_NAME}
        if self._uses_model_offload():  # load_model enabled diffusers' offload on this pipeline
            largest = max(module_bytes(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))
            self.residency.register(RESIDENT_NAME, largest, to_gpu=lambda: None, to_cpu=lambda: None)
            return
        # --quantize nf4 modules move too: safe because they only ever run on the GPU. bitsandbytes 0.50
        # repacks a Linear4bit into a CPU-only layout after an eval-mode CPU forward (AVX512-BF16), and a
        # later .to("cuda") keeps that layout (garbage): never run one on the CPU and then move it here.
        if is_transformer_family(family):
            self._register_components(pipe)
            return
        self.residency.register(
            RESIDENT_NAME, pipeline_bytes(pipe), to_gpu=lambda: pipe.to(self.device), to_cpu=lambda: pipe.to("cpu")
        )

    def _register_components(self, pipe: DiffusionPipeline) -> None:
        """Flux.1 / SD 3.5: each module (transformer, T5, CLIP encoders, VAE) registered with its own size.

        The text encoders are needed only while the prompt is encoded; registered apart, they are the
        least recently used entries once the transformer runs, so the manager moves them (T5 first, the
        largest) off the GPU when the transformer and VAE need the room. Moves use ``.to`` as the whole
        pipeline's did: each module only ever runs while placed on the device (see ``_register_with_residency``).
        """
        self._residents = {}
        for attribute, module in pipe.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            name = COMPONENT_PREFIX + attribute
            self.residency.register(
                name,
                module_bytes(module),
                to_gpu=lambda module=module: module.to(self.device),
                to_cpu=lambda module=module: module.to("cpu"),
            )
            self._residents[attribute] = name

    def require_model(self) -> LoadedModel:
        if self._model is None:
            raise UserError("No base model is loaded yet. Choose a model and press Load.")
        return self._model

    # --- generation ------------------------------------------------------------------------

    def resolve_loras(self, request: GenerationRequest) -> list[LoraSelection]:
        seen: set[str] = set()
        selections = []
        for lora in request.loras:
            info: LoraInfo = self.library.resolve(lora.name)
            if info.name in seen:
                raise UserError(f"LoRA {info.name} is selected twice; give it one scale.")
            seen.add(info.name)
            selections.append(LoraSelection(info, check_scale(info.name, lora.scale)))
        return selections

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        with self._lock:
            model = self.require_model()
            request = validate(request, model.native_size, family=model.family)
            transformer = is_transformer_family(model.family)
            warnings = []  # long prompts are chunked (prompt_encoding), so nothing is cut any more
            if transformer:  # Flux: no negative prompt, clip skip or variation noise (lorapg.diffusion.flux)
                request, warnings = flux.adapt_request(request, model.family, model.pipe)
            selections = self.resolve_loras(request)
            pipe = model.pipe
            pipe.scheduler = scheduler_for(
                request.sampler, model.base_scheduler_config, pipe.scheduler, family=model.family
            )
            seeds = image_seeds(request)  # seed + i; the same seed for each image of a variation batch
            if transformer and request.img2img is not None:
                raise UserError("img2img and inpainting are built for SD 1.x and SDXL so far; clear the init image.")
            # img2img / inpainting: another pipeline over the same modules, and the images around it.
            image_run = prepare_image_run(model, request, seeds)
            if image_run is not None:
                request = image_run.request  # its init image and mask decoded and checked
            # Hires fix: a second pass on the upscaled first one; progress counts both passes' steps.
            hires_run = prepare_hires_run(model, request, seeds, self.upscalers, self.max_image_pixels)
            control_run = self._control_run(model, request, image_run) if request.controlnet else None
            if image_run is not None:
                image_run.control = control_run
            self._configure_vae_tiling(model, *(hires_run.size if hires_run else (request.width, request.height)))
            total_steps = image_run.steps if image_run else hires_run.total_steps if hires_run else request.steps
            cancelled = False
            steps_done = 0
            steps_before = 0  # the steps of the passes already run (the hires pass counts on from the first)
            clip_skip, clip_warnings = self._clip_skip(model, request)
            warnings += clip_warnings

            def step_end(pipeline, step: int, timestep, kwargs):
                nonlocal cancelled, steps_done
                done = steps_done = steps_before + step + 1
                if on_step is not None:
                    preview = None
                    if done % self.preview_every == 0 and done < total_steps:
                        preview = self._preview(model, kwargs["latents"], request)
                    on_step(done, total_steps, preview)
                if should_cancel is not None and should_cancel():
                    cancelled = True
                    pipeline._interrupt = True  # diffusers skips the remaining steps
                return kwargs

            def run_pipeline():
                nonlocal steps_before
                steps_before = 0  # an out-of-memory retry runs both passes again
                if transformer:
                    return run_transformer_pipeline()
                prompts = {"prompt": request.prompt, "negative_prompt": request.negative_prompt or None}
                texts = (request.prompt, request.negative_prompt)
                if any(needs_chunked_encoding(text, pipe.tokenizer) for text in texts):
                    # A1111 syntax or more than 75 tokens; plain short prompts keep diffusers' own encoding.
                    prompts = chunked_prompt_embeddings(pipe, request.prompt, request.negative_prompt, clip_skip)
                elif clip_skip is not None:
                    prompts = clip_skipped_embeddings(pipe, request, clip_skip)
                if image_run is not None:
                    return image_run.call(prompts, step_end)
                # One CPU generator per image: image i is reproducible alone with seed + i, and the
                # same seed gives the same noise whatever the device.
                generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                latents = initial_latents(pipe, request, generators)  # None: no variation, the pipeline draws
                first_pass = dict(prompts, latents=latents) if latents is not None else prompts
                if control_run is not None:  # the ControlNet pipeline over the same modules
                    first_pass = dict(first_pass, **control_run.kwargs())
                output = (control_run.pipe if control_run is not None else pipe)(
                    **first_pass,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    width=request.width,
                    height=request.height,
                    num_images_per_prompt=request.batch_size,
                    generator=generators,
                    callback_on_step_end=step_end,
                    callback_on_step_end_tensor_inputs=["latents"],
                    output_type=hires_run.first_output_type if hires_run else "pil",
                )
                return run_hires_pass(output.images, prompts) if hires_run else output

            def run_hires_pass(first, prompts: dict):
                nonlocal steps_before, cancelled
                if cancelled:  # stopped in the first pass: its images, at the base size
                    return SimpleNamespace(images=hires_run.decoded(first))
                steps_before = request.steps
                try:
                    return hires_run.second_pass(first, prompts, step_end, should_cancel)
                except UpscaleCancelled:
                    # Between an upscaler model's tiles: the first pass's images, as a cancel in the
                    # first pass keeps them (and A1111's interrupt during the upscale returns images).
                    cancelled = True
                    return SimpleNamespace(images=hires_run.decoded(first))

            def run_transformer_pipeline(encoded: dict | None = None):
                generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]  # as for SD: one per image
                return pipe(
                    **(encoded or flux.pipeline_kwargs(pipe, request)),
                    num_inference_steps=request.steps,
                    width=request.width,
                    height=request.height,
                    # Encoded prompts come repeated for the batch already (flux.encode_prompts).
                    num_images_per_prompt=1 if encoded else request.batch_size,
                    generator=generators,
                    callback_on_step_end=step_end,
                    callback_on_step_end_tensor_inputs=["latents"],
                    output_type="pil",
                )

            if self.residency is None:
                model.adapters.activate(selections)
                output = run_pipeline()
            elif RESIDENT_NAME not in self._residents.values():  # Flux.1 / SD 3.5, component by component
                output = self._generate_by_component(model, selections, request, run_transformer_pipeline)
            else:
                # Pinned before LoRAs are injected: "Free GPU memory now" must not move the
                # pipeline while peft adds layers to it.
                controls = control_run.pinned(self.residency) if control_run else nullcontext()
                with self.residency.use(RESIDENT_NAME), controls:
                    model.adapters.activate(selections)
                    output = self.residency.run_with_oom_retry(
                        run_pipeline,
                        keep=RESIDENT_NAME,
                        advice="Lower the image size or the batch size, or start with --policy lowvram.",
                    )
            warnings += model.adapters.warnings(selections)  # modules of a LoRA the model has no place for
            if cancelled:
                log.info("generation cancelled after step %d of %d", steps_done, total_steps)
            # A cancelled run still decodes its current latents (diffusers skips the remaining steps,
            # then decodes): A1111's interrupt returns those images, so they are kept; callers that
            # record only finished work check ``cancelled``.
            return GenerationResult(
                images=image_run.finish(output.images) if image_run else list(output.images),
                seeds=seeds,
                request=request,
                loras=selections,
                model=model.source,
                family=model.family,
                cancelled=cancelled,
                warnings=warnings,
                variation_seeds=variation_seeds(request),
                control_images=control_run.images if control_run else [],
                control_hashes=control_run.hashes if control_run else [],
                guidance_distilled=flux.takes_distilled_guidance(model.family, model.pipe),
            )

    def _generate_by_component(
        self, model: LoadedModel, selections: list[LoraSelection], request: GenerationRequest, run: Callable
    ):
        """Encode the prompt with the text encoders on the GPU, then denoise and decode with the transformer
        and VAE there: the encoders are unpinned before the transformer is placed, so it can take their room."""
        pipe, names = model.pipe, self._residents
        self._activate_by_component(model, selections)
        t5 = component(pipe, "t5")
        # T5 is used first, so it is the least recently used (and the first to leave) once the transformer runs.
        encoders = sorted(
            (attribute for attribute in names if attribute.startswith("text_encoder")),
            key=lambda attribute: getattr(pipe, attribute) is not t5,
        )
        with ExitStack() as placed:
            for attribute in encoders:
                placed.enter_context(self.residency.use(names[attribute]))
            encoded = self.residency.run_with_oom_retry(
                lambda: flux.encode_prompts(pipe, request, self.device),
                advice="Use --quantize nf4 for the T5 encoder, or start with --policy lowvram.",
            )
        denoisers = sorted(  # the transformer first, then the VAE (which also decodes the previews)
            (name for attribute, name in names.items() if not attribute.startswith("text_encoder")),
            key=lambda name: name != names.get("transformer"),
        )
        with ExitStack() as placed:
            for name in denoisers:
                placed.enter_context(self.residency.use(name))
            return self.residency.run_with_oom_retry(
                lambda: run(encoded),
                keep=names.get("transformer"),
                advice="Lower the image size or the batch size, or start with --policy lowvram.",
            )

    def _activate_by_component(self, model: LoadedModel, selections: list[LoraSelection]) -> None:
        """Fuse or patch the LoRAs with the modules they change (the transformer, the CLIP encoders) placed:
        the deltas are then computed and rounded on the device that runs them (in the GPU's dtype there,
        in fp32 then rounded on the CPU), so the same request gives the same bytes wherever the transformer
        was before. T5 and the VAE, which no LoRA changes here, are only held where they are, so the
        encoding that follows still starts with T5 and "Free GPU memory now" moves nothing meanwhile."""
        pipe, names = model.pipe, self._residents
        if not model.adapters.computes_deltas(selections):
            # Nothing to add to the weights (no LoRA, or this selection is fused already): placing the
            # transformer now would only push T5 out of the way of the encoding.
            with self.residency.hold(*names.values()):
                model.adapters.activate(selections)
            return
        t5 = component(pipe, "t5")
        clip = {attribute for attribute in names if attribute.startswith("text_encoder")} - {
            attribute for attribute in names if getattr(pipe, attribute, None) is t5
        }
        changed = {name for attribute, name in names.items() if attribute == "transformer" or attribute in clip}
        with ExitStack() as placed:
            for name in sorted(changed, key=lambda name: name != names.get("transformer")):  # the largest first
                placed.enter_context(self.residency.use(name))
            # Held after the placing, so the placing may still move them out of the way.
            placed.enter_context(self.residency.hold(*(name for name in names.values() if name not in changed)))
            model.adapters.activate(selections)

    def _control_run(self, model: LoadedModel, request: GenerationRequest, image_run) -> ControlRun:
        if image_run is not None and image_run.plan.box is not None:
            # "Only masked" repaints a crop: the control image would have to be cropped the same way.
            raise UserError("ControlNet with inpainting works on the whole picture so far; turn off 'Only masked'.")
        if self.compile_unet:
            # Not built or tested yet: the ControlNet's residuals are new inputs to the compiled UNet's graph
            # (a recompile, or a graph break, on every unit set); refused rather than run slow or wrong.
            raise UserError("ControlNet does not run with --compile yet; start the app without --compile to use it.")
        return prepare_control_run(
            model,
            request.controlnet,
            request.width,
            request.height,
            library=self.controlnets,
            annotators=self.annotators_dir,
            place=self._place_controlnet,
            kind=image_run.kind if image_run is not None else TXT2IMG,
        )

    def check_hires_upscaler(self, name: str) -> None:
        """Refuse a hires upscaler that is neither built in nor a model in the upscalers folder (checked
        name: ``hires.check_upscaler``'s); the generation service asks before queueing."""
        from lorapg.diffusion import hires

        hires.check_upscaler_model(name, self.upscalers)

    def _place_controlnet(self, name: str, controlnet: torch.nn.Module) -> str:
        """Put a ControlNet where the UNet runs: registered with the residency manager like the pipeline."""
        resident = RESIDENT_PREFIX + name
        if self.residency is None:
            controlnet.to(self.device)
        elif resident not in {entry["name"] for entry in self.residency.status()}:
            self.residency.register(
                resident,
                module_bytes(controlnet),
                to_gpu=lambda: controlnet.to(self.device),
                to_cpu=lambda: controlnet.to("cpu"),
            )
        return resident

    @staticmethod
    def _preview(model: LoadedModel, latents: torch.Tensor, request: GenerationRequest) -> Image.Image:
        if is_transformer_family(model.family):  # packed latents: unpacked and decoded (flux)
            return flux.latents_to_preview(latents, model.pipe, request.width, request.height)
        return latents_to_preview(latents, model.family)

    @staticmethod
    def _clip_skip(model: LoadedModel, request: GenerationRequest) -> tuple[int | None, list[str]]:
        """A1111's "Clip skip" to apply (None: none), and warnings.

        SDXL already reads the penultimate layer, and A1111 ignores clip skip there by default: so does this.
        """
        if request.clip_skip <= 1:
            return None, []
        if model.family != SD1:
            note = f"Clip skip {request.clip_skip} applies to SD 1.x models only; it was ignored, as A1111 does."
            return None, [note]
        layers = model.pipe.text_encoder.config.num_hidden_layers
        if request.clip_skip > layers:
            raise UserError(
                f"Clip skip must be at most {layers} for this model (its text encoder has {layers} layers), "
                f"got {request.clip_skip}."
            )
        return request.clip_skip, []

    def _configure_vae_tiling(self, model: LoadedModel, width: int, height: int) -> None:
        # Decoding large images in one piece needs several GB for the VAE alone; tiles bound it.
        large = max(width, height) > int(model.native_size * 1.5)
        if large:
            model.pipe.vae.enable_tiling()
        else:
            model.pipe.vae.disable_tiling()


def clip_skipped_embeddings(pipe: DiffusionPipeline, request: GenerationRequest, clip_skip: int) -> dict:
    """Prompt and negative prompt embeddings read ``clip_skip`` layers from the end, as A1111 does.

    A1111's "Clip skip" N takes the N-th hidden state from the end (1 = the last layer, 2 = the
    penultimate), then the final layer norm. diffusers' own ``clip_skip`` argument (N - 1 in its
    counting) is not used: in diffusers 0.42 it reads ``text_encoder.text_model``, which transformers 5
    removed (AttributeError), and it skips layers for the prompt only, where A1111 skips for both.
    """
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    final_norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 4 nests it

    def encode(text: str) -> torch.Tensor:
        ids = tokenizer(
            text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        hidden = encoder(ids.to(pipe._execution_device), output_hidden_states=True).hidden_states
        return final_norm(hidden[-clip_skip])

    with torch.no_grad():
        return {"prompt_embeds": encode(request.prompt), "negative_prompt_embeds": encode(request.negative_prompt)}


def native_size(pipe: DiffusionPipeline, family: str) -> int:
    """The model's native image side: the UNet's sample size x the VAE's scale for SD, the VAE's for Flux."""
    if is_transformer_family(family):
        return flux.native_size(pipe, family)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(pipe.unet.config.sample_size * vae_scale) or NATIVE_SIZE[family]


def module_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def pipeline_bytes(pipe: DiffusionPipeline) -> int:
    """GPU footprint of the pipeline's weights (activations come out of the manager's reserve)."""
    return sum(module_bytes(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))
