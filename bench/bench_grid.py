"""A comparison grid of N cells ÷ the same N single generations, on the same tiny model and LoRA.

Both run through GenerationService in this process with the base model and the LoRA loaded once, so
the ratio is the grid's own cost: planning, the per-cell bookkeeping, drawing and writing the grid
PNG (goal <= 1.05). Runs alternate between the two, so load from elsewhere hits both alike.

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
    grid_times, single_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        grids.run(base, x, y)
        grid_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for request in singles:
            runtime.service.generate(request)
        single_times.append(time.perf_counter() - start)
    grid, single = statistics.median(grid_times), statistics.median(single_times)
    # Each grid against the singles run right after it: load from other processes that drifts over the
    # run moves both of a pair alike, so the pairs' median is the steadier figure on a shared machine.
    paired = sorted(g / s for g, s in zip(grid_times, single_times, strict=True))
    print(f"cells: {len(singles)}, steps {args.steps}, {args.size}px, repeats {args.repeats}")
    print(f"grid: {grid:.3f}s  singles: {single:.3f}s  ratio grid/singles: {grid / single:.3f} (goal <= 1.05)")
    print(f"paired ratios: median {statistics.median(paired):.3f}, range {paired[0]:.3f}-{paired[-1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
