"""Keyword enhancement and style rewrites: the prompt logic on top of any ``LLMBackend``.

The writer owns everything a model cannot be trusted with: LoRA trigger words are always in the
result, the result is one clean line, it fits the 75 tokens CLIP reads (when a tokenizer is
given), HD never asks a model, and when the model fails in any way the rules answer instead and
the result says so (``fell_back`` + ``reason``), so the UI never shows an error for a prompt.
"""

from __future__ import annotations

import inspect
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorapg.errors import UserError
from lorapg.prompting.backends import LLMBackend, RulesBackend
from lorapg.prompting.cleaning import clean_llm_output
from lorapg.prompting.presets import PresetCatalog, RewritePreset
from lorapg.prompting.tokens import (
    CLIP_CONTENT_LIMIT,
    count_clip_tokens,
    fit_phrases,
    join_phrases,
    split_phrases,
)

logger = logging.getLogger(__name__)

# Words the rules backend adds to bare keywords: safe with any subject and any base model.
DETAIL_WORDS = ("highly detailed", "intricate details", "sharp focus", "professional lighting")
MAX_WORDS = 70  # a little under what 75 CLIP tokens hold, before the exact trim
MAX_NEW_TOKENS = 120  # enough for ~70 words; a model that rambles longer is cut here


@dataclass
class LoraHint:
    """What the writer knows about a selected LoRA."""

    name: str
    trigger_words: list[str] = field(default_factory=list)
    style: str = ""  # a short description, e.g. "flat cel-shaded anime, bold outlines"


@dataclass
class PromptResult:
    text: str
    backend_label: str
    fell_back: bool = False
    reason: str | None = None  # why the rules answered instead of the model
    token_count: int | None = None  # CLIP content tokens, when a tokenizer was given
    truncated_words: list[str] = field(default_factory=list)  # phrases trimmed to fit 75 tokens
    seed: int | None = None  # the seed the model sampled with (reuse it to get the same text)


class _Failed(Exception):
    """The model gave no usable prompt; the message is the user-facing reason."""


class ModelThreads:
    """The threads that run a backend for prompt writers, so that they can be stopped and joined.

    A writer stops waiting for a model at its deadline, but a model thread is inside torch until its
    current step ends; a process that exits then aborts ("terminate called without an active exception",
    status 134: a daemon thread still in native code at interpreter shutdown). So every thread gets a
    stop flag the backend checks between tokens, and ``close`` (the CLI and the service call it before
    they let go) sets every flag and waits until each thread has ended.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[threading.Thread, threading.Event] = {}
        self._closed = False

    def start(self, work: Callable[[threading.Event], None], name: str) -> threading.Event:
        """Run ``work(stop)`` in a new daemon thread; returns its stop flag. Refused after ``close``."""
        stop = threading.Event()

        def run() -> None:
            try:
                work(stop)
            finally:
                with self._lock:
                    self._running.pop(thread, None)

        # A daemon thread: one that never ends (a backend that ignores its flag) must not keep an app
        # from exiting; close() is what makes the usual case clean.
        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            if self._closed:
                raise _Failed("prompt writing is shutting down")
            self._running[thread] = stop
            thread.start()
        return stop

    def close(self, timeout: float | None = None) -> bool:
        """Stop every thread, refuse new ones, and wait until all have ended; True if they have.

        ``timeout`` bounds the whole wait (None: until they end, which is one model step).
        """
        with self._lock:
            self._closed = True
            running = dict(self._running)
        for stop in running.values():
            stop.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in running:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in running)


class PromptWriter:
    """``enhance`` keywords into a prompt and ``rewrite`` a prompt with a preset."""

    def __init__(
        self,
        backend: LLMBackend,
        presets: PresetCatalog,
        tokenizer: Any = None,
        *,
        timeout_s: float = 60.0,
        grace_s: float = 5.0,
        token_limit: int = CLIP_CONTENT_LIMIT,
        threads: ModelThreads | None = None,
    ) -> None:
        self.backend = backend
        self.presets = presets
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        # The backend is asked to stop itself after timeout_s; the writer stops waiting grace_s
        # later in case it does not (a hung socket, a model that ignores max_time).
        self.grace_s = grace_s
        self.token_limit = token_limit
        self.rules = RulesBackend()
        # Shared by every writer of one service, so that its close() reaches all of their threads.
        self.threads = threads if threads is not None else ModelThreads()

    def close(self, timeout: float | None = None) -> bool:
        """Stop the model threads this writer started and wait for them (see ``ModelThreads``)."""
        return self.threads.close(timeout)

    # -- public API ----------------------------------------------------------------------------

    def enhance(self, keywords: str, loras: Sequence[LoraHint] = (), seed: int | None = None) -> PromptResult:
        """Expand a few keywords (subject, mood, setting) into one detailed SD prompt."""
        return _last(self.enhance_stream(keywords, loras, seed))

    def rewrite(
        self, prompt: str, preset_name: str, loras: Sequence[LoraHint] = (), seed: int | None = None
    ) -> PromptResult:
        """Apply a rewrite preset to ``prompt``; presets with ``llm = false`` never call a model."""
        return _last(self.rewrite_stream(prompt, preset_name, loras, seed))

    def enhance_stream(
        self, keywords: str, loras: Sequence[LoraHint] = (), seed: int | None = None
    ) -> Iterator[str | PromptResult]:
        """Like ``enhance``, but first yields the text so far (str) while the model writes.

        The last item is always the finished ``PromptResult``; bad input raises before any yield.
        """
        keywords = " ".join(keywords.split())
        if not keywords:
            raise UserError("Type a few keywords first (a subject, a mood, a setting).")
        system = _enhance_system(loras)
        user = f"Keywords: {keywords}"
        return self._write(
            system,
            user,
            loras,
            seed,
            source=keywords,
            rules=lambda: rules_enhance(keywords, loras),
            keep=split_phrases(keywords),
        )

    def rewrite_stream(
        self, prompt: str, preset_name: str, loras: Sequence[LoraHint] = (), seed: int | None = None
    ) -> Iterator[str | PromptResult]:
        """Like ``rewrite``, yielding the text so far first (see ``enhance_stream``)."""
        prompt = " ".join(prompt.split())
        if not prompt:
            raise UserError("There is no prompt to rewrite yet; write or enhance one first.")
        preset = self.presets.get(preset_name)

        def rules() -> str:
            return append_style_words(prompt, preset.style_words)

        if not preset.llm:
            return iter([self._finish(rules(), loras, f"{preset.label} preset (no LLM)")])
        system = _rewrite_system(preset, loras)
        user = f"Prompt: {prompt}"
        return self._write(system, user, loras, seed, source=prompt, rules=rules)

    def uses_model(self, preset_name: str | None = None) -> bool:
        """Whether a call would ask the model (False for the rules backend and ``llm = false``)."""
        if isinstance(self.backend, RulesBackend):
            return False
        return preset_name is None or self.presets.get(preset_name).llm

    # -- the model path, with fallback -----------------------------------------------------------

    def _write(
        self,
        system: str,
        user: str,
        loras: Sequence[LoraHint],
        seed: int | None,
        *,
        source: str,
        rules: Callable[[], str],
        keep: Sequence[str] = (),
    ) -> Iterator[str | PromptResult]:
        if isinstance(self.backend, RulesBackend):
            yield self._finish(rules(), loras, self.rules.label)
            return
        seed = random.randrange(2**31) if seed is None else seed
        try:
            raw, shown = "", ""
            for raw in self._raw_stream(system, user, seed):
                # Show the text cleaned as it grows, so a preamble never flashes up in the prompt box.
                partial = clean_llm_output(raw, max_words=MAX_WORDS)
                if partial and partial != shown:
                    shown = partial
                    yield partial
            text = self._usable(raw, source)
        except _Failed as exc:
            logger.warning("prompt LLM %s failed, using rules: %s", self.backend.label, exc)
            result = self._finish(rules(), loras, self.rules.label)
            result.fell_back, result.reason = True, str(exc)
            yield result
            return
        # A prompt that lost the user's subject is worse than none: put back any keyword it dropped.
        result = self._finish(ensure_keywords(text, keep), loras, self.backend.label)
        result.seed = seed
        yield result

    def _raw_stream(self, system: str, user: str, seed: int) -> Iterator[str]:
        """The model's growing raw answer; ``_Failed`` with a reason a user can read on any failure."""
        try:
            # Loading a model is not generating: give it its own (untimed) step, so the first
            # request after start-up does not time out while a 7B model is still being read.
            prepare = getattr(self.backend, "ensure_loaded", None)
            if callable(prepare):
                prepare()
            yield from self._stream_with_deadline(system, user, seed)
        except _Failed:
            raise
        except UserError as exc:
            raise _Failed(str(exc)) from exc
        except Exception as exc:
            logger.exception("prompt LLM %s raised", self.backend.label)
            raise _Failed(f"{self.backend.label} failed: {type(exc).__name__}: {exc}") from exc

    def _usable(self, raw: str, source: str) -> str:
        """The cleaned model answer, or ``_Failed`` when there is nothing on-topic in it."""
        # Small models loop ("snowy forest, snowy forest, ..."); a repeated phrase adds nothing.
        text = join_phrases(_dedupe(split_phrases(clean_llm_output(raw, max_words=MAX_WORDS))))
        if not text:
            raise _Failed(f"{self.backend.label} returned no usable prompt")
        if not _shares_a_word(source, text):
            # A reply about something else entirely (small models drift into stories or chat)
            # is worse than the rules' plain but on-topic prompt.
            raise _Failed(f"{self.backend.label} answered off-topic: {text[:80]!r}")
        return text

    def _stream_with_deadline(self, system: str, user: str, seed: int) -> Iterator[str]:
        """Run the backend in a worker thread; yield the text so far; give up at the deadline.

        Backends with a ``stream`` method hand over pieces as they come; the others answer once.
        Whenever this stops reading (the answer ended, the deadline passed, the caller went away),
        the worker's stop flag is set: the model stops at its next token, and ``close`` joins it.
        """
        pieces: queue.Queue[tuple[str, Any]] = queue.Queue()
        stream = getattr(self.backend, "stream", None)
        kwargs: dict[str, Any] = {"seed": seed, "max_new_tokens": MAX_NEW_TOKENS, "timeout_s": self.timeout_s}

        def work(stop: threading.Event) -> None:
            call_kwargs = {**kwargs, "stop": stop} if _takes_stop(stream or self.backend.complete) else kwargs
            try:
                if callable(stream):
                    for piece in stream(system, user, **call_kwargs):
                        if stop.is_set():
                            break  # closes the backend's stream, which ends its own work
                        pieces.put(("piece", piece))
                else:
                    pieces.put(("piece", self.backend.complete(system, user, **call_kwargs)))
                pieces.put(("end", None))
            except BaseException as exc:  # handed to the waiting thread, re-raised there
                pieces.put(("error", exc))

        stop = self.threads.start(work, name="prompt-llm")
        try:
            yield from self._read_until(pieces, time.monotonic() + self.timeout_s + self.grace_s)
        finally:
            stop.set()

    def _read_until(self, pieces: queue.Queue[tuple[str, Any]], deadline: float) -> Iterator[str]:
        text = ""
        while True:
            try:
                kind, value = pieces.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise _Failed(f"{self.backend.label} did not answer within {self.timeout_s:g} s") from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            if isinstance(value, str) and value:
                text += value
                yield text

    # -- shared finishing: triggers, token budget ---------------------------------------------------

    def _finish(self, text: str, loras: Sequence[LoraHint], label: str) -> PromptResult:
        triggers = _triggers(loras)
        phrases = split_phrases(ensure_trigger_words(text, triggers))
        dropped: list[str] = []
        count: int | None = None
        if self.tokenizer is not None:
            phrases, dropped = fit_phrases(
                phrases, self.tokenizer, self.token_limit, protected=lambda phrase: _mentions_any(phrase, triggers)
            )
        final = join_phrases(phrases)
        if self.tokenizer is not None:
            count = count_clip_tokens(final, self.tokenizer)
        return PromptResult(text=final, backend_label=label, token_count=count, truncated_words=dropped)


# -- prompt text for the model ---------------------------------------------------------------------

_FORMAT_RULES = (
    "Answer with the prompt only: one line of comma-separated phrases, most important first, "
    f"at most {MAX_WORDS - 10} words. No quotes, no lists, no explanations, no preamble."
)


def _lora_lines(loras: Sequence[LoraHint]) -> str:
    if not loras:
        return ""
    lines = []
    for lora in loras:
        parts = [f"- {lora.name}"]
        if lora.style:
            parts.append(f"style: {lora.style}")
        if lora.trigger_words:
            parts.append(f"trigger words: {', '.join(lora.trigger_words)}")
        lines.append("; ".join(parts))
    return (
        "\nThe image uses these LoRA styles; choose wording that plays to their strengths, and "
        "start the prompt with their trigger words exactly as written:\n" + "\n".join(lines)
    )


def _enhance_system(loras: Sequence[LoraHint]) -> str:
    return (
        "You write prompts for Stable Diffusion image generation. Turn the user's keywords into "
        "one detailed prompt. Keep every keyword's meaning. Order: subject and what it does, "
        "then setting, mood, lighting, composition, art style, quality words. "
        + _FORMAT_RULES
        + "\nExample: keywords 'fox, snowy forest, calm' -> a red fox sitting in a snowy pine "
        "forest, calm winter morning, soft falling snow, golden backlight, shallow depth of "
        "field, wildlife photography, highly detailed" + _lora_lines(loras)
    )


def _rewrite_system(preset: RewritePreset, loras: Sequence[LoraHint]) -> str:
    return (
        "You rewrite prompts for Stable Diffusion image generation. "
        f"Style '{preset.label}': {preset.instruction} "
        f"Useful terms: {', '.join(preset.style_words)}. " + _FORMAT_RULES + _lora_lines(loras)
    )


def _takes_stop(method: Callable[..., Any]) -> bool:
    """Whether a backend method has a ``stop`` parameter (backends written without one still work)."""
    try:
        return "stop" in inspect.signature(method).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a readable signature
        return False


def _last(items: Iterator[str | PromptResult]) -> PromptResult:
    *_, result = items
    assert isinstance(result, PromptResult)  # every stream ends with its result
    return result


# -- helpers shared with the rules path ------------------------------------------------------------


def _triggers(loras: Iterable[LoraHint]) -> list[str]:
    words: list[str] = []
    for lora in loras:
        words.extend(" ".join(w.split()) for w in lora.trigger_words if w.strip())
    return _dedupe(words)


def _norm(phrase: str) -> str:
    """Compare phrases ignoring case, attention weights "(word:1.2)" and brackets."""
    phrase = re.sub(r":\s*-?\d+(?:\.\d+)?", "", phrase.lower())
    phrase = re.sub(r"[()\[\]{}]", " ", phrase)
    return " ".join(phrase.split())


def _contains(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words (case/weight-insensitive)."""
    needle = _norm(phrase)
    if not needle:
        return True
    return re.search(rf"(?<![\w-]){re.escape(needle)}(?![\w-])", _norm(text)) is not None


def _mentions_any(phrase: str, triggers: Sequence[str]) -> bool:
    return any(_contains(phrase, t) for t in triggers)


_STOPWORDS = frozenset(
    {
        "the",
        "and",
        "with",
        "for",
        "from",
        "into",
        "onto",
        "over",
        "under",
        "its",
        "his",
        "her",
        "their",
        "this",
        "that",
        "very",
        "style",
    }
)


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[^\W\d_]{3,}", text.lower()) if w not in _STOPWORDS}


def _shares_a_word(source: str, text: str) -> bool:
    """Whether ``text`` keeps at least one content word of ``source`` ("fox" ~ "foxes")."""
    wanted = _content_words(source)
    if not wanted:
        return True
    found = _content_words(text)
    return any(a.startswith(b) or b.startswith(a) for a in wanted for b in found)


def _dedupe(phrases: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for phrase in phrases:
        key = _norm(phrase)
        if key and key not in seen:
            seen.add(key)
            out.append(phrase.strip())
    return out


def rules_enhance(keywords: str, loras: Sequence[LoraHint]) -> str:
    """The no-model enhancement: trigger words, the keywords, then generic detail words."""
    return join_phrases(_dedupe([*_triggers(loras), *split_phrases(keywords), *DETAIL_WORDS]))


def ensure_trigger_words(text: str, triggers: Sequence[str]) -> str:
    """Put every trigger word the text lacks at its front (in LoRA order)."""
    missing = [t for t in triggers if not _contains(text, t)]
    return join_phrases([*missing, *split_phrases(text)])


def _keeps_words(text: str, phrase: str) -> bool:
    """Whether every content word of ``phrase`` is in ``text``, allowing inflection ("fox" ~ "foxes")."""
    found = re.findall(r"[^\W_]+", _norm(text))
    for word in re.findall(r"[^\W_]+", _norm(phrase)):
        stem = word[: max(3, len(word) - 2)]
        if len(word) > 2 and word not in _STOPWORDS and not any(w.startswith(stem) for w in found):
            return False
    return True


def ensure_keywords(text: str, keywords: Sequence[str]) -> str:
    """Put each keyword phrase whose words the text lacks at its front, in the user's order."""
    missing = [k for k in keywords if not _keeps_words(text, k)]
    return join_phrases([*missing, *split_phrases(text)])


def append_style_words(prompt: str, words: Sequence[str]) -> str:
    """``prompt`` plus each of ``words`` it does not already contain, in order.

    Applying it twice changes nothing the second time, which is what makes HD safe to click again.
    """
    phrases = split_phrases(prompt)
    for word in words:
        if not _contains(join_phrases(phrases), word):
            phrases.append(word)
    return join_phrases(phrases)
