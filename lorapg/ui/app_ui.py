"""The whole Gradio app: tabs composed around one service object."""

from __future__ import annotations

import gradio as gr

from lorapg.services import PlaygroundService
from lorapg.ui.generate_tab import build_generate_tab

TITLE = "LoRA Playground"


def build_ui(service: PlaygroundService) -> gr.Blocks:
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nStable Diffusion with any number of LoRAs, each at its own scale.")
        with gr.Tabs(), gr.Tab("Generate", id="generate"):
            build_generate_tab(service)

        def model_status_on_load():
            return service.model_status().describe()

    return demo
