"""Services return data, the UI phrases it (issue 14, item 2).

The services under lorapg/services/ are called by the web UI, the CLI and the REST API: a sentence
naming a button, or Markdown, is right for one of them only. These tests read the services' source
for UI phrasing and check that the UI's phrasing of the values they return says what it said before.
"""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lorapg.errors import UserError
from lorapg.gallery.a1111 import ParsedParameters
from lorapg.gallery.records import ImageRecord, LoraUse
from lorapg.jobs import JobQueue
from lorapg.services.gallery import BY_HASH, ImageDetails, LoraMatch, PngInfo
from lorapg.services.generation import MemoryStatus, ModelStatus
from lorapg.services.prompts import BackendInfo
from lorapg.ui.texts import (
    backend_text,
    image_details_text,
    loading_text,
    lora_match_text,
    memory_text,
    model_status_text,
    png_info_text,
)

SERVICES = Path(__file__).resolve().parents[1] / "lorapg" / "services"
# Markdown (bold, a heading) and words that only make sense in front of a web page.
UI_PHRASING = re.compile(r"\*\*|^#+\s|\bpress\b|\bclick|\btabs?\b|\bbuttons?\b|\bRefresh\b", re.IGNORECASE)


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def test_services_hold_no_ui_phrasing() -> None:
    """String literals (docstrings aside: they talk to developers) carry no Markdown or button names."""
    offending = []
    for path in sorted(SERVICES.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and UI_PHRASING.search(node.value)
            ):
                offending.append(f"{path.name}:{node.lineno}: {node.value[:60]!r}")
    assert not offending, offending


def test_service_dataclasses_have_no_describe_or_summary() -> None:
    """The values are phrased in lorapg/ui/texts.py (web UI) and lorapg/cli.py (one line each)."""
    methods = []
    for path in sorted(SERVICES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                methods += [
                    f"{path.name}: {node.name}.{item.name}"
                    for item in node.body
                    if isinstance(item, ast.FunctionDef) and item.name in ("describe", "summary")
                ]
    assert not methods, methods


def test_model_status_text() -> None:
    assert model_status_text(ModelStatus(None, None, None, False)) == "No base model loaded yet."
    status = ModelStatus("org/model", "sdxl", 1024, True)
    assert model_status_text(status) == "org/model — SDXL, native 1024px"


def test_loading_text_follows_the_job() -> None:
    jobs = JobQueue()
    try:
        assert loading_text(None) is None
        failed = jobs.submit("load-model", lambda job: (_ for _ in ()).throw(UserError("No such model 'x'.")))
        failed.wait(10)
        assert loading_text(failed) == "Loading the model failed: No such model 'x'."
        done = jobs.submit("load-model", lambda job: None)
        done.wait(10)
        assert loading_text(done) is None
    finally:
        jobs.shutdown()


def test_memory_text() -> None:
    assert memory_text(MemoryStatus("cpu", None)) == "Running on CPU: there is no GPU memory to manage."
    assert memory_text(MemoryStatus("cuda", "Policy auto.")) == "Policy auto."
    freed = memory_text(MemoryStatus("cuda", "Policy auto.", ["unet", "vae"]))
    assert freed == "Moved off the GPU: unet, vae.\n\nPolicy auto."
    assert memory_text(MemoryStatus("cuda", "Policy auto.", [])).startswith("Nothing to move")


def test_png_info_text_lists_loras_and_problems() -> None:
    info = PngInfo(
        "a castle <lora:old:0.6>\nSteps: 20",
        ParsedParameters(prompt="a castle <lora:old:0.6>", steps=20),
        loras=[
            LoraMatch("old", 0.6, "abc", local_name="styles/old_v2", matched_by=BY_HASH),
            LoraMatch("ghost", 1.0, "def"),
        ],
        problems=["Unreadable line"],
    )
    text = png_info_text(info)
    assert "**Prompt:** a castle" in text and "<lora:" not in text and "**Steps:** 20" in text
    assert "- old at 0.6: found by hash → local file styles/old_v2." in text
    assert "- ⚠️ ghost at 1: missing — no local LoRA has this name or hash (hash def)." in text
    assert text.endswith("⚠️ Unreadable line")
    assert (
        lora_match_text(LoraMatch("same", 0.5, local_name="same", matched_by="name")) == "same at 0.5: found by name."
    )


def test_image_details_text() -> None:
    record = ImageRecord(
        id=7,
        path=Path("/g/7.png"),
        prompt="a fox",
        negative_prompt="",
        loras=[LoraUse("style", 0.8, "abc123")],
        steps=20,
        guidance_scale=7.0,
        sampler="Euler a",
        seed=5,
        width=512,
        height=512,
        model_name="sd15",
        model_hash="h1",
        job_id="j1",
        starred=True,
        created_at=datetime(2026, 1, 2, tzinfo=UTC),
    )
    text = image_details_text(ImageDetails(record, "a fox\nSteps: 20"))
    assert text.startswith("**Image:** #7 ★ starred")
    assert "**LoRAs:** style at 0.8 (hash abc123)" in text and "**Model:** sd15 (hash h1)" in text
    assert "Negative prompt" not in text  # empty values are left out


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (BackendInfo("rules", "rules", "Rules (no LLM)", "", False), "joined by rules"),
        (BackendInfo("auto", "smollm2", "SmolLM2", "no GPU", False), "Prompt backend: SmolLM2 (no GPU) — loads on"),
    ],
)
def test_backend_text(info: BackendInfo, expected: str) -> None:
    assert expected in backend_text(info)
