"""Prompt writing: LLM backends, rewrite presets, keyword enhancement, output cleaning.

No UI here (never imports gradio) and nothing runs at import: models load on first use.
"""

from lorapg.prompting.backends import (
    DEFAULT_LLM_ID,
    BundledSmolLMBackend,
    LLMBackend,
    OpenAICompatibleBackend,
    RulesBackend,
    TransformersBackend,
    bundled_model_available,
    locate_bundled_gguf,
)
from lorapg.prompting.cleaning import clean_llm_output
from lorapg.prompting.presets import PresetCatalog, RewritePreset, load_presets
from lorapg.prompting.tokens import (
    CLIP_CONTENT_LIMIT,
    count_clip_tokens,
    count_prompt_chunks,
    truncate_to_clip,
)
from lorapg.prompting.writer import LoraHint, PromptResult, PromptWriter

__all__ = [
    "CLIP_CONTENT_LIMIT",
    "DEFAULT_LLM_ID",
    "BundledSmolLMBackend",
    "LLMBackend",
    "LoraHint",
    "OpenAICompatibleBackend",
    "PresetCatalog",
    "PromptResult",
    "PromptWriter",
    "RewritePreset",
    "RulesBackend",
    "TransformersBackend",
    "bundled_model_available",
    "clean_llm_output",
    "count_clip_tokens",
    "count_prompt_chunks",
    "load_presets",
    "locate_bundled_gguf",
    "truncate_to_clip",
]
