"""The LoRAs tab: every LoRA with its preview, details and metadata; rename, trash and restore, test,
and "use in Generate". Every action calls ``LoraManager``; this module only lays out what it returns."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from lorapg.hosting.visitors import Visitors
from lorapg.jobs import DONE
from lorapg.services.lora_manager import LoraManager
from lorapg.ui.common import follow, job_status_text, user_errors, visitor

COLUMNS = ["Name", "Family", "Format", "Trigger words", "Size", "Hash", "Epoch files"]
TAG_COLUMNS = ["Tag", "Count"]
CHART_TAGS = 20  # the chart's bars; the table below it lists every tag
TEST_STEPS = None  # the app's default steps: a test shows the LoRA as a normal generation would


def build_loras_tab(
    manager: LoraManager, generate: dict[str, gr.components.Component], tabs: gr.Tabs, visitors: Visitors | None = None
) -> dict[str, gr.components.Component]:
    """Add the LoRAs tab (call inside ``tabs``' ``with`` block); ``generate``: the Generate tab's widgets."""
    with gr.Tab("LoRAs", id="loras") as tab:
        with gr.Row():
            refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="loras-refresh")
            summary = gr.Markdown(elem_id="loras-summary")
        table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, elem_id="loras-table")
        previews = gr.Gallery(
            label="Previews", columns=8, height=180, object_fit="contain", allow_preview=False, elem_id="loras-previews"
        )
        with gr.Row():
            with gr.Column(scale=1):
                selected = gr.Dropdown(label="LoRA", choices=[], elem_id="loras-selected")
                preview = gr.Image(label="Preview", type="filepath", height=256, interactive=False)
                with gr.Row():
                    use = gr.Button("Use in Generate", variant="primary", elem_id="loras-use")
                    test = gr.Button("Test (generate a sample)", elem_id="loras-test")
                test_image = gr.Image(
                    label="Test image (also saved to the Gallery)",
                    type="pil",
                    interactive=False,
                    elem_id="loras-test-image",
                )
                keep = gr.Button("Use the test image as its preview", size="sm", elem_id="loras-keep-preview")
            with gr.Column(scale=2):
                details = gr.Markdown(elem_id="loras-details")
                chart = gr.BarPlot(
                    x="tag", y="count", sort="-y", label="Tag frequency", height=240, elem_id="loras-tag-chart"
                )
                tags = gr.Dataframe(headers=TAG_COLUMNS, label="Tag frequency (training captions)", interactive=False)
                metadata = gr.JSON(label="Metadata", open=False)
        with gr.Row():
            new_name = gr.Textbox(label="New name", placeholder="folder/name (without .safetensors)", scale=3)
            rename = gr.Button("Rename", scale=1, elem_id="loras-rename")
            delete = gr.Button("Delete (to trash)", variant="stop", scale=1, elem_id="loras-delete")
        with gr.Row():
            trash = gr.Dropdown(label="Trash", choices=[], scale=3, elem_id="loras-trash")
            restore = gr.Button("Restore", scale=1, elem_id="loras-restore")
        status = gr.Markdown(elem_id="loras-status")

    listing_outputs = [summary, table, previews, selected, trash]

    def listing(keep: str | None = None) -> dict:
        found = manager.list()
        loras = found["loras"]
        # Per-epoch files can be chosen too: to see, test or use one like any LoRA.
        names = [name for lora in loras for name in (lora["name"], *(e["name"] for e in lora["epochs"]))]
        entries = manager.trash()
        problems = "".join(f"\n\n⚠️ {problem}" for problem in found["problems"])
        return {
            summary: f"{len(loras)} LoRA(s) in `{manager.folder}`.{problems}",
            table: [_row(lora) for lora in loras],
            previews: [(lora["preview"], lora["name"]) for lora in loras if lora["preview"]],
            selected: gr.update(choices=names, value=keep if keep in names else None),
            trash: gr.update(
                choices=[(f"{e['name']} ({e['id']})", e["id"]) for e in entries],
                value=entries[0]["id"] if entries else None,
            ),
        }

    @user_errors
    def show(name: str | None):
        if not name:
            return None, "Choose a LoRA to see its details.", [], None, "", None
        info = manager.info(name)
        counts = [[t["tag"], t["count"]] for t in info["groups"]["tag_frequency"]]
        top = pd.DataFrame(counts[:CHART_TAGS], columns=["tag", "count"])
        # Bars start at 0: from the smallest count they would exaggerate the differences.
        chart_update = gr.update(value=top, y_lim=[0, max([c for _, c in counts], default=1)])
        return info["preview"], details_text(info), counts, info["metadata"], info["name"], chart_update

    @user_errors
    def do_rename(name: str | None, target: str):
        renamed = manager.rename(_chosen(name), target)
        return {**listing(keep=renamed["name"]), status: f"Renamed `{name}` to `{renamed['name']}`."}

    @user_errors
    def do_delete(name: str | None):
        entry = manager.delete(_chosen(name))
        return {**listing(), status: f"Moved `{entry['name']}` to the trash; Restore brings it back."}

    @user_errors
    def do_restore(entry_id: str | None):
        if not entry_id:
            raise gr.Error("Trash: choose a deleted LoRA to restore.", print_exception=False)
        restored = manager.restore(entry_id)
        return {**listing(keep=restored["name"]), status: f"Restored `{restored['name']}`."}

    @user_errors
    def do_test(name: str | None, request: gr.Request):
        job = manager.test(_chosen(name), steps=TEST_STEPS, owner=visitor(visitors, request))
        for state in follow(job, manager.generation.jobs):
            yield job_status_text(state, manager.generation.jobs), None
        result = job.result
        if job.status != DONE or result is None or not result.images:
            yield f"Test of `{name}` ended: {job.status}.", None
            return
        words = result.request.prompt
        yield f"Test of `{name}` at 1.0 with “{words}”, seed {result.seeds[0]}; saved to the Gallery.", result.images[0]

    @user_errors
    def keep_preview(name: str | None, image):
        path = manager.set_preview(_chosen(name), image)
        return {**listing(keep=name), preview: str(path), status: f"Saved the test image as the preview of `{name}`."}

    @user_errors
    def use_in_generate(name: str | None, current: list[str] | None):
        name = _chosen(name)
        names = [*(current or []), *([] if name in (current or []) else [name])]
        from lorapg.ui.generate_tab import lora_choices

        return gr.update(choices=lora_choices(manager.generation), value=names), gr.Tabs(selected="generate")

    def pick_row(evt: gr.SelectData, rows):
        """A click on the table selects that row's LoRA."""
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        return rows.iloc[row, 0] if hasattr(rows, "iloc") else rows[row][0]

    tab.select(listing, None, listing_outputs, api_visibility="private")
    refresh.click(listing, None, listing_outputs, api_visibility="private")
    table.select(pick_row, table, selected, api_visibility="private")
    selected.change(show, selected, [preview, details, tags, metadata, new_name, chart], api_visibility="private")
    rename.click(do_rename, [selected, new_name], [*listing_outputs, status], api_name="lora_rename")
    delete.click(do_delete, selected, [*listing_outputs, status], api_name="lora_delete")
    restore.click(do_restore, trash, [*listing_outputs, status], api_name="lora_restore")
    test.click(do_test, selected, [status, test_image], api_name="lora_test")
    keep.click(keep_preview, [selected, test_image], [*listing_outputs, preview, status], api_visibility="private")
    use.click(
        use_in_generate, [selected, generate["lora_select"]], [generate["lora_select"], tabs], api_visibility="private"
    )
    return {"tab": tab, "selected": selected, "table": table, "status": status, "trash": trash}


def _chosen(name: str | None) -> str:
    if not name:
        raise gr.Error("LoRA: choose one in the list first.", print_exception=False)
    return name


def _size(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _row(lora: dict[str, Any]) -> list:
    return [
        lora["name"],
        lora["family"] or "?",
        lora["format"],
        ", ".join(lora["trigger_words"]),
        _size(lora["size_bytes"]),
        lora["hash"] or "",
        len(lora["epochs"]),
    ]


def details_text(info: dict[str, Any]) -> str:
    """The detail panel's Markdown: what the file is, its files, its training and civitai facts."""
    lines = [
        f"### {info['name']}",
        f"**{info['format']}** for **{info['family'] or 'an unknown base model'}**, {_size(info['size_bytes'])}",
        f"Trigger words: {', '.join(f'`{w}`' for w in info['trigger_words']) or '—'}",
        f"Hash `{info['hash']}` · SHA-256 `{info['sha256'][:16]}…`",
        f"File: `{info['path']}`",
    ]
    if info["description"]:
        lines.append(f"> {info['description']}")
    if info["epochs"]:
        lines.append("Per-epoch files (select them in Generate like any LoRA):")
        lines += [f"- `{e['name']}` ({_size(e['size_bytes'])})" for e in info["epochs"]]
    training = info["groups"]["training"]
    if training:
        shown = ("ss_network_dim", "ss_network_alpha", "ss_num_epochs", "ss_steps", "ss_resolution", "ss_unet_lr")
        facts = [f"{key.removeprefix('ss_')} {training[key]}" for key in shown if key in training]
        lines.append("Training: " + (", ".join(facts) or f"{len(training)} settings (see Metadata)"))
    civitai = info["civitai"]
    if civitai:
        link = f" — [civitai]({civitai['url']})" if civitai["url"] else ""
        lines.append(f"civitai: {civitai['model'] or '?'} / {civitai['version'] or '?'}{link}")
    return "\n\n".join(lines)
