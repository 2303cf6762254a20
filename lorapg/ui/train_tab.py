"""The Train tab: dataset (upload, grid, captions, validation) → preset and fields → run with live progress;
the Runs section: the history and queue, queue a run, remove or cancel one, train again, compare runs.

Handlers only turn widget values into service calls; the config the fields produce is the same
TOML file ``python -m lorapg train`` runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from lorapg.diffusion.families import is_transformer_family
from lorapg.hosting.visitors import Visitors
from lorapg.services.captions import CaptionService
from lorapg.services.training import RunCurves, TrainingRun, TrainingService
from lorapg.training.config import CHOICES, LR_SCHEDULERS, TrainConfig, to_toml
from lorapg.training.estimate import format_duration
from lorapg.training.run_store import STATUSES, RunRecord
from lorapg.ui.captions_section import build_captions_section, caption_frame, caption_table, edited_captions
from lorapg.ui.common import POLL_SECONDS, user_errors, visitor
from lorapg.ui.crops_section import build_crops_section
from lorapg.ui.texts import training_run_text

# TrainConfig.quantize's choices as (label, value): "" is the app's --quantize setting.
QUANTIZE_CHOICES = [("the app's setting" if value == "" else value, value) for value in CHOICES["quantize"]]


def _created(component: gr.components.Component) -> int:
    """The order Gradio gives a set of outputs (by creation)."""
    return component._id


def quantize_update(service: TrainingService, value: str | None = None, config: TrainConfig | None = None) -> dict:
    """The quantize dropdown for the base a run trains now (the model may have changed since the page
    was built): shown for Flux.1 / SD 3.5 with ``value`` (None: kept). Hidden, it is reset to "" (the
    app's setting): a value picked for Flux would otherwise be sent, unseen, for an SD base and refused."""
    if not is_transformer_family(service.model_family(config)):
        return gr.update(visible=False, value="")
    return gr.update(visible=True) if value is None else gr.update(visible=True, value=value)


# Editable fields: TrainConfig field -> (widget factory, label).
FIELDS = (
    "rank",
    "alpha",
    "unet_lr",
    "text_encoder_lr",
    "train_text_encoder",
    "epochs",
    "repeats",
    "resolution",
    "batch_size",
    "max_steps",
    "min_snr_gamma",
    "noise_offset",
    "lr_scheduler",
    "seed",
    "face_crop",  # its checkbox lives in the crop preview (lorapg/ui/crops_section.py)
    # Tag captions (kohya's shuffle_caption, keep_tokens, caption_dropout_rate); applied per step by
    # lorapg/training/caption_variation.py.
    "shuffle_tags",
    "keep_tokens",
    "caption_dropout",
)


# Browser notifications for runs started from this tab: the Start click asks for permission (browsers
# want a user gesture), and the end of the start handler, which returns when its run ends (done,
# failed or cancelled), shows one. Runs started elsewhere (API, CLI, another tab) notify through
# --notify-webhook instead: this tab only knows its own run. Denied or unsupported: nothing happens.
ASK_NOTIFICATION_JS = """() => {
  try {
    if ("Notification" in window && Notification.permission === "default") Notification.requestPermission();
  } catch (e) {}
}"""
NOTIFY_JS = """(jobId, statusText) => {
  try {
    if (!jobId || !("Notification" in window) || Notification.permission !== "granted") return;
    const line = String(statusText || "").split("\\n").find((l) => l.trim()) || "Training ended.";
    new Notification("LoRA Playground: training ended", {
      body: line.replace(/[*_`#]/g, "").slice(0, 200),
      tag: "lorapg-train-" + jobId,
    });
  } catch (e) {}
}"""


def _loss_frame(run: TrainingRun | None) -> pd.DataFrame:
    points = list(run.losses) if run else []
    return pd.DataFrame(points, columns=["step", "loss"])


def _samples(run: TrainingRun | None) -> list:
    return [(image, label) for label, image in (run.samples if run else [])]


RUN_COLUMNS = ["id", "name", "status", "dataset", "queued", "duration", "steps", "final loss", "LoRA", "error"]


def _runs_frame(records: list[RunRecord]) -> pd.DataFrame:
    """The runs table: one row per run, queue order, as people read it."""
    rows = [
        (
            record.id,
            record.name,
            record.status,
            Path(str(record.config.get("images", ""))).name,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)),
            format_duration(record.duration_s) if record.duration_s is not None else "",
            f"{record.steps}/{record.total_steps}" if record.total_steps else "",
            f"{record.final_loss:.4f}" if record.final_loss is not None else "",
            Path(record.lora_path).name if record.lora_path else "",
            record.error or "",
        )
        for record in records
    ]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def _compare_frame(curves: list[RunCurves]) -> pd.DataFrame:
    """Every run's loss points in one frame; the ``run`` column colours the overlaid curves."""
    rows = [(step, loss, f"{curve.name} ({curve.id})") for curve in curves for step, loss in curve.losses]
    return pd.DataFrame(rows, columns=["step", "loss", "run"])


def _compare_samples(curves: list[RunCurves]) -> list[tuple[Image.Image, str]]:
    """Samples epoch by epoch, one column per run: the grid reads across for the same epoch.

    Images, not paths: the kept samples live under the models folder, which Gradio does not serve."""
    epochs = max((len(curve.samples) for curve in curves), default=0)
    cells = []
    for i in range(epochs):
        for curve in curves:
            if i < len(curve.samples) and Path(curve.samples[i][1]).is_file():
                label, path = curve.samples[i]
                with Image.open(path) as image:
                    cells.append((image.copy(), f"{curve.name} · {label}"))
    return cells


def _run_ids(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").replace(" ", ",").split(",") if part.strip()]


def _dataset_view(captions: CaptionService, name: str, owner: str | None = None):
    """(grid, caption table, validation summary, the captions the table shows): the last is kept in a
    gr.State so Save writes only the cells the user changed."""
    view = captions.view(name, owner)
    return view.images, caption_frame(view.table), view.summary, view.captions


def build_train_tab(
    service: TrainingService,
    visitors: Visitors | None = None,
    run_actions: Callable[[dict], dict] | None = None,
    caption_service: CaptionService | None = None,
    refresh_on: Sequence = (),
) -> dict[str, gr.components.Component]:
    """``visitors``: whose datasets and runs each request sees (a public app keeps visitors apart).
    ``run_actions`` builds actions on a finished run under its status (the epochs × scales grid): it
    gets {"job_id": the run's id box} and returns its widgets, which join the returned dict.
    ``caption_service``: adds the Captions section (auto-caption, tag counts, find/replace); without one
    the caption table is still shown and saved through a CaptionService (no captioning jobs).
    ``refresh_on``: events (the tab's select, the page's load) after which what depends on the model
    a run trains is shown again for the model chosen now (the quantize dropdown)."""
    defaults = TrainConfig()
    # One save path for the caption table, with or without the Captions section.
    captions_service = caption_service or CaptionService(service.settings, service.dataset_store)
    # Where visitors are kept apart, the shared datasets are the owner's: a visitor starts with none.
    private = visitors is not None and visitors.private
    presets = service.preset_names()
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown(
                f"### 1. Dataset\nUpload 1–{service.settings.max_dataset_images} images (PNG, JPEG, WebP) "
                "or a zip; `.txt` files with the same name as an image are imported as its caption."
            )
            with gr.Row():
                dataset = gr.Dropdown(
                    [] if private else service.dataset_names(),
                    label="Dataset name",
                    allow_custom_value=True,
                    value=None,
                    elem_id="train-dataset",
                    scale=3,
                )
                load_button = gr.Button("Open", size="sm", scale=1)
            uploads = gr.File(
                label="Images or zip",
                file_count="multiple",
                elem_id="train-upload",
                file_types=["image", ".zip", ".txt"],
            )
            add_button = gr.Button("Add to dataset")
            grid = gr.Gallery(label="Images (select one to remove it)", columns=6, height=260, elem_id="train-grid")
            selected = gr.State(None)
            with gr.Row():
                remove_button = gr.Button("Remove selected image", size="sm", variant="stop")
                # Near duplicates are listed in the validation report and trained on unless removed here.
                remove_near_button = gr.Button(
                    "Remove near duplicates", size="sm", variant="stop", elem_id="train-remove-near"
                )
            captions = caption_table(
                label="Captions (click a caption to edit it, then Save captions)", elem_id="train-captions"
            )
            # file -> caption as the table showed them when loaded: Save writes only what the user changed.
            loaded_captions = gr.State({})
            save_captions_button = gr.Button("Save captions", size="sm")
            caption_widgets = (
                build_captions_section(caption_service, dataset, captions, loaded_captions, visitors)
                if caption_service
                else {}
            )
            report = gr.Markdown("", elem_id="train-validation")
            crops = build_crops_section(service, dataset, visitors)
        with gr.Column(scale=2):
            gr.Markdown("### 2. Settings")
            name = gr.Textbox(label="LoRA name", elem_id="train-name")
            trigger = gr.Textbox(label="Trigger word (required)", placeholder="e.g. zqx_fox", elem_id="train-trigger")
            preset = gr.Dropdown(presets, value=presets[0] if presets else None, label="Preset")
            preset_note = gr.Markdown(service.preset_description(presets[0]) if presets else "")
            regularization = gr.Dropdown(
                [],
                value=None,
                allow_custom_value=True,
                elem_id="train-regularization",
                label="Regularization images (optional dataset: ordinary images of the class, captions kept "
                "as written, so prompts without the trigger keep their meaning)",
            )
            with gr.Accordion("Fields (from the preset; edit any)", open=False):
                widgets = {
                    "rank": gr.Number(defaults.rank, precision=0, label="Rank"),
                    "alpha": gr.Number(defaults.alpha, label="Alpha"),
                    "unet_lr": gr.Number(defaults.unet_lr, label="UNet learning rate"),
                    "text_encoder_lr": gr.Number(defaults.text_encoder_lr, label="Text encoder learning rate"),
                    "train_text_encoder": gr.Checkbox(defaults.train_text_encoder, label="Train the text encoder"),
                    "epochs": gr.Number(defaults.epochs, precision=0, label="Epochs"),
                    "repeats": gr.Number(defaults.repeats, precision=0, label="Repeats per epoch"),
                    "resolution": gr.Number(defaults.resolution, precision=0, label="Resolution (0 = native)"),
                    "batch_size": gr.Number(defaults.batch_size, precision=0, label="Batch size"),
                    "max_steps": gr.Number(defaults.max_steps, precision=0, label="Max steps (0 = all epochs)"),
                    "min_snr_gamma": gr.Number(defaults.min_snr_gamma, label="Min-SNR γ (0 = off)"),
                    "noise_offset": gr.Number(defaults.noise_offset, label="Noise offset"),
                    "lr_scheduler": gr.Dropdown(list(LR_SCHEDULERS), value=defaults.lr_scheduler, label="LR schedule"),
                    "seed": gr.Number(defaults.seed, precision=0, label="Seed"),
                    # Out-of-range values are refused by the config check, naming the field.
                    "shuffle_tags": gr.Checkbox(
                        defaults.shuffle_tags, label="Shuffle tags (comma-separated captions, every step)"
                    ),
                    "keep_tokens": gr.Number(
                        defaults.keep_tokens, precision=0, label="Keep first N tags (not shuffled; 1 = the trigger)"
                    ),
                    "caption_dropout": gr.Number(
                        defaults.caption_dropout, label="Caption dropout (chance of an empty caption, 0–1)"
                    ),
                }
                # Flux.1 / SD 3.5 only (TrainConfig.quantize): the frozen base in NF4 (QLoRA); fp8 is for
                # generation only. "" = the app's --quantize setting.
                quantize = gr.Dropdown(
                    QUANTIZE_CHOICES,
                    value=defaults.quantize,
                    label="Quantize the frozen base (Flux.1 / SD 3.5)",
                    visible=is_transformer_family(service.model_family()),
                    # Checked by the config (TrainConfig's choices), whose message names the field and
                    # says fp8 is not for training; Gradio's own check would name neither.
                    allow_custom_value=True,
                    elem_id="train-quantize",
                )
                overwrite = gr.Checkbox(False, label="Overwrite a LoRA of the same name")
            with gr.Row():
                start_button = gr.Button("Start training", variant="primary", elem_id="train-start")
                queue_button = gr.Button("Add to queue", elem_id="train-queue")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
            with gr.Row():
                estimate = gr.Markdown("", elem_id="train-estimate")
                estimate_button = gr.Button("Estimate duration", size="sm", scale=0)
            status = gr.Markdown("", elem_id="train-status")
            job_id = gr.Textbox(visible=False)
            actions = run_actions({"job_id": job_id}) if run_actions is not None else {}
            loss_plot = gr.LinePlot(_loss_frame(None), x="step", y="loss", title="Loss", height=220)
            samples = gr.Gallery(label="Samples (one per epoch)", columns=4, height=200, elem_id="train-samples")
            with gr.Accordion("Config file (runs headless: python -m lorapg train FILE)", open=False):
                config_text = gr.Code(language=None, label="config.toml", interactive=False)
    with gr.Accordion("3. Runs: history, queue, compare", open=False, elem_id="train-runs-section"):
        with gr.Row():
            runs_filter = gr.Dropdown(["all", *STATUSES], value="all", label="Show", scale=1)
            runs_refresh = gr.Button("Refresh runs", size="sm", scale=0)
        runs_table = gr.Dataframe(
            _runs_frame([]),
            headers=RUN_COLUMNS,
            interactive=False,
            label="Runs, in queue order (select rows to pick their ids)",
            elem_id="train-runs",
        )
        with gr.Row():
            run_ids = gr.Textbox(label="Run ids (comma-separated)", elem_id="train-run-ids", scale=3)
            remove_run_button = gr.Button("Remove (queued or finished)", size="sm", variant="stop", scale=1)
            cancel_run_button = gr.Button("Cancel run", size="sm", variant="stop", scale=1)
            again_button = gr.Button("Train again with changes", size="sm", scale=1, elem_id="train-again")
            compare_button = gr.Button("Compare", size="sm", scale=1, elem_id="train-compare")
        runs_note = gr.Markdown("", elem_id="train-runs-note")
        compare_plot = gr.LinePlot(
            _compare_frame([]), x="step", y="loss", color="run", title="Loss, runs overlaid", height=260
        )
        compare_samples = gr.Gallery(
            label="Samples: one column per run, one row per epoch",
            columns=2,
            height=260,
            elem_id="train-compare-samples",
        )

    widgets["face_crop"] = crops.face_crop
    crops.connect(widgets["resolution"], preset)  # the preview follows the run's resolution and bucketing

    # --- dataset events ------------------------------------------------------------------------
    @user_errors
    def add_files(dataset_name, files, request: gr.Request):
        owner = visitor(visitors, request)
        _, notes = service.dataset_add(dataset_name, [getattr(f, "name", f) for f in files or []], owner)
        grid_items, table, summary, shown = _dataset_view(captions_service, dataset_name, owner)
        note = "".join(f"\n- {n}" for n in notes)
        return (
            grid_items,
            table,
            summary + note,
            gr.update(choices=service.dataset_names(owner), value=dataset_name),
            None,
            shown,
        )

    add_button.click(
        add_files,
        inputs_kwargs={"dataset_name": dataset, "files": uploads},
        outputs=[grid, captions, report, dataset, uploads, loaded_captions],
        api_name="dataset_add",
    )

    @user_errors
    def open_dataset(dataset_name, request: gr.Request):
        return _dataset_view(captions_service, dataset_name, visitor(visitors, request))

    load_button.click(open_dataset, dataset, [grid, captions, report, loaded_captions], api_visibility="private")

    @user_errors
    def validate(dataset_name, request: gr.Request):
        return service.dataset_validate(dataset_name, visitor(visitors, request)).summary()

    # The API name issue 5 promises; the button-less event keeps it callable headless.
    validate_trigger = gr.Button("Validate", size="sm")
    validate_trigger.click(validate, dataset, report, api_name="dataset_validate")

    def pick(grid_items, event: gr.SelectData):
        return event.value.get("caption") if isinstance(event.value, dict) else None

    grid.select(pick, grid, selected, api_visibility="private")

    @user_errors
    def remove(dataset_name, file, request: gr.Request):
        if not file:
            raise gr.Error("Select an image in the grid first.")
        owner = visitor(visitors, request)
        service.dataset_remove(dataset_name, file, owner)
        return (*_dataset_view(captions_service, dataset_name, owner), None)

    remove_button.click(
        remove,
        inputs_kwargs={"dataset_name": dataset, "file": selected},
        outputs=[grid, captions, report, loaded_captions, selected],
        api_name="dataset_remove",
    )

    @user_errors
    def remove_near_duplicates(dataset_name, request: gr.Request):
        owner = visitor(visitors, request)
        removed = service.dataset_remove_near_duplicates(dataset_name, owner)
        grid_items, table, summary, shown = _dataset_view(captions_service, dataset_name, owner)
        note = (
            f"\nRemoved {len(removed)} near duplicate(s): {', '.join(removed)}."
            if removed
            else "\nNo near duplicates to remove."
        )
        return grid_items, table, summary + note, shown

    remove_near_button.click(
        remove_near_duplicates,
        dataset,
        [grid, captions, report, loaded_captions],
        api_name="dataset_remove_near_duplicates",
    )

    @user_errors
    def save_captions(dataset_name, table, shown, request: gr.Request):
        owner = visitor(visitors, request)
        # Every caption checked (length) before any is written; only the cells changed since the
        # table was loaded are written, so an edit made meanwhile elsewhere is not reverted.
        saved = captions_service.save_captions(dataset_name, edited_captions(table), shown, owner)
        grid_items, frame, summary, now_shown = _dataset_view(captions_service, dataset_name, owner)
        return grid_items, frame, f"{saved.note()}\n\n{summary}", now_shown

    save_captions_button.click(
        save_captions,
        inputs_kwargs={"dataset_name": dataset, "table": captions, "shown": loaded_captions},
        outputs=[grid, captions, report, loaded_captions],
        api_name="dataset_captions",
    )

    # --- settings events -----------------------------------------------------------------------
    @user_errors
    def apply_preset(preset_name):
        config = service.config_for({"preset": preset_name})
        return {
            preset_note: service.preset_description(preset_name),
            **{widgets[key]: getattr(config, key) for key in FIELDS},
            # The model may have changed since the tab was built: shown for Flux.1 / SD 3.5 only.
            quantize: quantize_update(service),
        }

    # ``input``, not ``change``: "Train again" sets the preset and the fields together, and a change
    # event would then overwrite the copied fields with the preset's.
    preset.input(apply_preset, preset, {preset_note, quantize, *widgets.values()}, api_visibility="private")
    if refresh_on:
        gr.on(
            list(refresh_on),
            lambda: quantize_update(service),
            None,
            quantize,
            api_visibility="private",
            show_progress="hidden",
        )

    def refresh_regularization(request: gr.Request):
        return gr.update(choices=service.dataset_names(visitor(visitors, request)))

    regularization.focus(refresh_regularization, None, regularization, api_visibility="private")

    def config_values(
        owner,
        dataset_name,
        lora_name,
        trigger_word,
        preset_name,
        overwrite_flag,
        regularization_name,
        field_values: dict,
    ) -> dict:
        fields = {key: field_values.get(key) for key in (*FIELDS, "quantize")}
        fields = {key: value for key, value in fields.items() if value is not None and value != ""}
        images = str(service.dataset_folder(dataset_name, owner)) if dataset_name else ""
        prior = str(service.dataset_folder(regularization_name, owner)) if regularization_name else ""
        return dict(
            fields,
            name=lora_name or "",
            trigger=trigger_word or "",
            preset=preset_name or "",
            images=images,
            regularization_images=prior,
            overwrite=bool(overwrite_flag),
        )

    # --- run events ----------------------------------------------------------------------------
    @user_errors
    def start(
        request: gr.Request,
        dataset_name,
        lora_name,
        trigger_word,
        preset_name,
        overwrite_flag,
        regularization_name=None,
        **field_values,
    ):
        """Keyword inputs: the API names every config field as TrainConfig does (rank=…, epochs=…)."""
        owner = visitor(visitors, request)
        config = service.config_for(
            config_values(
                owner,
                dataset_name,
                lora_name,
                trigger_word,
                preset_name,
                overwrite_flag,
                regularization_name,
                field_values,
            )
        )
        run = service.submit(config, owner=owner)
        toml = to_toml(run.config) + f"# saved as {run.config_path}\n"
        while not run.job.wait(POLL_SECONDS * 4):
            yield training_run_text(run), _loss_frame(run), _samples(run), run.job.id, toml
        yield training_run_text(run), _loss_frame(run), _samples(run), run.job.id, toml

    # Keyed by the handler's parameter names; the dict's order is the API's positional order.
    start_inputs = {
        "dataset_name": dataset,
        "lora_name": name,
        "trigger_word": trigger,
        "preset_name": preset,
        "overwrite_flag": overwrite,
        **{key: widgets[key] for key in FIELDS},
        "regularization_name": regularization,
    }
    # Inputs added later go last, after every event's own extra inputs, so positional API callers keep working.
    added_inputs = {"quantize": quantize}
    start_button.click(None, js=ASK_NOTIFICATION_JS, queue=False, api_visibility="private")
    started = start_button.click(
        start,
        inputs_kwargs={**start_inputs, **added_inputs},
        outputs=[status, loss_plot, samples, job_id, config_text],
        api_name="train_start",
        concurrency_id="train",
        concurrency_limit=1,
    )
    # Only after a run was accepted: a refused start (an error shown in the tab) notifies nothing.
    started.success(None, [job_id, status], None, js=NOTIFY_JS, queue=False, api_visibility="private")

    @user_errors
    def current_status(current_job_id, request: gr.Request):
        owner = visitor(visitors, request)
        run = service.run(current_job_id, owner) if current_job_id else service.latest_run(owner)
        if run is None:
            return "No training run yet.", _loss_frame(None), []
        return training_run_text(run), _loss_frame(run), _samples(run)

    status_button = gr.Button("Refresh status", size="sm")
    status_button.click(current_status, job_id, [status, loss_plot, samples], api_name="train_status")

    @user_errors
    def cancel(current_job_id, request: gr.Request):
        if not current_job_id:
            return "Nothing to cancel."
        service.cancel(current_job_id, visitor(visitors, request))
        return "Cancelling after the current step; the checkpoint is kept."

    cancel_button.click(cancel, job_id, status, api_name="train_cancel")

    # --- queue, history, comparison --------------------------------------------------------------
    def form_config(request, *form_values, field_values: dict):
        """The config the form describes, and whose it is (the start handler's inputs, in its order)."""
        owner = visitor(visitors, request)
        return service.config_for(config_values(owner, *form_values, field_values)), owner

    def runs_view(status_filter, owner):
        return _runs_frame(service.history_runs(None if status_filter in (None, "", "all") else status_filter, owner))

    @user_errors
    def queue_run(
        request: gr.Request,
        dataset_name,
        lora_name,
        trigger_word,
        preset_name,
        overwrite_flag,
        regularization_name=None,
        status_filter="all",
        **field_values,
    ):
        """Queue a run and return at once; it starts when the runs queued before it have ended."""
        form = (dataset_name, lora_name, trigger_word, preset_name, overwrite_flag, regularization_name)
        config, owner = form_config(request, *form, field_values=field_values)
        run = service.submit(config, owner=owner)
        ahead = service.jobs.position(run.job)
        note = f"Queued **{run.config.name}** (run `{run.job.id}`), {ahead} job(s) ahead of it."
        return note, service.estimate(run.config).text(), runs_view(status_filter, owner)

    queue_button.click(
        queue_run,
        inputs_kwargs={**start_inputs, "status_filter": runs_filter, **added_inputs},
        outputs=[runs_note, estimate, runs_table],
        api_name="train_queue",
    )

    @user_errors
    def estimate_run(
        request: gr.Request,
        dataset_name,
        lora_name,
        trigger_word,
        preset_name,
        overwrite_flag,
        regularization_name=None,
        **field_values,
    ):
        form = (dataset_name, lora_name, trigger_word, preset_name, overwrite_flag, regularization_name)
        config, _ = form_config(request, *form, field_values=field_values)
        return service.estimate(config).text()

    estimate_button.click(
        estimate_run, inputs_kwargs={**start_inputs, **added_inputs}, outputs=estimate, api_name="train_estimate"
    )

    def estimate_on_start(request: gr.Request, **form_values):
        """The estimate beside a starting run; a form the start refuses shows the start's error alone."""
        try:
            return estimate_run(request, **form_values)
        except gr.Error:
            return ""

    start_button.click(
        estimate_on_start,
        inputs_kwargs={**start_inputs, **added_inputs},
        outputs=estimate,
        queue=False,
        api_visibility="private",
    )

    @user_errors
    def list_runs(status_filter, request: gr.Request):
        return runs_view(status_filter, visitor(visitors, request))

    runs_refresh.click(list_runs, runs_filter, runs_table, api_name="train_runs")
    runs_filter.change(list_runs, runs_filter, runs_table, api_visibility="private")

    def pick_run(current, table, event: gr.SelectData):
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        picked = str(table.iloc[row]["id"]) if hasattr(table, "iloc") else ""
        ids = _run_ids(current)
        return ", ".join(ids if not picked or picked in ids else [*ids, picked])

    runs_table.select(pick_run, [run_ids, runs_table], run_ids, api_visibility="private")

    @user_errors
    def remove_runs(ids_text, status_filter, request: gr.Request):
        owner = visitor(visitors, request)
        ids = _run_ids(ids_text)
        if not ids:
            raise gr.Error("Run ids: pick a run in the table (or type its id) first.")
        removed = [service.remove(run_id, owner).name for run_id in ids]
        return f"Removed {', '.join(removed)}.", runs_view(status_filter, owner), ""

    remove_run_button.click(
        remove_runs, [run_ids, runs_filter], [runs_note, runs_table, run_ids], api_name="train_remove"
    )

    @user_errors
    def cancel_runs(ids_text, status_filter, request: gr.Request):
        owner = visitor(visitors, request)
        ids = _run_ids(ids_text)
        if not ids:
            raise gr.Error("Run ids: pick a run in the table (or type its id) first.")
        cancelled = [service.cancel(run_id, owner).config.name for run_id in ids]
        return f"Cancelling {', '.join(cancelled)}.", runs_view(status_filter, owner)

    cancel_run_button.click(cancel_runs, [run_ids, runs_filter], [runs_note, runs_table], api_name="train_cancel_run")

    @user_errors
    def train_again(ids_text, request: gr.Request):
        owner = visitor(visitors, request)
        ids = _run_ids(ids_text)
        if not ids:
            raise gr.Error("Run ids: pick the run to train again in the table first.")
        config = service.config_of(ids[0], owner)
        return {
            dataset: service.dataset_name_of(config, owner),
            name: config.name,
            trigger: config.trigger,
            preset: config.preset or None,
            overwrite: False,
            **{widgets[key]: getattr(config, key) for key in FIELDS},
            runs_note: f"The settings of run `{ids[0]}` are in the form as **{config.name}**: change them, "
            "then Start training or Add to queue.",
            quantize: quantize_update(service, config.quantize, config),
        }

    # Gradio orders a set of outputs by creation (_id): that order is the API's positions, kept as it
    # was; quantize, added later, goes last so positional callers keep working.
    again_outputs = sorted({dataset, name, trigger, preset, overwrite, *widgets.values(), runs_note}, key=_created)
    again_button.click(train_again, [run_ids], [*again_outputs, quantize], api_name="train_again")

    @user_errors
    def compare(ids_text, request: gr.Request):
        curves = service.compare(_run_ids(ids_text), visitor(visitors, request))
        return _compare_frame(curves), gr.update(value=_compare_samples(curves), columns=len(curves))

    compare_button.click(compare, run_ids, [compare_plot, compare_samples], api_name="train_compare")

    return {
        "dataset": dataset,
        "name": name,
        "trigger": trigger,
        "preset": preset,
        "status": status,
        "job_id": job_id,
        "regularization": regularization,
        "runs_table": runs_table,
        "run_ids": run_ids,
        "estimate": estimate,
        "quantize": quantize,
        **widgets,
        **actions,
        **caption_widgets,
    }
