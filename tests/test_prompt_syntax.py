"""A1111 prompt syntax: the parser (a table of A1111's own cases), 75-token chunks, and the weighted
encoding on the tiny SD 1.x and SDXL models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from lorapg.cli import main
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.prompt_encoding import _emphasised, chunked_prompt_embeddings
from lorapg.diffusion.prompt_syntax import (
    BREAK_MARK,
    BREAK_WEIGHT,
    chunk_prompt,
    comma_token_id,
    is_plain,
    parse_prompt_attention,
    tokenizer_chunks,
)
from lorapg.diffusion.request import GenerationRequest
from lorapg.gallery.png import read_png_parameters
from lorapg.prompting.tokens import count_prompt_chunks
from lorapg.ui.prompt_tools import prompt_size_text
from tests.reproducibility import assert_same_bytes
from tests.tiny_models import write_tiny_clip_tokenizer

# (prompt, expected [(text, weight)]) -- the first six are the examples in A1111's prompt_parser.py.
PARSER_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.573),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641),
            (".", 1.1),
        ],
    ),
    ("((word))", [("word", 1.21)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("( word : 0.5 )", [(" word ", 0.5)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.21)]),
    ("(word:1.0)", [("word", 1.0)]),
    ("a (b:1.0) c", [("a b c", 1.0)]),
    ("a BREAK b", [("a", 1.0), (BREAK_MARK, BREAK_WEIGHT), ("b", 1.0)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("a\\\\b", [("a\\b", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("stray) and ]", [("stray) and ]", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), PARSER_CASES)
def test_parser_matches_a1111(prompt, expected):
    parsed = parse_prompt_attention(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


def test_plain_means_no_syntax():
    assert is_plain("a red fox, snow") and is_plain("")
    assert not is_plain("(fox:1.0)") and not is_plain("a BREAK b") and not is_plain("\\(x\\)")


# A word-level fake tokenizer: one id per word, the comma its own token (id 0).
def _word_ids(texts):
    return [[0 if w == "," else 1 + len(w) for w in t.replace(",", " , ").split()] for t in texts]


def _chunks(text):
    return chunk_prompt(text, _word_ids, comma_id=0)


def test_chunks_of_75_tokens_carry_their_weights():
    chunks = _chunks("w " * 70 + "(x:1.5) " * 10)
    assert [len(c.tokens) for c in chunks] == [75, 5]
    assert chunks[0].weights[:70] == [1.0] * 70 and chunks[0].weights[70:] == [1.5] * 5
    assert chunks[1].weights == [1.5] * 5
    assert [len(c.tokens) for c in _chunks("w " * 75)] == [75]
    assert [len(c.tokens) for c in _chunks("")] == [0]


def test_break_starts_a_new_chunk():
    assert [len(c.tokens) for c in _chunks("a b BREAK c")] == [2, 1]
    assert [len(c.tokens) for c in _chunks("a BREAK BREAK c")] == [1, 0, 1]


def test_a_full_chunk_moves_the_phrase_after_its_last_comma_to_the_next():
    # 70 words, a comma, 10 words: the comma is 4 tokens before the end of the chunk (<= 20).
    chunks = _chunks("w " * 70 + ", " + "v " * 10)
    assert [len(c.tokens) for c in chunks] == [71, 10]
    # A comma 40 tokens back is too far: the chunk is cut at 75.
    assert [len(c.tokens) for c in _chunks("w " * 35 + ", " + "v " * 50)] == [75, 11]


def test_emphasis_scales_tokens_and_restores_the_mean():
    hidden = torch.rand(1, 77, 8) + 0.5
    weighted = _emphasised(hidden, [1.0, 2.0])
    assert torch.isclose(weighted.mean(), hidden.mean(), rtol=1e-5)
    ratio = (weighted[0, 2] / hidden[0, 2]) / (weighted[0, 1] / hidden[0, 1])
    assert torch.allclose(ratio, torch.full_like(ratio, 2.0), rtol=1e-4)
    assert _emphasised(hidden, [1.0, 1.0]) is hidden


def _engine(tiny_models, family: str) -> DiffusionEngine:
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models[family]))
    return engine


@pytest.fixture(scope="module")
def sd15(tiny_models):
    return _engine(tiny_models, "sd15")


@pytest.fixture(scope="module")
def sdxl(tiny_models):
    return _engine(tiny_models, "sdxl")


def image(engine, prompt, negative="", **overrides):
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, steps=3, seed=77, **overrides)
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def changed(first, second, family: str) -> None:
    """The prompt change reached the image.

    The tiny models' UNets barely listen to their text (another prompt moves pixels by a few levels),
    so a change is any difference; the tests that use this fail without the feature because the two
    images are then bit-identical (same encoding). ``family`` names the model in the message.
    """
    assert not np.array_equal(first, second), f"{family}: the prompt change did not reach the image"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_plain_prompt_keeps_todays_image_and_encoding(sd15, sdxl, family, monkeypatch):
    """The reproducibility promise: a plain short prompt gives what diffusers' own encoding gives."""
    engine = sd15 if family == "sd15" else sdxl
    pipe = engine.model.pipe
    todays = image(engine, "a red fox", "blurry", width=64, height=64)  # plain: diffusers encodes the strings
    monkeypatch.setattr("lorapg.diffusion.engine.needs_chunked_encoding", lambda text, tokenizer: True)
    assert_same_bytes(image(engine, "a red fox", "blurry", width=64, height=64), todays)
    assert_same_bytes(image(engine, "a red fox", "", width=64, height=64), image(engine, "a red fox", ""))
    monkeypatch.undo()
    # The chunked encoder itself gives diffusers' tensors exactly for a one-chunk, weight-free prompt.
    ours = chunked_prompt_embeddings(pipe, "a red fox", "blurry")
    theirs = pipe.encode_prompt(
        "a red fox",
        device=torch.device("cpu"),
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt="blurry",
    )
    for mine, reference in zip(ours.values(), theirs, strict=True):
        assert torch.equal(mine, reference)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_weights_one_is_exactly_plain_and_other_weights_change_the_image(sd15, sdxl, family):
    engine = sd15 if family == "sd15" else sdxl
    size = {"width": 64, "height": 64}
    plain = image(engine, "a red fox in the snow", **size)
    assert_same_bytes(image(engine, "a (red fox:1.0) in the snow", **size), plain)
    changed(image(engine, "a (red fox:1.5) in the snow", **size), plain, family)
    changed(image(engine, "a [[[red fox]]] in the snow", **size), plain, family)
    # The weights reach the embeddings as A1111's emphasis: the weighted tokens move, the mean stays.
    pipe = engine.model.pipe
    base = chunked_prompt_embeddings(pipe, "a red fox", "")["prompt_embeds"]
    weighted = chunked_prompt_embeddings(pipe, "a (red fox:1.5)", "")["prompt_embeds"]
    assert (weighted - base).abs().max() > 0.1


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_long_prompt_tail_and_break_change_the_image(sd15, sdxl, family):
    engine = sd15 if family == "sd15" else sdxl
    size = {"width": 64, "height": 64}
    head = "a castle on a hill " * 6  # 78 tokens in the tiny tokenizer (one per non-space character)
    one_tail = image(engine, head + "at dawn, golden light, mist", **size)
    other_tail = image(engine, head + "under storm clouds at night", **size)
    changed(one_tail, other_tail, family)  # cut at 75 tokens, the two would be identical
    changed(image(engine, "a fox BREAK in snow", **size), image(engine, "a fox in snow", **size), family)
    # A negative prompt of more chunks than the prompt is padded, not refused, and counts.
    long_negative = "blurry, ugly, " * 12
    changed(image(engine, "a fox", long_negative, **size), image(engine, "a fox", "blurry", **size), family)


def test_weighted_prompt_with_clip_skip_on_sd15(sd15):
    weighted = image(sd15, "a (red:1.4) fox", clip_skip=2)
    assert_same_bytes(image(sd15, "a (red:1.4) fox", clip_skip=2), weighted)
    changed(weighted, image(sd15, "a (red:1.4) fox"), "sd15")
    assert_same_bytes(image(sd15, "a (red fox:1.0)", clip_skip=2), image(sd15, "a red fox", clip_skip=2))


def test_token_counter_reads_the_syntax_and_counts_chunks(tmp_path):
    tokenizer = write_tiny_clip_tokenizer(tmp_path / "tok")  # one token per non-space character
    assert count_prompt_chunks("(ab:1.3) [c] <lora:style:0.5>", tokenizer) == (3, 1)
    assert count_prompt_chunks("x" * 80, tokenizer) == (80, 2)
    assert count_prompt_chunks("ab BREAK c", tokenizer) == (3, 2)
    assert prompt_size_text((12, 1)) == "12 / 75 tokens"
    assert prompt_size_text((80, 2)).startswith("80 tokens, 2 chunks")
    assert "load a base model" in prompt_size_text(None)


def test_the_comma_is_found_without_copying_the_vocabulary(tmp_path, monkeypatch):
    """A real CLIP vocabulary has 49,408 tokens: copying it (``get_vocab``) for every prompt cost ~30 ms."""
    tokenizer = write_tiny_clip_tokenizer(tmp_path / "tok")  # one token per non-space character
    vocab = tokenizer.get_vocab()

    def no_copy():
        raise AssertionError("get_vocab() copies the whole vocabulary")

    monkeypatch.setattr(tokenizer, "get_vocab", no_copy)
    assert comma_token_id(tokenizer) == vocab[",</w>"]
    # The comma is where a full chunk is split: 70 tokens, a comma, 10 tokens -> 71 + 10, not 75 + 6.
    assert [len(c.tokens) for c in tokenizer_chunks("x" * 70 + ", " + "y" * 10, tokenizer)] == [71, 10]

    # A vocabulary without a lone comma: None, not the unknown token's id.
    no_comma = tmp_path / "no-comma"
    no_comma.mkdir()
    tokens = [token for token in sorted(vocab, key=vocab.get) if token != ",</w>"]
    (no_comma / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    for name in ("merges.txt", "special_tokens_map.json"):
        (no_comma / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    assert comma_token_id(CLIPTokenizer.from_pretrained(str(no_comma), model_max_length=77)) is None


def test_cli_clip_skip_is_written_to_the_png_and_checked(tiny_models, tmp_path, capsys):
    base = ["generate", "--model", str(tiny_models["sd15"]), "--lora-dir", str(tiny_models["loras"])]
    base += ["--outputs", str(tmp_path / "outputs"), "--threads", "1", "--steps", "2", "--seed", "3"]
    out = tmp_path / "skip.png"
    assert main([*base, "--prompt", "a (red:1.3) fox BREAK snow", "--clip-skip", "2", "--out", str(out)]) == 0
    parameters = read_png_parameters(out)
    assert parameters.startswith("a (red:1.3) fox BREAK snow\n") and "Clip skip: 2" in parameters
    capsys.readouterr()
    assert main([*base, "--prompt", "x", "--clip-skip", "13", "--out", str(tmp_path / "bad.png")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Clip skip must be" in errors[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_batch_with_chunked_prompts_makes_every_image(sd15, sdxl, family):
    engine = sd15 if family == "sd15" else sdxl
    request = GenerationRequest(
        prompt="a (fox:1.2) " + "in snow, " * 12, negative_prompt="[blurry]", steps=2, seed=5, batch_size=2
    )
    result = engine.generate(request)
    assert len(result.images) == 2 and result.warnings == []
    embeddings = chunked_prompt_embeddings(engine.model.pipe, request.prompt, request.negative_prompt)
    assert all(torch.isfinite(tensor).all() and tensor.abs().max() > 0 for tensor in embeddings.values())


def test_emphasis_on_a_zero_mean_chunk_stays_finite():
    """A bias-free final layer norm (the tiny SD 1.x model) has a chunk mean of ~0: no 0/0."""
    hidden = torch.randn(1, 77, 8)
    hidden = hidden - hidden.mean(dim=-1, keepdim=True)  # per-token zero mean, as such a layer norm gives
    weighted = _emphasised(hidden, [1 / 1.1, 1.5])
    assert torch.isfinite(weighted).all()
    assert torch.allclose(weighted[0, 1], hidden[0, 1] / 1.1) and torch.allclose(weighted[0, 2], hidden[0, 2] * 1.5)
