"""Background jobs on one GPU queue: id, status, progress, preview, cancel.

One worker thread runs jobs one at a time, so several browser tabs, API clients and the CLI share the
GPU without racing; everything else (gallery, presets) never waits on it. Jobs run in submission
order, except that *background* jobs (queued training runs: minutes to hours each) wait while any
interactive job (a generation, a prompt) is waiting: a user who queued three runs for the night can
still generate after the current run, instead of after all three.
Cancellation is a flag the work checks between steps. Work runs in the context (``contextvars``) of
the call that submitted it, so a ZeroGPU function called from the worker still sees the visitor's
request (ZeroGPU charges each visitor's own quota from it).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorapg.errors import UserError, shorten

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, ERROR, CANCELLED = "queued", "running", "done", "error", "cancelled"
FINISHED = {DONE, ERROR, CANCELLED}


@dataclass
class Job:
    kind: str
    owner: str | None = None  # the visitor who submitted it (None where visitors are not kept apart)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: str = QUEUED
    step: int = 0
    total: int = 0
    message: str = ""
    preview: Any = None
    result: Any = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    background: bool = False  # runs only when no interactive job waits (see JobQueue)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)

    # --- called by the work --------------------------------------------------------------
    def report(self, step: int, total: int, preview: Any = None, message: str = "") -> None:
        self.step, self.total = step, total
        if preview is not None:
            self.preview = preview
        if message:
            self.message = message

    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    # --- called by observers -------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def describe(self) -> str:
        if self.status == RUNNING and self.total:
            return f"{self.kind} {self.id}: step {self.step} of {self.total}"
        if self.status == ERROR:
            return f"{self.kind} {self.id}: error: {self.error}"
        return f"{self.kind} {self.id}: {self.message or self.status}"


class JobQueue:
    """Jobs executed one at a time by a single worker thread: interactive ones in submission order,
    then background ones in submission order."""

    def __init__(self, keep_finished: int = 20):
        self._pending: list[tuple[Job, Callable[[Job], Any], contextvars.Context]] = []
        self._closing = False  # set by shutdown/close: the worker exits once nothing is pending
        self._jobs: dict[str, Job] = {}
        self._order: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._keep_finished = keep_finished
        self._worker = threading.Thread(target=self._run, name="gpu-queue", daemon=True)
        self._worker.start()

    def submit(
        self,
        kind: str,
        work: Callable[[Job], Any],
        owner: str | None = None,
        total: int = 0,
        *,
        background: bool = False,
    ) -> Job:
        """``total``: the job's step count when known up front (watchers see "0 of N" while it waits).
        ``background``: long work that lets interactive jobs submitted later go first."""
        job = Job(kind=kind, owner=owner, total=total, background=background)
        with self._wake:
            self._jobs[job.id] = job
            self._order.append(job.id)
            self._forget_old()
            self._pending.append((job, work, contextvars.copy_context()))
            self._wake.notify()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise UserError(f"Unknown job id {shorten(job_id, 40)!r}.")
        return job

    def position(self, job: Job) -> int:
        """How many jobs run before this one as the queue stands now (0 when it is running or finished);
        interactive jobs submitted later still go ahead of a background one."""
        if job.status != QUEUED:
            return 0
        with self._lock:
            waiting = [item[0] for item in self._pending]
            running = sum(1 for i in self._order if self._jobs[i].status == RUNNING)
        if job not in waiting:  # taken by the worker a moment ago
            return running
        return running + _in_run_order(waiting).index(job)

    def running(self) -> Job | None:
        """The job the worker is executing now, if any."""
        with self._lock:
            jobs = [self._jobs[i] for i in self._order if i in self._jobs]
        return next((job for job in jobs if job.status == RUNNING), None)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job._cancel.set()
        return job

    def cancel_all(self) -> None:
        """Ask every unfinished job to stop (does not wait): the running one at its next step."""
        with self._lock:
            unfinished = [job for job in self._jobs.values() if not job.finished]
        for job in unfinished:
            job._cancel.set()

    def shutdown(self) -> None:
        """Let the worker exit after the jobs already queued (does not wait: see ``close``)."""
        with self._wake:
            self._closing = True
            self._wake.notify()

    def close(self, timeout: float | None = None) -> bool:
        """Cancel every unfinished job and wait until the worker thread has exited; True if it has.

        A process must call this before it exits (the CLI does): the worker is a daemon thread, and a
        daemon thread still inside torch when the interpreter shuts down aborts the whole process with
        "terminate called without an active exception" (exit status 134). A running job stops at its
        next cancellation check; queued ones are finished as cancelled without running.
        """
        self.cancel_all()
        self.shutdown()
        self._worker.join(timeout)
        return not self._worker.is_alive()

    def _run(self) -> None:
        while True:
            item = self._take()
            if item is None:
                return
            self._execute(*item)
            del item  # the work's closure goes now, not when the next job arrives

    def _take(self) -> tuple[Job, Callable[[Job], Any], contextvars.Context] | None:
        """The next job to run (the first interactive one waiting, else the first background one); None
        once the queue is closing and nothing is pending."""
        with self._wake:
            while not self._pending and not self._closing:
                self._wake.wait()
            if not self._pending:
                return None
            job = _in_run_order([item[0] for item in self._pending])[0]
            index = next(i for i, item in enumerate(self._pending) if item[0] is job)
            item = self._pending.pop(index)
            # Marked here, under the lock: position() never sees a job that is neither pending nor running.
            job.status = RUNNING if not job.cancel_requested() else job.status
            return item

    def _execute(self, job: Job, work: Callable[[Job], Any], context: contextvars.Context) -> None:
        if job.cancel_requested():
            self._finish(job, CANCELLED, message="cancelled before it started")
            return
        job.status = RUNNING
        error = None
        try:
            job.result = context.run(work, job)
        except UserError as exc:
            error = str(exc)
        except Exception as exc:  # the worker must survive any job; the error is shown, the app serves on
            log.exception("job %s (%s) failed", job.id, job.kind)
            error = f"{type(exc).__name__}: {exc}"
        # Waiters are woken only here, after the except block has dropped the exception: its traceback
        # holds the failed work's frames (a half-loaded pipeline, a trainer's models), and freeing them
        # runs torch destructors. Woken earlier, a CLI would exit while this thread is still inside
        # them, and the interpreter's shutdown aborts the process (exit status 134).
        if error is not None:
            self._finish(job, ERROR, error=error)
            return
        # Work that reports its own outcome (a generation cancelled after its last step still
        # finished and saved its images) decides; otherwise the cancel flag does.
        cancelled = getattr(job.result, "cancelled", None)
        self._finish(job, CANCELLED if (job.cancel_requested() if cancelled is None else cancelled) else DONE)

    def _finish(self, job: Job, status: str, *, error: str | None = None, message: str = "") -> None:
        job.error = error
        job.message = message or status
        job.status = status
        job._finished.set()

    def _forget_old(self) -> None:  # called with the lock held
        finished = [i for i in self._order if self._jobs[i].finished]
        for job_id in finished[: max(0, len(finished) - self._keep_finished)]:
            self._order.remove(job_id)
            del self._jobs[job_id]


def _in_run_order(waiting: list[Job]) -> list[Job]:
    """Waiting jobs in the order the worker takes them: interactive ones first, each group in submission order."""
    return [job for job in waiting if not job.background] + [job for job in waiting if job.background]
