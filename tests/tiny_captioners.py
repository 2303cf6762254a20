"""Tiny captioning models built in code (no downloads), saved as users' folders are laid out.

``save_tiny_blip``: a BLIP from a tiny ``BlipConfig`` and a word-level tokenizer built with the
``tokenizers`` library, saved with ``save_pretrained``; ``save_tiny_blip2`` the same for BLIP-2 (a tiny
ViT, Q-Former and OPT with two query tokens). ``save_tiny_wd14``: an ONNX graph built with
``onnx.helper`` that scores five tags from the mean colour (BGR input, as the real taggers take)
plus a ``selected_tags.csv``: red images get ``red_theme``, blue ones ``blue_theme``; every image
gets the character tag ``hero_(character)``, the kaomoji ``^_^`` and the rating tag ``general``.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "cat", "blue", "dog", "on", "grass"]
WD14_SIDE = 16
WD14_TAGS = [  # (name, category): 9 rating, 0 general, 4 character
    ("general", 9),
    ("red_theme", 0),
    ("blue_theme", 0),
    ("hero_(character)", 4),
    ("^_^", 0),
]


def save_tiny_blip(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    vocab = {word: i for i, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    processor = BlipProcessor(image_processor=_blip_images(), tokenizer=tokenizer)
    text = _tiny_layers(
        vocab_size=len(WORDS),
        max_position_embeddings=64,
        bos_token_id=2,
        sep_token_id=3,
        pad_token_id=0,
        eos_token_id=3,
    )
    config = BlipConfig(text_config=text, vision_config=_blip_vision(), projection_dim=16)
    return _save_random(folder, BlipForConditionalGeneration, config, processor, suppress_tokens=[0, 1, 2, 4])


BLIP2_WORDS = ["a", "photo", "of", "red", "cat", "blue", "dog", "on", "grass"]


def save_tiny_blip2(folder: Path) -> Path:
    """A BLIP-2 with an OPT language model, as ``Salesforce/blip2-opt-2.7b`` is laid out (config
    ``model_type`` ``blip-2``, a Blip2Processor with ``num_query_tokens`` and the ``<image>`` token)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, PreTrainedTokenizerFast

    words = ["</s>", "<pad>", "<unk>", "<image>"] + ["\u0120" + word for word in BLIP2_WORDS]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_backend(words),
        bos_token="</s>",  # OPT's BOS is its EOS, as in facebook/opt-*
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    processor = Blip2Processor(image_processor=_blip_images(), tokenizer=tokenizer, num_query_tokens=2)
    qformer = _tiny_layers(vocab_size=len(words), encoder_hidden_size=16, max_position_embeddings=32)
    text = dict(
        model_type="opt",
        vocab_size=len(words),
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=512,  # room for query tokens + BOS + max_new_tokens (2 per word, 200 words)
        word_embed_proj_dim=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    config = Blip2Config(
        vision_config=_blip_vision(), qformer_config=qformer, text_config=text, num_query_tokens=2, image_token_index=3
    )
    return _save_random(folder, Blip2ForConditionalGeneration, config, processor, suppress_tokens=[0, 1, 2, 3])


def _tiny_layers(**fields) -> dict:
    """A BERT-like config's sizes, the smallest that runs: one layer, two heads, 16 wide; plus ``fields``."""
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **fields)


def _blip_vision() -> dict:
    """The ViT of BLIP and BLIP-2: 32 px images in 8 px patches (16 image tokens)."""
    return _tiny_layers(image_size=32, patch_size=8)


def _blip_images():
    from transformers.models.blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": 32, "width": 32})


def _byte_level_backend(words: list[str]):
    """A word-level vocabulary behind GPT-2's byte-level pre-tokenizer, as OPT's and BART's tokenizers are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _save_random(folder: Path, model_class, config, processor, suppress_tokens: list[int]) -> Path:
    """Build the model with seed 0's random weights and save it with its processor in ``folder``."""
    import torch

    torch.manual_seed(0)
    model = model_class(config)
    # Random weights may end a caption at once or say only special tokens: make them say words.
    model.generation_config.min_new_tokens = 3
    model.generation_config.suppress_tokens = suppress_tokens
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_wd14(folder: Path, side: int = WD14_SIDE) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # logits = mean(BGR) @ weights + bias; the sigmoid gives the taggers' probabilities.
    weights = np.zeros((3, len(WD14_TAGS)), dtype=np.float32)
    bias = np.zeros(len(WD14_TAGS), dtype=np.float32)
    bias[0] = 5.0  # rating: always, and always left out of captions
    weights[2, 1], weights[0, 1] = 0.05, -0.05  # red_theme: R - B
    weights[0, 2], weights[2, 2] = 0.05, -0.05  # blue_theme: B - R
    bias[3] = 3.0  # the character: 0.95, above its 0.85 threshold
    bias[4] = 0.0  # the kaomoji: 0.5, above the general 0.35
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "weights"], ["scaled"]),
            helper.make_node("Add", ["scaled", "bias"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", side, side, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(WD14_TAGS)])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    lines = ["tag_id,name,category,count"] + [f"{i},{name},{cat},100" for i, (name, cat) in enumerate(WD14_TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


FLORENCE_WORDS = ["describe", "in", "detail", "what", "is", "shown", "the", "image.", "a", "red", "fox", "blue", "sky"]


def save_tiny_florence2(folder: Path) -> Path:
    """A Florence-2 in transformers' native format: a tiny DaViT + BART, a byte-level word tokenizer
    with the ``<image>`` token, and a CLIP image processor at 64 px (2 x 2 patches + 1 = 5 image tokens)."""
    from transformers import BartTokenizer, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip import CLIPImageProcessorPil

    words = ["<s>", "<pad>", "</s>", "<unk>", "<image>"] + ["\u0120" + word for word in FLORENCE_WORDS]
    tokenizer = BartTokenizer(
        tokenizer_object=_byte_level_backend(words),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    images = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False)
    images.image_seq_length = 5
    processor = Florence2Processor(image_processor=images, tokenizer=tokenizer)
    text = dict(
        model_type="bart",
        vocab_size=len(words),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    vision = dict(
        depths=[1, 1, 1, 1],
        embed_dim=[8, 8, 16, 16],
        num_heads=[1, 1, 2, 2],
        num_groups=[1, 1, 2, 2],
        window_size=2,
        projection_dim=16,
        max_position_embeddings=8,
        max_temporal_embeddings=2,
    )
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=4)
    return _save_random(folder, Florence2ForConditionalGeneration, config, processor, suppress_tokens=[0, 1, 3, 4])
