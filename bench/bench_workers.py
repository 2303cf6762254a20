"""Generation throughput with 1, 2 and 3 workers behind the one job queue (``--devices cpu,cpu,...``).

Prints, in one run on a tiny SD 1.x model built in code: for each worker count, jobs/s through the
app's own path (``GenerationService.submit_generation`` on the ``JobQueue``, each image saved into the
gallery as a PNG with its A1111 metadata), jobs/s per worker, the scaling ratio against 1 worker,
and the process's CPU seconds per job and per wall second (the cores it kept busy); with the
machine's core count and load average at the start.

The three apps are built side by side in this one process (each its own services, queue, workers and
gallery) and timed in interleaved rounds (1, 2, 3 workers, then 2, 3, 1, ...), each round a batch of
``--jobs`` identical-size jobs with different seeds, all submitted at once; figures are medians over
the rounds, so a neighbour's load hits every worker count alike. The scaling ratio is the median of
the per-round ratios against that round's 1-worker batch. Each worker's torch runs one thread, so N
workers want N free cores; on a shared machine the load average says how many were free.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_workers.py [--jobs 24] [--rounds 5] [--steps 8] [--size 64]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lorapg.config import Settings  # noqa: E402
from lorapg.diffusion.request import GenerationRequest  # noqa: E402
from lorapg.jobs import DONE  # noqa: E402
from lorapg.services.build import Services, build_services, configure_logging  # noqa: E402
from tests.tiny_models import build_sd15_pipeline  # noqa: E402

PROMPT = "a lighthouse on a cliff"
WAIT = 600  # seconds: a safety net against a hang, never what is measured


@dataclass
class App:
    """One app with ``workers`` CPU workers, and what its timed batches measured."""

    workers: int
    services: Services
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    ran_on: dict[int, int] = field(default_factory=dict)  # worker index -> jobs it ran (all rounds)


def build_app(root: Path, model: Path, workers: int) -> App:
    folder = root / f"app-{workers}"
    settings = Settings(
        model=str(model),
        lora_dir=folder / "loras",
        models_dir=folder / "models",
        outputs=folder / "outputs",
        load_model_at_start=False,
        device="cpu",
        devices=",".join(["cpu"] * workers),
        threads=1,  # one torch thread per worker: the scaling measured is the workers', not torch's
        gallery_keep=0,  # no pruning inside a timed batch
    )
    (folder / "loras").mkdir(parents=True)
    services = build_services(settings)
    services.service.load_model()
    return App(workers, services)


def request(seed: int, args) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, steps=args.steps, width=args.size, height=args.size, seed=seed)


def warm_up(app: App, args) -> None:
    """Every worker loads the model and runs one generation before anything is timed: a worker
    other than the first loads the chosen model on its first job, which is not what is measured."""
    service, jobs = app.services.service, app.services.jobs
    ref = service.chosen_model()
    prepared = service.prepare(request(0, args))
    warm = [
        jobs.submit("warm-up", lambda job: service.run_in_job(prepared, job, model_ref=ref, record=False), worker=i)
        for i in range(app.workers)
    ]
    for job in warm:
        finish(job)


def finish(job) -> None:
    if not job.wait(WAIT) or job.status != DONE:
        raise RuntimeError(f"job {job.id} ended {job.status}: {job.error}")


def timed_batch(app: App, first_seed: int, args) -> None:
    """Submit ``args.jobs`` generations at once and wait for all of them: wall and CPU seconds."""
    service = app.services.service
    wall, cpu = time.perf_counter(), time.process_time()
    jobs = [service.submit_generation(request(first_seed + i, args)) for i in range(args.jobs)]
    for job in jobs:
        finish(job)
    app.seconds.append(time.perf_counter() - wall)
    app.cpu_seconds.append(time.process_time() - cpu)
    for job in jobs:
        app.ran_on[job.worker] = app.ran_on.get(job.worker, 0) + 1


def run_rounds(apps: list[App], args) -> None:
    for round_index in range(args.rounds):
        shift = round_index % len(apps)  # each worker count takes every place in the round in turn
        for app in apps[shift:] + apps[:shift]:
            timed_batch(app, 1000 * (round_index + 1), args)


HEADER = ("workers", "jobs/s (median)", "jobs/s per worker", "vs 1 worker (rounds)", "CPU s per job", "cores busy")


def table(apps: list[App], args) -> str:
    base = apps[0]
    rows = ["| " + " | ".join((*HEADER, "jobs per worker")) + " |", "|---:" * len(HEADER) + "|---|"]
    for app in apps:
        rate = args.jobs / statistics.median(app.seconds)
        ratios = [b / s for s, b in zip(app.seconds, base.seconds, strict=True)]  # per round: the noise
        scaling = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        cpu_per_job = statistics.median(app.cpu_seconds) / args.jobs
        # The process's CPU seconds per wall second: how many cores its workers kept busy.
        busy = statistics.median(c / s for c, s in zip(app.cpu_seconds, app.seconds, strict=True))
        spread = " / ".join(str(app.ran_on.get(i, 0)) for i in range(app.workers))
        cells = (app.workers, f"{rate:.2f}", f"{rate / app.workers:.2f}", scaling, f"{cpu_per_job:.3f}", f"{busy:.2f}")
        rows.append("| " + " | ".join(map(str, (*cells, spread))) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=24, help="generations per timed batch")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is printed)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    configure_logging()
    logging.getLogger("lorapg").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_sd15_pipeline(root / "model")
        apps = [build_app(root, root / "model", count) for count in sorted(args.workers)]
        try:
            for app in apps:
                warm_up(app, args)
            started = time.perf_counter()
            run_rounds(apps, args)
            elapsed = time.perf_counter() - started
        finally:
            for app in apps:
                app.services.jobs.close(WAIT)
    print(
        f"tiny SD 1.x, {args.size}x{args.size}, {args.steps} steps, {args.jobs} jobs per batch (different seeds), "
        f"saved to the gallery; 1 torch thread per worker; {args.rounds} interleaved rounds, medians"
    )
    print(
        f"machine: {cores} core(s) usable, load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"(1/5/15 min); timed rounds took {elapsed:.0f} s"
    )
    print(table(apps, args))


if __name__ == "__main__":
    main()
