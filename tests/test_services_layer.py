"""The service layer's shape: one package, built in one place, never importing the UI.

``lorapg/services/`` is what the UI, the CLI and the REST API call; ``build_services`` is the one
place the run-time objects are built; ``training/`` is an engine that knows nothing of jobs,
visitors or Space hosting.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorapg.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lorapg"

# Classes whose instances exist once per app run: only lorapg/services/build.py constructs them.
RUNTIME_CLASSES = {
    "JobQueue",
    "DiffusionEngine",
    "GalleryStore",
    "LoraLibrary",
    "ResidencyManager",
    "Visitors",
    "GenerationService",
    "GalleryService",
    "PromptService",
    "TrainingService",
}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (lazy imports inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def constructed_classes(path: Path) -> set[str]:
    calls = (n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call))
    return {call.func.id for call in calls if isinstance(call.func, ast.Name)}


def test_services_never_import_gradio() -> None:
    """The UI depends on services, never the reverse: checked in the source of every module under
    lorapg/services/ and by importing all of them (and the CLI) in a fresh interpreter."""
    modules = sorted(PACKAGE.joinpath("services").glob("*.py"))
    assert {m.stem for m in modules} >= {"__init__", "build", "gallery", "generation", "prompts", "training"}
    for module in modules:
        gradio = {name for name in imported_modules(module) if name.split(".")[0] == "gradio"}
        assert not gradio, f"{module.relative_to(ROOT)} imports {gradio}"
    names = ", ".join(f"lorapg.services.{m.stem}" for m in modules if m.stem != "__init__")
    code = f"import sys, lorapg.services, {names}, lorapg.cli; print('gradio' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )
    assert done.stdout.strip() == "False", done.stderr


def test_training_is_an_engine_without_jobs_visitors_or_hosting() -> None:
    for module in sorted(PACKAGE.joinpath("training").rglob("*.py")):
        imports = imported_modules(module)
        bad = {name for name in imports if name.startswith(("lorapg.jobs", "lorapg.hosting", "lorapg.services"))}
        assert not bad, f"{module.relative_to(ROOT)} imports {bad}"


def test_runtime_objects_are_built_only_in_build_services() -> None:
    """app.py and the CLI get their services from build_services; nobody else composes them."""
    build = PACKAGE / "services" / "build.py"
    sources = [ROOT / "app.py", *PACKAGE.rglob("*.py")]
    for source in sources:
        if source == build or PACKAGE / "demo" in source.parents:  # the demo is a build tool
            continue
        built = constructed_classes(source) & RUNTIME_CLASSES
        assert not built, f"{source.relative_to(ROOT)} constructs {sorted(built)}; use build_services"
    assert constructed_classes(build) >= RUNTIME_CLASSES


def test_the_package_names_each_service_once() -> None:
    import lorapg.services as services
    from lorapg.services.gallery import GalleryService
    from lorapg.services.prompts import PromptService

    assert services.GalleryService is GalleryService and services.PromptService is PromptService
    with pytest.raises(AttributeError):
        services.PlaygroundService  # noqa: B018  (the old name is gone, not aliased)


def test_build_services_shares_one_queue_library_and_gallery(tmp_path) -> None:
    from lorapg.services.build import build_services

    settings = load_settings(None, {"outputs": str(tmp_path / "out"), "device": "cpu"}, environ={})
    built = build_services(settings)
    try:
        assert built.service.jobs is built.jobs
        assert built.prompts.jobs is built.jobs and built.training.jobs is built.jobs
        assert built.prompts.engine is built.engine and built.training.engine is built.engine
        assert built.gallery_service.store is built.gallery and built.gallery_service.library is built.library
        assert not built.policy.private_visitors and built.residency is None  # local CPU run
    finally:
        built.jobs.shutdown()


def test_build_services_for_the_gallery_alone_does_not_import_torch(tmp_path) -> None:
    """The CLI's gallery commands build the gallery alone: no torch import, they stay quick."""
    code = (
        "import sys; from lorapg.config import load_settings; from lorapg.services import build_services; "
        f"s = build_services(load_settings(None, {{'outputs': {str(tmp_path / 'out')!r}}}, environ={{}}), "
        "engines=False, prompts=False); s.jobs.shutdown(); "
        "print(s.engine, s.service, s.training, s.prompts, [m for m in ('torch', 'diffusers') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.stdout.strip() == "None None None None []", done.stderr
