"""Prompt embeddings with A1111's weights and 75-token chunks, for SD 1.x and SDXL pipelines.

Each chunk is encoded alone as BOS + 75 tokens + EOS (padded with the tokenizer's pad token, as
diffusers pads), the token embeddings are multiplied by their weights and rescaled to the chunk's
original mean (A1111's "Original" emphasis), and the chunks are concatenated along the sequence axis.
The prompt and the negative prompt are padded with empty chunks to the same count, as A1111's
"pad prompt/negative prompt" option does, because diffusers runs both in one batch.

A one-chunk prompt whose weights are all 1 goes through exactly the calls diffusers' own
``encode_prompt`` makes, so ``(word:1.0)`` gives bit for bit the image of ``word``.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import get_module_execution_device

from lorapg.diffusion.prompt_syntax import CHUNK_LENGTH, TokenChunk, tokenizer_chunks

_MEAN_FLOOR = 1e-4  # a chunk mean below this share of the mean magnitude is "no mean" (see _emphasised)


def chunked_prompt_embeddings(
    pipe: DiffusionPipeline, prompt: str, negative_prompt: str, clip_skip: int | None = None
) -> dict:
    """``pipe(**result)`` arguments: prompt and negative embeddings (and pooled ones for SDXL).

    ``clip_skip`` is A1111's (2 = penultimate layer), for SD 1.x only: the engine ignores it for SDXL.
    """
    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is not None:
            return _sdxl_embeddings(pipe, prompt, negative_prompt)
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        positive, negative = _same_length([tokenizer_chunks(t, tokenizer) for t in (prompt, negative_prompt)])
        return {
            "prompt_embeds": _encode_chunks(encoder, tokenizer, positive, clip_skip=clip_skip)[0],
            "negative_prompt_embeds": _encode_chunks(encoder, tokenizer, negative, clip_skip=clip_skip)[0],
        }


def _sdxl_embeddings(pipe: DiffusionPipeline, prompt: str, negative_prompt: str) -> dict:
    encoders = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    # diffusers' choice for SDXL with no negative prompt: zeros, not the encoding of "".
    zero_negative = not negative_prompt and pipe.config.force_zeros_for_empty_prompt
    texts = [prompt] if zero_negative else [prompt, negative_prompt]
    # Both encoders of both texts get the same chunk count, so the tensors line up.
    chunk_lists = _same_length([tokenizer_chunks(t, tokenizer) for t in texts for tokenizer, _ in encoders])
    encoded = []
    for first_chunks, second_chunks in zip(chunk_lists[::2], chunk_lists[1::2], strict=True):
        first, _ = _encode_chunks(pipe.text_encoder, pipe.tokenizer, first_chunks, penultimate=True)
        second, pooled = _encode_chunks(pipe.text_encoder_2, pipe.tokenizer_2, second_chunks, penultimate=True)
        encoded.append((torch.cat([first, second], dim=-1).to(pipe.text_encoder_2.dtype), pooled))
    (positive, pooled), *rest = encoded
    negative, negative_pooled = rest[0] if rest else (torch.zeros_like(positive), torch.zeros_like(pooled))
    return {
        "prompt_embeds": positive,
        "negative_prompt_embeds": negative,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
    }


def _same_length(chunk_lists: list[list[TokenChunk]]) -> list[list[TokenChunk]]:
    """Each list padded with empty chunks (A1111's ``empty_chunk``: BOS, EOS, padding) to the longest."""
    longest = max(len(chunks) for chunks in chunk_lists)
    return [chunks + [TokenChunk() for _ in range(longest - len(chunks))] for chunks in chunk_lists]


def _encode_chunks(
    encoder, tokenizer, chunks: list[TokenChunk], *, clip_skip: int | None = None, penultimate: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(1, 77 × chunks, width) weighted embeddings and the first chunk's pooled output (None for SD 1.x).

    The calls mirror diffusers' ``encode_prompt`` (SD 1.x: ``encoder(ids)[0]``; SDXL: the penultimate
    hidden state) so that one weight-free chunk gives exactly diffusers' tensor.
    """
    pieces, pooled = [], None
    for chunk in chunks:
        # Where the forward pass runs: with CPU offload the weights sit on the CPU until the hook moves them.
        ids = torch.tensor([_chunk_ids(chunk, tokenizer)], device=get_module_execution_device(encoder))
        output = encoder(ids, output_hidden_states=penultimate or clip_skip is not None)
        if penultimate:  # SDXL: both encoders read the penultimate layer, without the final norm
            hidden = output.hidden_states[-2]
            if pooled is None and output[0].ndim == 2:  # the projection model's text_embeds
                pooled = output[0]
        elif clip_skip is not None:  # A1111's clip skip N: the N-th layer from the end, then the final norm
            final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
            hidden = final_norm(output.hidden_states[-clip_skip])
        else:
            hidden = output[0]
        pieces.append(_emphasised(hidden, chunk.weights))
    return torch.cat(pieces, dim=1).to(encoder.dtype), pooled


def _chunk_ids(chunk: TokenChunk, tokenizer) -> list[int]:
    """BOS + tokens + EOS, then the pad token up to 77: what ``tokenizer(..., padding="max_length")`` gives."""
    ids = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (CHUNK_LENGTH + 2 - len(ids))


def _emphasised(hidden: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111's emphasis: scale each token's embedding by its weight, then restore the chunk's mean."""
    if all(w == 1.0 for w in weights):
        return hidden  # untouched, so a weight-free prompt is bit-identical to diffusers' encoding
    padded = [1.0, *weights, *([1.0] * (hidden.shape[1] - 1 - len(weights)))]  # BOS, tokens, EOS + padding
    scale = torch.tensor(padded, dtype=hidden.dtype, device=hidden.device).reshape(1, -1, 1)
    original_mean = hidden.mean()
    weighted = hidden * scale
    new_mean = weighted.mean()
    # A final layer norm without bias (untrained or tiny models) gives a mean of ~0: the ratio would be
    # 0/0 or 0/tiny (NaN, zeros or huge values). Trained SD encoders have a clear mean, where this is A1111's.
    if new_mean.abs() <= _MEAN_FLOOR * weighted.abs().mean():
        return weighted
    return weighted * (original_mean / new_mean)
