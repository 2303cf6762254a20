"""A comparison grid of N cells ÷ the same N single generations, on the same tiny model and LoRA.

Both run through GenerationService in this process with the base model and the LoRA loaded once, so
the ratio is the grid's own cost: planning, the per-cell bookkeeping, drawing and writing the grid
PNG (goal <= 1.05). Runs alternate between the two, so load from elsewhere hits both alike; the
process's CPU seconds are reported beside the wall seconds, as they hardly depend on that load.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_grid.py [--repeats 5] [--steps 10] [--size 64]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lorapg.config import Settings  # noqa: E402
from lorapg.diffusion.request import GenerationRequest, LoraRequest  # noqa: E402
from lorapg.services.build import build_services, configure_logging  # noqa: E402
from lorapg.services.grid import GridService  # noqa: E402
from tests.tiny_models import build_sd15_pipeline, random_lora_state_dict, save_diffusers_lora  # noqa: E402

log = logging.getLogger("bench")
SCALES, SEEDS = (0.0, 0.5, 1.0), (1, 2, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    configure_logging()
    logging.getLogger("lorapg").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe = build_sd15_pipeline(root / "sd15")
        state, config = random_lora_state_dict(pipe, rank=4, alpha=2.0, seed=1)
        save_diffusers_lora(root / "loras" / "style.safetensors", pipe, state, config)
        settings = Settings(model=str(root / "sd15"), lora_dir=root / "loras", outputs=root / "outputs", threads=1)
        runtime = build_services(settings)
        try:
            return measure(runtime, args)
        finally:
            runtime.jobs.close()


def timed(work) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all its threads) of ``work()``. With one torch thread
    the CPU seconds are the work's own cost, which other processes on a shared machine barely move."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(runtime, args) -> int:
    grids = GridService(runtime.settings, runtime.service)
    base = GenerationRequest(prompt="a lighthouse at dusk", steps=args.steps, width=args.size, height=args.size)
    x, y = "lora:style=" + ",".join(f"{s:g}" for s in SCALES), "seed=" + ",".join(map(str, SEEDS))
    singles = [
        GenerationRequest(**{**base.__dict__, "seed": seed, "loras": (LoraRequest("style", scale),)})
        for seed in SEEDS
        for scale in SCALES
    ]
    runtime.service.generate(singles[0])  # warm-up: the model and the LoRA load here, outside the timing
    grid_times, single_times = [], []  # (wall seconds, this process's CPU seconds) per run
    for _ in range(args.repeats):
        grid_times.append(timed(lambda: grids.run(base, x, y)))
        single_times.append(timed(lambda: [runtime.service.generate(request) for request in singles]))
    print(f"cells: {len(singles)}, steps {args.steps}, {args.size}px, repeats {args.repeats}")
    for index, label in enumerate(("wall", "CPU")):
        grid = statistics.median(run[index] for run in grid_times)
        single = statistics.median(run[index] for run in single_times)
        # Each grid against the singles run right after it: load from other processes that drifts over
        # the run moves both of a pair alike.
        paired = sorted(g[index] / s[index] for g, s in zip(grid_times, single_times, strict=True))
        print(
            f"{label:4}: grid {grid:.3f}s  singles {single:.3f}s  ratio grid/singles {grid / single:.3f} "
            f"(goal <= 1.05); paired ratios median {statistics.median(paired):.3f}, "
            f"range {paired[0]:.3f}-{paired[-1]:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
