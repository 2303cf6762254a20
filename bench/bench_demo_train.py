"""The demo model's training recipe: how long the full run takes with 1 and with 2 CPU threads.

Times a slice of each stage (VAE steps, diffusion steps) of the real recipe in a fresh process per
thread count, and projects the full recipe from the measured seconds per step. Prints both
projections and their ratio (2 threads ÷ 1 thread; lower is better). Run it on an idle machine: the
other core being busy is exactly what makes 2 threads slow.

Run: .venv/bin/python bench/bench_demo_train.py [--vae-steps 20] [--diffusion-steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import json, sys, time
from dataclasses import replace
import numpy as np, torch
from lorapg.demo.training import Recipe, train_diffusion, train_vae
from lorapg.demo.vocabulary import write_tokenizer
import tempfile, pathlib
threads, vae_steps, diffusion_steps = (int(v) for v in sys.argv[1:4])
torch.set_num_threads(threads)
full = Recipe()
rng = np.random.default_rng(0)
quiet = lambda message: None
started = time.perf_counter()
vae = train_vae(replace(full, vae_steps=vae_steps, vae_pool=2000), rng, quiet)
vae_s = (time.perf_counter() - started) / vae_steps
tokenizer = write_tokenizer(pathlib.Path(tempfile.mkdtemp()))
started = time.perf_counter()
train_diffusion(vae, tokenizer, replace(full, diffusion_steps=diffusion_steps, jitters_per_scene=4), rng, quiet)
diffusion_s = (time.perf_counter() - started) / diffusion_steps
print(json.dumps({"vae_s": vae_s, "diffusion_s": diffusion_s,
                  "projected_min": (vae_s * full.vae_steps + diffusion_s * full.diffusion_steps) / 60}))
"""


def measure(threads: int, vae_steps: int, diffusion_steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(threads), str(vae_steps), str(diffusion_steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vae-steps", type=int, default=20)
    parser.add_argument("--diffusion-steps", type=int, default=40)
    args = parser.parse_args()
    results = {threads: measure(threads, args.vae_steps, args.diffusion_steps) for threads in (1, 2)}
    for threads, r in results.items():
        print(
            f"{threads} thread(s): VAE {r['vae_s']:.2f} s/step, diffusion {r['diffusion_s']:.2f} s/step, "
            f"full recipe ≈ {r['projected_min']:.1f} min"
        )
    print(f"ratio 2 threads / 1 thread: {results[2]['projected_min'] / results[1]['projected_min']:.2f}×")


if __name__ == "__main__":
    main()
