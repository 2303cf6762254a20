"""What the web UI says about the values the services return: Markdown, and which button to press.

The services (lorapg/services/) return dataclasses and never phrase them for a front end; the CLI
phrases the same values as one-line prints, a REST API as JSON. Every sentence that names a widget of
this UI lives here or in the tab that owns the widget. Never imports gradio, so tests read it directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorapg.config import SUGGESTED_MODELS, is_demo_model
from lorapg.diffusion.families import family_label
from lorapg.gallery.records import strip_lora_tags
from lorapg.jobs import DONE, ERROR, FINISHED, QUEUED, Job
from lorapg.services.gallery import BY_HASH, NO_PARAMETERS, ImageDetails, LoraMatch, PngInfo

if TYPE_CHECKING:  # these import torch; the phrasing needs only their fields
    from lorapg.services.generation import MemoryStatus, ModelStatus, WorkerStatus
    from lorapg.services.prompts import BackendInfo
    from lorapg.services.training import TrainingRun

# --- Generate tab ---------------------------------------------------------------------------------


def model_status_text(status: ModelStatus) -> str:
    if not status.loaded:
        return "No base model loaded yet."
    if is_demo_model(status.ref):
        # Said in the UI, so nobody mistakes the 32 px shapes for what the app does with real models.
        hubs = " or ".join(f"{label} ({ref})" for label, ref in SUGGESTED_MODELS.items())
        return (
            f"Bundled demo model — a 5 MB SD 1.x-architecture model of coloured shapes, native "
            f"{status.native_size}px; try “a red star on a blue background”. For real images load {hubs}: "
            "type it in the model box and press Load, or start the app with --model."
        )
    return f"{status.ref} — {family_label(status.family)}, native {status.native_size}px"


def loading_text(job: Job | None) -> str | None:
    """What the latest model load is doing, or why it failed; None once it succeeded (or none ran)."""
    if job is None or job.status == DONE:
        return None
    if job.status == ERROR:
        return f"Loading the model failed: {job.error}"
    return job.message or f"Loading model (job {job.id}, queued)…"


def memory_text(status: MemoryStatus) -> str:
    if status.report is None:
        return f"Running on {status.device.upper()}: there is no GPU memory to manage."
    if status.freed is None:  # a status query, not a Free press
        return status.report
    moved = f"Moved off the GPU: {', '.join(status.freed)}." if status.freed else "Nothing to move: models in use stay."
    return f"{moved}\n\n{status.report}"


def workers_text(workers: list[WorkerStatus]) -> str:
    """The generation workers as a list, for an app with more than one (one worker says nothing new)."""
    if len(workers) < 2:
        return ""
    lines = []
    for worker in workers:
        model = worker.model or "no model loaded"
        running = f" (job {worker.job})" if worker.job else ""
        lines.append(f"- {worker.device}: {worker.state}{running}; {model}")
    return "**Workers**\n\n" + "\n".join(lines)


# --- Gallery and PNG Info tabs ----------------------------------------------------------------------


def lora_match_text(match: LoraMatch) -> str:
    if match.missing:
        hash_text = f" (hash {match.file_hash})" if match.file_hash else ""
        return f"{match.name} at {match.scale:g}: missing — no local LoRA has this name or hash{hash_text}."
    via = "by hash" if match.matched_by == BY_HASH else "by name"
    renamed = f" → local file {match.local_name}" if match.local_name != match.name else ""
    note = f" {match.note}" if match.note else ""
    return f"{match.name} at {match.scale:g}: found {via}{renamed}.{note}"


def png_info_text(info: PngInfo) -> str:
    """Markdown for the PNG Info tab: the parameters, each LoRA's match, and any problems."""
    if not info.has_parameters:
        return NO_PARAMETERS
    p = info.parsed
    rows = [
        ("Prompt", strip_lora_tags(p.prompt)),
        ("Negative prompt", p.negative_prompt),
        ("Steps", p.steps),
        ("Sampler", p.sampler),
        ("CFG scale", p.guidance_scale),
        # Forge's Flux dev text: "CFG scale: 1" beside it; this is the guidance that ran.
        ("Distilled CFG Scale", p.distilled_guidance),
        ("Seed", p.seed),
        ("Variation", variation_text(p.variation_seed, p.variation_strength)),
        ("Hires fix", hires_text(p.hires)),
        ("Size", f"{p.width}x{p.height}" if p.width and p.height else None),
        ("Model", p.model_name),
        ("Model hash", p.model_hash),
        ("Version", p.version),
        *sorted(p.extra.items()),
    ]
    lines = [f"**{key}:** {value}" for key, value in rows if value not in (None, "")]
    if info.loras:
        lines.append("**LoRAs:**")
        lines += [f"- {'⚠️ ' if lora.missing else ''}{lora_match_text(lora)}" for lora in info.loras]
    lines += [f"⚠️ {problem}" for problem in info.problems]
    return "\n\n".join(lines)


def image_details_text(details: ImageDetails) -> str:
    """Markdown for the Gallery tab: every parameter, LoRAs with their hashes."""
    r = details.record
    created = r.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if r.created_at else None
    model = r.model_name + (f" (hash {r.model_hash})" if r.model_hash else "") if r.model_name else None
    rows = [
        ("Image", f"#{r.id}" + (" ★ starred" if r.starred else "")),
        ("Created", created),
        ("Prompt", r.prompt),
        ("Negative prompt", r.negative_prompt),
        ("LoRAs", ", ".join(_lora_text(lora.name, lora.scale, lora.file_hash) for lora in r.loras)),
        ("Steps", r.steps),
        ("Sampler", r.sampler),
        # Flux dev's guidance is distilled guidance (no classifier-free guidance), as Forge names it.
        ("Distilled CFG Scale" if r.distilled_guidance else "CFG scale", r.guidance_scale),
        ("Seed", r.seed),
        ("Variation", variation_text(r.variation_seed, r.variation_strength)),
        ("Hires fix", hires_text(r.hires)),
        ("Size", f"{r.width}x{r.height}" if r.width and r.height else None),
        ("Model", model),
        ("Job", r.job_id),
        ("File", r.path),
    ]
    return "\n\n".join(f"**{key}:** {value}" for key, value in rows if value not in (None, ""))


def variation_text(seed: int | None, strength: float | None) -> str | None:
    """``seed 77 at strength 0.2``; None when the image is not a variation."""
    return f"seed {seed} at strength {strength:g}" if seed is not None and strength else None


def hires_text(use) -> str | None:
    """``Latent ×2, 10 steps, denoising 0.5``; None without a hires fix (``use``: a gallery HiresUse)."""
    if use is None:
        return None
    size = f"to {use.resize_x}x{use.resize_y}" if use.resize_x or use.resize_y else f"×{use.scale or 0:g}"
    parts = [f"{use.upscaler} {size}", f"{use.steps} steps" if use.steps else "steps as the first pass"]
    if use.denoising_strength is not None:
        parts.append(f"denoising {use.denoising_strength:g}")
    return ", ".join(parts)


def _lora_text(name: str, scale: float, file_hash: str | None) -> str:
    return f"{name} at {scale:g}" + (f" (hash {file_hash})" if file_hash else "")


# --- prompt tools ------------------------------------------------------------------------------------


def backend_text(info: BackendInfo) -> str:
    text = f"Prompt backend: {info.label}"
    if info.why:
        text += f" ({info.why})"
    if info.name == "rules":
        text += " — keywords, trigger words and style words joined by rules"
    elif info.name in ("transformers", "smollm2") and not info.loaded:
        text += " — loads on first use"
    return text


# --- Train tab ----------------------------------------------------------------------------------------


def training_run_text(run: TrainingRun) -> str:
    job = run.job
    if job.status == ERROR:
        return f"Training failed: {job.error}"
    result = run.result
    if result is not None and result.cancelled:
        where = (
            f" Checkpoint kept: {result.checkpoint.name}; Start training again to resume." if result.checkpoint else ""
        )
        return f"Cancelled at step {result.steps} of {result.total_steps}.{where}"
    if result is not None and result.lora_path is not None:
        return (
            f"Done: LoRA **{run.config.name}** ({result.steps} steps) is in the LoRA list — press "
            f"Refresh LoRAs in the Generate tab and use the trigger word “{run.config.trigger}”."
        )
    if job.status in FINISHED:
        return f"Training {job.status}."
    if run.progress is None:
        return "Queued: waiting for the GPU queue." if job.status == QUEUED else "Starting…"
    return run.progress.describe()
