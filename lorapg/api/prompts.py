"""Prompt tools over HTTP: ``/api/v1/prompts/{presets,enhance,rewrite}``, each write also as SSE.

``POST /enhance`` and ``/rewrite`` answer once with the finished prompt; ``POST /enhance/stream`` and
``/rewrite/stream`` take the same body and answer with Server-Sent Events: ``token`` (the text so
far, whole) while the LLM writes, then ``complete`` (the same object the plain route returns) or
``error``. Bad input is a 400/422 before any event, because the stream is started in a dependency,
which FastAPI runs before it sends the response's first byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, Field

from lorapg.api.auth import ApiAccess
from lorapg.api.routing import api_router
from lorapg.services.prompt_events import presets_view, result_view, stream_events
from lorapg.services.prompts import PromptService, StreamItem

PREFIX = "/api/v1/prompts"

_RESULT_EXAMPLE = {
    "prompt": "zqstyle, red fox, snowy forest, soft morning light, highly detailed",
    "backend": "SmolLM2 135M (CPU)",
    "fell_back": False,
    "reason": None,
    "token_count": 17,
    "truncated_words": [],
    "seed": 7,
    "note": "written by SmolLM2 135M (CPU), seed 7",
}
_SSE_EXAMPLE = (
    'event: token\ndata: {"text": "red fox"}\n\n'
    'event: token\ndata: {"text": "red fox, snowy forest"}\n\n'
    f'event: complete\ndata: {{"prompt": "{_RESULT_EXAMPLE["prompt"]}", …}}\n\n'
)
_SSE_RESPONSE = {
    200: {
        "description": "Server-Sent Events: `token` {text} (the prompt so far) per change, then "
        "`complete` (a PromptReply) or `error` {message}.",
        "content": {"text/event-stream": {"example": _SSE_EXAMPLE}},
    }
}


class EnhanceRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"keywords": "red fox, snowy forest", "loras": ["triggered"], "seed": 7}]}
    )

    keywords: str = Field(description="A few keywords: a subject, a mood, a setting.")
    loras: list[str] = Field(default=[], description="LoRA names whose trigger words and style guide the writing.")
    seed: int | None = Field(default=None, description="LLM sampling seed; null or -1: random.")


class RewriteRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"prompt": "a red fox in a snowy forest", "preset": "cinematic", "seed": 7}]}
    )

    prompt: str
    preset: str = Field(description="A preset name from GET /api/v1/prompts/presets.")
    loras: list[str] = Field(default=[], description="LoRA names whose trigger words are kept.")
    seed: int | None = Field(default=None, description="LLM sampling seed; null or -1: random.")


class PromptReply(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_RESULT_EXAMPLE]})

    prompt: str
    backend: str = Field(description="Who wrote it.")
    fell_back: bool = Field(description="True when the rules wrote it because the LLM could not.")
    reason: str | None = Field(description="Why the rules wrote it, when they had to.")
    token_count: int | None = Field(description="CLIP tokens, when a base model is loaded.")
    truncated_words: list[str]
    seed: int | None
    note: str = Field(description="One line for a person.")


class PresetItem(BaseModel):
    name: str
    label: str
    llm: bool = Field(description="False: applied by rules alone (style words appended).")
    instruction: str
    style_words: list[str]


class PresetList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "presets": [
                        {
                            "name": "hd",
                            "label": "HD",
                            "llm": False,
                            "instruction": "Add quality words.",
                            "style_words": ["masterpiece", "best quality", "highly detailed", "8k"],
                        }
                    ],
                    "problems": [],
                }
            ]
        }
    )

    presets: list[PresetItem]
    problems: list[str] = Field(description="One line per preset file that did not load.")


def prompts_router(service: PromptService, access: ApiAccess) -> APIRouter:
    router = api_router(PREFIX, "Prompt tools", access)

    # The streams start in dependencies: bad input raises there, before the 200 goes out.
    def start_enhance(body: EnhanceRequest) -> Iterator[StreamItem]:
        return service.enhance_stream(body.keywords, body.loras, body.seed)

    def start_rewrite(body: RewriteRequest) -> Iterator[StreamItem]:
        return service.rewrite_stream(body.prompt, body.preset, body.loras, body.seed)

    @router.get("/presets", response_model=PresetList, summary="The rewrite presets")
    def presets() -> dict[str, Any]:
        return presets_view(service.presets())

    @router.post("/enhance", response_model=PromptReply, summary="Keywords to a prompt")
    def enhance(body: EnhanceRequest) -> dict[str, Any]:
        return result_view(service.enhance(body.keywords, body.loras, body.seed))

    @router.post("/rewrite", response_model=PromptReply, summary="Rewrite a prompt in a preset's style")
    def rewrite(body: RewriteRequest) -> dict[str, Any]:
        return result_view(service.rewrite(body.prompt, body.preset, body.loras, body.seed))

    @router.post(
        "/enhance/stream",
        response_class=EventSourceResponse,
        responses=_SSE_RESPONSE,
        summary="Keywords to a prompt, streamed as Server-Sent Events",
    )
    def enhance_stream(stream: Iterator[StreamItem] = Depends(start_enhance)) -> Iterator[ServerSentEvent]:
        for event, data in stream_events(stream):
            yield ServerSentEvent(event=event, data=data)

    @router.post(
        "/rewrite/stream",
        response_class=EventSourceResponse,
        responses=_SSE_RESPONSE,
        summary="Rewrite a prompt, streamed as Server-Sent Events",
    )
    def rewrite_stream(stream: Iterator[StreamItem] = Depends(start_rewrite)) -> Iterator[ServerSentEvent]:
        for event, data in stream_events(stream):
            yield ServerSentEvent(event=event, data=data)

    return router
