"""The GPU memory panel: which models are where, the budget, a button to free memory now, and the
generation workers (devices and Ray workers) with their models and load where there are several."""

from __future__ import annotations

import gradio as gr

from lorapg.services.generation import GenerationService
from lorapg.ui.texts import memory_text, workers_text


def build_memory_panel(service: GenerationService) -> None:
    with gr.Accordion("GPU memory", open=False):
        status = gr.Markdown(memory_text(service.memory_status()), elem_id="memory-status")
        workers = gr.Markdown(workers_text(service.worker_status()), elem_id="worker-status")
        with gr.Row():
            refresh = gr.Button("Refresh", size="sm")
            free = gr.Button("Free GPU memory now", size="sm", variant="secondary")
    refresh.click(lambda: memory_text(service.memory_status()), None, status, api_name="memory_status")
    refresh.click(lambda: workers_text(service.worker_status()), None, workers, api_name="worker_status")
    free.click(lambda: memory_text(service.free_gpu_memory()), None, status, api_name="free_gpu")
