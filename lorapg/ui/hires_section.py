"""The Generate tab's "Hires fix" accordion (A1111's txt2img hires fix); the values are checked
with the request (lorapg.diffusion.hires), so the widgets hold no rules of their own."""

from __future__ import annotations

import gradio as gr

from lorapg.limits import DENOISING_STRENGTH, HIRES_SCALE, HIRES_STEPS, HIRES_STRENGTH_DEFAULT, HIRES_UPSCALERS
from lorapg.ui.common import raw_number

# The generate handler's hires parameters (A1111's API names), in the API's positional order.
HIRES_INPUTS = ("enable_hr", "hr_upscaler", "hr_scale", "hr_second_pass_steps", "hr_denoising_strength")


def _ranged(limits) -> dict:
    return {"minimum": limits.minimum, "maximum": limits.maximum, "step": limits.step}


def hires_upscaler_choices(service) -> list[str]:
    """The built-in upscalers, then the upscaler models in the folder now (``service``: generation's)."""
    return service.hires_upscalers()


def build_hires_section(choices: list[str] | None = None) -> dict[str, gr.components.Component]:
    """The accordion's widgets, keyed by HIRES_INPUTS; ``choices``: the upscalers (default: the built-in ones)."""
    with gr.Accordion("Hires fix", open=False, elem_id="hires"):
        gr.Markdown(
            "Generate at the size above, upscale, then refine with a second pass (txt2img only). "
            '"Latent" upscales the latents; "None" resizes the image (Lanczos); models come from `models/upscalers/`.'
        )
        with gr.Row():
            enabled = gr.Checkbox(False, label="Hires fix", elem_id="hires-enable")
            upscaler = gr.Dropdown(choices or list(HIRES_UPSCALERS), value=HIRES_UPSCALERS[0], label="Upscaler")
        with gr.Row():
            scale = raw_number(gr.Slider(**_ranged(HIRES_SCALE), value=HIRES_SCALE.default, label="Upscale by"))
            steps = raw_number(
                gr.Slider(
                    **_ranged(HIRES_STEPS), value=HIRES_STEPS.default, label="Hires steps (0 = as the first pass)"
                )
            )
            strength = raw_number(
                gr.Slider(**_ranged(DENOISING_STRENGTH), value=HIRES_STRENGTH_DEFAULT, label="Denoising strength")
            )
    widgets = (enabled, upscaler, scale, steps, strength)
    return dict(zip(HIRES_INPUTS, widgets, strict=True))
