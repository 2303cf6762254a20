"""LoRA training on the tiny SD 1.x model: cached VAE latents vs encoding every step, side by side.

Prints steps/s for both runs, their ratio (higher is better), and peak memory (CUDA: max allocated;
CPU: the process's peak RSS so far). Both runs train the same steps on the same data and seed.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train.py [--steps 60] [--images 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lorapg.training.config import build_config  # noqa: E402
from lorapg.training.trainer import Trainer  # noqa: E402
from tests.tiny_models import build_sd15_pipeline  # noqa: E402
from tests.training_data import write_images  # noqa: E402


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (CUDA max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_sd15_pipeline(root / "model")
        write_images(root / "images", args.images)
        rates = {}
        for cache in (True, False, True):  # the second cached run measures a warm (on-disk) cache
            config = build_config(
                dict(
                    name=f"bench_{cache}",
                    model=str(root / "model"),
                    images=str(root / "images"),
                    trigger="zqx",
                    rank=4,
                    alpha=4,
                    max_steps=args.steps,
                    epochs=1000,
                    sample_steps=0,
                    save_every_epochs=1000,
                    cache_latents=cache,
                    gradient_checkpointing=False,
                    resume=False,
                )
            )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            result = Trainer(config, lora_dir=root / "loras", work_dir=root / f"work_{cache}", device=device).run()
            rates[cache] = result.steps_per_s
            print(f"cache_latents={cache!s:5}  {result.steps_per_s:7.2f} steps/s  peak {peak_memory(device)}")
        print(
            f"cached ÷ uncached steps/s: {rates[True] / rates[False]:.2f}×  ({args.steps} steps, {args.images} "
            f"images, {device})"
        )


if __name__ == "__main__":
    main()
