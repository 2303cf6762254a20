"""Generation overhead and LoRA switching, measured side by side on the same tiny model.

Prints, in one run on a tiny SD 1.x model (lower is better):
  1. per image, a generation through the project's service (validation, job queue, prompt
     handling, previews, the PNG with its A1111 metadata saved into the gallery) ÷ a bare diffusers
     pipeline call with the same settings (goal ≤ 1.03). Beside it, the service's time outside the
     diffusers call, measured inside the same runs: on this shared machine that figure is steadier
     than the ratio, whose pairs scatter by several per cent with the neighbours' load;
  2. changing the LoRA selection/scales of already-loaded LoRAs ÷ loading those LoRAs afresh.

The timed runs interleave (bare, service, then service, bare, …) and each ratio is the median of
the per-pair ratios, so a neighbour's load hits both sides of a pair alike; the ratio of the
fastest runs (the least disturbed ones) is printed beside it. At 128 px the service decodes the
image in tiles (it tiles above 1.5× the model's native size, 64 px for the tiny model); at this
size that costs what one whole decode does.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_generate.py [--repeats 15] [--steps 20] [--size 128]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline  # noqa: E402

from lorapg.config import load_settings  # noqa: E402
from lorapg.diffusion.adapters import LoraSelection  # noqa: E402
from lorapg.diffusion.request import GenerationRequest  # noqa: E402
from lorapg.services.build import build_services, configure_logging  # noqa: E402
from tests.tiny_models import build_sd15_pipeline, random_lora_state_dict, save_diffusers_lora  # noqa: E402

PROMPT = "a lighthouse on a cliff"


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_seconds(fn: Callable[[], object]) -> float:
    """CPU time of the whole process (every thread): what the work cost, whatever else the machine ran."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def paired(numerator, denominator, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each side over ``repeats`` interleaved pairs; every other pair runs the numerator first."""
    numerator(), denominator()  # warm-up: first calls allocate, load and fuse
    tops, bottoms = [], []
    for index in range(repeats):
        if index % 2:
            tops.append(seconds(numerator))
            bottoms.append(seconds(denominator))
        else:
            bottoms.append(seconds(denominator))
            tops.append(seconds(numerator))
    return tops, bottoms


def median_ratio(tops: list[float], bottoms: list[float]) -> float:
    return statistics.median(t / b for t, b in zip(tops, bottoms, strict=True))


def time_pipeline_calls(pipe: DiffusionPipeline) -> list[float]:
    """Record the seconds of every call of ``pipe`` (the diffusers call inside the service).

    The pipeline's class is swapped for a subclass whose ``__call__`` is timed: ``pipe(...)``
    looks ``__call__`` up on the class, so an instance attribute would not be called.
    """
    durations: list[float] = []
    base = type(pipe)

    class Timed(base):  # type: ignore[misc, valid-type]
        def __call__(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return base.__call__(self, *args, **kwargs)
            finally:
                durations.append(time.perf_counter() - start)

    Timed.__name__ = Timed.__qualname__ = base.__name__
    pipe.__class__ = Timed
    return durations


def build(root: Path):
    pipe = build_sd15_pipeline(root / "model")
    for i, name in enumerate(("a", "b", "c")):
        state, config = random_lora_state_dict(pipe, seed=i)
        save_diffusers_lora(root / "loras" / f"{name}.safetensors", pipe, state, config)
    # The app's defaults otherwise (the gallery keeps the newest 20: each save also prunes).
    overrides = {"model": str(root / "model"), "lora_dir": str(root / "loras"), "outputs": str(root / "outputs")}
    runtime = build_services(load_settings(None, overrides))
    runtime.service.load_model()
    bare = StableDiffusionPipeline.from_pretrained(str(root / "model"), safety_checker=None)
    bare.scheduler = EulerDiscreteScheduler.from_config(bare.scheduler.config)  # the service's "Euler"
    bare.set_progress_bar_config(disable=True)
    return runtime, bare


def bench_generation(runtime, bare: DiffusionPipeline, args) -> None:
    service = runtime.service
    request = GenerationRequest(
        prompt=PROMPT, steps=args.steps, guidance_scale=7.0, sampler="Euler", width=args.size, height=args.size, seed=1
    )

    def bare_call():
        bare(
            prompt=PROMPT,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            width=args.size,
            height=args.size,
            generator=torch.Generator("cpu").manual_seed(1),
        )

    inner = time_pipeline_calls(runtime.engine.model.pipe)
    service_s, bare_s = paired(lambda: service.generate(request), bare_call, args.repeats)
    outside = [total - call for total, call in zip(service_s, inner[1:], strict=True)]  # inner[0]: the warm-up
    outside_ms = statistics.median(outside) * 1000
    call_ms = statistics.median(inner[1:]) * 1000
    pairs = [s / b for s, b in zip(service_s, bare_s, strict=True)]
    print(
        f"generate: service {statistics.median(service_s) * 1000:.1f} ms / bare diffusers "
        f"{statistics.median(bare_s) * 1000:.1f} ms = {median_ratio(service_s, bare_s):.3f}x "
        f"(pairs {min(pairs):.3f}-{max(pairs):.3f}; fastest run / fastest run {min(service_s) / min(bare_s):.3f}x)"
    )
    print(
        f"  the service's time outside its diffusers call: {outside_ms:.2f} ms per image "
        f"= {outside_ms / call_ms * 100:.2f}% of the call ({call_ms:.1f} ms)"
    )


def bench_lora_switch(runtime, bare: DiffusionPipeline, args) -> None:
    adapters = runtime.engine.model.adapters
    infos = [runtime.library.resolve(n) for n in ("a", "b", "c")]
    selections = [
        [LoraSelection(infos[0], 0.7), LoraSelection(infos[1], 0.3)],
        [LoraSelection(infos[1], 1.0), LoraSelection(infos[2], 0.5)],
        [LoraSelection(infos[0], 0.2), LoraSelection(infos[1], 0.9), LoraSelection(infos[2], 1.2)],
    ]
    adapters.activate(selections[2])  # every file read once
    turn = iter(range(10**9))

    def switch_selection():
        adapters.activate(selections[next(turn) % 3])

    def load_afresh():
        bare.unload_lora_weights()
        for info in infos:
            bare.load_lora_weights(str(info.path), adapter_name=info.name)
        bare.set_adapters([i.name for i in infos], adapter_weights=[0.2, 0.9, 1.2])

    switch_s, fresh_s = paired(switch_selection, load_afresh, args.repeats)
    print(
        f"LoRA selection change {statistics.median(switch_s) * 1000:.2f} ms / load 3 LoRAs afresh "
        f"{statistics.median(fresh_s) * 1000:.1f} ms = {median_ratio(switch_s, fresh_s):.3f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    configure_logging()
    logging.getLogger("lorapg").setLevel(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    with tempfile.TemporaryDirectory() as tmp:
        runtime, bare = build(Path(tmp))
        print(
            f"tiny SD 1.x, {args.size}x{args.size}, {args.steps} steps, {torch.get_num_threads()} thread(s), "
            f"median of {args.repeats} interleaved pairs"
        )
        try:
            bench_generation(runtime, bare, args)
            bench_lora_switch(runtime, bare, args)
        finally:
            runtime.jobs.close()


if __name__ == "__main__":
    main()
