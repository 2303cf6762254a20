"""The engine's img2img and inpainting runs: diffusers' pipelines made with ``from_pipe``.

``from_pipe`` builds the img2img / inpaint pipeline over the loaded pipeline's own modules: no
reload, no second copy of the weights, and the LoRAs fused into (or injected into) those modules
apply exactly as they do for txt2img. An inpainting checkpoint (a UNet with 9 input channels)
always runs the inpaint pipeline, with an all-white mask for plain img2img; a regular UNet runs
the img2img pipeline, or the inpaint pipeline (which supports 4-channel UNets by blending the
init latents back in outside the mask at every step) when there is a mask.
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

from lorapg.diffusion import img2img

if TYPE_CHECKING:
    from lorapg.diffusion.engine import LoadedModel
    from lorapg.diffusion.request import GenerationRequest

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
