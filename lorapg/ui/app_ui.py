"""The whole Gradio app: tabs composed around the service objects."""

from __future__ import annotations

import gradio as gr

from lorapg.hosting.visitors import Visitors
from lorapg.services.captions import CaptionService
from lorapg.services.gallery import GalleryService
from lorapg.services.generation import GenerationService
from lorapg.services.grid import GridService
from lorapg.services.lora_manager import LoraManager
from lorapg.services.prompts import PromptService
from lorapg.services.training import TrainingService
from lorapg.services.upscale import UpscaleService
from lorapg.ui.common import visitor
from lorapg.ui.gallery_tab import REUSE_TARGETS, build_gallery_tab, wire_send_to_upscale
from lorapg.ui.generate_tab import DEFAULT_LORA_SCALE, build_generate_tab, lora_choices
from lorapg.ui.grid_tab import build_grid_tab, epochs_grid_actions
from lorapg.ui.hires_section import hires_upscaler_choices
from lorapg.ui.loras_tab import build_loras_tab
from lorapg.ui.memory_panel import build_memory_panel
from lorapg.ui.prompt_tools import build_prompt_tools
from lorapg.ui.train_tab import build_train_tab
from lorapg.ui.upscale_tab import build_upscale_tab
from lorapg.working_state import VisitorWorkingStates, WorkingState, WorkingValues

TITLE = "LoRA Playground"

# Generate-tab widgets kept in the working-state file: what Reuse fills, plus the prompt tools' keywords
# (which exist only when the prompt tools are built). Read by key, not by position.
PERSISTED = (*REUSE_TARGETS, "keywords")
# WorkingValues field -> Generate-tab widget, for the plain parameters.
_PARAMETERS = {
    "steps": "steps",
    "guidance_scale": "cfg",
    "sampler": "sampler",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "batch_size": "batch",
    "clip_skip": "clip_skip",
}


def build_ui(
    service: GenerationService,
    gallery_service: GalleryService | None = None,
    working_state: WorkingState | VisitorWorkingStates | None = None,
    prompt_service: PromptService | None = None,
    training_service: TrainingService | None = None,
    visitors: Visitors | None = None,
    visitor_secret: str | None = None,
    lora_manager: LoraManager | None = None,
    caption_service: CaptionService | None = None,
    upscale_service: UpscaleService | None = None,
) -> gr.Blocks:
    """``visitors``: keeps each visitor's gallery, drafts and datasets apart where it is private;
    ``visitor_secret`` encrypts the visitor id the browser keeps (the same secret across restarts
    keeps visitors recognised)."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nStable Diffusion with any number of LoRAs, each at its own scale.")
        page_open = _identify_visitors(demo, visitors, visitor_secret)
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate") as generate_tab:
                tools = (lambda widgets: build_prompt_tools(prompt_service, widgets)) if prompt_service else None
                generate = build_generate_tab(service, prompt_tools=tools, visitors=visitors)
            # A LoRA trained (or copied in) meanwhile is listed as soon as the user comes back. Only the
            # choices change: Reuse switches to this tab while it sets the selection itself.
            generate_tab.select(
                lambda: gr.update(choices=lora_choices(service)),
                None,
                generate["lora_select"],
                api_visibility="private",
            )
            # The hires fix's upscaler models too: a file copied into models/upscalers is offered at once.
            generate_tab.select(
                lambda: gr.update(choices=hires_upscaler_choices(service)),
                None,
                generate["hr_upscaler"],
                api_visibility="private",
            )
            grids = GridService(service.settings, service)
            with gr.Tab("X/Y/Z plot", id="grid") as grid_tab:
                build_grid_tab(grids, generate, grid_tab, visitors=visitors)
            if gallery_service is not None:
                gallery = build_gallery_tab(
                    gallery_service,
                    generate,
                    tabs,
                    lora_choices=lambda: lora_choices(service),
                    visitors=visitors,
                    generation=service,
                )
            if upscale_service is not None:
                upscale = build_upscale_tab(upscale_service, visitors=visitors)
                if gallery_service is not None:  # the Gallery tab's "Upscale" sends the selected image
                    wire_send_to_upscale(gallery_service, gallery, upscale, tabs, visitors)
            if training_service is not None:
                with gr.Tab("Train", id="train") as train_tab:
                    grid_action = epochs_grid_actions(grids, training_service, visitors)
                    build_train_tab(
                        training_service,
                        visitors=visitors,
                        run_actions=grid_action,
                        caption_service=caption_service,
                        # A model loaded in the Generate tab meanwhile changes what a run trains.
                        refresh_on=(train_tab.select, demo.load),
                    )
            if lora_manager is not None:
                build_loras_tab(lora_manager, generate, tabs, visitors=visitors)
        build_memory_panel(service)

        if working_state is not None:
            wire_working_state(demo, service, working_state, generate, visitors=visitors, after=page_open)
    return demo


def _identify_visitors(demo: gr.Blocks, visitors: Visitors | None, secret: str | None):
    """Where visitors are kept apart: when a page opens, tie its session to the id its browser keeps.

    Returns the page-open event (what needs the visitor waits for it), or None.
    """
    if visitors is None or not visitors.private:
        return None
    browser_id = gr.BrowserState(None, storage_key="lorapg-visitor", secret=secret)

    def open_page(stored, request: gr.Request):
        return visitors.open_page(request.session_hash, stored, getattr(request, "username", None))

    return demo.load(open_page, browser_id, browser_id, api_visibility="private", show_progress="hidden")


def _whole_or_none(value: object) -> int | None:
    try:
        return None if value is None or value == "" else int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _number_or_none(value: object) -> float | None:
    try:
        return None if value is None or value == "" else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def wire_working_state(
    demo: gr.Blocks,
    service: GenerationService,
    states: WorkingState | VisitorWorkingStates,
    generate: dict,
    *,
    visitors: Visitors | None = None,
    after=None,
) -> None:
    """Restore the working prompt when a page opens; write it to disk whenever it changes.

    ``states`` gives each visitor's state (one shared file where visitors are not kept apart);
    ``after``: the event that identifies the visitor, which the restore waits for.
    """
    widgets = {key: generate[key] for key in PERSISTED if key in generate}

    def save(values: dict, request: gr.Request):
        """``values``: widget -> value (the inputs are a set of widgets, read by key, never by position)."""
        value = {key: values.get(widget) for key, widget in widgets.items()}.get
        scales = value("scales") or {}
        keywords = value("keywords")  # None: the prompt tools are not built
        states.for_owner(visitor(visitors, request)).update(
            **({} if keywords is None else {"keywords": keywords or ""}),
            prompt=value("prompt") or "",
            negative_prompt=value("negative") or "",
            loras=[(name, scales.get(name, DEFAULT_LORA_SCALE)) for name in value("lora_select") or []],
            steps=_whole_or_none(value("steps")),
            guidance_scale=_number_or_none(value("cfg")),
            sampler=value("sampler") or None,
            width=_whole_or_none(value("width")),
            height=_whole_or_none(value("height")),
            seed=_whole_or_none(value("seed")),
            batch_size=_whole_or_none(value("batch")),
            clip_skip=_whole_or_none(value("clip_skip")),
        )

    def restore(request: gr.Request):
        values = states.for_owner(visitor(visitors, request)).load()
        updates: dict = {}
        if values == WorkingValues():
            # Nothing saved yet: touching no widget fires no change events (and no slider re-render)
            # that could race the user's first clicks. (An empty dict is not "no updates" to Gradio.)
            return {widget: gr.skip() for widget in widgets.values()}
        updates[generate["prompt"]] = values.prompt
        updates[generate["negative"]] = values.negative_prompt
        if "keywords" in generate:
            updates[generate["keywords"]] = values.keywords
        # A LoRA deleted or a sampler renamed since the last session cannot be selected again.
        available = {name for _, name in lora_choices(service)}
        names = [name for name in values.lora_names if name in available]
        if names:
            updates[generate["scales"]] = {name: values.lora_scales[name] for name in names}
            updates[generate["lora_select"]] = names
        for field_name, key in _PARAMETERS.items():
            value = getattr(values, field_name)
            if value is not None and (key != "sampler" or value in service.sampler_names()):
                updates[generate[key]] = value
        return updates

    outputs = list(widgets.values())  # restore returns {widget: value}: the order does not matter
    if after is None:
        demo.load(restore, None, outputs, api_visibility="private")
    else:
        after.then(restore, None, outputs, api_visibility="private")
    gr.on(
        [widget.change for widget in outputs],
        save,
        set(outputs),
        None,
        api_visibility="private",
        trigger_mode="always_last",
        show_progress="hidden",
    )
