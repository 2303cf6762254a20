"""The Generate tab's "ControlNet" accordion (one unit); the values are checked with the request
(lorapg.diffusion.controlnet), so the widgets hold no rules of their own."""

from __future__ import annotations

import gradio as gr

from lorapg.limits import (
    CONTROL_GUIDANCE_END,
    CONTROL_GUIDANCE_START,
    CONTROL_PREPROCESSORS,
    CONTROL_RESIZE_MODES,
    CONTROL_THRESHOLD,
    CONTROL_WEIGHT,
)
from lorapg.ui.common import raw_number

# The generate handler's ControlNet parameters, in the API's positional order (after the hires fix's).
CONTROLNET_INPUTS = (
    "controlnet_model",
    "controlnet_image",
    "controlnet_module",
    "controlnet_weight",
    "controlnet_guidance_start",
    "controlnet_guidance_end",
    # added after the first release, so positional callers keep working: what Reuse restores too
    "controlnet_resize_mode",
    "controlnet_threshold_a",
    "controlnet_threshold_b",
)
NO_MODEL = "None"  # the dropdown's "no ControlNet" entry, as the extension shows it


def _ranged(limits) -> dict:
    return {"minimum": limits.minimum, "maximum": limits.maximum, "step": limits.step}


def build_controlnet_section(model_names: list[str]) -> dict[str, gr.components.Component]:
    """The accordion's widgets, keyed by CONTROLNET_INPUTS, plus its refresh button ("controlnet_refresh")."""
    with gr.Accordion("ControlNet", open=False, elem_id="controlnet"):
        gr.Markdown(
            "Steer the image with a control image (SD 1.x and SDXL; txt2img and img2img). Models come from "
            "`models/controlnet`; a preprocessor turns a photo into the map the model reads "
            "(canny: edges; depth needs a depth model in `models/annotators/depth`)."
        )
        with gr.Row():
            model = gr.Dropdown([NO_MODEL, *model_names], value=NO_MODEL, label="Model", elem_id="controlnet-model")
            refresh = gr.Button("Refresh", size="sm", scale=0)
            module = gr.Dropdown(list(CONTROL_PREPROCESSORS), value="none", label="Preprocessor")
        # PNG, not Gradio's default WEBP: the control image must reach the engine unchanged.
        image = gr.Image(
            label="Control image (or the preprocessor's source)",
            type="pil",
            format="png",
            sources=["upload", "clipboard"],
            height=280,
            elem_id="controlnet-image",
        )
        with gr.Row():
            weight = raw_number(gr.Slider(**_ranged(CONTROL_WEIGHT), value=CONTROL_WEIGHT.default, label="Weight"))
            start = raw_number(
                gr.Slider(**_ranged(CONTROL_GUIDANCE_START), value=0.0, label="Starting control step (fraction)")
            )
            end = raw_number(
                gr.Slider(**_ranged(CONTROL_GUIDANCE_END), value=1.0, label="Ending control step (fraction)")
            )
        with gr.Row():
            # The extension's names and defaults (Crop and Resize; canny 100 / 200).
            resize_mode = gr.Dropdown(
                list(CONTROL_RESIZE_MODES.values()), value=CONTROL_RESIZE_MODES[1], label="Resize mode"
            )
            low = raw_number(
                gr.Slider(**_ranged(CONTROL_THRESHOLD), value=CONTROL_THRESHOLD.default, label="Canny low threshold")
            )
            high = raw_number(gr.Slider(**_ranged(CONTROL_THRESHOLD), value=200, label="Canny high threshold"))
    widgets = (model, image, module, weight, start, end, resize_mode, low, high)
    return {**dict(zip(CONTROLNET_INPUTS, widgets, strict=True)), "controlnet_refresh": refresh}
