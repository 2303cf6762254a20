"""The REST API's cost and its behaviour under load, measured side by side on the same tiny model.

Prints (lower is better for the first, about 1.0 is the goal for the second):
  1. an A1111 ``POST /sdapi/v1/txt2img`` round trip to a real app process (``app.py --api``: HTTP,
     JSON, the job queue, base64 PNGs) ÷ the ``GenerationService.generate`` call it wraps, made
     in this process with the same request and model (goal <= 1.10). Calls alternate between
     the two, so load from elsewhere on the machine hits both alike;
  2. the throughput of 20 concurrent API clients ÷ one client making the same 20 calls in turn.
     The queue serialises generation, so this stays near 1.0; the bench also checks that no job is
     lost, each client gets its own seed's image (compared with the one-client image for that seed
     within the reproducibility bound of tests/reproducibility.py) and nothing is mixed up.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_api.py [--repeats 10] [--steps 10] [--clients 20]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lorapg.config import load_settings  # noqa: E402
from lorapg.diffusion.request import GenerationRequest  # noqa: E402
from lorapg.services.a1111 import resolve_sampler  # noqa: E402
from lorapg.services.build import build_services, configure_logging  # noqa: E402
from tests.app_server import running_app  # noqa: E402
from tests.reproducibility import BATCH_MAX_LEVELS, BATCH_MEAN_LEVELS  # noqa: E402
from tests.tiny_models import build_sd15_pipeline  # noqa: E402

log = logging.getLogger("bench")
AUTH = ("bench", "bench-pw")
PROMPT, SIZE, CFG, SAMPLER = "a lighthouse at dusk", 64, 7.0, "Euler a"


def api_body(seed: int, steps: int) -> dict:
    return {
        "prompt": PROMPT,
        "seed": seed,
        "steps": steps,
        "width": SIZE,
        "height": SIZE,
        "cfg_scale": CFG,
        "sampler_name": SAMPLER,
    }


def service_request(seed: int, steps: int) -> GenerationRequest:
    """What the txt2img route hands to GenerationService for ``api_body``."""
    return GenerationRequest(
        prompt=PROMPT,
        steps=steps,
        guidance_scale=CFG,
        sampler=resolve_sampler(SAMPLER, None),
        width=SIZE,
        height=SIZE,
        seed=seed,
    )


def txt2img(base: str, seed: int, steps: int) -> tuple[list[int], Image.Image]:
    reply = requests.post(f"{base}/txt2img", json=api_body(seed, steps), auth=AUTH, timeout=600)
    reply.raise_for_status()
    body = reply.json()
    (raw,) = body["images"]
    return json.loads(body["info"])["all_seeds"], Image.open(io.BytesIO(base64.b64decode(raw))).convert("RGB")


def within_bound(first: Image.Image, second: Image.Image) -> bool:
    difference = np.abs(np.asarray(first, dtype=np.int16) - np.asarray(second, dtype=np.int16))
    return difference.max() <= BATCH_MAX_LEVELS and difference.mean() <= BATCH_MEAN_LEVELS


def round_trip_ratio(base: str, service, steps: int, repeats: int) -> tuple[float, float]:
    """Median seconds of an API call and of the service call it wraps, alternating."""
    api_times, service_times = [], []
    txt2img(base, 1, steps)  # warm-up both sides: first calls allocate
    service.generate(service_request(1, steps), record=False)
    for _ in range(repeats):
        start = time.perf_counter()
        txt2img(base, 1, steps)
        api_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        service.generate(service_request(1, steps), record=False)
        service_times.append(time.perf_counter() - start)
    return statistics.median(api_times), statistics.median(service_times)


def concurrency(base: str, steps: int, clients: int) -> dict:
    """One client making ``clients`` calls in turn, then ``clients`` clients at once (seeds 100, 101, …)."""
    seeds = [100 + i for i in range(clients)]
    start = time.perf_counter()
    alone = {seed: txt2img(base, seed, steps) for seed in seeds}
    one_s = time.perf_counter() - start
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        futures = {seed: pool.submit(txt2img, base, seed, steps) for seed in seeds}
        replies, errors = {}, []
        for seed, future in futures.items():
            try:
                replies[seed] = future.result()
            except Exception as exc:  # a lost job is counted and reported, not raised
                errors.append(f"seed {seed}: {exc}")
        many_s = time.perf_counter() - start
    wrong_seed = [seed for seed, (got, _) in replies.items() if got != [seed]]
    mixed_up = [seed for seed, (_, image) in replies.items() if not within_bound(image, alone[seed][1])]
    # The bound must tell different seeds apart, or "not mixed up" would mean nothing.
    distinct = not within_bound(alone[seeds[0]][1], alone[seeds[1]][1])
    return {
        "one_s": one_s,
        "many_s": many_s,
        "lost": errors,
        "wrong_seed": wrong_seed,
        "mixed_up": mixed_up,
        "distinct": distinct,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()
    configure_logging()
    logging.getLogger("lorapg").setLevel(logging.WARNING)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_sd15_pipeline(root / "model")
        (root / "loras").mkdir()
        values = {"model": str(root / "model"), "lora_dir": str(root / "loras"), "outputs": str(root / "outputs")}
        runtime = build_services(load_settings(None, values))
        runtime.service.load_model()
        app_args = ("--api", "--api-auth", ":".join(AUTH), "--model", values["model"], "--lora-dir", values["lora_dir"])
        app_args += ("--outputs", str(root / "app-outputs"), "--threads", str(threads))
        with running_app(*app_args) as url:
            base = url + "sdapi/v1"
            api_s, service_s = round_trip_ratio(base, runtime.service, args.steps, args.repeats)
            load = concurrency(base, args.steps, args.clients)
        runtime.jobs.close()

    per_image = args.clients / load["one_s"], args.clients / load["many_s"]
    print(f"tiny SD 1.x, {SIZE}x{SIZE}, {args.steps} steps, {threads} torch thread(s) in each process")
    print(f"{'measure':<46}{'value':>22}{'ratio':>9}  goal")
    print(
        f"{'txt2img API round trip / service call':<46}"
        f"{f'{api_s * 1000:.0f} / {service_s * 1000:.0f} ms':>22}{api_s / service_s:>8.2f}x  <= 1.10"
        f" (median of {args.repeats})"
    )
    print(
        f"{f'{args.clients} concurrent clients / 1 client':<46}"
        f"{f'{per_image[1]:.2f} / {per_image[0]:.2f} img/s':>22}{per_image[1] / per_image[0]:>8.2f}x  ~1.0"
        " (one GPU queue)"
    )
    checks = {
        "jobs lost": load["lost"],
        "replies with another seed": load["wrong_seed"],
        "images not their seed's (mixed up)": load["mixed_up"],
    }
    for name, problems in checks.items():
        print(f"{name}: {len(problems)}" + (f" {problems[:5]}" if problems else ""))
    if not load["distinct"]:
        print("warning: two seeds' images fall within the bound; the mix-up check cannot see a swap")
    return 1 if any(checks.values()) or not load["distinct"] else 0


if __name__ == "__main__":
    sys.exit(main())
