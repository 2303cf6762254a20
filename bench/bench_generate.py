"""Generation overhead and LoRA switching, measured side by side on the same tiny model.

Prints two ratios (lower is better):
  1. a generation through the project's service (job queue, validation, adapters, gallery save)
     ÷ a bare diffusers pipeline call with the same settings;
  2. changing the LoRA selection/scales of already-loaded LoRAs ÷ loading those LoRAs afresh.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_generate.py [--repeats 10]
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
from diffusers import StableDiffusionPipeline  # noqa: E402

from lorapg.config import load_settings  # noqa: E402
from lorapg.diffusion.request import GenerationRequest  # noqa: E402
from lorapg.services.build import build_services, configure_logging  # noqa: E402
from tests.tiny_models import build_sd15_pipeline, random_lora_state_dict, save_diffusers_lora  # noqa: E402

log = logging.getLogger("bench")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and load
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    configure_logging()
    logging.getLogger("lorapg").setLevel(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe = build_sd15_pipeline(root / "model")
        for i, name in enumerate(("a", "b", "c")):
            state, config = random_lora_state_dict(pipe, seed=i)
            save_diffusers_lora(root / "loras" / f"{name}.safetensors", pipe, state, config)
        settings = load_settings(
            None,
            {
                "model": str(root / "model"),
                "lora_dir": str(root / "loras"),
                "outputs": str(root / "outputs"),
                "gallery_keep": 0,
            },
        )
        runtime = build_services(settings)
        service = runtime.service
        service.load_model()

        bare = StableDiffusionPipeline.from_pretrained(str(root / "model"), safety_checker=None)
        bare.set_progress_bar_config(disable=True)
        settings_kwargs = dict(
            prompt="a lighthouse", num_inference_steps=args.steps, guidance_scale=7.0, width=64, height=64
        )

        def bare_call():
            bare(**settings_kwargs, generator=torch.Generator("cpu").manual_seed(1))

        def service_call():
            service.generate(
                GenerationRequest(
                    prompt="a lighthouse",
                    steps=args.steps,
                    guidance_scale=7.0,
                    sampler="Euler",
                    width=64,
                    height=64,
                    seed=1,
                )
            )

        bare_s = median_seconds(bare_call, args.repeats)
        service_s = median_seconds(service_call, args.repeats)

        adapters = runtime.engine.model.adapters
        infos = [runtime.library.resolve(n) for n in ("a", "b", "c")]
        from lorapg.diffusion.adapters import LoraSelection

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

        switch_s = median_seconds(switch_selection, args.repeats)
        fresh_s = median_seconds(load_afresh, args.repeats)
        runtime.jobs.shutdown()

    print(f"tiny SD 1.x, 64x64, {args.steps} steps, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(
        f"generate: service {service_s * 1000:.1f} ms / bare diffusers {bare_s * 1000:.1f} ms "
        f"= {service_s / bare_s:.2f}x"
    )
    print(
        f"LoRA selection change {switch_s * 1000:.2f} ms / load 3 LoRAs afresh {fresh_s * 1000:.1f} ms "
        f"= {switch_s / fresh_s:.3f}x"
    )


if __name__ == "__main__":
    main()
