"""Prompt tools inside the Generate tab: keywords → Enhance, one button per rewrite preset, Undo,
the CLIP token count, and an "LLM settings" accordion. Handlers only call ``PromptService``."""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from lorapg.errors import UserError
from lorapg.prompting import CLIP_CONTENT_LIMIT, PromptResult
from lorapg.services.prompts import BACKEND_CHOICES, PromptService, StreamItem, result_note
from lorapg.ui.common import user_errors
from lorapg.ui.texts import backend_text

MAX_UNDO = 50  # earlier prompts kept per browser tab


def raw_values(component: gr.components.Component) -> gr.components.Component:
    """Hand an API client's value to the handler unchanged, for the service to check and name the field.

    Gradio's own preprocessing turns a list into its ``str()`` in a Textbox (``["a"]`` would be
    enhanced as the text "['a']") and fails on NaN or text in a Number with "Could not preprocess
    input component at index 4". Set on the instance: a Component subclass would make Gradio write a
    ``.pyi`` stub next to this module at import.
    """
    component.preprocess = _unchanged
    return component


def _unchanged(payload):
    return payload


def token_count_text(count: int | None) -> str:
    if count is None:
        return f"– / {CLIP_CONTENT_LIMIT} tokens (load a base model to count with its tokenizer)"
    if count > CLIP_CONTENT_LIMIT:
        return f"⚠️ {count} / {CLIP_CONTENT_LIMIT} tokens — the text encoder ignores the words past {CLIP_CONTENT_LIMIT}"
    return f"{count} / {CLIP_CONTENT_LIMIT} tokens"


def prompt_size_text(size: tuple[int, int] | None) -> str:
    """The live counter under the prompt: tokens, and chunks once the prompt needs more than one."""
    if size is None:
        return token_count_text(None)
    tokens, chunks = size
    if chunks == 1:
        return f"{tokens} / {CLIP_CONTENT_LIMIT} tokens"
    return f"{tokens} tokens, {chunks} chunks (encoded {CLIP_CONTENT_LIMIT} tokens at a time, as A1111 does)"


def result_status(result: PromptResult) -> str:
    note = result_note(result)
    if result.fell_back:
        return f"⚠️ {note}"
    tokens = "" if result.token_count is None else f" · {token_count_text(result.token_count)}"
    return f"✅ {note}{tokens}"


def push(stack: list[str] | None, previous: str, new: str) -> list[str]:
    """The undo stack after replacing ``previous`` with ``new`` (no entry when nothing changed)."""
    stack = list(stack or [])
    if previous and previous != new and (not stack or stack[-1] != previous):
        stack.append(previous)
    return stack[-MAX_UNDO:]


def stream_into_prompt(stream: Iterator[StreamItem], current: str, stack: list[str], label: str):
    """Outputs (prompt, history, status) while the text streams in, then the final result."""
    yield gr.update(), stack, f"✍️ {label} is writing…"
    try:
        for item in stream:
            if isinstance(item, PromptResult):
                yield item.text, push(stack, current, item.text), result_status(item)
            else:
                yield item, stack, f"✍️ {label} is writing…"
    except UserError:
        yield current, stack, ""  # put back what the user had before re-raising
        raise


def build_prompt_tools(prompts: PromptService, generate: dict) -> dict[str, gr.components.Component]:
    """Widgets under the prompt box; ``generate`` holds the Generate tab's "prompt" and "lora_select"."""
    prompt, lora_select = generate["prompt"], generate["lora_select"]
    info = prompts.backend_info()
    catalog = prompts.presets()

    with gr.Group():
        token_display = gr.Markdown(prompt_size_text(prompts.prompt_size("")), elem_id="token-count")
        with gr.Row(equal_height=True):
            keywords = raw_values(
                gr.Textbox(label="Keywords", placeholder="red fox, snowy forest, calm", elem_id="keywords", scale=5)
            )
            enhance_button = gr.Button("Enhance", elem_id="enhance", scale=1)
        with gr.Row():
            preset_buttons = [(p.name, gr.Button(p.label, size="sm", elem_id=f"preset-{p.name}")) for p in catalog]
            undo_button = gr.Button("↶ Undo", size="sm", elem_id="undo-prompt")
        tool_status = gr.Markdown(backend_text(info), elem_id="prompt-tool-status")
        if catalog.errors:
            gr.Markdown("⚠️ Presets not loaded: " + "; ".join(catalog.errors))
    history = gr.State([])
    # The /rewrite API takes the preset by name; the buttons above fill it in for the UI.
    preset_box = raw_values(gr.Textbox(visible=False))
    rewrite_api = gr.Button(visible=False)
    # The /rewrite API reads the prompt from this hidden box: the visible prompt box is the Generate
    # tab's Textbox, whose preprocessing would turn a list into text.
    api_prompt = raw_values(gr.Textbox(visible=False))

    with gr.Accordion("LLM settings", open=False):
        with gr.Row():
            backend_box = gr.Dropdown(
                list(BACKEND_CHOICES), value=prompts.settings.llm_backend, label="Backend", elem_id="llm-backend"
            )
            model_box = gr.Textbox(
                prompts.settings.llm_model or "",
                label="Model (hub id, folder, .gguf, or name)",
                placeholder="auto: Qwen/Qwen2.5-7B-Instruct on a GPU",
            )
            url_box = gr.Textbox(
                prompts.settings.llm_url or "", label="OpenAI-compatible URL", placeholder="http://127.0.0.1:11434/v1"
            )
            key_box = gr.Textbox(label="API key (optional)", type="password")
        with gr.Row():
            llm_seed = raw_values(gr.Number(value=-1, precision=0, label="LLM seed (-1 = random)"))
            apply_button = gr.Button("Apply LLM settings", elem_id="apply-llm")
        with gr.Row():
            note_lora = gr.Dropdown([], label="Style note for a selected LoRA", scale=2)
            note_text = gr.Textbox(label="Style (steers the LLM; e.g. 'flat cel-shaded anime, bold outlines')", scale=4)
            note_save = gr.Button("Save note", size="sm", scale=1)

    # --- events ----------------------------------------------------------------------------

    @user_errors
    def enhance(keywords_text, selected, current_prompt, stack, seed):
        stream = prompts.enhance_stream(keywords_text, selected or [], seed)
        yield from stream_into_prompt(stream, _shown(current_prompt), stack, prompts.backend.label)

    @user_errors
    def rewrite(preset, current_prompt, selected, stack, seed):
        stream = prompts.rewrite_stream(current_prompt, preset, selected or [], seed)
        yield from stream_into_prompt(stream, _shown(current_prompt), stack, prompts.backend.label)

    outputs = [prompt, history, tool_status]
    # Inputs keyed by the handlers' parameter names (which are also the API's parameter names).
    enhance_inputs = {
        "keywords_text": keywords,
        "selected": lora_select,
        "current_prompt": prompt,
        "stack": history,
        "seed": llm_seed,
    }
    enhance_button.click(enhance, inputs_kwargs=enhance_inputs, outputs=outputs, api_name="enhance")
    keywords.submit(enhance, inputs_kwargs=enhance_inputs, outputs=outputs, api_visibility="private")
    rewrite_inputs = {
        "preset": preset_box,
        "current_prompt": api_prompt,
        "selected": lora_select,
        "stack": history,
        "seed": llm_seed,
    }
    rewrite_api.click(rewrite, inputs_kwargs=rewrite_inputs, outputs=outputs, api_name="rewrite")
    for name, button in preset_buttons:
        button.click(lambda n=name: n, None, preset_box, api_visibility="private", show_progress="hidden").then(
            rewrite,
            inputs_kwargs={**rewrite_inputs, "current_prompt": prompt},
            outputs=outputs,
            api_visibility="private",
        )

    def undo(stack):
        stack = list(stack or [])
        if not stack:
            return gr.update(), stack, "Nothing to undo."
        previous = stack.pop()
        return previous, stack, f"Undone ({len(stack)} earlier prompt(s) left)."

    undo_button.click(undo, history, outputs, api_visibility="private")

    def token_count(text):
        # Runs on every keystroke: a refusal (a prompt over the length limit) belongs in the counter,
        # not in an error toast per key.
        try:
            return prompt_size_text(prompts.prompt_size(text))
        except UserError as exc:
            return f"⚠️ {exc}"

    prompt.change(
        token_count, prompt, token_display, api_name="token_count", trigger_mode="always_last", show_progress="hidden"
    )

    @user_errors
    def llm_settings(backend, model, url, api_key):
        return backend_text(prompts.change_backend(backend, model or "", url or "", api_key or ""))

    apply_button.click(
        llm_settings,
        inputs_kwargs={"backend": backend_box, "model": model_box, "url": url_box, "api_key": key_box},
        outputs=tool_status,
        api_name="llm_settings",
    )

    lora_select.change(
        lambda selected: gr.update(choices=list(selected or []), value=(selected or [None])[0]),
        lora_select,
        note_lora,
        api_visibility="private",
    )

    @user_errors
    def load_note(name):
        return prompts.style_note(name) if name else ""

    @user_errors
    def save_note(name, text):
        if not name:
            raise UserError("Select a LoRA above first; its style note steers Enhance and the presets.")
        prompts.set_style_note(name, text or "")
        return f"Saved the style note for {name}."

    note_lora.change(load_note, note_lora, note_text, api_visibility="private")
    note_save.click(
        save_note, inputs_kwargs={"name": note_lora, "text": note_text}, outputs=tool_status, api_name="style_note"
    )

    return {
        "keywords": keywords,
        "token_count": token_display,
        "prompt_tool_status": tool_status,
        "prompt_history": history,
    }


def _shown(prompt) -> str:
    """What the prompt box held, for Undo and to put back on an error (an API client may send anything)."""
    return prompt if isinstance(prompt, str) else ""
