"""The Generate tab: base model, LoRA stack with a scale each, parameters, images."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from lorapg.diffusion.families import family_label
from lorapg.diffusion.lycoris import LORA
from lorapg.diffusion.request import GenerationRequest, parse_lora_list
from lorapg.diffusion.samplers import samplers_for
from lorapg.hosting.visitors import Visitors
from lorapg.jobs import CANCELLED
from lorapg.limits import (
    BATCH_SIZE,
    CFG_SCALE,
    CLIP_SKIP,
    DENOISING_STRENGTH,
    INPAINT_PADDING,
    LORA_SCALE,
    MASK_BLUR,
    RANDOM_SEED,
    RESIZE_MODES,
    SEED,
    SIZE,
    STEPS,
    VARIATION_STRENGTH,
    Range,
)
from lorapg.services.generation import GenerationService, LoraListing
from lorapg.ui.common import (
    checked_text,
    follow,
    gpu_slots,
    job_status_text,
    primary_worker_group,
    raw_number,
    user_errors,
    visitor,
)
from lorapg.ui.controlnet_section import CONTROLNET_INPUTS, NO_MODEL, build_controlnet_section
from lorapg.ui.hires_section import HIRES_INPUTS, build_hires_section, hires_upscaler_choices
from lorapg.ui.texts import loading_text, model_status_text

DEFAULT_LORA_SCALE = LORA_SCALE.default


def ranged(limits: Range) -> dict:
    """A slider's or number field's bounds from lorapg.limits, the ranges validation uses."""
    return {"minimum": limits.minimum, "maximum": limits.maximum, "step": limits.step}


def lora_choices(service: GenerationService) -> list[tuple[str, str]]:
    return _choices(service.list_loras())


def _choices(listing: LoraListing) -> list[tuple[str, str]]:
    choices = []
    for info in listing.loras:
        # Any format but plain LoRA (LoCon, LoHa, LoKr, DoRA, diffs…) is named: users tell their civitai
        # files apart by it; a plain LoRA keeps the short label.
        about = [family_label(info.family)] if info.family else []
        about += [info.format] if info.format != LORA else []
        label = f"{info.name} ({', '.join(about)})" if about else info.name
        if info.trigger_words:
            label += f" — {', '.join(info.trigger_words)}"
        choices.append((label, info.name))
    return choices


def refreshed_lora_dropdown(service: GenerationService, selected: list[str] | None):
    """Re-scan the LoRA folder; keep the selected LoRAs that still exist; say which files were skipped."""
    listing = service.list_loras()
    for problem in listing.problems:
        gr.Warning(problem)
    choices = _choices(listing)
    names = {value for _, value in choices}
    return gr.update(choices=choices, value=[n for n in selected or [] if n in names])


def lora_spec(selected: list[str] | None, scales: dict | None) -> str:
    """The selection as ``name:scale, …`` — the same text the API and the CLI take."""
    scales = scales or {}
    return ", ".join(f"{name}:{scales.get(name, DEFAULT_LORA_SCALE):g}" for name in selected or [])


def _variation_widgets() -> tuple[gr.Number, gr.Slider]:
    """A1111's "Variation seed" and "Variation strength", folded away: at strength 0 they do nothing."""
    with gr.Accordion("Variation", open=False, elem_id="variation"):
        gr.Markdown(
            "Blend this seed's starting noise towards another seed's: 0 keeps the image exactly, "
            "0.1–0.3 gives the same image with other details, 1 gives the variation seed's image. "
            "A batch keeps the seed and counts the variation seed up."
        )
        with gr.Row():
            variation_seed = raw_number(
                gr.Number(
                    value=RANDOM_SEED,
                    precision=0,
                    minimum=RANDOM_SEED,
                    maximum=SEED.maximum,
                    step=1,
                    label=f"Variation seed (random: {RANDOM_SEED})",
                    elem_id="variation-seed",
                )
            )
            variation_strength = raw_number(
                gr.Slider(
                    **ranged(VARIATION_STRENGTH),
                    value=VARIATION_STRENGTH.default,
                    label="Variation strength (0 = off)",
                    elem_id="variation-strength",
                )
            )
    return variation_seed, variation_strength


# The generate handler's img2img parameters (the API's names), in the API's positional order.
IMG2IMG_INPUTS = (
    "init_image",
    "mask",
    "denoising_strength",
    "resize_mode",
    "mask_blur",
    "masked_content",
    "mask_invert",
    "only_masked",
    "only_masked_padding",
)


def build_img2img_section() -> dict[str, gr.components.Component]:
    """img2img and inpainting widgets: an init image to paint a mask on (or a mask to upload)."""
    with gr.Accordion("img2img / inpainting", open=False, elem_id="img2img"):
        with gr.Row():
            # PNG, not Gradio's default WEBP: the init image must reach the engine unchanged.
            init_image = gr.ImageEditor(
                label="Init image — paint over the part to repaint (inpainting); leave empty for txt2img",
                type="pil",
                format="png",
                sources=["upload", "clipboard"],
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                height=360,
                elem_id="init-image",
            )
            mask = gr.Image(
                label="…or upload a mask (white = repaint), the init image's size",
                type="pil",
                format="png",
                image_mode="L",
                sources=["upload"],
                height=360,
                elem_id="mask-upload",
            )
        with gr.Row():
            strength = raw_number(
                gr.Slider(**ranged(DENOISING_STRENGTH), value=DENOISING_STRENGTH.default, label="Denoising strength")
            )
            resize_mode = gr.Dropdown(
                [(label, number) for number, label in RESIZE_MODES.items()], value=0, label="Resize mode"
            )
        with gr.Row():
            blur = raw_number(gr.Slider(**ranged(MASK_BLUR), value=MASK_BLUR.default, label="Mask blur"))
            content = gr.Radio(["original", "fill"], value="original", label="Masked content")
            invert = gr.Checkbox(False, label="Invert mask (repaint the unpainted part)")
            only_masked = gr.Checkbox(False, label="Only masked (repaint the mask's box at full size)")
            padding = raw_number(
                gr.Slider(**ranged(INPAINT_PADDING), value=INPAINT_PADDING.default, label="Only masked padding")
            )
    widgets = (init_image, mask, strength, resize_mode, blur, content, invert, only_masked, padding)
    return dict(zip(IMG2IMG_INPUTS, widgets, strict=True))


def build_generate_tab(
    service: GenerationService, prompt_tools: Callable[[dict], dict] | None = None, visitors: Visitors | None = None
) -> dict[str, gr.components.Component]:
    """Build the tab's widgets and events; returns the widgets other tabs fill (Reuse, prompts).

    ``visitors``: who owns each generation's gallery images (a public app keeps visitors apart).

    ``prompt_tools`` builds extra widgets under the prompt and LoRA boxes: it gets those widgets
    ({"prompt", "negative", "lora_select"}) and returns its own, which join the returned dict.
    """
    extra: dict = {}
    status = service.model_status()
    with gr.Row():
        model_box = gr.Dropdown(
            label="Base model (Hugging Face id, diffusers folder, .safetensors or Flux/SD 3.5 .gguf file)",
            choices=service.model_choices(),
            value=status.ref or service.settings.model,
            allow_custom_value=True,
            scale=4,
        )
        load_button = gr.Button("Load model", scale=1)
    model_status = gr.Markdown(model_status_text(status), elem_id="model-status")
    # The model (and its family) whose native size and sampler list the fields show.
    shown_model = gr.State((status.ref, status.family))
    status_timer = gr.Timer(2.0)

    with gr.Row():
        with gr.Column(scale=3):
            prompt = checked_text(
                gr.Textbox(
                    label="Prompt",
                    lines=3,
                    elem_id="prompt",
                    placeholder="a watercolor fox in a misty forest  (A1111 tags like <lora:name:0.7> work too)",
                )
            )
            negative = checked_text(gr.Textbox(label="Negative prompt", lines=2, elem_id="negative-prompt"))
            with gr.Row():
                lora_select = gr.Dropdown(
                    label="LoRAs", choices=lora_choices(service), multiselect=True, elem_id="lora-select", scale=5
                )
                refresh_button = gr.Button("Refresh LoRAs", scale=1, size="sm")
            scales = gr.State({})
            # "hidden": not shown, but in the page, so a browser test can see when a scale has arrived.
            loras_text = gr.Textbox(label="LoRAs (name:scale, …)", visible="hidden", elem_id="lora-spec")

            @gr.render(inputs=[lora_select, scales], triggers=[lora_select.change])
            def render_scale_sliders(selected, current):
                for name in selected or []:
                    slider = gr.Slider(
                        **ranged(LORA_SCALE),
                        value=(current or {}).get(name, DEFAULT_LORA_SCALE),
                        label=f"{name} — scale",
                        key=f"scale-{name}",
                        interactive=True,
                    )
                    slider.change(
                        lambda value, state, n=name: {**(state or {}), n: value},
                        inputs_kwargs={"value": slider, "state": scales},
                        outputs=scales,
                    )

            if prompt_tools is not None:
                extra = prompt_tools({"prompt": prompt, "negative": negative, "lora_select": lora_select})

            with gr.Accordion("Parameters", open=True):
                with gr.Row():
                    defaults = service.generation_defaults()  # the loaded family's (Flux differs from SD)
                    steps = raw_number(gr.Slider(**ranged(STEPS), value=defaults.steps, label="Steps"))
                    cfg = raw_number(gr.Slider(**ranged(CFG_SCALE), value=defaults.guidance_scale, label="CFG scale"))
                    sampler = gr.Dropdown(service.sampler_names(), value=defaults.sampler, label="Sampler")
                with gr.Row():
                    native = status.native_size or SIZE.default
                    width = raw_number(gr.Number(value=native, precision=0, **ranged(SIZE), label="Width"))
                    height = raw_number(gr.Number(value=native, precision=0, **ranged(SIZE), label="Height"))
                    batch = raw_number(gr.Slider(**ranged(BATCH_SIZE), value=BATCH_SIZE.default, label="Batch size"))
                    clip_skip = raw_number(
                        gr.Slider(**ranged(CLIP_SKIP), value=CLIP_SKIP.default, label="Clip skip (SD 1.x)")
                    )
                    # -1 (random) sits just below the seed range.
                    seed = raw_number(
                        gr.Number(
                            value=RANDOM_SEED,
                            precision=0,
                            minimum=RANDOM_SEED,
                            maximum=SEED.maximum,
                            step=1,
                            label=f"Seed ({RANDOM_SEED} = random)",
                        )
                    )
            variation_seed, variation_strength = _variation_widgets()
            img2img = build_img2img_section()
            hires = build_hires_section(hires_upscaler_choices(service))
            controlnet = build_controlnet_section(service.controlnet_names())
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
        with gr.Column(scale=2):
            images = gr.Gallery(label="Images", format="png", columns=2, height=520, elem_id="images")
            job_status = gr.Markdown("", elem_id="job-status")
            with gr.Row():
                seed_used = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="seed-used")
                reuse_seed = gr.Button("Use this seed", size="sm")
            job_id = gr.Textbox(visible=False)

    # --- events ----------------------------------------------------------------------------
    for source in (lora_select, scales):
        source.change(
            lora_spec,
            inputs_kwargs={"selected": lora_select, "scales": scales},
            outputs=loras_text,
            api_visibility="private",
        )

    refresh_button.click(
        user_errors(lambda selected: refreshed_lora_dropdown(service, selected)),
        lora_select,
        lora_select,
        api_name="refresh_loras",
    )

    @user_errors
    def load_model(ref, progress=gr.Progress()):
        job = service.submit_load_model(ref)
        for current in follow(job, service.jobs):
            yield current.message or job_status_text(current, service.jobs), gr.update(), gr.update()
        loaded = service.model_status()
        yield model_status_text(loaded), loaded.native_size, loaded.native_size

    load_button.click(
        load_model,
        model_box,
        [model_status, width, height],
        api_name="load_model",
        **primary_worker_group(service.jobs),  # loads on the first worker only
    )

    @user_errors
    def generate(
        prompt,
        negative_prompt,
        loras,
        steps,
        cfg_scale,
        sampler,
        width,
        height,
        seed,
        batch_size,
        http: gr.Request,
        clip_skip=int(CLIP_SKIP.default),
        variation_seed=RANDOM_SEED,
        variation_strength=VARIATION_STRENGTH.default,
        init_image=None,
        mask=None,
        denoising_strength=DENOISING_STRENGTH.default,
        resize_mode=0,
        mask_blur=int(MASK_BLUR.default),
        masked_content="original",
        mask_invert=False,
        only_masked=False,
        only_masked_padding=int(INPAINT_PADDING.default),
        enable_hr=False,
        hr_upscaler=None,
        hr_scale=None,
        hr_second_pass_steps=0,
        hr_denoising_strength=None,
        controlnet_model=None,
        controlnet_image=None,
        controlnet_module="none",
        controlnet_weight=1.0,
        controlnet_guidance_start=0.0,
        controlnet_guidance_end=1.0,
        controlnet_resize_mode="Crop and Resize",
        controlnet_threshold_a=100,
        controlnet_threshold_b=200,
        progress=gr.Progress(),
    ):
        """Parameter names are the API's (``client.predict(prompt=…, cfg_scale=…)``): keep them stable."""
        editor = init_image if isinstance(init_image, dict) else {"background": init_image, "layers": []}
        options = service.img2img_options(
            editor.get("background"),
            painted=editor.get("layers") or (),
            mask=mask,
            strength=denoising_strength,
            resize_mode=resize_mode,
            mask_blur=mask_blur,
            masked_content=masked_content,
            mask_invert=mask_invert,
            only_masked=only_masked,
            only_masked_padding=only_masked_padding,
        )
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            loras=parse_lora_list(loras),
            steps=steps,
            guidance_scale=cfg_scale,
            sampler=sampler,
            width=width,
            height=height,
            seed=seed,
            batch_size=batch_size,
            clip_skip=clip_skip,
            variation_seed=variation_seed,
            variation_strength=variation_strength,
            img2img=options,
            hires=service.hires_options(enable_hr, hr_upscaler, hr_scale, hr_second_pass_steps, hr_denoising_strength),
            controlnet=service.controlnet_units(
                controlnet_model,
                controlnet_image,
                controlnet_module,
                controlnet_weight,
                controlnet_guidance_start,
                controlnet_guidance_end,
                resize_mode=controlnet_resize_mode,
                threshold_a=controlnet_threshold_a,
                threshold_b=controlnet_threshold_b,
            ),
        )
        job = service.submit_generation(request, owner=visitor(visitors, http))
        for current in follow(job, service.jobs, progress):
            if not current.finished:
                preview = [current.preview] if current.preview is not None else gr.update()
                yield preview, job_status_text(current, service.jobs), gr.update(), current.id
        if job.status == CANCELLED:
            yield gr.update(), f"Cancelled (job `{job.id}`).", gr.update(), job.id
            return
        result = job.result
        pictures = [str(record.path) for record in result.saved] or result.images
        notes = "".join(f"\n\n⚠️ {w}" for w in result.warnings)
        yield pictures, f"Done: seed {result.seeds[0]} (job `{job.id}`).{notes}", result.seeds[0], job.id

    # Keyed by the handler's parameter names, which are also the API's; the dict's order is the
    # API's positional order (unchanged since the first release).
    generate_inputs = {
        "prompt": prompt,
        "negative_prompt": negative,
        "loras": loras_text,
        "steps": steps,
        "cfg_scale": cfg,
        "sampler": sampler,
        "width": width,
        "height": height,
        "seed": seed,
        "batch_size": batch,
        "clip_skip": clip_skip,  # added after the first release: the positional order before it stays the API's
        "variation_seed": variation_seed,
        "variation_strength": variation_strength,
        **{name: img2img[name] for name in IMG2IMG_INPUTS},  # img2img, added after clip skip and variation
        **{name: hires[name] for name in HIRES_INPUTS},  # the hires fix, added after img2img
        **{name: controlnet[name] for name in CONTROLNET_INPUTS},  # ControlNet, added last
    }
    generate_button.click(
        generate,
        inputs_kwargs=generate_inputs,
        outputs=[images, job_status, seed_used, job_id],
        api_name="generate",
        concurrency_id="gpu",
        concurrency_limit=gpu_slots(service.jobs),
    )

    @user_errors
    def cancel(current_job_id, request: gr.Request):
        if not current_job_id:
            return "Nothing to cancel."
        job = service.cancel(current_job_id, visitor(visitors, request))
        return f"Cancelling job `{job.id}`…"

    cancel_button.click(cancel, job_id, job_status, api_name="cancel")
    controlnet["controlnet_refresh"].click(
        lambda: gr.update(choices=[NO_MODEL, *service.controlnet_names()]),
        outputs=controlnet["controlnet_model"],
        api_visibility="private",
    )
    reuse_seed.click(lambda used: used, seed_used, seed, api_visibility="private")

    def poll_model_status(shown):
        """Background loads finish while the page is open: show them, and adopt the native size once."""
        current = service.model_status()
        text = model_status_text(current)
        note = loading_text(service.loading_job())
        if note:
            text = note if not current.loaded else f"{text}\n\n{note}"
        shown_ref, shown_family = shown or (None, None)
        keep = gr.update()
        if not current.loaded or current.ref == shown_ref:
            return text, keep, keep, shown, keep, keep, keep
        size, now = current.native_size, (current.ref, current.family)
        if samplers_for(current.family) is samplers_for(shown_family):  # SD 1.x <-> SDXL: the user's values stay
            return text, size, size, now, keep, keep, keep
        # Another family (SD <-> Flux): its own samplers, steps and guidance replace the fields' values.
        defaults = service.generation_defaults()
        samplers = gr.update(choices=service.sampler_names(), value=defaults.sampler)
        return text, size, size, now, samplers, defaults.steps, defaults.guidance_scale

    status_timer.tick(
        poll_model_status,
        shown_model,
        [model_status, width, height, shown_model, sampler, steps, cfg],
        api_visibility="private",
        show_progress="hidden",
    )

    return {
        "prompt": prompt,
        "negative": negative,
        "lora_select": lora_select,
        "scales": scales,
        "steps": steps,
        "cfg": cfg,
        "sampler": sampler,
        "width": width,
        "height": height,
        "seed": seed,
        "batch": batch,
        "clip_skip": clip_skip,
        "variation_seed": variation_seed,
        "variation_strength": variation_strength,
        "model": model_box,
        "model_status": model_status,
        **{f"img2img_{name}": widget for name, widget in img2img.items()},
        **hires,
        **{name: controlnet[name] for name in CONTROLNET_INPUTS},
        **extra,
    }
