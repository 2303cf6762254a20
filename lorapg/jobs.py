"""Background jobs on one GPU queue: id, status, progress, preview, cancel.

One worker thread runs jobs one at a time, so several browser tabs, API clients and the CLI share the
GPU without racing; everything else (gallery, presets) never waits on it. Jobs run in submission
order, except that *background* jobs (queued training runs: minutes to hours each) wait while any
interactive job (a generation, a prompt) is waiting: a user who queued three runs for the night can
still generate after the current run, instead of after all three.
With several devices (``--devices``) there is one worker thread per device, all taking from this
one queue in the same order: a job may run on any worker (``ANY_WORKER``: generations) or on one
(every other job: worker 0, the first device, and training on its own device's worker); it records
the device it ran on. The default is one worker, exactly as before.
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
ANY_WORKER = None  # ``submit(worker=ANY_WORKER)``: the first free worker runs it
RETRIES_ELSEWHERE = 1  # times a job whose worker was lost mid-job runs again on another worker


class WorkerUnfit(UserError):
    """Raised by work whose worker cannot run it with the model it was given (a remote worker that has
    the model's ref as another family): that worker leaves the rotation until another model is chosen,
    as a device that could not load the model does (GenerationService), so it stops failing its share."""


class WorkerLost(Exception):
    """Raised by work whose worker died under it (a remote worker's process or connection is gone):
    the queue takes that worker out of the rotation for good and runs the job once more elsewhere."""


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
    worker: int | None = 0  # the worker that may run it (ANY_WORKER: any); once started, the one running it
    device: str | None = None  # the device of the worker that runs it, once started (None: not known)
    # Workers that hold what it needs (its model resident): a free one of them is asked first.
    prefer: frozenset[int] = frozenset()
    # Workers able to run it (they have every LoRA it names); None: all. The others take it only while
    # none of these is in the rotation (then it runs anyway, and its error says what is missing where).
    able: frozenset[int] | None = None
    retries: int = 0  # times it went back to the queue because its worker was lost (``WorkerLost``)
    _anywhere: bool = field(default=False, repr=False)  # submitted as ANY_WORKER (may move to another worker)
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
    """Jobs executed one at a time per worker thread (one worker unless ``devices`` names several):
    interactive ones in submission order, then background ones in submission order."""

    def __init__(self, keep_finished: int = 20, devices: list[str | None] | None = None, *, may_grow: bool = False):
        """``devices``: one worker per entry, labelled with it (shown as the device a job runs on).
        ``may_grow``: workers may join while it runs (``add_worker``; the app with ``--ray``), so callers
        do not size anything by today's ``worker_count``."""
        self.may_grow = may_grow
        self._pending: list[tuple[Job, Callable[[Job], Any], contextvars.Context]] = []
        self._closing = False  # set by shutdown/close: each worker exits once nothing it may run is pending
        self._jobs: dict[str, Job] = {}
        self._order: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._keep_finished = keep_finished
        self.devices: list[str | None] = list(devices) if devices else [None]
        self._retired: set[int] = set()  # workers that take no ANY_WORKER job (see ``retire``)
        self._lost: set[int] = set()  # workers gone for good (``WorkerLost``): ``restore`` keeps them out
        self._ended: set[int] = set()  # lost workers whose thread has ended (their slot may be reused)
        self._busy: set[int] = set()  # workers running a job now (a preferred one that is free gets it)
        self._workers = [
            threading.Thread(target=self._run, args=(index,), name=_thread_name(index), daemon=True)
            for index in range(len(self.devices))
        ]
        self._worker = self._workers[0]  # the one worker of a single-device app (tests look at it)
        for thread in self._workers:
            thread.start()

    @property
    def worker_count(self) -> int:
        return len(self.devices)

    def submit(
        self,
        kind: str,
        work: Callable[[Job], Any],
        owner: str | None = None,
        total: int = 0,
        *,
        background: bool = False,
        worker: int | None = 0,
        prefer: frozenset[int] = frozenset(),
        able: frozenset[int] | None = None,
    ) -> Job:
        """``total``: the job's step count when known up front (watchers see "0 of N" while it waits).
        ``background``: long work that lets interactive jobs submitted later go first.
        ``worker``: the worker that runs it (its device's models are the ones it uses); ``ANY_WORKER``:
        the first free one. ``prefer`` (with ANY_WORKER): workers that run it first when one of them
        is free (its model is resident there); the others take it only while all of those are busy.
        ``able`` (with ANY_WORKER): the workers that can run it at all (None: every one); the others
        take it only while none of these is in the rotation."""
        if worker is not None and not 0 <= worker < len(self.devices):
            raise ValueError(f"no worker {worker}; this queue has {len(self.devices)}")
        if worker in self._ended:  # its thread is gone: the job would wait forever
            raise UserError(f"Worker {self.devices[worker]} is gone; submit the job without choosing that worker.")
        job = Job(kind=kind, owner=owner, total=total, background=background, worker=worker)
        job.prefer, job._anywhere = frozenset(prefer), worker is ANY_WORKER
        job.able = None if able is None else frozenset(able)
        with self._wake:
            self._jobs[job.id] = job
            self._order.append(job.id)
            self._forget_old()
            self._pending.append((job, work, contextvars.copy_context()))
            self._wake.notify_all()  # workers wait for different jobs: each looks whether this one is its
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
        """The job a worker is executing now, if any (the earliest submitted where several run)."""
        return next(iter(self.running_jobs()), None)

    def running_jobs(self) -> list[Job]:
        """Every job a worker is executing now, in submission order."""
        with self._lock:
            jobs = [self._jobs[i] for i in self._order if i in self._jobs]
        return [job for job in jobs if job.status == RUNNING]

    def add_worker(self, device: str | None, index: int | None = None) -> int:
        """A worker that joins while the queue runs (a remote worker connected after the app started):
        its own thread, which takes queued jobs at once. Returns its index (``Job.worker``). ``index``:
        the slot of a lost worker to reuse (``reusable``), so a worker restarting in a loop does not add
        a slot each time; else a new one."""
        with self._wake:
            if self._closing:
                raise RuntimeError("the job queue is closing; no worker joins it now")
            if index is None:
                index = len(self.devices)
                self.devices.append(device)
                self._workers.append(None)
            elif index not in self._ended:
                raise ValueError(f"worker {index} is not a lost worker whose thread has ended")
            else:  # back in the rotation, with a new thread
                self.devices[index] = device
                self._lost.discard(index)
                self._ended.discard(index)
                self._retired.discard(index)
            thread = threading.Thread(target=self._run, args=(index,), name=_thread_name(index), daemon=True)
            self._workers[index] = thread
            # Started under the lock: its first look at the queue waits until the worker is fully listed.
            thread.start()
        log.info("worker %d (%s) joined the queue", index, device)
        return index

    def reusable(self, device: str | None) -> int | None:
        """The slot of a lost worker labelled ``device`` whose thread has ended (nothing meant for it
        alone was left), for ``add_worker(device, index)``; None when there is none."""
        with self._lock:
            return next((index for index in sorted(self._ended) if self.devices[index] == device), None)

    def lose(self, worker: int) -> None:
        """Worker ``worker`` is gone for good, found outside a job (its process stopped or was replaced
        by a new one under the same name): it takes no ANY_WORKER job any more. Never the first one."""
        if worker:
            with self._wake:
                self._lost.add(worker)
                self._wake.notify_all()  # jobs that waited for it look at the other workers again
            log.warning("worker %d (%s) is gone; the other worker(s) keep serving", worker, self.devices[worker])

    def retire(self, worker: int) -> None:
        """Take a worker out of the rotation (its device could not load the model): it takes no
        ANY_WORKER job until ``restore``; jobs meant for it alone still run there. The first worker is
        never retired: with one left, the queue serves as a single-device app does."""
        if worker:
            with self._wake:
                self._retired.add(worker)
                self._wake.notify_all()
            device = self.devices[worker]
            log.warning("worker %d (%s) left the rotation; the other device(s) keep serving", worker, device)

    def restore(self) -> None:
        """Every worker back in the rotation (a new model was chosen: each device tries it)."""
        with self._wake:
            self._retired.clear()
            self._wake.notify_all()

    def retired(self) -> list[int]:
        with self._lock:
            return sorted(self._retired)

    def lost(self) -> list[int]:
        """Workers gone for good (their process or connection died): they take no ANY_WORKER job."""
        with self._lock:
            return sorted(self._lost)

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
            self._wake.notify_all()  # every worker exits

    def close(self, timeout: float | None = None) -> bool:
        """Cancel every unfinished job and wait until the worker thread has exited; True if it has.

        A process must call this before it exits (the CLI does): the worker is a daemon thread, and a
        daemon thread still inside torch when the interpreter shuts down aborts the whole process with
        "terminate called without an active exception" (exit status 134). A running job stops at its
        next cancellation check; queued ones are finished as cancelled without running.
        """
        self.cancel_all()
        self.shutdown()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._workers:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._workers)

    def _run(self, worker: int) -> None:
        while True:
            item = self._take(worker)
            if item is None:
                return
            self._execute(*item, worker)
            del item  # the work's closure goes now, not when the next job arrives
            with self._wake:
                self._busy.discard(worker)
                self._wake.notify_all()  # a job left for this (preferred) worker may be waiting on it

    def _take(self, worker: int) -> tuple[Job, Callable[[Job], Any], contextvars.Context] | None:
        """The next job this worker may run (the first interactive one waiting, else the first
        background one); None once the queue is closing, or the worker is lost, and nothing it may run
        is pending (a lost worker's thread ends: a worker restarting in a loop leaves none behind)."""
        with self._wake:
            while (job := self._next_for(worker)) is None and not self._closing and worker not in self._lost:
                self._wake.wait()
            if job is None:
                if worker in self._lost:  # nothing meant for it alone is pending: its thread ends
                    self._ended.add(worker)
                return None
            index = next(i for i, item in enumerate(self._pending) if item[0] is job)
            item = self._pending.pop(index)
            job.worker, job.device = worker, self.devices[worker]
            self._busy.add(worker)
            self._wake.notify_all()  # workers that left this job to a preferred one look again
            # Marked here, under the lock: position() never sees a job that is neither pending nor running.
            job.status = RUNNING if not job.cancel_requested() else job.status
            return item

    def _next_for(self, worker: int) -> Job | None:  # called with the lock held
        """Jobs meant for another worker are passed over: they wait for theirs, this one need not."""
        for job in _in_run_order([item[0] for item in self._pending]):
            if job.worker == worker:
                return job
            in_rotation = job.worker is ANY_WORKER and worker not in self._retired | self._lost
            if not (in_rotation and self._may_take(job, worker)):
                continue
            if worker in job.prefer or not self._preferred_free(job):
                return job
        return None

    def _may_take(self, job: Job, worker: int) -> bool:  # called with the lock held
        """Whether ``worker`` may run ``job``: it is able to, or no worker that is able is in the rotation
        (a job nobody can run still runs once, and says why it failed, instead of waiting forever)."""
        if job.able is None or worker in job.able:
            return True
        out = self._retired | self._lost
        return not any(index not in out for index in job.able if 0 <= index < len(self.devices))

    def _preferred_free(self, job: Job) -> bool:  # called with the lock held
        """Whether a worker ``job`` prefers is free to take it now."""
        out = self._busy | self._retired | self._lost
        return any(index not in out for index in job.prefer if 0 <= index < len(self.devices))

    def _execute(self, job: Job, work: Callable[[Job], Any], context: contextvars.Context, worker: int = 0) -> None:
        if job.cancel_requested():
            self._finish(job, CANCELLED, message="cancelled before it started")
            return
        job.status = RUNNING
        error = None
        try:
            job.result = context.run(work, job)
        except WorkerLost as exc:
            error = self._worker_lost(job, work, context, worker, exc)
            if error is None:  # back in the queue: another worker runs it
                return
            if job.cancel_requested():  # the user stopped it: nothing to submit again, whatever the worker did
                self._finish(job, CANCELLED, message=f"cancelled; {exc}")
                return
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

    def _worker_lost(
        self, job: Job, work: Callable[[Job], Any], context: contextvars.Context, worker: int, exc: WorkerLost
    ) -> str | None:
        """Worker ``worker`` died under ``job``: it leaves the rotation for good, and the job goes back to
        the front of the queue for another worker (once; a job meant for that worker alone fails).
        Returns the job's error when it is not run again. Its lost run returned nothing, so nothing of
        it was saved: the job runs (and saves) once."""
        with self._wake:
            if worker:  # the first worker is the app's own: never lost
                self._lost.add(worker)
            log.warning("worker %d (%s) was lost during job %s: %s", worker, self.devices[worker], job.id, exc)
            can_retry = job._anywhere and job.retries < RETRIES_ELSEWHERE and not self._closing
            if not can_retry or job.cancel_requested():
                return f"{exc} The job was not run again; submit it again."
            job.retries += 1
            job.worker, job.device, job.status = ANY_WORKER, None, QUEUED
            job.report(0, job.total, message=f"worker {self.devices[worker]} was lost; retrying on another worker")
            self._pending.insert(0, (job, work, context))  # first in line: it was running already
            self._wake.notify_all()
        return None

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


def _thread_name(worker: int) -> str:
    return "gpu-queue" if worker == 0 else f"gpu-queue-{worker}"


def _in_run_order(waiting: list[Job]) -> list[Job]:
    """Waiting jobs in the order the worker takes them: interactive ones first, each group in submission order."""
    return [job for job in waiting if not job.background] + [job for job in waiting if job.background]
