"""What an active LoRA selection costs per image, fused against unfused, measured side by side.

Prints, in one run on the same tiny SD 1.x model (lower is better):
  1. per-image time with three LoRAs ÷ without any (fused, as the app runs; and unfused, as before);
  2. a LoRA selection change (unfuse, set scales, fuse) ÷ loading the three LoRAs afresh;
  3. the largest pixel difference of a no-LoRA image made after fuse → unfuse against one made by
     an engine that never fused (goal 0-1), and of a fused image against an unfused one.

The timed runs interleave (base, LoRAs, base, …) and the ratio is the median of the per-pair
ratios, so a neighbour's load on this shared machine hits both sides of a pair alike.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_lora_fusing.py [--repeats 7] [--steps 20] [--size 128]
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
from diffusers import StableDiffusionPipeline  # noqa: E402

from lorapg.diffusion.adapters import LoraSelection  # noqa: E402
from lorapg.diffusion.engine import DiffusionEngine  # noqa: E402
from lorapg.diffusion.lora_library import LoraLibrary  # noqa: E402
from lorapg.diffusion.request import GenerationRequest, LoraRequest  # noqa: E402
from tests.tiny_models import build_sd15_pipeline, random_lora_state_dict, save_diffusers_lora  # noqa: E402

NAMES = ("a", "b", "c")
THREE = (("a", 0.7), ("b", 0.3), ("c", 1.0))


def make_engine(root: Path, *, fusing: bool = True) -> DiffusionEngine:
    engine = DiffusionEngine(LoraLibrary(root / "loras"), torch.device("cpu"), torch.float32)
    engine.load_model(str(root / "model"))
    engine.model.adapters.fuser.enabled = fusing
    return engine


def generate(engine: DiffusionEngine, args, loras=()) -> np.ndarray:
    request = GenerationRequest(
        prompt="a lighthouse on a cliff",
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        steps=args.steps,
        width=args.size,
        height=args.size,
        seed=1,
    )
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_ratio(numerator, denominator, repeats: int) -> tuple[float, float, float]:
    """Median of numerator/denominator over interleaved pairs, and each side's median seconds."""
    numerator(), denominator()  # warm-up: first calls allocate, load and fuse
    tops, bottoms = [], []
    for _ in range(repeats):
        bottoms.append(seconds(denominator))
        tops.append(seconds(numerator))
    ratio = statistics.median(t / b for t, b in zip(tops, bottoms, strict=True))
    return ratio, statistics.median(tops), statistics.median(bottoms)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe = build_sd15_pipeline(root / "model")
        for i, name in enumerate(NAMES):
            state, config = random_lora_state_dict(pipe, seed=i)
            save_diffusers_lora(root / "loras" / f"{name}.safetensors", pipe, state, config)
        plain, fused, unfused = make_engine(root), make_engine(root), make_engine(root, fusing=False)

        # 1. Per image: three LoRAs against none (an engine that never loaded a LoRA).
        fused_ratio, fused_s, plain_s = paired_ratio(
            lambda: generate(fused, args, THREE), lambda: generate(plain, args), args.repeats
        )
        unfused_ratio, unfused_s, _ = paired_ratio(
            lambda: generate(unfused, args, THREE), lambda: generate(plain, args), args.repeats
        )

        # 2. Selection change (unfuse, set_adapters, fuse) against a fresh load of the three files.
        adapters = fused.model.adapters
        infos = [fused.library.resolve(name) for name in NAMES]
        selections = [
            [LoraSelection(infos[0], 0.7), LoraSelection(infos[1], 0.3)],
            [LoraSelection(infos[1], 1.0), LoraSelection(infos[2], 0.5)],
            [LoraSelection(infos[0], 0.2), LoraSelection(infos[1], 0.9), LoraSelection(infos[2], 1.2)],
        ]
        turn = iter(range(10**9))
        bare = StableDiffusionPipeline.from_pretrained(str(root / "model"), safety_checker=None)

        def change_selection():
            adapters.activate(selections[next(turn) % 3])

        def load_afresh():
            bare.unload_lora_weights()
            for info in infos:
                bare.load_lora_weights(str(info.path), adapter_name=info.name)
            bare.set_adapters([i.name for i in infos], adapter_weights=[0.2, 0.9, 1.2])

        change_ratio, change_s, fresh_s = paired_ratio(change_selection, load_afresh, args.repeats)

        # 3. Pixels: fuse → unfuse → generate without LoRAs, against never fused; fused against unfused.
        never_fused = generate(plain, args)
        fused_image = generate(fused, args, THREE)
        after_unfuse = generate(fused, args)
        unfused_image = generate(unfused, args, THREE)

    print(
        f"tiny SD 1.x, {args.size}x{args.size}, {args.steps} steps, {torch.get_num_threads()} thread(s), "
        f"median of {args.repeats} interleaved pairs"
    )
    print(
        f"per image, 3 LoRAs fused {fused_s * 1000:.0f} ms / no LoRA {plain_s * 1000:.0f} ms = {fused_ratio:.3f}x"
        f"   (unfused, per-step adapters: {unfused_s * 1000:.0f} ms = {unfused_ratio:.3f}x)"
    )
    print(
        f"selection change (unfuse + scales + fuse) {change_s * 1000:.2f} ms / load 3 LoRAs afresh "
        f"{fresh_s * 1000:.1f} ms = {change_ratio:.3f}x"
    )
    restored, path = int(np.abs(after_unfuse - never_fused).max()), int(np.abs(fused_image - unfused_image).max())
    print(
        f"max pixel difference: fuse -> unfuse -> no LoRA vs never fused {restored} level(s); "
        f"fused vs unfused 3 LoRAs {path} level(s)"
    )


if __name__ == "__main__":
    main()
