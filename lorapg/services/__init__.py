"""The service layer: the one place the UI, the CLI and the REST API call. Never imports gradio.

- ``generation``: ``GenerationService`` (models, generate, memory)
- ``gallery``: ``GalleryService`` (list, show, star, delete, export, reuse)
- ``prompts``: ``PromptService`` (LLM enhance and rewrite presets)
- ``training``: ``TrainingService`` (datasets and LoRA training runs)
- ``build``: ``build_services(settings)``, the one place all of them and what they share are built

The names are re-exported lazily: ``from lorapg.services import GalleryService`` imports only the
gallery service, so the CLI's gallery commands do not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorapg.services.build import Services, build_services
    from lorapg.services.gallery import GalleryService
    from lorapg.services.generation import GenerationService
    from lorapg.services.prompts import PromptService
    from lorapg.services.training import TrainingService

_HOME = {
    "GenerationService": "generation",
    "GalleryService": "gallery",
    "PromptService": "prompts",
    "TrainingService": "training",
    "Services": "build",
    "build_services": "build",
}

__all__ = [
    "GalleryService",
    "GenerationService",
    "PromptService",
    "Services",
    "TrainingService",
    "build_services",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
