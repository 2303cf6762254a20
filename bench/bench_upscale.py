"""Tiled upscaling's peak memory against untiled, on an ESRGAN built in code (random weights).

Each run is a fresh process (peak RSS, ``ru_maxrss``, only grows): the same net and image, once with
tiles of ``--tile`` input pixels (lorapg.diffusion.upscalers: 16 px blended overlaps) and once in one
piece; prints what each upscale added to the process's peak and their ratio (goal: well under 1, the
tiled one bounded by a tile's activations plus the output) and the largest pixel difference between the two results.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_upscale.py [--size 256] [--tile 64] [--filters 32]
(a 4× of 1024 px: --size 1024 --tile 256; minutes on a CPU at ESRGAN's real width of 64 filters)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(folder: Path, filters: int, blocks: int) -> None:
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    net = ESRGAN(num_filters=filters, num_blocks=blocks, scale=4)
    (folder / "upscalers").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "upscalers" / "4x-bench.safetensors")


def one_run(folder: Path, size: int, tile: int, out: Path) -> dict:
    """In this process: upscale a size×size noise image; peak RSS before and after, seconds."""
    import numpy as np
    from PIL import Image

    from lorapg.diffusion.upscalers import UpscalerLibrary

    library = UpscalerLibrary(folder / "upscalers", tile=tile)
    library.load(library.find("4x-bench"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = library.upscale(image, "4x-bench", (size * 4, size * 4))
    seconds = time.perf_counter() - start
    result.save(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"before_mb": before / 1024, "peak_mb": peak / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--run", nargs=3, metavar=("FOLDER", "TILE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(one_run(Path(args.run[0]), args.size, int(args.run[1]), Path(args.run[2]))))
        return
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        build(folder, args.filters, args.blocks)
        runs = {}
        for label, tile in (("tiled", args.tile), ("untiled", 0)):
            out = folder / f"{label}.png"
            command = [sys.executable, __file__, "--size", str(args.size), "--run", str(folder), str(tile), str(out)]
            runs[label] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            run = runs[label]
            run["growth_mb"] = run["peak_mb"] - run["before_mb"]  # what the upscale itself added
            growth, peak = run["growth_mb"], run["peak_mb"]
            print(f"{label:8} tile {tile:4}: +{growth:.0f} MB (peak {peak:.0f}), {run['seconds']:.1f} s")
        tiled, whole = (np.asarray(Image.open(folder / f"{k}.png"), dtype=np.int16) for k in ("tiled", "untiled"))
        ratio = runs["tiled"]["growth_mb"] / runs["untiled"]["growth_mb"]
        print(f"memory the upscale added, tiled / untiled: {ratio:.2f}")
        print(f"largest pixel difference (0-255): {int(np.abs(tiled - whole).max())}")


if __name__ == "__main__":
    main()
