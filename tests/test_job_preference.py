"""The job queue's routing for remote workers (issue 20 item 3), without Ray: a job goes first to a
free worker that holds its model (``prefer``), and a job whose worker is lost mid-job
(``WorkerLost``) runs once more on another worker, never twice to the end.
Concurrency is set up with events the tests control, never timing."""

from __future__ import annotations

import threading

import pytest

from lorapg.errors import UserError
from lorapg.jobs import ANY_WORKER, CANCELLED, DONE, ERROR, QUEUED, JobQueue, WorkerLost

WAIT = 30  # seconds: a safety net against a hang, never what a test measures


def test_a_free_worker_that_holds_the_model_is_asked_first():
    jobs = JobQueue(devices=["cpu", "ray:wa/cpu", "ray:wb/cpu"])
    try:
        ran = []
        for _ in range(20):  # any one worker's thread may wake first: 20 in a row prove the rule
            job = jobs.submit("generate", lambda job: ran.append(job.worker), worker=ANY_WORKER, prefer={2})
            assert job.wait(WAIT) and job.status == DONE
        assert ran == [2] * 20
    finally:
        assert jobs.close(WAIT)


def test_while_the_preferred_worker_is_busy_another_takes_the_job():
    jobs = JobQueue(devices=["cpu", "ray:wa/cpu"])
    started, release = threading.Event(), threading.Event()

    def busy(job):
        started.set()
        assert release.wait(WAIT)

    try:
        holder = jobs.submit("generate", busy, worker=1)
        assert started.wait(WAIT)
        job = jobs.submit("generate", lambda job: job.worker, worker=ANY_WORKER, prefer={1})
        assert job.wait(WAIT) and job.status == DONE and job.result == 0
        release.set()
        assert holder.wait(WAIT)
    finally:
        release.set()
        assert jobs.close(WAIT)


def test_a_job_whose_worker_is_lost_runs_once_more_elsewhere():
    jobs = JobQueue(devices=["cpu", "ray:wa/cpu"])
    runs = []

    def work(job):
        runs.append(job.worker)
        if job.worker == 1:
            raise WorkerLost("Worker ray:wa/cpu stopped (ActorDiedError).")
        return "image"

    try:
        job = jobs.submit("generate", work, worker=ANY_WORKER, prefer={1})
        assert job.wait(WAIT)
        assert job.status == DONE and job.result == "image"
        assert runs == [1, 0] and job.retries == 1 and job.device == "cpu"
        assert jobs.lost() == [1]
        # A lost worker stays out of the rotation, even after a new model is chosen (restore).
        jobs.restore()
        again = jobs.submit("generate", work, worker=ANY_WORKER, prefer={1})
        assert again.wait(WAIT) and again.status == DONE and again.worker == 0
    finally:
        assert jobs.close(WAIT)


def test_a_job_lost_twice_fails_with_a_clear_message():
    jobs = JobQueue(devices=["cpu", "ray:wa/cpu", "ray:wb/cpu"])

    def work(job):
        if job.worker:
            raise WorkerLost(f"Worker {job.device} stopped (ActorDiedError).")
        return "never here"

    try:
        # Only the remote workers hold the model; the first worker is kept busy so it cannot run it.
        started, release = threading.Event(), threading.Event()
        holder = jobs.submit("generate", lambda job: (started.set(), release.wait(WAIT)), worker=0)
        assert started.wait(WAIT)
        job = jobs.submit("generate", work, worker=ANY_WORKER, prefer={1, 2})
        assert job.wait(WAIT)
        assert job.status == ERROR and job.retries == 1
        assert "stopped" in job.error and "submit it again" in job.error
        assert jobs.lost() == [1, 2]
        release.set()
        assert holder.wait(WAIT)
    finally:
        assert jobs.close(WAIT)


def test_a_job_for_one_worker_is_not_moved_when_that_worker_is_lost():
    jobs = JobQueue(devices=["cpu", "ray:wa/cpu"])

    def work(job):
        raise WorkerLost("Worker ray:wa/cpu stopped (ActorDiedError).")

    try:
        job = jobs.submit("generate", work, worker=1)
        assert job.wait(WAIT)
        assert job.status == ERROR and job.retries == 0 and "not run again" in job.error
    finally:
        assert jobs.close(WAIT)


def test_a_cancelled_job_whose_worker_is_then_lost_ends_cancelled():
    jobs = JobQueue(devices=["cpu", "ray:wa/cpu"])
    started, lose = threading.Event(), threading.Event()

    def work(job):
        started.set()
        assert lose.wait(WAIT)
        raise WorkerLost("Worker ray:wa/cpu stopped (ActorDiedError).")

    try:
        job = jobs.submit("generate", work, worker=ANY_WORKER, prefer={1})
        assert started.wait(WAIT)
        jobs.cancel(job.id)
        lose.set()
        assert job.wait(WAIT)
        assert job.status == CANCELLED and job.error is None and job.retries == 0
        assert jobs.lost() == [1]
    finally:
        assert jobs.close(WAIT)


def held(jobs: JobQueue, worker: int) -> tuple[threading.Event, object]:
    """Worker ``worker`` kept busy until the returned event is set (a job meant for it alone)."""
    started, release = threading.Event(), threading.Event()
    holder = jobs.submit("hold", lambda job: (started.set(), release.wait(WAIT)), worker=worker)
    assert started.wait(WAIT)
    return release, holder


def test_a_worker_added_while_the_queue_runs_takes_a_queued_job_at_once():
    jobs = JobQueue(devices=["cpu"])
    release, holder = held(jobs, 0)
    try:
        job = jobs.submit("generate", lambda job: job.device, worker=ANY_WORKER)
        assert job.status == QUEUED  # the only worker is busy
        assert jobs.add_worker("ray:wc/cpu") == 1
        assert job.wait(WAIT) and job.status == DONE
        assert job.worker == 1 and job.result == "ray:wc/cpu"
        assert jobs.worker_count == 2 and jobs.devices == ["cpu", "ray:wc/cpu"]
        # It takes jobs meant for it alone too.
        mine = jobs.submit("generate", lambda job: job.worker, worker=1)
        assert mine.wait(WAIT) and mine.result == 1
    finally:
        release.set()
        assert holder.wait(WAIT)
        assert jobs.close(WAIT)


def test_no_worker_joins_a_closing_queue():
    jobs = JobQueue(devices=["cpu"])
    assert jobs.close(WAIT)
    with pytest.raises(RuntimeError, match="closing"):
        jobs.add_worker("ray:wc/cpu")


def test_a_worker_that_cannot_run_a_job_leaves_it_to_one_that_can():
    jobs = JobQueue(devices=["cpu", "ray:wc/cpu"])
    release, holder = held(jobs, 0)  # the worker able to run it is busy
    try:
        job = jobs.submit("generate", lambda job: job.worker, worker=ANY_WORKER, able={0})
        # Taken after it by the free worker, which passed over the job it cannot run (order is kept).
        other = jobs.submit("generate", lambda job: job.worker, worker=ANY_WORKER)
        assert other.wait(WAIT) and other.result == 1
        assert job.status == QUEUED
        release.set()
        assert job.wait(WAIT) and job.status == DONE and job.result == 0
    finally:
        release.set()
        assert holder.wait(WAIT)
        assert jobs.close(WAIT)


def test_a_job_whose_able_remote_worker_is_lost_waits_for_the_apps_own_worker():
    """As production routes: the app's own worker is always able (it reads the app's LoRA folder, where
    ``prepare`` found every LoRA) and never lost, so a job never runs on a worker that lacks its LoRAs."""
    jobs = JobQueue(devices=["cpu", "ray:wa/cpu", "ray:wb/cpu"])
    release0, holder0 = held(jobs, 0)
    release1, holder1 = held(jobs, 1)  # the remote worker able to run it, soon gone
    try:
        job = jobs.submit("generate", lambda job: job.worker, worker=ANY_WORKER, able={0, 1})
        jobs.lose(1)  # found gone outside a job: the job no longer waits for it
        # Worker 2 is free all along but lacks the LoRA: it does not take the job.
        other = jobs.submit("generate", lambda job: job.worker, worker=ANY_WORKER)
        assert other.wait(WAIT) and other.result == 2 and job.status == QUEUED
        release0.set()
        assert job.wait(WAIT) and job.status == DONE and job.result == 0
        assert jobs.lost() == [1]
        jobs.lose(0)  # the app's own worker is never lost
        assert jobs.lost() == [1]
    finally:
        release0.set()
        release1.set()
        assert holder0.wait(WAIT) and holder1.wait(WAIT)
        assert jobs.close(WAIT)


def test_a_lost_worker_ends_its_thread_once_nothing_meant_for_it_waits_and_its_slot_is_reused():
    jobs = JobQueue(devices=["cpu", "ray:wa/cpu"])
    release, holder = held(jobs, 1)
    try:
        pinned = jobs.submit("generate", lambda job: job.worker, worker=1)  # meant for it alone, waiting
        jobs.lose(1)
        assert jobs.reusable("ray:wa/cpu") is None  # its thread still has work
        release.set()
        assert pinned.wait(WAIT) and pinned.status == DONE and pinned.result == 1  # what was meant for it ran
        old = jobs._workers[1]
        old.join(WAIT)
        assert not old.is_alive()  # no thread left behind per lost worker
        with pytest.raises(UserError, match="Worker ray:wa/cpu is gone"):
            jobs.submit("generate", lambda job: job.worker, worker=1)
        # The same worker back (its process restarted): the same slot, a new thread, in the rotation again.
        assert jobs.reusable("ray:wb/cpu") is None
        assert jobs.add_worker("ray:wa/cpu", jobs.reusable("ray:wa/cpu")) == 1
        assert jobs.worker_count == 2 and jobs.lost() == []
        release0, holder0 = held(jobs, 0)
        job = jobs.submit("generate", lambda job: job.worker, worker=ANY_WORKER)
        assert job.wait(WAIT) and job.result == 1
        release0.set()
        assert holder0.wait(WAIT)
    finally:
        release.set()
        assert holder.wait(WAIT)
        assert jobs.close(WAIT)
