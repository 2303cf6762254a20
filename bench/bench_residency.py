"""Residency policy by simulation: bytes moved onto the GPU per user action.

Replays traces of user actions with published model sizes under budgets of 8, 12, 16 and 24 GB and
prints, per trace and budget, the GB moved per action for
  - this policy (lorapg.residency.ResidencyManager, policy "auto": LRU with pinning),
  - "unload everything after use" (the lowvram extreme),
  - the offline optimum by Belady's rule (evict the model needed furthest in the future),
and each as a ratio to the optimum (1.00 = optimal; lower is better).

Run: .venv/bin/python bench/bench_residency.py
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorapg.errors import UserError  # noqa: E402
from lorapg.residency import AUTO, GB, LOWVRAM, ResidencyManager  # noqa: E402

# Published footprints (GB): fp16 weights, NF4 LLM, LoRA training working sets.
SIZES = {"sd15": 2.0, "sdxl": 7.0, "llm": 4.75}
TRAIN_WORKING_SET = {"sd15": 7.0, "sdxl": 14.0}


def trace_prompt_loop(rng: random.Random, base: str) -> list[tuple[str, str]]:
    """Enhance keywords, generate a few, rewrite with a preset, generate again — the core loop."""
    actions = []
    for _ in range(12):
        actions.append(("enhance", "llm"))
        actions += [("generate", base)] * rng.randint(1, 4)
        for _ in range(rng.randint(0, 2)):
            actions += [("rewrite", "llm"), ("generate", base)]
    return actions


def trace_train_and_test(rng: random.Random, base: str) -> list[tuple[str, str]]:
    """Generate, train a LoRA, try it, retrain: training interleaved with generation."""
    actions = []
    for _ in range(4):
        actions += [("generate", base)] * rng.randint(2, 5)
        actions.append(("train", base))
        actions += [("generate", base)] * rng.randint(2, 5)
        actions.append(("enhance", "llm"))
    return actions


def trace_switching(rng: random.Random, base: str) -> list[tuple[str, str]]:
    """Compare SD 1.5 and SDXL on the same prompts, rewriting between."""
    actions = []
    for _ in range(10):
        for model in ("sd15", "sdxl"):
            actions += [("generate", model)] * rng.randint(1, 3)
        if rng.random() < 0.6:
            actions.append(("rewrite", "llm"))
    return actions


TRACES = {
    "prompt loop, SD 1.5": (trace_prompt_loop, "sd15"),
    "prompt loop, SDXL": (trace_prompt_loop, "sdxl"),
    "train + test, SD 1.5": (trace_train_and_test, "sd15"),
    "train + test, SDXL": (trace_train_and_test, "sdxl"),
    "SD 1.5 vs SDXL": (trace_switching, "sd15"),
}


def needed(action: tuple[str, str]) -> str | None:
    kind, model = action
    return None if kind == "train" else model


def simulate_manager(actions: list[tuple[str, str]], budget: float, policy: str) -> float:
    """Bytes (GB) the real ResidencyManager moves to the GPU for ``actions``."""
    manager = ResidencyManager(int(budget * GB), policy)
    for name, size in SIZES.items():
        manager.register(name, int(size * GB), to_gpu=lambda: None, to_cpu=lambda: None)
    moved = 0
    for kind, model in actions:
        if kind == "train":
            with manager.exclusive("training", int(TRAIN_WORKING_SET[model] * GB)):
                moved += TRAIN_WORKING_SET[model] * GB
            continue
        with manager.use(model):
            pass
    return (manager.bytes_moved_to_gpu + moved) / GB


def simulate_belady(actions: list[tuple[str, str]], budget: float) -> float:
    """Offline optimum: on a miss, evict the resident model whose next use is furthest away."""
    resident: set[str] = set()
    moved = 0.0
    for index, action in enumerate(actions):
        kind, model = action
        if kind == "train":
            resident.clear()  # training needs the whole GPU under every policy
            moved += TRAIN_WORKING_SET[model]
            continue
        if model in resident:
            continue
        while sum(SIZES[m] for m in resident) + SIZES[model] > budget:
            resident.remove(max(resident, key=lambda m: _next_use(actions, index, m)))
        resident.add(model)
        moved += SIZES[model]
    return moved


def _next_use(actions: list[tuple[str, str]], index: int, model: str) -> int:
    for later in range(index + 1, len(actions)):
        if needed(actions[later]) == model:
            return later
        if actions[later][0] == "train":
            return len(actions) + 1  # a training run evicts everything anyway: keeping it is worthless
    return len(actions) + 2


def main() -> None:
    logging.getLogger("lorapg").setLevel(logging.ERROR)  # "SDXL training exceeds 8 GB" is expected here
    rng = random.Random(0)
    print(
        f"{'trace':24} {'budget':>6} {'actions':>7} | GB moved per action: {'this':>6} {'unload':>7} "
        f"{'optimum':>8} | ratio to optimum: {'this':>5} {'unload':>6}"
    )
    totals = {"this": [], "unload": []}
    for trace_name, (make, base) in TRACES.items():
        actions = make(rng, base)
        for budget in (8, 12, 16, 24):
            try:
                ours = simulate_manager(actions, budget, AUTO)
                unload = simulate_manager(actions, budget, LOWVRAM)
            except UserError as exc:
                print(f"{trace_name:24} {budget:>4}GB  does not fit: {exc}")
                continue
            best = simulate_belady(actions, budget)
            n = len(actions)
            totals["this"].append(ours / best)
            totals["unload"].append(unload / best)
            print(
                f"{trace_name:24} {budget:>4}GB {n:>7} | {'':21}{ours / n:>6.2f} {unload / n:>7.2f} "
                f"{best / n:>8.2f} | {'':18}{ours / best:>5.2f} {unload / best:>6.2f}"
            )
    mean = {k: sum(v) / len(v) for k, v in totals.items()}
    print(f"mean ratio to optimum: this policy {mean['this']:.2f}, unload-after-use {mean['unload']:.2f}")


if __name__ == "__main__":
    main()
