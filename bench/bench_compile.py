"""``--compile`` side by side with the plain engine, on the tiny SD 1.x model, in one run.

Prints:
  1. the first compiled image's time (tracing + compiling) ÷ a plain image;
  2. per-image time compiled ÷ plain, both with a LoRA selection that changes every image
     (A, B, A at another scale, none, …), i.e. including the selection change;
  3. how many graphs dynamo compiled after the first image (goal 0: changing LoRAs never recompiles),
     and the largest pixel difference compiled vs plain.

The timed runs interleave (plain, compiled, plain, …) and the ratio is the median of the per-pair ratios.
On CPU inductor needs a C++ compiler; ``--backend eager`` measures dynamo's overhead alone.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_compile.py [--device cuda] [--backend inductor] [--repeats 8]
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from lorapg.diffusion.engine import DiffusionEngine  # noqa: E402
from lorapg.diffusion.lora_library import LoraLibrary  # noqa: E402
from lorapg.diffusion.request import GenerationRequest, LoraRequest  # noqa: E402
from tests.tiny_models import build_sd15_pipeline, random_lora_state_dict, save_diffusers_lora  # noqa: E402

SELECTIONS = [(("a", 0.8),), (("b", 1.0),), (("a", 0.4), ("b", 0.5)), ()]


def generate(engine: DiffusionEngine, args, loras=()) -> tuple[np.ndarray, float]:
    request = GenerationRequest(
        prompt="a lighthouse on a cliff",
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        steps=args.steps,
        width=args.size,
        height=args.size,
        seed=1,
    )
    started = time.perf_counter()
    image = engine.generate(request).images[0]
    return np.asarray(image, dtype=np.int16), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        pipe = build_sd15_pipeline(root / "model")
        for seed, name in enumerate(("a", "b"), start=1):
            state, config = random_lora_state_dict(pipe, seed=seed)
            save_diffusers_lora(root / "loras" / f"{name}.safetensors", pipe, state, config)
        engines = {}
        for compiled in (False, True):
            engine = DiffusionEngine(
                LoraLibrary(root / "loras"),
                torch.device(args.device),
                dtype,
                compile_unet=compiled,
                compile_backend=args.backend,
            )
            engine.load_model(str(root / "model"))
            engines[compiled] = engine
        _, plain_first = generate(engines[False], args)
        _, compiled_first = generate(engines[True], args)
        graphs_after_first = counters["stats"]["unique_graphs"]
        ratios, worst = [], 0
        for i in range(args.repeats):
            loras = SELECTIONS[i % len(SELECTIONS)]
            plain, plain_s = generate(engines[False], args, loras)
            compiled, compiled_s = generate(engines[True], args, loras)
            ratios.append(compiled_s / plain_s)
            worst = max(worst, int(np.abs(plain - compiled).max()))
        recompiled = counters["stats"]["unique_graphs"] - graphs_after_first
    print(f"device {args.device}, backend {args.backend}, {args.steps} steps at {args.size}px")
    print(f"first compiled image ÷ first plain image:        {compiled_first / plain_first:8.2f}")
    print(f"per image, LoRAs changing, compiled ÷ plain:     {statistics.median(ratios):8.3f}")
    print(f"graphs compiled after the first image (goal 0):  {recompiled:8d}")
    print(f"max pixel difference compiled vs plain:          {worst:8d}")


if __name__ == "__main__":
    main()
