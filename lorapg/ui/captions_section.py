"""The Train tab's "Captions" section: auto-caption the dataset, count tags, find/replace, add or
remove a tag everywhere. The captions table it refreshes is the tab's own (edited inline there):
one row per image with its thumbnail, file name and caption (``caption_table`` builds it).

Handlers only turn widget values into ``CaptionService`` calls and the results into widget values.
"""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from lorapg.captioning.base import DEFAULT_MAX_LENGTH, MAX_LENGTH_LIMIT, SENTENCE, STYLES, CaptionOptions
from lorapg.captioning.editing import END, START
from lorapg.captioning.sources import KINDS
from lorapg.hosting.visitors import Visitors
from lorapg.jobs import Job
from lorapg.services.captions import CaptionService
from lorapg.ui.common import POLL_SECONDS, user_errors, visitor

# The table's columns; only the caption is editable (TABLE_STATIC: thumbnail and file stay as they are).
TABLE_COLUMNS = ["thumbnail", "file", "caption"]
# "html", not "image": gradio 6.31's table shows an "image" cell as its URL text (no image component is
# passed to the cell); an <img> in an html cell renders, and its src is always our own data: URL.
TABLE_TYPES = ["html", "str", "str"]
TABLE_STATIC = [0, 1]


def caption_frame(rows: list[dict[str, str]]) -> pd.DataFrame:
    """Rows from ``CaptionService.table`` as the table shows them."""
    cells = [[_thumbnail_cell(row["thumbnail"], row["file"]), row["file"], row["caption"]] for row in rows]
    return pd.DataFrame(cells, columns=TABLE_COLUMNS)


def _thumbnail_cell(url: str, file: str) -> str:
    """An <img> of the thumbnail: the URL is a data: URL the service made, the file name is escaped
    (a dataset may hold any name a zip carried)."""
    if not url.startswith("data:image/"):
        return "(no preview)"
    return f'<img src="{html.escape(url)}" alt="{html.escape(file)}" class="caption-thumb" style="max-width:96px">'


def caption_table(**kwargs) -> gr.Dataframe:
    """The caption table: a thumbnail per row (a data: URL, never a path on the server), the file name,
    and the caption, edited in place."""
    return gr.Dataframe(
        headers=TABLE_COLUMNS,
        datatype=TABLE_TYPES,  # type: ignore[arg-type]
        static_columns=TABLE_STATIC,
        column_widths=["110px", "22%", "auto"],
        interactive=True,
        wrap=True,
        **kwargs,
    )


def edited_captions(table) -> dict[str, str]:
    """file -> caption from the table as edited. By column name, so a client that still sends the older
    two-column table (file, caption) saves the same way."""
    if table is None:
        return {}
    if isinstance(table, pd.DataFrame):
        if "file" not in table.columns or "caption" not in table.columns:
            raise gr.Error("Captions table: it needs its file and caption columns; reload the dataset.")
        pairs = zip(table["file"].tolist(), table["caption"].tolist(), strict=True)
    else:  # a list of rows: the last two cells are file and caption in either layout
        pairs = ((row[-2], row[-1]) for row in table if row and len(row) >= 2)
    # A cleared cell can come back as None or NaN: both mean "no caption".
    return {str(file): caption if isinstance(caption, str) else "" for file, caption in pairs if file}


def _table(service: CaptionService, name: str, owner: str | None) -> tuple[pd.DataFrame, dict[str, str]]:
    """The refreshed table and the captions it shows (the tab's gr.State that Save compares with)."""
    rows = service.table(name, owner)
    return caption_frame(rows), {row["file"]: row["caption"] for row in rows}


def _job_text(job: Job) -> str:
    if job.finished:
        if job.error:
            return f"Captioning failed: {job.error}"
        report = job.result
        lines = [f"Captioning {job.status}: {report.summary()}." if report is not None else f"Captioning {job.status}."]
        if report is not None:
            lines += [f"- skipped {file}: {reason}" for file, reason in report.skipped.items()]
        return "\n".join(lines)
    if job.status == "queued":
        return "Captioning is queued behind other GPU work…"
    return f"Captioning: {job.step} of {job.total} images ({job.message or 'loading the captioner'})."


def _changed_text(what: str, changed: list[str]) -> str:
    return f"{what}: {len(changed)} caption(s) changed." if changed else f"{what}: no caption changed."


def build_captions_section(
    service: CaptionService,
    dataset: gr.Dropdown,
    table: gr.Dataframe,
    shown: gr.State,
    visitors: Visitors | None = None,
) -> dict[str, gr.components.Component]:
    """``shown``: the tab's file -> caption State of what the table shows; refreshed with the table."""
    with gr.Accordion("Captions: auto-caption and edit in bulk", open=False, elem_id="captions-section"):
        with gr.Row():
            captioner = gr.Dropdown(
                service.captioner_choices(),
                value=KINDS[0],
                # A folder saved after the app started; the service accepts only names in models/captioners.
                allow_custom_value=True,
                label="Captioner (or a model folder's name in models/captioners)",
                elem_id="captions-captioner",
                scale=2,
            )
            style = gr.Radio(list(STYLES), value=SENTENCE, label="Style", scale=1)
            max_length = gr.Number(
                DEFAULT_MAX_LENGTH, precision=0, minimum=1, maximum=MAX_LENGTH_LIMIT, label="Max words / tags", scale=1
            )
        with gr.Row():
            caption_trigger = gr.Textbox(label="Put this trigger word first (optional)", scale=2)
            overwrite = gr.Checkbox(False, label="Overwrite existing captions", scale=1)
        with gr.Row():
            caption_button = gr.Button("Caption images", variant="primary", size="sm", elem_id="captions-run")
            cancel_button = gr.Button("Cancel captioning", variant="stop", size="sm")
        job_id = gr.Textbox(visible=False)
        status = gr.Markdown("", elem_id="captions-status")
        with gr.Row():
            find = gr.Textbox(label="Find", scale=2)
            replace = gr.Textbox(label="Replace with", scale=2)
            regex = gr.Checkbox(False, label="Regular expression", scale=1)
        replace_button = gr.Button("Replace in every caption", size="sm")
        with gr.Row():
            tag = gr.Textbox(label="Tag", scale=2)
            position = gr.Radio([START, END], value=END, label="Add at", scale=1)
        with gr.Row():
            add_button = gr.Button("Add tag everywhere", size="sm")
            remove_button = gr.Button("Remove tag everywhere", size="sm", variant="stop")
        count_button = gr.Button("Count tags", size="sm")
        counts = gr.Dataframe(headers=["tag", "count"], datatype=["str", "number"], interactive=False, label="Tags")

    @user_errors
    def run(name, choice, style_value, length, trigger_word, overwrite_flag, request: gr.Request):
        owner = visitor(visitors, request)
        options = CaptionOptions(
            style_value, trigger_word or "", int(length or DEFAULT_MAX_LENGTH), bool(overwrite_flag)
        )
        job = service.start(name, choice, options, owner)
        while not job.wait(POLL_SECONDS * 4):
            yield _job_text(job), job.id, gr.skip(), gr.skip()
        yield _job_text(job), job.id, *_table(service, name, owner)

    caption_button.click(
        run,
        [dataset, captioner, style, max_length, caption_trigger, overwrite],
        [status, job_id, table, shown],
        api_name="dataset_caption",
        concurrency_id="caption",
        concurrency_limit=1,
    )

    @user_errors
    def cancel(current_job_id, request: gr.Request):
        if not current_job_id:
            return "Nothing to cancel."
        job = service.job(current_job_id, visitor(visitors, request))
        service.jobs.cancel(job.id)
        return "Cancelling after the current batch; captions already written stay."

    cancel_button.click(cancel, job_id, status, api_name="dataset_caption_cancel")

    @user_errors
    def replace_all(name, find_text, replace_text, regex_flag, request: gr.Request):
        owner = visitor(visitors, request)
        changed = service.find_replace(name, find_text or "", replace_text or "", bool(regex_flag), owner)
        return _changed_text("Replace", changed), *_table(service, name, owner)

    replace_button.click(
        replace_all, [dataset, find, replace, regex], [status, table, shown], api_name="dataset_replace"
    )

    @user_errors
    def add(name, tag_text, where, request: gr.Request):
        owner = visitor(visitors, request)
        changed = service.add_tag(name, tag_text or "", where, owner)
        return _changed_text("Add tag", changed), *_table(service, name, owner)

    add_button.click(add, [dataset, tag, position], [status, table, shown], api_name="dataset_add_tag")

    @user_errors
    def remove(name, tag_text, request: gr.Request):
        owner = visitor(visitors, request)
        changed = service.remove_tag(name, tag_text or "", owner)
        return _changed_text("Remove tag", changed), *_table(service, name, owner)

    remove_button.click(remove, [dataset, tag], [status, table, shown], api_name="dataset_remove_tag")

    @user_errors
    def count(name, trigger_word, request: gr.Request):
        pairs = service.tag_frequency(name, trigger_word or "", owner=visitor(visitors, request))
        return pd.DataFrame(pairs, columns=["tag", "count"])

    count_button.click(count, [dataset, caption_trigger], counts, api_name="dataset_tags")
    return {"captioner": captioner, "caption_status": status, "tag_counts": counts}
