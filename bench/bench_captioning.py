"""Captioning throughput batched ÷ one image at a time, through the product's path.

Builds the tests' tiny BLIP (a transformers model: generate()) and tiny WD14 tagger (an ONNX graph),
a dataset of N small images of different colours, and captions the whole dataset with overwrite on
through ``CaptionService.caption`` (the CLI's path: runner, image reading, atomic caption writes)
with batch_size 1 and with each batched size. Prints per captioner and batch size the images/s and
the ratio batched ÷ single (above 1: batching is faster), and how many captions the batched run
wrote exactly as the single run did (greedy decoding; a float difference between batch shapes may
rarely flip a word, so this is reported, not asserted). A "model only" line times the captioner's
own calls on the decoded images: the ceiling batching can reach, since each caption's durable write
(``atomic_write``: the file and its folder fsynced) costs the same at any batch size.

The timed runs interleave (single, batched, single, …) and the ratio is the median of the per-pair
ratios, so a neighbour's load on this shared machine hits both sides of a pair alike.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_captioning.py [--images 32] [--repeats 9] [--batch 4 8]
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
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the tiny models' save/load bars
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lorapg.captioning.base import SENTENCE, TAGS, CaptionOptions  # noqa: E402
from lorapg.config import Settings  # noqa: E402
from lorapg.services.captions import CaptionService  # noqa: E402
from lorapg.training.dataset import DatasetStore  # noqa: E402
from tests.tiny_captioners import save_tiny_blip, save_tiny_wd14  # noqa: E402

DATASET = "bench"


def make_images(folder: Path, count: int, side: int) -> None:
    """Noisy images around different colours, so the captioners see different inputs."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 256, size=3)
        noise = rng.integers(-40, 41, size=(side, side, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")


def caption_all(service: CaptionService, folder: Path, choice: str, style: str, batch_size: int) -> dict[str, str]:
    options = CaptionOptions(style=style, max_length=8, overwrite=True, batch_size=batch_size)
    report = service.caption(DATASET, str(folder), options)
    if report.skipped or report.cancelled:
        raise RuntimeError(f"{choice}: captioning skipped images: {report.summary()}")
    return report.written


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_speedup(single, batched, repeats: int) -> tuple[float, float, float]:
    """Median over interleaved pairs of single seconds / batched seconds (= batched ÷ single in
    images/s), and each side's median seconds."""
    single(), batched()  # warm-up: the first call loads the model and allocates
    singles, batches = [], []
    for _ in range(repeats):
        singles.append(seconds(single))
        batches.append(seconds(batched))
    ratio = statistics.median(s / b for s, b in zip(singles, batches, strict=True))
    return ratio, statistics.median(singles), statistics.median(batches)


def model_only(captioner, images: list[Image.Image], style: str, batch_size: int) -> None:
    """The captioner's own calls over the decoded images: no file reading, no caption writes."""
    options = CaptionOptions(style=style, max_length=8, batch_size=batch_size)
    for start in range(0, len(images), batch_size):
        captioner.caption(images[start : start + batch_size], options)


def bench_captioner(service: CaptionService, label: str, folder: Path, style: str, args) -> None:
    single_captions = caption_all(service, folder, label, style, 1)
    captioner = service.captioner(str(folder))  # the one the runs above loaded and keep
    images = [Image.open(path).convert("RGB") for path in service.dataset(DATASET).image_paths()]
    for size in args.batch:
        batched_captions = caption_all(service, folder, label, style, size)
        same = sum(single_captions[name] == batched_captions.get(name) for name in single_captions)
        ratio, single_s, batched_s = paired_speedup(
            lambda: caption_all(service, folder, label, style, 1),
            lambda size=size: caption_all(service, folder, label, style, size),
            args.repeats,
        )
        print(
            f"{label:5s} batch {size:2d}: {args.images / batched_s:7.1f} img/s vs batch 1 {args.images / single_s:7.1f}"
            f" img/s = {ratio:.2f}x   ({same}/{len(single_captions)} captions as batch 1)"
        )
        ratio, single_s, batched_s = paired_speedup(
            lambda: model_only(captioner, images, style, 1),
            lambda size=size: model_only(captioner, images, style, size),
            args.repeats,
        )
        print(
            f"      model only: {args.images / batched_s:7.1f} img/s vs batch 1 {args.images / single_s:7.1f}"
            f" img/s = {ratio:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--side", type=int, default=64, help="image side in pixels (the captioners resize)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--no-wd14", action="store_true", help="bench only the BLIP")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "datasets" / DATASET, args.images, args.side)
        store = DatasetStore(root / "datasets")
        print(
            f"{args.images} images of {args.side}x{args.side} px, {torch.get_num_threads()} torch thread(s), "
            f"median of {args.repeats} interleaved pairs, load average {os.getloadavg()[0]:.2f}"
        )
        captioners = [("blip", save_tiny_blip(root / "blip"), SENTENCE)]
        if not args.no_wd14:
            captioners.append(("wd14", save_tiny_wd14(root / "wd14"), TAGS))
        for label, folder, style in captioners:
            # One service per captioner: it keeps its model loaded between runs, as the app does.
            service = CaptionService(Settings(), lambda owner: store, allow_any_path=True)
            bench_captioner(service, label, folder, style, args)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
