"""Hugging Face Spaces and ZeroGPU: one decorator, and a relay that runs job work inside it.

On a ZeroGPU Space the GPU exists only inside functions decorated with ``spaces.GPU``; each call
runs in a forked process, so its arguments and everything it yields travel pickled, and nothing it
changes in memory comes back. Callbacks (progress, the cancel flag) cannot cross that line, so
``GpuTask`` turns blocking work that reports progress into a generator on the GPU side (``spaces.GPU``
relays every yielded item to the caller) and back into callbacks on the caller's side. Cancelling
touches a flag file the GPU side polls: a file is the one thing both processes see.

Off ZeroGPU the same code runs unchanged: ``spaces`` is imported only on a Space (``SYSTEM=spaces``)
where it is installed, its decorator is a no-op without ZeroGPU, and ``GpuTask`` calls the work
directly. This module must be imported before torch: ``spaces`` patches torch when it loads.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lorapg.errors import UserError

log = logging.getLogger(__name__)

MIN_GPU_SECONDS = 10  # ZeroGPU hands out the GPU per call; below this the start-up dominates
MAX_GPU_SECONDS = 300  # a longer request is refused by ZeroGPU for most users; estimates stop here

_PROGRESS, _RESULT, _USER_ERROR, _FAILED = "progress", "result", "user-error", "failed"


def running_on_spaces(environ: Mapping[str, str] | None = None) -> bool:
    """True on a Hugging Face Space (the same test Gradio makes)."""
    return (os.environ if environ is None else environ).get("SYSTEM") == "spaces"


def zero_gpu_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True on a ZeroGPU Space, where ``spaces.GPU`` really moves work into a GPU process."""
    env = os.environ if environ is None else environ
    return running_on_spaces(env) and env.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def _load_spaces() -> Any:
    """The ``spaces`` package on a Space where it is installed, else None (everywhere else)."""
    if not running_on_spaces():
        return None
    try:
        return importlib.import_module("spaces")
    except ImportError:
        log.info("running on a Space without the 'spaces' package: GPU functions run as plain calls")
        return None


# Imported now, at app start-up: ZeroGPU needs `spaces` in memory before torch touches CUDA.
_spaces = _load_spaces()


def gpu(duration: int | Callable[..., int] = 60) -> Callable[[Callable], Callable]:
    """``spaces.GPU(duration=...)`` on a Space, a decorator that changes nothing elsewhere.

    ``duration`` (seconds) may be a callable that receives the decorated function's arguments.
    """
    if _spaces is None:
        return lambda function: function
    return _spaces.GPU(duration=duration)


def gpu_seconds(estimate: float) -> int:
    """A duration to ask ZeroGPU for: the estimate, within what it accepts."""
    return int(min(max(estimate, MIN_GPU_SECONDS), MAX_GPU_SECONDS))


class GpuTaskError(RuntimeError):
    """Work that failed inside the GPU process with an error other than a ``UserError``."""


Report = Callable[..., None]


class GpuTask:
    """Runs ``work(*args, report=..., should_cancel=...)`` for a job, on the GPU where that is a place.

    ``seconds(*args)`` estimates how long the GPU is needed (ZeroGPU reserves that much of the
    visitor's quota). ``relay``: go through the GPU function; by default only on ZeroGPU.
    ``decorator`` replaces ``gpu`` (tests run the relay through a real fork with it).
    The arguments, the reports and the result must pickle when relayed: plain data, PIL images,
    never CUDA tensors.
    """

    def __init__(
        self,
        work: Callable[..., Any],
        seconds: Callable[..., float],
        *,
        relay: bool | None = None,
        decorator: Callable[[Callable], Callable] | None = None,
    ):
        self.work = work
        self.seconds = seconds
        self.relay = zero_gpu_enabled() if relay is None else relay
        # Decorated at construction, before the app launches: ZeroGPU registers its functions at launch.
        self._on_gpu = (decorator or gpu(duration=self._duration))(self._generate)

    def _duration(self, cancel_flag: str, args: tuple, kwargs: dict) -> int:
        return gpu_seconds(self.seconds(*args, **kwargs))

    def run(self, *args: Any, report: Report, should_cancel: Callable[[], bool], **kwargs: Any) -> Any:
        if not self.relay:
            return self.work(*args, report=report, should_cancel=should_cancel, **kwargs)
        estimate = self.seconds(*args, **kwargs)
        if estimate > MAX_GPU_SECONDS:
            # Asking for less than the work needs would stop it part-way and still spend the quota.
            raise UserError(
                f"This needs about {estimate:.0f} s of GPU time, more than the {MAX_GPU_SECONDS} s one "
                "ZeroGPU call may take: lower the steps, size or batch (or the training steps)."
            )
        with tempfile.TemporaryDirectory(prefix="lorapg-gpu-") as folder:
            flag = Path(folder) / "cancel"
            result = None
            try:
                for kind, payload in self._on_gpu(str(flag), args, kwargs):
                    if should_cancel() and not flag.exists():
                        flag.touch()
                    if kind == _PROGRESS:
                        report(*payload)
                    elif kind == _RESULT:
                        result = payload
                    elif kind == _USER_ERROR:
                        raise UserError(payload)
                    else:
                        raise GpuTaskError(payload)
            except (UserError, GpuTaskError):
                raise
            except Exception as exc:
                # The work's own errors arrive as events; this one comes from ZeroGPU itself (quota used
                # up, no GPU free, the GPU process died), and its message is written for the visitor.
                raise UserError(f"The GPU is not available: {getattr(exc, 'message', None) or exc}") from exc
            return result

    def _generate(self, cancel_flag: str, args: tuple, kwargs: dict) -> Iterator[tuple[str, Any]]:
        """The GPU side: run the work on a thread, yield its reports as they come, then its result."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()

        def target() -> None:
            try:
                value = self.work(
                    *args,
                    report=lambda *progress: events.put((_PROGRESS, progress)),
                    should_cancel=lambda: os.path.exists(cancel_flag),
                    **kwargs,
                )
                events.put((_RESULT, value))
            except UserError as exc:
                events.put((_USER_ERROR, str(exc)))
            except Exception as exc:  # crosses a process boundary as text; the traceback stays in this log
                log.exception("GPU task %s failed", getattr(self.work, "__name__", self.work))
                events.put((_FAILED, f"{type(exc).__name__}: {exc}"))

        threading.Thread(target=target, name="gpu-task", daemon=True).start()
        while True:
            kind, payload = events.get()
            yield kind, payload
            if kind != _PROGRESS:
                return
