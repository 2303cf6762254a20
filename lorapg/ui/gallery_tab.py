"""The Gallery and PNG Info tabs: browse, filter, reuse, star, delete, download, read any PNG.

Images are handed to Gradio as file paths from the gallery store, never as PIL images: Gradio
re-encodes PIL images (WEBP by default) and drops the PNG text chunk that carries the parameters,
so a download would no longer open in A1111 or civitai with its settings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from lorapg.gallery.records import ImageRecord
from lorapg.hosting.visitors import Visitors
from lorapg.jobs import DONE
from lorapg.services.gallery import GalleryService, ReuseParameters
from lorapg.ui.common import follow, gpu_slots, job_status_text, user_errors, visitor
from lorapg.ui.controlnet_section import CONTROLNET_INPUTS
from lorapg.ui.hires_section import HIRES_INPUTS
from lorapg.ui.texts import image_details_text, png_info_text

if TYPE_CHECKING:  # imports torch and diffusers; the gallery tab itself needs neither
    from lorapg.services.generation import GenerationService

# Generate-tab widgets that Reuse fills, by the keys of build_generate_tab's dict.
REUSE_TARGETS = (
    "prompt",
    "negative",
    "lora_select",
    "scales",
    "steps",
    "cfg",
    "sampler",
    "width",
    "height",
    "seed",
    "batch",
    "clip_skip",
    "variation_seed",
    "variation_strength",
)
# The Generate tab's img2img widgets (build_generate_tab's keys) that Reuse and "Send to img2img" set.
IMG2IMG_TARGETS = (
    "img2img_init_image",
    "img2img_mask",
    "img2img_denoising_strength",
    "img2img_resize_mode",
    "img2img_mask_blur",
    "img2img_masked_content",
    "img2img_mask_invert",
    "img2img_only_masked",
    "img2img_only_masked_padding",
)
_PARAMETER_WIDGETS = {
    "steps": "steps",
    "guidance_scale": "cfg",
    "sampler": "sampler",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "clip_skip": "clip_skip",
    "variation_seed": "variation_seed",
    "variation_strength": "variation_strength",
}


def gallery_items(records: list[ImageRecord]) -> list[tuple[str, str]]:
    """(file path, caption) pairs for gr.Gallery, newest first as the store lists them."""
    return [(str(r.path), f"#{r.id} · seed {r.seed}" + (" ★" if r.starred else "")) for r in records]


def serve_gallery_in_place(images_dir: Path) -> None:
    """Let Gradio serve gallery PNGs from the gallery folder instead of copying them into its cache.

    Gradio copies every file a handler returns into its cache (GRADIO_TEMP_DIR) and never cleans
    it, so a deleted or pruned image kept downloading from the URL /generate had returned.
    Served in place, an image that leaves the gallery leaves every URL with it (Gradio answers
    403 for a missing file), no cached copy needs finding, and no disk is spent on copies.
    The folder is already in ``allowed_paths``, so this exposes nothing that was not served.
    """
    gr.set_static_paths([images_dir])


def star_label(starred: bool) -> str:
    return "★ Unstar" if starred else "☆ Star"


def build_gallery_tab(
    gallery_service: GalleryService,
    generate_widgets: dict[str, gr.components.Component],
    tabs: gr.Tabs,
    *,
    lora_choices: Callable[[], list[tuple[str, str]]] | None = None,
    visitors: Visitors | None = None,
    generation: GenerationService | None = None,
) -> dict[str, gr.components.Component]:
    """Add the Gallery and PNG Info tabs to ``tabs`` (call inside its ``with`` block).

    ``lora_choices``: the Generate tab's LoRA dropdown choices, re-read on Reuse so a LoRA added
    since start-up can be selected. ``visitors``: whose gallery each request sees. ``generation``:
    runs "Vary" (a batch of variations of the selected image); without it there is no Vary button.
    """
    serve_gallery_in_place(gallery_service.store.images_dir)
    with gr.Tab("Gallery", id="gallery") as gallery_tab:
        widgets = _gallery_widgets(gallery_service, can_vary=generation is not None)
    with gr.Tab("PNG Info", id="png-info"):
        widgets |= _png_info_widgets()
    list_images = _wire_gallery(gallery_service, widgets, gallery_tab, visitors)
    _wire_reuse(gallery_service, widgets, generate_widgets, tabs, lora_choices, visitors)
    if generation is not None:
        _wire_vary(gallery_service, generation, widgets, list_images, generate_widgets.get("model"), visitors)
    return widgets


def _img2img_updates(img2img: dict, params: ReuseParameters) -> dict:
    """Reuse of an img2img result restores its init image, mask and settings (the settings alone when
    the images are not here: a note says so); of any other image, clears the init image so the next
    Generate is txt2img again."""
    form = params.img2img_form()
    if not form:
        return {img2img["img2img_init_image"]: None, img2img["img2img_mask"]: None}
    images = {key: str(form[key]) if form[key] is not None else None for key in ("image", "mask")}
    return {
        img2img["img2img_init_image"]: images["image"],
        img2img["img2img_mask"]: images["mask"],
        img2img["img2img_denoising_strength"]: form["strength"],
        img2img["img2img_resize_mode"]: form["resize_mode"],
        img2img["img2img_mask_blur"]: form["mask_blur"],
        img2img["img2img_masked_content"]: "fill" if form["inpainting_fill"] == 0 else "original",
        img2img["img2img_mask_invert"]: form["mask_invert"],
        img2img["img2img_only_masked"]: form["only_masked"],
        img2img["img2img_only_masked_padding"]: form["only_masked_padding"],
    }


def _gallery_widgets(gallery_service: GalleryService, can_vary: bool = False) -> dict[str, gr.components.Component]:
    with gr.Row():
        query = gr.Textbox(
            label="Prompt words", placeholder="every word must be in the prompt", scale=3, elem_id="gallery-query"
        )
        lora_filter = gr.Dropdown(
            label="LoRA", choices=[""], value="", allow_custom_value=True, scale=2, elem_id="gallery-lora-filter"
        )
        refresh = gr.Button("🔄 Refresh", scale=1, elem_id="gallery-refresh")
    with gr.Row():
        with gr.Column(scale=3):
            thumbs = gr.Gallery(
                label="Gallery (newest first)",
                format="png",
                columns=4,
                height=560,
                allow_preview=False,
                fit_columns=False,
                elem_id="gallery",
            )
            count = gr.Markdown("", elem_id="gallery-count")
        with gr.Column(scale=2):
            # No precision: Gradio would round 1.5 to 2 before the service could refuse it, and
            # the wrong image was deleted. The service's id check refuses fractions instead.
            selected_id = gr.Number(
                None, label="Image # (type an id and press Enter)", step=1, elem_id="gallery-selected-id"
            )
            full = gr.Image(
                label="Selected image", type="filepath", format="png", interactive=False, elem_id="gallery-image"
            )
            with gr.Row():
                reuse = gr.Button("♻️ Reuse", variant="primary", elem_id="gallery-reuse")
                vary = gr.Button("🎲 Vary", visible=can_vary, elem_id="gallery-vary")
                send_img2img = gr.Button("🖼️ Send to img2img", elem_id="gallery-send-img2img")
                # Shown by wire_send_to_upscale where the app has an Upscale tab.
                send_upscale = gr.Button("⬆️ Upscale", visible=False, elem_id="gallery-send-upscale")
                star = gr.Button(star_label(False), elem_id="gallery-star")
                delete = gr.Button("🗑️ Delete", variant="stop", elem_id="gallery-delete")
                download = gr.DownloadButton("⬇️ Download PNG", value=None, elem_id="gallery-download")
            details = gr.Markdown("Select an image to see how it was made.", elem_id="gallery-details")
            raw = gr.Textbox(
                label="Parameters in the PNG (AUTOMATIC1111 format)", lines=4, interactive=False, elem_id="gallery-raw"
            )
            notes = gr.Markdown("", elem_id="gallery-notes")
    ids = gr.State([])
    return {
        "query": query,
        "lora_filter": lora_filter,
        "refresh": refresh,
        "gallery": thumbs,
        "count": count,
        "selected_id": selected_id,
        "image": full,
        "reuse": reuse,
        "vary": vary,
        "send_img2img": send_img2img,
        "send_upscale": send_upscale,
        "star": star,
        "delete": delete,
        "download": download,
        "details": details,
        "raw": raw,
        "notes": notes,
        "ids": ids,
    }


def _png_info_widgets() -> dict[str, gr.components.Component]:
    gr.Markdown("Drop a PNG made here or by AUTOMATIC1111, Forge or Fooocus to read how it was made.")
    with gr.Row():
        with gr.Column(scale=2):
            # gr.File, not gr.Image: an image widget would re-encode the upload and lose its text.
            upload = gr.File(label="PNG file", file_types=[".png"], type="filepath", elem_id="png-info-file")
            send = gr.Button("➡️ Send to Generate", variant="primary", elem_id="png-info-send")
        with gr.Column(scale=3):
            summary = gr.Markdown("", elem_id="png-info-summary")
            text = gr.Textbox(label="Raw parameters", lines=6, interactive=False, elem_id="png-info-raw")
    return {"png_file": upload, "png_send": send, "png_summary": summary, "png_raw": text}


def _wire_gallery(service: GalleryService, w: dict, gallery_tab: gr.Tab, visitors: Visitors | None) -> Callable:
    listing = [w["gallery"], w["ids"], w["count"]]
    shown = [w["selected_id"], w["image"], w["details"], w["raw"], w["star"], w["download"]]

    @user_errors
    def list_images(query, lora, request: gr.Request):
        records = service.list(query=query, lora=lora or None, owner=visitor(visitors, request))
        # An image pruned since the query has no file to serve; listing it would fail the whole
        # answer for API clients, which download every listed file.
        records = [r for r in records if r.path is not None and r.path.is_file()]
        return gallery_items(records), [r.id for r in records], f"{len(records)} image(s)."

    @user_errors
    def lora_filter_choices(current, request: gr.Request):
        return gr.update(choices=["", *service.lora_names(visitor(visitors, request))], value=current or "")

    @user_errors
    def show(image_id, request: gr.Request):
        found = service.show(image_id, visitor(visitors, request))
        r = found.record
        return r.id, str(r.path), image_details_text(found), found.parameters, star_label(r.starred), str(r.path)

    def pick(ids, evt: gr.SelectData, request: gr.Request):
        # The gallery reports a position; the ids list from the same listing turns it into an id.
        return show(ids[evt.index], request) if 0 <= evt.index < len(ids) else [gr.update()] * len(shown)

    @user_errors
    def toggle_star(image_id, request: gr.Request):
        record = service.toggle_star(image_id, visitor(visitors, request))
        message = "is starred: it is never pruned." if record.starred else "is no longer starred."
        return star_label(record.starred), f"Image #{record.id} {message}"

    @user_errors
    def delete(image_id, query, lora, request: gr.Request):
        service.delete(image_id, visitor(visitors, request))
        cleared = (None, None, f"Deleted image #{int(image_id)}.", "", star_label(False), None)
        return *list_images(query, lora, request), *cleared

    filters = {"query": w["query"], "lora": w["lora_filter"]}  # keyed by the handlers' parameter names
    w["refresh"].click(list_images, inputs_kwargs=filters, outputs=listing, api_name="gallery_list")
    gr.on(
        [w["query"].submit, w["lora_filter"].change, gallery_tab.select],
        list_images,
        inputs_kwargs=filters,
        outputs=listing,
        api_visibility="private",
    )
    for trigger in (w["refresh"].click, gallery_tab.select):
        trigger(lora_filter_choices, w["lora_filter"], w["lora_filter"], api_visibility="private")
    w["gallery"].select(pick, w["ids"], shown, api_visibility="private")
    w["selected_id"].submit(show, w["selected_id"], shown, api_name="gallery_get")
    w["star"].click(toggle_star, w["selected_id"], [w["star"], w["notes"]], api_name="gallery_star").then(
        list_images, inputs_kwargs=filters, outputs=listing, api_visibility="private"
    )
    w["delete"].click(
        delete,
        inputs_kwargs={"image_id": w["selected_id"], **filters},
        outputs=listing + shown,
        api_name="gallery_delete",
    )
    return list_images


def _wire_vary(
    service: GalleryService,
    generation: GenerationService,
    w: dict,
    list_images: Callable,
    model: gr.components.Component | None,
    visitors: Visitors | None,
) -> None:
    """Vary: the gallery service plans the batch of variations, the generation service makes it."""
    listing = [w["gallery"], w["ids"], w["count"]]
    model_input = {"current_model": model} if model is not None else {}

    @user_errors
    def vary(image_id, query, lora, request: gr.Request, current_model=None):
        owner = visitor(visitors, request)
        plan = service.variations_request(image_id, current_model=current_model, owner=owner)
        for note in plan.notes:
            gr.Warning(note)
        job = generation.submit_generation(plan.request, owner=owner)
        for current in follow(job, generation.jobs):
            if not current.finished:
                yield gr.update(), gr.update(), gr.update(), job_status_text(current, generation.jobs)
        if job.status != DONE:
            yield gr.update(), gr.update(), gr.update(), f"{job.status.capitalize()} (job `{job.id}`)."
            return
        result = job.result
        seeds = result.variation_seeds
        done = (
            f"{len(result.images)} variations of image #{int(image_id)} (seed {result.seeds[0]}, variation seeds "
            f"{seeds[0]}–{seeds[-1]}, strength {result.request.variation_strength:g}) are first in the gallery."
        )
        yield *list_images(query, lora, request), done

    w["vary"].click(
        vary,
        inputs_kwargs={"image_id": w["selected_id"], "query": w["query"], "lora": w["lora_filter"], **model_input},
        outputs=[*listing, w["notes"]],
        api_name="gallery_vary",
        concurrency_id="gpu",
        concurrency_limit=gpu_slots(generation.jobs),
    )


def _wire_reuse(
    service: GalleryService,
    w: dict,
    generate: dict[str, gr.components.Component],
    tabs: gr.Tabs,
    lora_choices: Callable[[], list[tuple[str, str]]] | None,
    visitors: Visitors | None,
) -> None:
    targets = [generate[key] for key in REUSE_TARGETS]
    pending_loras = gr.State([])
    img2img = {key: generate[key] for key in IMG2IMG_TARGETS if key in generate}
    hires = {key: generate[key] for key in HIRES_INPUTS if key in generate}
    controlnet = {key: generate[key] for key in CONTROLNET_INPUTS if key in generate}
    # img2img's, the hires fix's and ControlNet's widgets come last: the positions before them stay what they were.
    outputs = [*targets, tabs, pending_loras, w["notes"], *img2img.values(), *hires.values(), *controlnet.values()]
    model = generate.get("model")
    model_input = {"current_model": model} if model is not None else {}  # keyed by the handlers' parameter name

    def fill_generate(params: ReuseParameters) -> dict:
        """Widget updates for the Generate tab; unknown parameters leave their widget alone."""
        notes = [*params.notes, *params.form_notes()]  # the latter: what this tab's form cannot hold
        for note in notes:
            gr.Warning(note)
        names = [name for name, _ in params.loras]
        choices = lora_choices() if lora_choices is not None else None
        updates = {
            generate["prompt"]: params.prompt,
            generate["negative"]: params.negative_prompt,
            # Cleared here and set by the follow-up event, so the scale sliders are re-drawn with the
            # new scales even when the same LoRAs were already selected.
            generate["lora_select"]: gr.update(value=[], choices=choices) if choices else [],
            generate["scales"]: dict(params.loras),
            generate["batch"]: 1,  # the seed names one image: a batch would make others as well
            tabs: gr.Tabs(selected="generate"),
            pending_loras: names,
            w["notes"]: "\n\n".join(f"⚠️ {note}" for note in notes),
        }
        for field_name, key in _PARAMETER_WIDGETS.items():
            value = getattr(params, field_name)
            if value is not None:
                updates[generate[key]] = value
        if img2img:
            updates.update(_img2img_updates(img2img, params))
        updates.update({hires[key]: value for key, value in params.hires_form().items() if key in hires})
        form = params.controlnet_form()
        updates.update({controlnet[key]: value for key, value in form.items() if key in controlnet})
        return updates

    @user_errors
    def send_to_img2img(image_id, request: gr.Request):
        """The selected gallery image as the Generate tab's init image (no mask: paint one there)."""
        path = service.image_path(image_id, visitor(visitors, request))
        return {
            img2img["img2img_init_image"]: str(path),
            img2img["img2img_mask"]: None,
            tabs: gr.Tabs(selected="generate"),
        }

    if img2img:
        w["send_img2img"].click(
            send_to_img2img,
            inputs_kwargs={"image_id": w["selected_id"]},
            outputs=[img2img["img2img_init_image"], img2img["img2img_mask"], tabs],
            api_name="gallery_send_to_img2img",
        )

    @user_errors
    def reuse_image(image_id, request: gr.Request, current_model=None):
        owner = visitor(visitors, request)
        return fill_generate(service.reuse_parameters(image_id, current_model=current_model, owner=owner))

    @user_errors
    def read_png(path):
        info = service.png_info(path)
        return png_info_text(info), info.text or ""

    @user_errors
    def send_png(path, current_model=None):
        return fill_generate(service.reuse_parameters(service.png_info(path), current_model=current_model))

    def select_loras(names):
        return names

    w["reuse"].click(
        reuse_image,
        inputs_kwargs={"image_id": w["selected_id"], **model_input},
        outputs=outputs,
        api_name="gallery_reuse",
    ).then(select_loras, pending_loras, generate["lora_select"], api_visibility="private")
    w["png_file"].upload(read_png, w["png_file"], [w["png_summary"], w["png_raw"]], api_name="png_info")
    w["png_send"].click(
        send_png, inputs_kwargs={"path": w["png_file"], **model_input}, outputs=outputs, api_name="png_info_send"
    ).then(select_loras, pending_loras, generate["lora_select"], api_visibility="private")


def wire_send_to_upscale(
    service: GalleryService, w: dict, upscale: dict, tabs: gr.Tabs, visitors: Visitors | None = None
) -> None:
    """The Gallery tab's "Upscale": the selected image into the Upscale tab (``upscale``: the dict
    build_upscale_tab returns), by its id, so the result is saved with the image's parameters."""

    @user_errors
    def send_to_upscale(image_id, request: gr.Request):
        owner = visitor(visitors, request)
        record = service.get(image_id, owner)  # one this visitor may see, else a UserError
        return {
            upscale["image"]: str(service.image_path(record.id, owner)),
            upscale["gallery_id"]: str(record.id),
            tabs: gr.Tabs(selected="upscale"),
        }

    w["send_upscale"].visible = True
    w["send_upscale"].click(
        send_to_upscale,
        inputs_kwargs={"image_id": w["selected_id"]},
        outputs=[upscale["image"], upscale["gallery_id"], tabs],
        api_name="gallery_send_to_upscale",
    )
