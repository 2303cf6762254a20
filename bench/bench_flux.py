"""Flux.1 on the tiny model built in code (issue 17 item 7), measured side by side.

Prints (one torch thread by default):
  1. per image, a generation through the app's GenerationService ÷ a bare diffusers FluxPipeline call
     with the same settings (lower is better). The runs interleave and the ratio is the median of
     the per-pair ratios, so a neighbour's load hits both sides of a pair alike.
  2. training steps/s with the caption embeddings cached before the loop (the trainer's way for
     Flux) ÷ re-encoded every step through the same ``FlowTraining._encode`` (the benchmark switch
     ``FlowTraining.encode_every_step``; higher is better). Runs alternate cached / re-encoded; the
     median of the per-pair ratios is printed.

The tiny T5 and CLIP are a few layers of width 32, so the encoding they save is far smaller than
T5-XXL's on a real FLUX.1; the ratio says the path works, not what a real model gains.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_flux.py [--repeats 9] [--steps 20] [--size 64]
     [--train-steps 30] [--train-pairs 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402

from bench.bench_generate import median_ratio, paired, time_pipeline_calls  # noqa: E402
from lorapg.config import load_settings  # noqa: E402
from lorapg.diffusion.request import GenerationRequest  # noqa: E402
from lorapg.diffusion.samplers import DEFAULT_FLOW_SAMPLER  # noqa: E402
from lorapg.services.build import build_services, configure_logging  # noqa: E402
from lorapg.training.config import build_config  # noqa: E402
from lorapg.training.flow_matching import FlowTraining  # noqa: E402
from lorapg.training.trainer import Trainer  # noqa: E402
from tests.tiny_flux import build_flux_pipeline  # noqa: E402
from tests.training_data import write_images  # noqa: E402

PROMPT = "a lighthouse on a cliff"
GUIDANCE = 3.5  # Flux dev's distilled guidance (the tiny model is dev-like)
MAX_SEQUENCE_LENGTH = 64  # the tiny T5 tokenizer's length: what the service passes too


def bench_generation(root: Path, args) -> None:
    overrides = {"model": str(root / "model"), "lora_dir": str(root / "loras"), "outputs": str(root / "outputs")}
    runtime = build_services(load_settings(None, overrides))
    try:
        runtime.service.load_model()
        bare = FluxPipeline.from_pretrained(str(root / "model"))
        bare.set_progress_bar_config(disable=True)
        request = GenerationRequest(
            prompt=PROMPT,
            steps=args.steps,
            guidance_scale=GUIDANCE,
            sampler=DEFAULT_FLOW_SAMPLER,
            width=args.size,
            height=args.size,
            seed=1,
        )

        def bare_call():
            bare(
                prompt=PROMPT,
                num_inference_steps=args.steps,
                guidance_scale=GUIDANCE,
                width=args.size,
                height=args.size,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                generator=torch.Generator("cpu").manual_seed(1),
            )

        inner = time_pipeline_calls(runtime.engine.model.pipe)
        service_s, bare_s = paired(lambda: runtime.service.generate(request), bare_call, args.repeats)
        pairs = [s / b for s, b in zip(service_s, bare_s, strict=True)]
        call_ms = statistics.median(inner[1:]) * 1000  # inner[0]: the warm-up
        outside_ms = statistics.median(t - c for t, c in zip(service_s, inner[1:], strict=True)) * 1000
        print(
            f"generate: service {statistics.median(service_s) * 1000:.1f} ms / bare FluxPipeline "
            f"{statistics.median(bare_s) * 1000:.1f} ms = {median_ratio(service_s, bare_s):.3f}x "
            f"(pairs {min(pairs):.3f}-{max(pairs):.3f})"
        )
        print(f"  the service's time outside its diffusers call: {outside_ms:.2f} ms per image (call {call_ms:.1f} ms)")
    finally:
        runtime.jobs.close()


def train_rate(root: Path, args, cached: bool, index: int) -> float:
    config = build_config(
        dict(
            name=f"bench_{index}",
            model=str(root / "model"),
            images=str(root / "images"),
            trigger="zqx",
            rank=4,
            alpha=4,
            max_steps=args.train_steps,
            epochs=1000,
            sample_steps=0,
            save_every_epochs=1000,
            gradient_checkpointing=False,
            resume=False,
        )
    )
    FlowTraining.encode_every_step = not cached
    try:
        result = Trainer(config, lora_dir=root / "loras", work_dir=root / f"work_{index}", device=torch.device("cpu"))
        return result.run().steps_per_s
    finally:
        FlowTraining.encode_every_step = False


def bench_training(root: Path, args) -> None:
    cached, encoded = [], []
    for pair in range(args.train_pairs):
        order = (True, False) if pair % 2 == 0 else (False, True)
        for cache in order:
            rate = train_rate(root, args, cache, pair * 2 + int(cache))
            (cached if cache else encoded).append(rate)
            print(f"  {'cached' if cache else 're-encoded':10} {rate:7.2f} steps/s")
    ratios = [c / e for c, e in zip(cached, encoded, strict=True)]
    print(
        f"train: cached text embeddings {statistics.median(cached):.2f} steps/s ÷ re-encoded each step "
        f"{statistics.median(encoded):.2f} steps/s = {statistics.median(ratios):.2f}x "
        f"(pairs {min(ratios):.2f}-{max(ratios):.2f}; {args.train_steps} steps, {args.images} images)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train-steps", dest="train_steps", type=int, default=30)
    parser.add_argument("--train-pairs", dest="train_pairs", type=int, default=3)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    configure_logging()
    logging.getLogger("lorapg").setLevel(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_flux_pipeline(root / "model")
        write_images(root / "images", args.images)
        print(
            f"tiny Flux.1 (dev-like), {args.size}x{args.size}, {args.steps} steps, {torch.get_num_threads()} "
            f"thread(s), median of {args.repeats} interleaved pairs; load average {os.getloadavg()[0]:.2f}"
        )
        bench_generation(root, args)
        bench_training(root, args)


if __name__ == "__main__":
    main()
