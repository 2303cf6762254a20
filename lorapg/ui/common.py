"""Helpers shared by the tabs: turning service errors and jobs into what Gradio shows."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator

import gradio as gr

from lorapg.errors import UserError
from lorapg.hosting.visitors import Visitors
from lorapg.jobs import ERROR, QUEUED, RUNNING, Job, JobQueue

POLL_SECONDS = 0.25


def user_errors(fn: Callable) -> Callable:
    """Show a service's UserError as a Gradio error toast (and an API error), not a traceback."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserError as exc:
                raise gr.Error(str(exc)) from None

        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(str(exc)) from None

    return wrapper


def visitor(visitors: Visitors | None, request: gr.Request | None) -> str | None:
    """The visitor behind a Gradio request; None where visitors are not kept apart."""
    if visitors is None or request is None:
        return None
    return visitors.owner(request.session_hash, getattr(request, "username", None))


def job_status_text(job: Job, queue: JobQueue) -> str:
    if job.status == QUEUED:
        ahead = queue.position(job)
        running = queue.running()
        # Training holds the GPU for minutes: say so, or the wait looks like a hang.
        why = " LoRA training in progress; this job starts when it ends." if running and running.kind == "train" else ""
        return f"⏳ Queued (job `{job.id}`): {ahead} job(s) ahead.{why}"
    if job.status == RUNNING and job.total:
        return f"▶️ Step {job.step} of {job.total} (job `{job.id}`)."
    if job.status == RUNNING:
        return f"▶️ {job.message or 'Running'} (job `{job.id}`)."
    return f"{job.status.capitalize()} (job `{job.id}`)."


def follow(job: Job, queue: JobQueue, progress: gr.Progress | None = None) -> Iterator[Job]:
    """Yield the job every poll until it finishes; drive ``gr.Progress`` on the way."""
    while not job.wait(POLL_SECONDS):
        if progress is not None and job.total:
            progress((job.step, job.total), desc=f"Step {job.step}/{job.total}")
        yield job
    if job.status == ERROR:
        raise gr.Error(job.error or "The job failed.")
    yield job
