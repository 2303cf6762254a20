"""The engine's img2img and inpainting runs: diffusers' pipelines made with ``from_pipe``.

``from_pipe`` builds the img2img / inpaint pipeline over the loaded pipeline's own modules: no
reload, no second copy of the weights, and the LoRAs fused into (or injected into) those modules
apply exactly as they do for txt2img. An inpainting checkpoint (a UNet with 9 input channels)
always runs the inpaint pipeline, with an all-white mask for plain img2img; a regular UNet runs
the img2img pipeline, or the inpaint pipeline (which supports 4-channel UNets by blending the
init latents back in outside the mask at every step) when there is a mask. The hires fix's second
pass (``HiresRun``) runs the same img2img pipeline on the upscaled first pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline
from PIL import Image

from lorapg.diffusion import hires, img2img
from lorapg.diffusion.upscalers import check_size
from lorapg.errors import UserError

if TYPE_CHECKING:
    from lorapg.diffusion.engine import LoadedModel
    from lorapg.diffusion.request import GenerationRequest
    from lorapg.diffusion.upscalers import UpscalerLibrary

log = logging.getLogger(__name__)

IMG2IMG, INPAINT = "img2img", "inpaint"
INPAINTING_UNET_CHANNELS = 9  # latents 4 + mask 1 + masked-image latents 4


@dataclass
class ImageRun:
    """One img2img / inpainting call, prepared: the pipeline, the plan and the effective steps."""

    pipe: DiffusionPipeline
    plan: img2img.Plan
    request: GenerationRequest
    seeds: list[int]
    steps: int  # the denoising steps that actually run: int(steps × strength)
    kind: str  # IMG2IMG or INPAINT
    control: object | None = None  # a ControlRun (lorapg.diffusion.control_pipelines): its pipeline runs instead

    def call(self, prompts: dict, step_end: Callable) -> object:
        """Run the pipeline (``prompts``: text or embeddings, as for txt2img); returns its output."""
        request = self.request
        if self.steps == 0:
            # Too little strength for a single step: the init image is the answer (diffusers would refuse).
            return SimpleNamespace(images=[self.plan.init.copy() for _ in self.seeds])
        kwargs = dict(
            prompts,
            num_inference_steps=request.steps,
            strength=request.img2img.strength,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.batch_size,
            # One CPU generator per image, as txt2img: image i is reproducible alone with seed + i.
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in self.seeds],
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=["latents"],
            output_type="pil",
        )
        if self.kind == INPAINT:
            mask = self.plan.mask if self.plan.mask is not None else Image.new("L", self.plan.init.size, 255)
            kwargs.update(image=self.plan.init, mask_image=mask, width=request.width, height=request.height)
        elif self.plan.latent_source is not None:
            generator = torch.Generator("cpu").manual_seed(self.seeds[0])
            kwargs["image"] = img2img.latent_resize(
                self.pipe, self.plan.latent_source, request.width, request.height, generator
            )
        else:
            kwargs["image"] = self.plan.init
        if self.control is not None:  # the ControlNet img2img / inpaint pipeline over the same modules
            return self.control.pipe(**kwargs, **self.control.kwargs("control_image"))
        return self.pipe(**kwargs)

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        return [self.plan.finish(image) for image in images]


def prepare_image_run(model: LoadedModel, request: GenerationRequest, seeds: list[int]) -> ImageRun | None:
    """The run for ``request`` (validated) if it has an init image; None for txt2img."""
    if request.img2img is None:
        return None
    options = img2img.check_options(request.img2img)
    request = replace(request, img2img=options)  # images decoded: the result's request carries them
    plan = img2img.plan(options, request.width, request.height)
    inpainting_unet = model.pipe.unet.config.in_channels == INPAINTING_UNET_CHANNELS
    kind = INPAINT if plan.mask is not None or inpainting_unet else IMG2IMG
    if inpainting_unet and plan.latent_source is not None:
        plan.latent_source = None  # the inpaint pipeline takes pixels: mode 3 resizes them instead
    steps = img2img.effective_steps(request.steps, options.strength)
    return ImageRun(derived_pipeline(model, kind), plan, request, seeds, steps, kind)


def derived_pipeline(model: LoadedModel, kind: str) -> DiffusionPipeline:
    """The ``kind`` pipeline over ``model.pipe``'s modules, made once per loaded model."""
    pipe = model.derived.get(kind)
    if pipe is None:
        maker = AutoPipelineForInpainting if kind == INPAINT else AutoPipelineForImage2Image
        pipe = maker.from_pipe(model.pipe)
        pipe.set_progress_bar_config(disable=True)
        model.derived[kind] = pipe
        log.info("made the %s pipeline (%s) from the loaded model", kind, type(pipe).__name__)
    pipe.scheduler = model.pipe.scheduler  # the engine sets the request's sampler on the base pipeline
    return pipe


@dataclass
class HiresRun:
    """A1111's hires fix around a txt2img call: the first pass's output type, then the upscale and
    the second pass through the img2img pipeline over the same modules (so the LoRAs apply to both)."""

    model: LoadedModel
    request: GenerationRequest  # validated: its ``hires`` checked
    seeds: list[int]
    width: int  # the upscaled (result) size
    height: int
    second_steps: int  # the denoising steps the second pass actually runs: int(steps × strength)
    # The upscaler library (lorapg.diffusion.upscalers) for an image upscaler: a resizer or a model.
    upscalers: UpscalerLibrary | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def latent(self) -> bool:
        return self.request.hires.upscaler in hires.LATENT_MODES

    @property
    def first_output_type(self) -> str:
        # A latent upscaler resizes the first pass's latents: they are not decoded in between.
        return "latent" if self.latent else "pil"

    @property
    def total_steps(self) -> int:
        return self.request.steps + self.second_steps

    def decoded(self, first: object) -> list[Image.Image]:
        """The first pass's images as they are (a cancelled run stops there, as A1111's does)."""
        return decode_latents(self.model.pipe, first) if self.latent else list(first)

    def second_pass(
        self, first: object, prompts: dict, step_end: Callable, should_cancel: Callable[[], bool] | None = None
    ) -> object:
        """Upscale the first pass's output and refine it; returns a pipeline-like output.
        ``should_cancel``: asked between an upscaler model's tiles (lorapg.diffusion.upscalers raises
        UpscaleCancelled there), so a long upscale does not hold a cancelled job."""
        upscaled = self._upscale(first, should_cancel)
        if self.second_steps == 0:
            # Too little strength for one step: the upscaled first pass is the answer (diffusers would refuse).
            images = decode_latents(self.model.pipe, upscaled) if self.latent else upscaled
            return SimpleNamespace(images=images)
        request, options = self.request, self.request.hires
        pipe = derived_pipeline(self.model, IMG2IMG)
        kwargs = {key: value for key, value in prompts.items() if key != "latents"}  # variation noise: first pass
        # A 4-channel tensor is taken as latents by diffusers' img2img (not encoded again).
        return pipe(
            **kwargs,
            image=upscaled,
            num_inference_steps=hires.second_pass_steps(options, request.steps),
            strength=options.strength,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.batch_size,
            # The same seeds as the first pass, one CPU generator per image (as A1111 reuses the seed).
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in self.seeds],
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=["latents"],
            output_type="pil",
        )

    def _upscale(self, first: object, should_cancel: Callable[[], bool] | None = None) -> object:
        if not self.latent:
            name = self.request.hires.upscaler
            if name == hires.LANCZOS_RESIZE or self.upscalers is None:  # "None": A1111's plain Lanczos resize
                return [image.resize(self.size, resample=Image.Resampling.LANCZOS) for image in first]
            return [self.upscalers.upscale(image, name, self.size, "Hires upscaler", should_cancel) for image in first]
        factor = self.model.pipe.vae_scale_factor
        size = (self.height // factor, self.width // factor)
        mode = hires.LATENT_MODES[self.request.hires.upscaler]
        return torch.nn.functional.interpolate(first, size=size, mode=mode)


def prepare_hires_run(
    model: LoadedModel,
    request: GenerationRequest,
    seeds: list[int],
    upscalers: UpscalerLibrary | None = None,
    max_pixels: int = 0,
) -> HiresRun | None:
    """The hires run for ``request`` (validated) if it asks for one; None otherwise. ``upscalers``:
    where an upscaler model's name is looked up (None: only the built-in upscalers); ``max_pixels``:
    Settings.max_image_pixels (0 = no limit), which an upscaler model's passes must stay within too."""
    options = request.hires
    if options is None:
        return None
    hires.check_upscaler_model(options.upscaler, upscalers)  # a model's name: in the folder, or refused
    if model.pipe.unet.config.in_channels == INPAINTING_UNET_CHANNELS:
        raise UserError("Hires fix needs a regular checkpoint; this one is an inpainting model. Turn hires fix off.")
    width, height = hires.target_size(options, request.width, request.height)
    if upscalers is not None and options.upscaler not in hires.UPSCALERS:
        _check_model_passes(upscalers, options.upscaler, request, (width, height), max_pixels)
    nominal = hires.second_pass_steps(options, request.steps)
    steps = img2img.effective_steps(nominal, options.strength)
    return HiresRun(model, request, seeds, width, height, steps, upscalers)


def _check_model_passes(
    upscalers: UpscalerLibrary, name: str, request: GenerationRequest, size: tuple[int, int], max_pixels: int
) -> None:
    """Refuse a hires upscale whose model passes overshoot ``max_pixels`` on the way to ``size`` (the checked
    result): a 4× model makes a 4× image before it is resized down, e.g. 8192² for hr_scale 1.05 of 2048²."""
    # The passes run until both sides are reached: the larger of the two ratios decides how many.
    scale = max(size[0] / request.width, size[1] / request.height)
    field = f"Hires upscaler {name!r}"
    check_size(request.width, request.height, scale, upscalers.model_scale(name), max_pixels, field)


def decode_latents(pipe: DiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Latents (scaled, as the pipeline's "latent" output) decoded to images by the pipeline's VAE."""
    vae = pipe.vae
    # SDXL's VAE overflows in float16: its pipelines decode in float32 (force_upcast), and so does this.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        with torch.no_grad():
            pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype)
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")
