"""The Upscale tab (A1111's Extras): an uploaded image or a gallery image, an upscaler and a scale;
the result is saved to the gallery with A1111's "Postprocess …" parameters. The rules live in
lorapg.services.upscale; the widgets hold none of their own."""

from __future__ import annotations

import gradio as gr

from lorapg.hosting.visitors import Visitors
from lorapg.limits import UPSCALE_BY
from lorapg.services.upscale import UpscaleService
from lorapg.ui.common import raw_number, user_errors, visitor


def upscaler_choices(service: UpscaleService) -> list[str]:
    """The resizers and the models in the folder now (a file added while the app runs appears)."""
    return [item.name for item in service.upscalers() if item.name != "None"]


def build_upscale_tab(service: UpscaleService, visitors: Visitors | None = None) -> dict:
    with gr.Tab("Upscale", id="upscale") as tab:
        gr.Markdown(
            "Upscale an image with an upscaler model from `models/upscalers/` (ESRGAN, Real-ESRGAN, "
            "4x-UltraSharp, … as .safetensors) or a plain resize. The result goes to the gallery."
        )
        with gr.Row():
            with gr.Column():
                source = gr.Image(type="filepath", label="Image", elem_id="upscale-image")
                gallery_id = gr.Textbox(label="…or a gallery image's id", elem_id="upscale-gallery-id")
                choices = upscaler_choices(service)
                upscaler = gr.Dropdown(choices, value=choices[0], label="Upscaler", elem_id="upscale-upscaler")
                scale = raw_number(
                    gr.Slider(
                        minimum=UPSCALE_BY.minimum,
                        maximum=UPSCALE_BY.maximum,
                        step=UPSCALE_BY.step,
                        value=UPSCALE_BY.default,
                        label="Upscale by",
                        elem_id="upscale-scale",
                    )
                )
                button = gr.Button("Upscale", variant="primary", elem_id="upscale-run")
            with gr.Column():
                result = gr.Image(type="pil", label="Result", interactive=False, elem_id="upscale-result")
                info = gr.Textbox(label="Parameters", interactive=False, elem_id="upscale-info")

    @user_errors
    def run(image_path, image_id, upscaler_name, factor, request: gr.Request):
        owner = visitor(visitors, request)
        if (image_id or "").strip():
            done = service.upscale_gallery_image(image_id.strip(), upscaler_name, factor, owner=owner)
        elif image_path:
            done = service.save(service.upscale(image_path, upscaler_name, factor, owner=owner), owner=owner)
        else:
            raise_missing()
        return done.image, f"#{done.record.id}: {done.info}"

    # An upload replaces a gallery image sent here (run() takes the id first).
    source.upload(lambda: "", None, gallery_id, api_visibility="private")
    button.click(run, [source, gallery_id, upscaler, scale], [result, info], api_name="upscale")
    tab.select(lambda: gr.update(choices=upscaler_choices(service)), None, upscaler, api_visibility="private")
    return {"tab": tab, "image": source, "gallery_id": gallery_id, "upscaler": upscaler, "result": result}


def raise_missing() -> None:
    from lorapg.errors import UserError

    raise UserError("Image: upload an image or give a gallery image's id.")
