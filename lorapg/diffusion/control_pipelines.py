"""The engine's ControlNet runs: diffusers' ControlNet pipelines made with ``from_pipe``.

``from_pipe`` builds the ControlNet pipeline over the loaded pipeline's own modules (no reload, no
second copy of the weights), so the LoRAs fused into or injected into the UNet and text encoders
apply exactly as they do for txt2img. Several units run as one ``MultiControlNetModel``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diffusers import (
    DiffusionPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
)
from diffusers.models import MultiControlNetModel
from PIL import Image

from lorapg.diffusion.controlnet import ControlUnit, control_image, describe_units
from lorapg.diffusion.controlnet_models import ControlNetLibrary, check_text_width
from lorapg.diffusion.families import SDXL
from lorapg.residency import ResidencyManager

if TYPE_CHECKING:
    from lorapg.diffusion.engine import LoadedModel

log = logging.getLogger(__name__)

RESIDENT_PREFIX = "controlnet "  # each model's name in the residency manager's status
TXT2IMG, IMG2IMG, INPAINT = "txt2img", "img2img", "inpaint"  # the run's kind (image_pipelines' names)
# (family is SDXL, kind) -> diffusers' ControlNet pipeline for it
_PIPELINES = {
    (False, TXT2IMG): StableDiffusionControlNetPipeline,
    (False, IMG2IMG): StableDiffusionControlNetImg2ImgPipeline,
    (False, INPAINT): StableDiffusionControlNetInpaintPipeline,
    (True, TXT2IMG): StableDiffusionXLControlNetPipeline,
    (True, IMG2IMG): StableDiffusionXLControlNetImg2ImgPipeline,
    (True, INPAINT): StableDiffusionXLControlNetInpaintPipeline,
}


@dataclass
class ControlRun:
    """One txt2img call steered by ControlNet units: the pipeline and its control arguments."""

    pipe: DiffusionPipeline
    images: list[Image.Image]  # what each unit's ControlNet sees, at width x height
    units: tuple[ControlUnit, ...]
    residents: list[str]  # their names in the residency manager
    hashes: list[str]  # each model's short hash, as the PNG parameters name it ("" if it has no weights file)

    def kwargs(self, image_key: str = "image") -> dict:
        """The pipeline's ControlNet arguments (lists: one entry per unit). ``image_key``: where the
        control images go ("image" for txt2img; img2img and inpainting take them as "control_image")."""
        single = len(self.units) == 1  # one ControlNetModel takes one image and a float weight
        weights = [unit.weight for unit in self.units]
        return {
            image_key: self.images[0] if single else self.images,
            "controlnet_conditioning_scale": weights[0] if single else weights,
            "control_guidance_start": [unit.guidance_start for unit in self.units],
            "control_guidance_end": [unit.guidance_end for unit in self.units],
        }

    def pinned(self, residency: ResidencyManager | None) -> ExitStack:
        """Each ControlNet held on the device for the run (a no-op without a residency manager)."""
        stack = ExitStack()
        if residency is not None:
            for name in self.residents:
                stack.enter_context(residency.use(name))
        return stack


def prepare_control_run(
    model: LoadedModel,
    units: tuple[ControlUnit, ...],
    width: int,
    height: int,
    *,
    library: ControlNetLibrary,
    annotators: Path,
    place: Callable[[str, object], str],
    kind: str = TXT2IMG,
) -> ControlRun:
    """Load (once) and check each unit's model, make its control image, and build the pipeline.

    ``place(name, controlnet)``: puts a ControlNet where the pipeline runs and returns its resident name.
    """
    controlnets, residents, hashes = [], [], []
    for unit in units:
        info = library.resolve(unit.model)
        library.check_family(info, model.family)
        controlnet = library.load(info, model.pipe.unet.dtype)
        check_text_width(info.name, controlnet, model.pipe.unet.config.cross_attention_dim, model.family)
        controlnets.append(controlnet)
        residents.append(place(info.name, controlnet))
        hashes.append(info.short_hash)
    images = [control_image(unit, width, height, annotators) for unit in units]
    pipe_class = _PIPELINES[(model.family == SDXL, kind)]
    controlnet = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(controlnets)
    pipe = pipe_class.from_pipe(model.pipe, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = model.pipe.scheduler  # the engine set the request's sampler on the base pipeline
    log.info("ControlNet run: %s", describe_units(units))
    return ControlRun(pipe, images, units, residents, hashes)
