"""The Train tab's crop preview: per image, the bucket it trains at and the box kept; click to set a focus.

Built inside the dataset column (``build_crops_section``); its events are connected once the training
fields exist (``CropsSection.connect``), because the preview follows the run's resolution field. The
face-aware checkbox *is* the training field ``face_crop``: what the preview shows is what trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from lorapg.hosting.visitors import Visitors
from lorapg.services.dataset_crops import CropOptions, DatasetCropService
from lorapg.services.training import TrainingService
from lorapg.training.config import TrainConfig
from lorapg.ui.common import user_errors, visitor


@dataclass
class CropsSection:
    service: DatasetCropService
    visitors: Visitors | None
    dataset: gr.Dropdown
    face_crop: gr.Checkbox
    show: gr.Button
    gallery: gr.Gallery
    image: gr.Image
    clear: gr.Button
    note: gr.Markdown
    selected: gr.State
    new_name: gr.Textbox
    apply: gr.Button

    def connect(self, resolution: gr.Number, preset: gr.Dropdown) -> None:
        """Wire the events; ``resolution`` and ``preset`` (whose ``bucketing`` the run takes): the training
        fields the preview and the cropped copies follow."""
        service, visitors = self.service, self.visitors

        def options(resolution_value, preset_name, face) -> CropOptions:
            return crop_options(service, resolution_value, preset_name, face)

        def gallery_items(name, resolution_value, preset_name, face, owner) -> list:
            chosen = options(resolution_value, preset_name, face)
            crops = service.crops(name, chosen, owner)
            return [(service.preview(name, c.file, chosen, owner), _label(c.plan, c.file)) for c in crops]

        @user_errors
        def show(name, resolution_value, preset_name, face, request: gr.Request):
            if not name:
                return [], "Open a dataset first."
            items = gallery_items(name, resolution_value, preset_name, face, visitor(visitors, request))
            return items, f"{len(items)} image(s). Select one, then click on it where its crop should centre."

        inputs = [self.dataset, resolution, preset, self.face_crop]
        self.show.click(show, inputs, [self.gallery, self.note], api_visibility="private")

        def pick(name, resolution_value, preset_name, face, event: gr.SelectData, request: gr.Request):
            file = str(event.value.get("caption", "")).split(" — ")[0] if isinstance(event.value, dict) else ""
            owner = visitor(visitors, request)
            return file, service.preview(name, file, options(resolution_value, preset_name, face), owner)

        self.gallery.select(user_errors(pick), inputs, [self.selected, self.image], api_visibility="private")

        @user_errors
        def set_focus(name, file, resolution_value, preset_name, face, event: gr.SelectData, request: gr.Request):
            if not file:
                return gr.skip(), gr.skip(), "Select an image in the crop gallery first."
            owner = visitor(visitors, request)
            width, height = service.preview(name, file, options(resolution_value, preset_name, face), owner).size
            x, y = event.index  # pixels of the shown preview, which has the image's proportions
            service.set_focus(name, file, min(max(x / width, 0.0), 1.0), min(max(y / height, 0.0), 1.0), owner)
            return (
                service.preview(name, file, options(resolution_value, preset_name, face), owner),
                gallery_items(name, resolution_value, preset_name, face, owner),
                f"Focus of {file} set; training crops around it.",
            )

        focus_inputs = [self.dataset, self.selected, resolution, preset, self.face_crop]
        self.image.select(set_focus, focus_inputs, [self.image, self.gallery, self.note], api_visibility="private")

        @user_errors
        def clear(name, file, resolution_value, preset_name, face, request: gr.Request):
            if not file:
                return gr.skip(), gr.skip(), "Select an image in the crop gallery first."
            owner = visitor(visitors, request)
            service.clear_focus(name, file, owner)
            return (
                service.preview(name, file, options(resolution_value, preset_name, face), owner),
                gallery_items(name, resolution_value, preset_name, face, owner),
                f"Focus of {file} cleared.",
            )

        self.clear.click(clear, focus_inputs, [self.image, self.gallery, self.note], api_visibility="private")

        @user_errors
        def apply(name, new_name, resolution_value, preset_name, face, request: gr.Request):
            chosen = options(resolution_value, preset_name, face)
            written = service.apply(name, new_name, chosen, visitor(visitors, request))
            return f"Wrote {len(written)} cropped image(s) into dataset {new_name}; {name} is unchanged."

        apply_inputs = [self.dataset, self.new_name, resolution, preset, self.face_crop]
        self.apply.click(apply, apply_inputs, self.note, api_visibility="private")


def crop_options(service: DatasetCropService, resolution_value, preset_name, face) -> CropOptions:
    """The form's crop settings: its resolution and face-aware fields, and the bucketing its preset sets
    (the form has no bucketing field: a run from it takes the preset's, e.g. demo-concept's square crops)."""
    bucketing = service.training.config_for({"preset": preset_name}).bucketing if preset_name else True
    return CropOptions(resolution=int(resolution_value or 0), bucketing=bucketing, face_crop=bool(face))


def _label(plan, file: str) -> str:
    return f"{file} — {plan.bucket[0]}×{plan.bucket[1]} ({plan.source})"


def build_crops_section(training: TrainingService, dataset: gr.Dropdown, visitors: Visitors | None) -> CropsSection:
    with gr.Accordion("Crops (the bucket and box each image trains at)", open=False):
        face_crop = gr.Checkbox(
            TrainConfig().face_crop,
            label="Face-aware crops (character datasets: centre on the largest face; a focus point wins)",
            elem_id="train-face-crop",
        )
        show = gr.Button("Show crops", size="sm", elem_id="train-show-crops")
        gallery = gr.Gallery(label="Crops", columns=5, height=240, elem_id="train-crops", format="png")
        image = gr.Image(
            label="Click where this image's crop should centre", interactive=False, elem_id="train-crop-focus"
        )
        clear = gr.Button("Clear focus", size="sm")
        with gr.Row():
            new_name = gr.Textbox(label="New dataset for cropped copies (optional; originals are kept)", scale=3)
            apply = gr.Button("Write cropped copies", size="sm", scale=1)
        note = gr.Markdown("")
    return CropsSection(
        DatasetCropService(training),
        visitors,
        dataset,
        face_crop,
        show,
        gallery,
        image,
        clear,
        note,
        gr.State(""),
        new_name,
        apply,
    )
