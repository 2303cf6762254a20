"""Prompt-tool results, presets and streams as plain data for the REST API (``/api/v1/prompts``).

``PromptService`` writes; this turns what it returns into JSON-able dicts and a stream of
``(event, data)`` pairs for Server-Sent Events. Never imports gradio or fastapi.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from lorapg.errors import UserError
from lorapg.prompting import PresetCatalog, PromptResult
from lorapg.services.prompts import StreamItem, result_note

log = logging.getLogger(__name__)

TOKEN, COMPLETE, ERROR = "token", "complete", "error"


def result_view(result: PromptResult) -> dict[str, Any]:
    return {
        "prompt": result.text,
        "backend": result.backend_label,
        "fell_back": result.fell_back,
        "reason": result.reason,
        "token_count": result.token_count,
        "truncated_words": list(result.truncated_words),
        "seed": result.seed,
        "note": result_note(result),
    }


def presets_view(catalog: PresetCatalog) -> dict[str, Any]:
    presets = [
        {
            "name": p.name,
            "label": p.label,
            "llm": p.llm,
            "instruction": p.instruction,
            "style_words": list(p.style_words),
        }
        for p in catalog
    ]
    return {"presets": presets, "problems": list(catalog.errors)}


def stream_events(stream: Iterator[StreamItem]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``token`` with the text so far (the cleaned text can change, not only grow: show it whole)
    for each change, then ``complete`` with the result, or ``error`` with a message."""
    try:
        for item in stream:
            if isinstance(item, PromptResult):
                yield COMPLETE, result_view(item)
                return
            yield TOKEN, {"text": item}
    except UserError as exc:
        yield ERROR, {"message": str(exc)}
        return
    except Exception:  # a bug: logged here with its traceback, the client gets one line
        log.exception("prompt stream failed")
        yield ERROR, {"message": "Internal error; the server log has the details."}
        return
    yield ERROR, {"message": "The prompt writer ended without a result."}
