"""Which models live on the GPU: a memory budget, least-recently-used eviction, pinning.

One process holds a Stable Diffusion pipeline, an instruct LLM and a LoRA trainer on one GPU. Each
engine registers its model with a size and two moves (to the GPU, off the GPU) and uses it inside
``with residency.use(name):``, which pins it there for the duration. When a model does not fit,
the least recently used unpinned models leave first (moved to CPU RAM, or dropped when they cannot
move and are cheaper to reload) — the policy ComfyUI and InvokeAI converged on, kept small here.

Policies:
  ``auto``     keep models on the GPU until the budget forces them off (LRU);
  ``lowvram``  a model leaves the GPU as soon as its use ends (the pipeline also uses diffusers'
               model CPU offload, applied by the engine);
  ``all-gpu``  never evict; a model that does not fit fails fast with a clear message.

The manager never touches CUDA itself: moves are callbacks, so tests drive it with fake devices.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from lorapg.errors import UserError

log = logging.getLogger(__name__)

AUTO, LOWVRAM, ALL_GPU = "auto", "lowvram", "all-gpu"
POLICIES = (AUTO, LOWVRAM, ALL_GPU)
GPU, CPU, UNLOADED = "gpu", "cpu", "unloaded"
GB = 1024**3
HISTORY_LENGTH = 1000  # moves kept in ResidencyManager.history


@dataclass
class ResidentModel:
    name: str
    size_bytes: int
    to_gpu: Callable[[], None]
    to_cpu: Callable[[], None] | None = None  # None: cannot move; ``drop`` frees it, to_gpu reloads
    drop: Callable[[], None] | None = None
    location: str = CPU
    pins: int = 0
    last_used: int = 0
    # This model's latest moves, for the status panel and tests (bounded like the manager's history).
    moves: deque[str] = field(default_factory=lambda: deque(maxlen=HISTORY_LENGTH))


def format_bytes(size: int) -> str:
    return f"{size / GB:.2f} GB" if size >= GB / 10 else f"{size / 1024**2:.0f} MB"


def parse_size(text: str) -> int:
    """``10GB``, ``7.5 GiB``, ``512MB`` → bytes (binary units, as GPU tools report them)."""
    units = {"tb": 1024**4, "tib": 1024**4, "gb": GB, "gib": GB, "mb": 1024**2, "mib": 1024**2, "b": 1}
    cleaned = text.strip().lower().replace(" ", "")
    unit = next((u for u in units if cleaned.endswith(u)), None)
    # A bare number means GB, the unit people think of VRAM in.
    number, factor = (cleaned[: -len(unit)], units[unit]) if unit else (cleaned, GB)
    try:
        value = float(number)
    except ValueError:
        raise UserError(f"VRAM budget {text!r} is not a size; write it like 10GB or 7.5GB.") from None
    if value <= 0:
        raise UserError(f"VRAM budget {text!r} must be more than zero.")
    return int(value * factor)


class OutOfMemory(Exception):
    """What a model move or a job raises when the device runs out of memory (CUDA OOM maps to it)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the device's out-of-memory error (CUDA's, XPU's via torch.OutOfMemoryError) or ours."""
    if isinstance(exc, OutOfMemory):
        return True
    try:
        import torch
    except ImportError:
        return False
    errors = tuple(
        error
        for error in (
            getattr(torch, "OutOfMemoryError", None),
            getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
        )
        if error
    )
    return isinstance(exc, errors)


@contextmanager
def out_of_memory_as_user_error(
    what: str, advice: str, empty_cache: Callable[[], None] | None = None
) -> Iterator[None]:
    """The app's one out-of-memory translation: "Out of GPU memory {what}. {advice}" as a UserError.

    Other errors pass through unchanged. ``empty_cache`` runs first, so the memory the failed work held
    is free again for whatever the user tries next.
    """
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        if empty_cache is not None:
            empty_cache()
        raise UserError(f"Out of GPU memory {what}. {advice}") from None


class ResidencyManager:
    """Places registered models on the GPU under ``budget_bytes``; thread-safe."""

    def __init__(self, budget_bytes: int, policy: str = AUTO, empty_cache: Callable[[], None] | None = None):
        if policy not in POLICIES:
            raise UserError(f"Unknown memory policy {policy!r}; use one of {', '.join(POLICIES)}.")
        self.budget_bytes = budget_bytes
        self.policy = policy
        self._models: dict[str, ResidentModel] = {}
        self._clock = itertools.count(1)
        self._lock = threading.RLock()
        self._free = threading.Condition(self._lock)
        self._exclusive: str | None = None  # the work holding the whole GPU (training), if any
        self._empty_cache = empty_cache or (lambda: None)
        self.bytes_moved_to_gpu = 0
        # The latest moves in order, (name, where it went): tests and the status panel read the order from
        # here. Bounded, so a server that runs for weeks does not keep every move it ever made.
        self.history: deque[tuple[str, str]] = deque(maxlen=HISTORY_LENGTH)

    # --- registration ------------------------------------------------------------------------

    def register(
        self,
        name: str,
        size_bytes: int,
        to_gpu: Callable[[], None],
        to_cpu: Callable[[], None] | None = None,
        drop: Callable[[], None] | None = None,
        location: str = CPU,
    ) -> ResidentModel:
        with self._lock:
            old = self._models.get(name)
            if old is not None and old.pins:
                raise UserError(f"{name} is in use; try again when the current job ends.")
            model = ResidentModel(name, size_bytes, to_gpu, to_cpu, drop, location=location)
            self._models[name] = model
            return model

    def unregister(self, name: str) -> bool:
        """Forget ``name`` (its file is gone or replaced): moved off the GPU first, so its memory is
        not left there uncounted. False when it is pinned (in use): the caller tries again later."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                return True
            if model.pins:
                return False
            self._evict(model)
            del self._models[name]
            return True

    def resize(self, name: str, size_bytes: int) -> None:
        """Correct a model's footprint once it is known (an estimate is registered before loading)."""
        with self._lock:
            self._require(name).size_bytes = size_bytes

    # --- use ---------------------------------------------------------------------------------

    @contextmanager
    def use(self, name: str) -> Iterator[ResidentModel]:
        """Put ``name`` on the GPU (evicting as needed) and pin it there until the block ends."""
        with self._lock:
            # Training holds the GPU exclusively; other work waits for it (or runs on the CPU if the
            # caller chose that before asking).
            self._free.wait_for(lambda: self._exclusive is None)
            model = self._require(name)
            self._place(model)
            model.pins += 1
            model.last_used = next(self._clock)
        try:
            yield model
        finally:
            with self._lock:
                model.pins -= 1
                if self.policy == LOWVRAM and model.pins == 0:
                    self._evict(model)
                self._free.notify_all()

    @contextmanager
    def hold(self, *names: str) -> Iterator[None]:
        """Pin ``names`` wherever they are, without placing them: nothing moves them while their modules
        change (peft injecting LoRA layers into a pipeline's components, some of them off the GPU)."""
        with self._lock:
            self._free.wait_for(lambda: self._exclusive is None)
            models = [self._require(name) for name in names]
            for model in models:
                model.pins += 1
        try:
            yield
        finally:
            with self._lock:
                for model in models:
                    model.pins -= 1
                self._free.notify_all()

    @contextmanager
    def exclusive(self, name: str, size_bytes: int) -> Iterator[None]:
        """Hold the whole GPU for work that is not a registered model (training's working set)."""
        with self._lock:
            self._free.wait_for(lambda: self._exclusive is None and not any(m.pins for m in self._models.values()))
            for model in self._models.values():
                self._evict(model)
            if size_bytes > self.budget_bytes:
                log.warning(
                    "%s needs %s but the budget is %s; trying anyway",
                    name,
                    format_bytes(size_bytes),
                    format_bytes(self.budget_bytes),
                )
            self._exclusive = name
            self._empty_cache()
        try:
            yield
        finally:
            with self._lock:
                self._exclusive = None
                self._empty_cache()
                self._free.notify_all()

    def run_with_oom_retry(self, fn: Callable[[], object], keep: str | None = None, advice: str = ""):
        """Run ``fn``; on out-of-memory evict everything but ``keep`` and try once more."""
        try:
            return fn()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            log.warning("out of GPU memory; evicting other models and retrying once")
        with self._lock:
            for model in self._models.values():
                if model.name != keep and not model.pins:
                    self._evict(model)
            self._empty_cache()
        with out_of_memory_as_user_error(
            "even with the other models moved off the GPU",
            advice or "Lower the image size or batch, or start with --policy lowvram.",
            self._empty_cache,
        ):
            return fn()

    def free_all(self) -> list[str]:
        """Move every unpinned model off the GPU now (the status panel's button)."""
        with self._lock:
            freed = [m.name for m in self._models.values() if m.location == GPU and not m.pins]
            for name in freed:
                self._evict(self._models[name])
            self._empty_cache()
            return freed

    # --- status ------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(m.size_bytes for m in self._models.values() if m.location == GPU)

    def status(self) -> list[dict]:
        with self._lock:
            return [
                {"name": m.name, "location": m.location, "size": format_bytes(m.size_bytes), "pinned": bool(m.pins)}
                for m in sorted(self._models.values(), key=lambda m: -m.last_used)
            ]

    def describe(self) -> str:
        lines = [
            f"Policy {self.policy}; GPU budget {format_bytes(self.budget_bytes)}, "
            f"in use {format_bytes(self.used_bytes)}."
        ]
        if self._exclusive:
            lines.append(f"{self._exclusive} holds the GPU; other work waits in the queue.")
        for row in self.status():
            pin = ", in use" if row["pinned"] else ""
            lines.append(f"- {row['name']}: {row['location']} ({row['size']}{pin})")
        return "\n".join(lines)

    # --- internals ---------------------------------------------------------------------------

    def _require(self, name: str) -> ResidentModel:
        model = self._models.get(name)
        if model is None:
            raise UserError(f"No model called {name!r} is loaded.")
        return model

    def _place(self, model: ResidentModel) -> None:
        if model.location == GPU:
            return
        if model.size_bytes > self.budget_bytes:
            raise UserError(
                f"{model.name} needs {format_bytes(model.size_bytes)} of GPU memory but the budget is "
                f"{format_bytes(self.budget_bytes)}. Raise --vram-budget or use --policy lowvram."
            )
        needed = model.size_bytes - (self.budget_bytes - self.used_bytes)
        if needed > 0:
            if self.policy == ALL_GPU:
                raise UserError(
                    f"{model.name} ({format_bytes(model.size_bytes)}) does not fit next to the models already on "
                    f"the GPU ({format_bytes(self.used_bytes)} of {format_bytes(self.budget_bytes)}) and the "
                    "all-gpu policy never evicts. Use --policy auto or a larger --vram-budget."
                )
            self._make_room(needed, exclude=model.name)
        with out_of_memory_as_user_error(
            f"while moving {model.name} onto the GPU",
            "Free GPU memory (other programs too), lower --vram-budget so the app evicts earlier, "
            "or use --policy lowvram.",
            self._empty_cache,
        ):
            model.to_gpu()
        model.location = GPU
        model.moves.append(GPU)
        self.history.append((model.name, GPU))
        self.bytes_moved_to_gpu += model.size_bytes

    def _make_room(self, needed: int, exclude: str) -> None:
        candidates = sorted(
            (m for m in self._models.values() if m.location == GPU and not m.pins and m.name != exclude),
            key=lambda m: m.last_used,
        )
        freed = 0
        for victim in candidates:
            if freed >= needed:
                break
            self._evict(victim)
            freed += victim.size_bytes
        if freed < needed:
            pinned = [m.name for m in self._models.values() if m.pins]
            raise UserError(
                f"Not enough GPU memory: {', '.join(pinned) or 'other work'} must stay on the GPU. "
                "Wait for the current job to finish or raise --vram-budget."
            )
        self._empty_cache()

    def _evict(self, model: ResidentModel) -> None:
        if model.location != GPU or model.pins:
            return
        if model.to_cpu is not None:
            model.to_cpu()
            model.location = CPU
        else:
            if model.drop is not None:
                model.drop()
            model.location = UNLOADED
        model.moves.append(model.location)
        self.history.append((model.name, model.location))
        log.info("moved %s off the GPU (%s)", model.name, model.location)
