"""What changes when the app is hosted for strangers (a Hugging Face Space) instead of its owner.

Locally one person uses the app: one gallery, one working prompt, no limits. On a Space anyone
with the link is a visitor: each one gets their own gallery, working prompt and training datasets,
uploads and training runs are bounded (a free CPU Space has 2 cores; ZeroGPU bills every second),
and the settings that change the app for everyone (the LLM server, loading arbitrary models or
paths) are the owner's, set through Space variables. Every limit is a setting; "auto" picks the
Space value on a Space and the local value elsewhere.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lorapg.config import Settings
from lorapg.errors import UserError
from lorapg.hosting.zerogpu import running_on_spaces, zero_gpu_enabled

log = logging.getLogger(__name__)

VISITOR_MODES = ("auto", "private", "shared")
SPACE_MAX_UPLOAD_MB = 50  # a 200-image dataset of phone photos fits; a model checkpoint does not
# The demo-concept preset (600 steps) takes about 2.5 min on 2 cores (under 2 on one) with the demo model.
SPACE_TRAIN_MAX_STEPS_CPU = 600
SPACE_TRAIN_MAX_STEPS_GPU = 600  # fits one ZeroGPU call of at most 300 s at 512 px (none on a dedicated GPU)


@dataclass(frozen=True)
class SpacePolicy:
    on_spaces: bool
    zero_gpu: bool
    private_visitors: bool  # each visitor sees only their own gallery, drafts and datasets
    shared_gallery: bool
    max_upload_bytes: int | None  # None: no limit
    train_max_steps: int | None  # None: no limit
    space_id: str | None = None

    @property
    def settings_locked(self) -> bool:
        """Whether app-wide settings (LLM backend and server, arbitrary model paths) are the owner's alone.

        Any public Space locks them, whatever its visitor mode: a shared gallery must not also let
        strangers point the LLM at an internal URL or make the server download any hub repo."""
        return self.private_visitors or self.on_spaces


def space_policy(
    settings: Settings, environ: Mapping[str, str] | None = None, has_gpu: bool | None = None
) -> SpacePolicy:
    """``has_gpu``: whether CUDA is visible (asked of torch when None and it matters)."""
    env = os.environ if environ is None else environ
    on_spaces = running_on_spaces(env)
    mode = settings.visitors.strip().lower()
    if mode not in VISITOR_MODES:
        raise UserError(f"Setting 'visitors': {settings.visitors!r} is not one of {', '.join(VISITOR_MODES)}.")
    private = on_spaces if mode == "auto" else mode == "private"
    zero_gpu = zero_gpu_enabled(env)
    upload_mb = settings.max_upload_mb if settings.max_upload_mb >= 0 else (SPACE_MAX_UPLOAD_MB if on_spaces else 0)
    steps = settings.train_max_steps
    if steps < 0:
        if not on_spaces:
            steps = 0
        elif zero_gpu:
            steps = SPACE_TRAIN_MAX_STEPS_GPU
        else:
            # A dedicated GPU is paid by the hour, not per call: its owner sets a limit if they want one.
            steps = 0 if (_cuda_visible() if has_gpu is None else has_gpu) else SPACE_TRAIN_MAX_STEPS_CPU
    return SpacePolicy(
        on_spaces=on_spaces,
        zero_gpu=zero_gpu,
        private_visitors=private,
        shared_gallery=settings.shared_gallery,
        max_upload_bytes=upload_mb * 1024 * 1024 if upload_mb else None,
        train_max_steps=steps or None,
        space_id=env.get("SPACE_ID"),
    )


def _cuda_visible() -> bool:
    import torch  # only on a Space without ZeroGPU, where torch is about to be used anyway

    return torch.cuda.is_available()


def writable_outputs(outputs: Path) -> Path:
    """``outputs`` when the app may write there, else a temporary folder (logged).

    A Space's files are writable but not kept across restarts; a folder that cannot be written
    (a read-only mount, a typo'd bucket path) must not stop the app from serving.
    """
    try:
        outputs.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=outputs, prefix=".write-test-"):
            pass
        return outputs
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / "lorapg-outputs"
        log.warning(
            "cannot write to %s (%s); images and the gallery go to %s and are lost on restart", outputs, exc, fallback
        )
        return fallback


def server_host(settings: Settings, policy: SpacePolicy, environ: Mapping[str, str] | None = None) -> str:
    """The address to serve on: a Space's proxy reaches the app from outside, so all interfaces there
    (``GRADIO_SERVER_NAME`` when the Space sets it); locally the loopback unless ``--listen``."""
    if not policy.on_spaces or settings.listen:
        return settings.host
    return (os.environ if environ is None else environ).get("GRADIO_SERVER_NAME") or "0.0.0.0"


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def reachable_by_others(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """Whether people other than the owner can reach the app: --listen, --share, a Space, or a
    ``GRADIO_SERVER_NAME`` that is not the loopback."""
    env = os.environ if environ is None else environ
    name = env.get("GRADIO_SERVER_NAME", "").strip()
    return settings.listen or settings.share or running_on_spaces(env) or bool(name and name not in LOOPBACK_NAMES)


def local_model_roots(settings: Settings, environ: Mapping[str, str] | None = None) -> tuple[Path, ...] | None:
    """Where a model path may point: anywhere (None) for the owner on 127.0.0.1; else only into the
    models folder or at the configured model, so visitors cannot probe which server paths exist."""
    if not reachable_by_others(settings, environ):
        return None
    roots = [Path(settings.models_dir)]
    if settings.model:
        roots.append(Path(settings.model))  # the owner's choice, wherever it lives
    return tuple(roots)
