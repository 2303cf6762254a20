"""The X/Y/Z plot tab (A1111's comparison grid) and the Train tab's "epochs × scales" action.

The grid's base is the Generate tab's current settings; up to three axes each have a kind and a
list of values. Handlers only turn widget values into ``GridService`` calls (lorapg/services/grid.py):
axes are parsed, counted and checked there, as for the CLI and the REST API. What the UI adds is the
question a grid over ``max_grid_cells`` asks: the user ticks "I know this is N cells", and the service
runs it only when N is still the grid's count.
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from lorapg.diffusion.request import GenerationRequest, parse_lora_list
from lorapg.errors import UserError
from lorapg.grid.axes import axis_text
from lorapg.hosting.visitors import Visitors
from lorapg.jobs import CANCELLED, QUEUED, Job
from lorapg.services.grid import DEFAULT_EPOCH_SCALES, GridCheck, GridResult, GridService
from lorapg.services.training import TrainingService
from lorapg.ui.common import follow, job_status_text, primary_worker_group, user_errors, visitor
from lorapg.ui.generate_tab import lora_spec

AXES = ("x", "y", "z")
# Generate-tab widget -> the grid handlers' parameter name (also the gradio_client API's).
BASE_INPUTS = {
    "prompt": "prompt",
    "negative": "negative_prompt",
    "lora_select": "loras",
    "scales": "lora_scales",
    "steps": "steps",
    "cfg": "cfg_scale",
    "sampler": "sampler",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "clip_skip": "clip_skip",
    "variation_seed": "variation_seed",
    "variation_strength": "variation_strength",
}
NO_AXES = "Choose the X axis' kind and list its values to see the cell count."


def base_request(values: dict) -> GenerationRequest:
    """The Generate tab's values (keyed as in BASE_INPUTS) as one cell's request: one image per cell."""
    return GenerationRequest(
        prompt=values["prompt"],
        negative_prompt=values["negative_prompt"] or "",
        loras=parse_lora_list(lora_spec(values["loras"], values["lora_scales"])),
        steps=values["steps"],
        guidance_scale=values["cfg_scale"],
        sampler=values["sampler"],
        width=values["width"],
        height=values["height"],
        seed=values["seed"],
        batch_size=1,
        clip_skip=values["clip_skip"],
        variation_seed=values["variation_seed"],
        variation_strength=values["variation_strength"],
    )


def axes_texts(values: dict) -> tuple[str | None, str | None, str | None]:
    return tuple(axis_text(values[f"{axis}_kind"], values[f"{axis}_values"]) for axis in AXES)


def confirm_label(cells: int) -> str:
    return f"I know this is {cells} cells"


def check_text(check: GridCheck) -> str:
    grids = f", {check.grids} grids (one per Z value)" if check.grids > 1 else ", one grid"
    text = f"**{check.cells} cells** ({check.shape}){grids}."
    if check.over_limit:
        text += (
            f" That is more than max_grid_cells ({check.limit}): tick “{confirm_label(check.cells)}” to make it anyway."
        )
    return text


def over_limit_error(check: GridCheck) -> UserError:
    return UserError(
        f"The grid has {check.cells} cells ({check.shape}), more than max_grid_cells ({check.limit}): "
        f"tick “{confirm_label(check.cells)}” and press Make grid again, or use fewer axis values."
    )


def result_text(job: Job) -> str:
    result = job.result if isinstance(job.result, GridResult) else None
    if result is None:
        return f"{job.status.capitalize()} (job `{job.id}`)."
    cells = f"{result.done} of {len(result.cells)} cells"
    if job.status == CANCELLED:
        return f"Cancelled after {cells}; they are in the grid and the gallery (job `{job.id}`)."
    return f"Done: {cells}, each in the gallery with its parameters (job `{job.id}`)."


def progress_text(job: Job, grids: GridService) -> str:
    if job.status == QUEUED:
        return job_status_text(job, grids.generation.jobs)
    return f"▶️ {job.message or 'Starting'} (job `{job.id}`)."


def follow_grid(job: Job, grids: GridService, progress: gr.Progress | None = None):
    """(status text, grid images or an update) every poll, then the finished grid."""
    for current in follow(job, grids.generation.jobs, progress):
        if not current.finished:
            yield progress_text(current, grids), gr.update()
    result = job.result if isinstance(job.result, GridResult) else None
    yield result_text(job), [str(path) for path in result.grids] if result else []


def _axis_widgets(grids: GridService, kinds: list[str]) -> dict[str, gr.components.Component]:
    widgets: dict[str, gr.components.Component] = {}
    for axis in AXES:
        label = f"{axis.upper()} axis"
        with gr.Row():
            widgets[f"{axis}_kind"] = gr.Dropdown(
                kinds,
                value=None,
                label=f"{label} kind" + (" (optional)" if axis != "x" else ""),
                allow_custom_value=True,  # lora:NAME for a LoRA copied in since the list was made
                elem_id=f"grid-{axis}-kind",
                scale=1,
            )
            widgets[f"{axis}_values"] = gr.Textbox(
                label=f"{label} values",
                placeholder=grids.axis_hint(None),
                info=grids.axis_hint(None),
                elem_id=f"grid-{axis}-values",
                scale=3,
            )
    return widgets


def build_grid_tab(
    grids: GridService, generate: dict, tab: gr.Tab, visitors: Visitors | None = None
) -> dict[str, gr.components.Component]:
    """The tab's widgets and events, built inside ``tab``; ``generate``: the Generate tab's widgets,
    the grid's base settings."""
    gr.Markdown(
        "A comparison grid (A1111's X/Y/Z plot) over the **Generate tab's current settings** (prompt, "
        "LoRAs, size, steps, CFG, sampler, seed, clip skip, variation) on the loaded model, one image per "
        "cell. Each axis: a kind and its values, comma-separated. Every cell is saved to the gallery with "
        "its own parameters, so any cell can be reused; one labelled grid per Z value."
    )
    axes = _axis_widgets(grids, grids.axis_kinds())
    preview = gr.Markdown(NO_AXES, elem_id="grid-preview")
    with gr.Row():
        confirm = gr.Checkbox(False, label=confirm_label(0), visible=False, elem_id="grid-confirm")
        # The count the preview showed: a confirmation is for that count only.
        shown_cells = gr.Number(0, precision=0, visible=False)
    with gr.Row():
        run_button = gr.Button("Make grid", variant="primary", elem_id="grid-run")
        cancel_button = gr.Button("Cancel", variant="stop", elem_id="grid-cancel")
    status = gr.Markdown("", elem_id="grid-status")
    # "contain": a grid is fitted into its box, however wide (tiny cells are not blown up past it).
    images = gr.Gallery(label="Grid", format="png", columns=1, height=560, object_fit="contain", elem_id="grid-images")
    job_id = gr.Textbox(visible=False)

    base_inputs = {name: generate[key] for key, name in BASE_INPUTS.items()}

    def hint(kind):
        text = grids.axis_hint(kind)
        return gr.update(info=text, placeholder=text)

    for axis in AXES:
        axes[f"{axis}_kind"].change(
            hint, axes[f"{axis}_kind"], axes[f"{axis}_values"], api_visibility="private", show_progress="hidden"
        )

    def check(**values):
        """The preview: the cell count, a problem with the axes, or the confirmation to ask for."""
        x, y, z = axes_texts(values)
        if x is None:
            return NO_AXES, gr.update(visible=False, value=False), 0
        try:
            checked = grids.check(base_request(values), x, y, z)
        except UserError as exc:
            return f"⚠️ {exc}", gr.update(visible=False, value=False), 0
        # A new count needs a new confirmation.
        confirm_update = gr.update(visible=checked.over_limit, value=False, label=confirm_label(checked.cells))
        return check_text(checked), confirm_update, checked.cells

    gr.on(
        [widget.change for widget in axes.values()],
        check,
        inputs_kwargs={**base_inputs, **axes},
        outputs=[preview, confirm, shown_cells],
        api_name="grid_check",
        trigger_mode="always_last",
        show_progress="hidden",
    )

    @user_errors
    def make_grid(request: gr.Request, confirmed=False, cells=0, progress=gr.Progress(), **values):
        """``confirmed``: the user ticked "I know this is ``cells`` cells"."""
        base, (x, y, z) = base_request(values), axes_texts(values)
        checked = grids.check(base, x, y, z)
        if checked.over_limit and not (confirmed and cells == checked.cells):
            raise over_limit_error(checked)
        job = grids.submit(
            base, x, y, z, owner=visitor(visitors, request), confirmed_cells=checked.cells if confirmed else 0
        )
        yield progress_text(job, grids), gr.update(), job.id
        for text, pictures in follow_grid(job, grids, progress):
            yield text, pictures, job.id

    run_button.click(
        make_grid,
        inputs_kwargs={**base_inputs, **axes, "confirmed": confirm, "cells": shown_cells},
        outputs=[status, images, job_id],
        api_name="grid",
        **primary_worker_group(grids.generation.jobs),  # a grid's cells run on the first worker
    )

    @user_errors
    def cancel(current_job_id, request: gr.Request):
        if not current_job_id:
            return "Nothing to cancel."
        grids.cancel(current_job_id, visitor(visitors, request))
        return f"Cancelling job `{current_job_id}` after its current cell…"

    cancel_button.click(cancel, job_id, status, api_name="grid_cancel")

    # LoRAs trained or copied in meanwhile become lora:NAME kinds as soon as the user comes back.
    kind_boxes = [axes[f"{axis}_kind"] for axis in AXES]
    tab.select(
        lambda: [gr.update(choices=grids.axis_kinds()) for _ in kind_boxes],
        None,
        kind_boxes,
        api_visibility="private",
    )
    return {**axes, "preview": preview, "confirm": confirm, "status": status, "images": images, "job_id": job_id}


def epochs_grid_actions(
    grids: GridService, training: TrainingService, visitors: Visitors | None = None
) -> Callable[[dict], dict]:
    """The Train tab's "Epochs × scales grid" action, built beside the run's status (``run_actions``).

    Gets the tab's widgets ({"job_id": the run's id box}) and returns its own.
    """

    def build(train: dict) -> dict:
        with gr.Row():
            scales = gr.Textbox(
                ", ".join(f"{scale:g}" for scale in DEFAULT_EPOCH_SCALES),
                label="Scales (rows of the epochs × scales grid)",
                elem_id="train-grid-scales",
                scale=3,
            )
            button = gr.Button("Epochs × scales grid", size="sm", elem_id="train-grid", scale=1)
        status = gr.Markdown("", elem_id="train-grid-status")
        images = gr.Gallery(
            label="Epochs × scales",
            format="png",
            columns=1,
            height=420,
            object_fit="contain",
            elem_id="train-grid-images",
        )

        @user_errors
        def make(current_job_id, scale_text, request: gr.Request, progress=gr.Progress()):
            """The finished run's per-epoch LoRAs and its final one × the scales, on its sample prompt."""
            owner = visitor(visitors, request)
            run = training.run(current_job_id, owner) if current_job_id else training.latest_run(owner)
            if run is None:
                raise UserError("No training run yet: train a LoRA with two or more epochs first.")
            job = grids.submit_epochs(run, scale_text or DEFAULT_EPOCH_SCALES, owner=owner)
            yield from follow_grid(job, grids, progress)

        button.click(
            make,
            [train["job_id"], scales],
            [status, images],
            api_name="train_epochs_grid",
            **primary_worker_group(grids.generation.jobs),
        )
        return {"grid_scales": scales, "grid_status": status, "grid_images": images}

    return build
