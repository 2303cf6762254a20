"""Helpers shared by the tabs: turning service errors and jobs into what Gradio shows."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator

import gradio as gr

from lorapg.diffusion.request import check_text
from lorapg.errors import UserError
from lorapg.hosting.visitors import Visitors
from lorapg.jobs import ERROR, QUEUED, RUNNING, Job, JobQueue

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25


def _refused(fn: Callable, exc: UserError) -> gr.Error:
    """A refused input is logged as one line: Gradio's default traceback per refusal filled the
    log (127 tracebacks, 52 MB) with nothing a traceback could explain."""
    log.info("%s refused: %s", getattr(fn, "__name__", "handler"), exc)
    return gr.Error(str(exc), print_exception=False)


def user_errors(fn: Callable) -> Callable:
    """Show a service's UserError as a Gradio error toast (and an API error), not a traceback."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserError as exc:
                raise _refused(fn, exc) from None

        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise _refused(fn, exc) from None

    return wrapper


def visitor(visitors: Visitors | None, request: gr.Request | None) -> str | None:
    """The visitor behind a Gradio request; None where visitors are not kept apart."""
    if visitors is None or request is None:
        return None
    return visitors.owner(request.session_hash, getattr(request, "username", None))


# The "gpu" group's limit where workers may join while the app runs (--ray): the UI is built once, so a
# limit of today's worker count would keep every worker that joins later idle. The job queue still runs
# one job per worker at a time; this only bounds the Gradio handlers waiting on it.
GROWING_GPU_SLOTS = 16


def gpu_slots(queue: JobQueue) -> int:
    """The "gpu" concurrency group's limit: one handler per worker (``--devices``), so two visitors'
    generations can run on two devices; the job queue still decides the order and the worker."""
    if queue.may_grow:
        return max(queue.worker_count, GROWING_GPU_SLOTS)
    return queue.worker_count


def primary_worker_group(queue: JobQueue) -> dict:
    """Gradio concurrency for events whose jobs run on the first worker alone (a model load, grids):
    with several devices their own group of one, so that handlers waiting for that worker never hold
    the "gpu" slots the generations on the other devices need; with one device the "gpu" group as before."""
    alone = queue.worker_count == 1 and not queue.may_grow  # Gradio gives a shared group its lowest limit
    return {"concurrency_id": "gpu" if alone else "gpu-primary", "concurrency_limit": 1}


def job_status_text(job: Job, queue: JobQueue) -> str:
    if job.status == QUEUED:
        ahead = queue.position(job)
        running = queue.running()
        # Training holds the GPU for minutes: say so, or the wait looks like a hang.
        # (With several devices the others keep generating while one trains: no such wait to explain.)
        training = running is not None and running.kind == "train" and queue.worker_count == 1
        why = " LoRA training in progress; this job starts when it ends." if training else ""
        return f"⏳ Queued (job `{job.id}`): {ahead} job(s) ahead.{why}{retired_note(queue)}"
    # With several devices (--devices) the user sees which one runs the job; with one, nothing changes.
    where = f" on {job.device}" if job.device and queue.worker_count > 1 else ""
    if job.status == RUNNING and job.total:
        return f"▶️ Step {job.step} of {job.total} (job `{job.id}`{where})."
    if job.status == RUNNING:
        return f"▶️ {job.message or 'Running'} (job `{job.id}`{where})."
    return f"{job.status.capitalize()} (job `{job.id}`{where})."


def retired_note(queue: JobQueue) -> str:
    """A device out of the rotation (it could not load the model) makes the wait longer: say which."""
    devices = [str(queue.devices[index]) for index in queue.retired()]
    if not devices:
        return ""
    return (
        f" Out of the rotation, as it could not load the model: {', '.join(devices)} "
        "(it tries again when another model is chosen)."
    )


def follow(job: Job, queue: JobQueue, progress: gr.Progress | None = None) -> Iterator[Job]:
    """Yield the job every poll until it finishes; drive ``gr.Progress`` on the way."""
    while not job.wait(POLL_SECONDS):
        if progress is not None and job.total:
            progress((job.step, job.total), desc=f"Step {job.step}/{job.total}")
        yield job
    if job.status == ERROR:
        # One line: a refused job (a UserError) has nothing to trace, and a crashed one was
        # already logged with its traceback by the job queue; this traceback is only Gradio's.
        log.info("job %s ended with an error: %s", job.id, job.error)
        raise gr.Error(job.error or "The job failed.", print_exception=False)
    yield job


def raw_number(component: gr.Slider | gr.Number) -> gr.Slider | gr.Number:
    """``component``, passing what the client sent to the handler unchanged.

    Gradio's own Slider and Number preprocessing refuse a NaN, a string or a value past the widget's
    bounds with "Could not preprocess input component at index 3 …", which names no field. The
    handler's validation (lorapg.diffusion.request, shared with the CLI) refuses them instead, naming
    the field. (Set on the instance: a gradio component subclass writes a .pyi beside its module.)
    """
    component.preprocess = _unchanged  # type: ignore[method-assign]
    return component


def checked_text(component: gr.Textbox) -> gr.Textbox:
    """``component``, refusing what is not text with a message naming its label.

    Gradio's Textbox turns a list or null into text ("['a']", None); a prompt box feeds generation
    and the prompt tools, so every endpoint that reads it gets the same check.
    """
    label = component.label or "Text"

    def preprocess(payload):
        try:
            return check_text(label, payload)
        except UserError as exc:
            raise gr.Error(str(exc)) from None

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def _unchanged(payload):
    return payload
