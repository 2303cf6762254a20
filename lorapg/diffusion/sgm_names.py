"""diffusers UNet module names -> the original (SGM/LDM) names that kohya's sd-scripts writes for SDXL.

sd-scripts trains SDXL on its own copy of Stability's UNet, so an SDXL LoRA from it names modules by
their original paths (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), and AUTOMATIC1111 and
Forge find a LoRA's modules by looking those names up in the original model. Files we write for SDXL
therefore use the same names. The numbering follows from the UNet config, so any size maps:

- ``input_blocks.0`` is conv_in; then each down block holds one slot per resnet (the resnet at
  ``.0``, its attention at ``.1``) and, unless it is the last block, one slot for its downsampler.
- ``middle_block`` is [resnet 0, attention, resnet 1].
- each up block holds one slot per resnet (one more resnet than its down block); the upsampler sits
  in the last slot after the attention (``.2``), or at ``.1`` in a block without attentions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Modules outside the block structure: a fixed rename.
_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    # SDXL's size/crop conditioning MLP is the original model's label embedding.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Inside a resnet; the original wraps each layer in a Sequential (out_layers.2 is a dropout).
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


@dataclass(frozen=True)
class UnetLayout:
    """What the numbering of the original blocks depends on, read from a UNet config."""

    layers_per_block: tuple[int, ...]  # resnets per down block (each up block has one more)
    up_has_attention: tuple[bool, ...]  # per up block, in diffusers' (execution) order

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UnetLayout:
        blocks = len(config["down_block_types"])
        per_block = config["layers_per_block"]
        counts = (per_block,) * blocks if isinstance(per_block, int) else tuple(int(n) for n in per_block)
        if len(counts) != blocks:
            raise ValueError(f"layers_per_block {per_block!r} does not match {blocks} down blocks")
        return cls(counts, tuple("CrossAttn" in name for name in config["up_block_types"]))

    def input_slot(self, block: int) -> int:
        """The first input block of down block ``block`` (conv_in takes slot 0)."""
        return 1 + sum(count + 1 for count in self.layers_per_block[:block])

    def up_resnets(self, block: int) -> int:
        # Up blocks run the down blocks in reverse, each with one extra resnet (the skip from the downsampler).
        return self.layers_per_block[::-1][block] + 1

    def output_slot(self, block: int) -> int:
        """The first output block of up block ``block``."""
        return sum(self.up_resnets(b) for b in range(block))


def sgm_unet_module_name(name: str, layout: UnetLayout) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``input_blocks.4.1.…`` (SDXL)."""
    if name in _FIXED:
        return _FIXED[name]
    head, _, rest = name.partition(".")
    if head == "down_blocks":
        return _down_block(rest, layout)
    if head == "up_blocks":
        return _up_block(rest, layout)
    if head == "mid_block":
        return _mid_block(rest)
    raise ValueError(f"no original (SGM) name for UNet module {name!r}")


def _down_block(rest: str, layout: UnetLayout) -> str:
    block, kind, index, tail = _parts(rest)
    slot = layout.input_slot(block)
    if kind == "resnets":
        return f"input_blocks.{slot + index}.0.{_resnet_part(tail)}"
    if kind == "attentions":
        return f"input_blocks.{slot + index}.1.{tail}"
    if kind == "downsamplers" and tail == "conv":
        return f"input_blocks.{slot + layout.layers_per_block[block]}.0.op"
    raise ValueError(f"no original (SGM) name for UNet module 'down_blocks.{rest}'")


def _up_block(rest: str, layout: UnetLayout) -> str:
    block, kind, index, tail = _parts(rest)
    slot = layout.output_slot(block)
    if kind == "resnets":
        return f"output_blocks.{slot + index}.0.{_resnet_part(tail)}"
    if kind == "attentions":
        return f"output_blocks.{slot + index}.1.{tail}"
    if kind == "upsamplers" and tail == "conv":
        position = 2 if layout.up_has_attention[block] else 1
        return f"output_blocks.{slot + layout.up_resnets(block) - 1}.{position}.conv"
    raise ValueError(f"no original (SGM) name for UNet module 'up_blocks.{rest}'")


def _mid_block(rest: str) -> str:
    kind, index, tail = rest.split(".", 2)
    if kind == "resnets":
        return f"middle_block.{2 * int(index)}.{_resnet_part(tail)}"
    if kind == "attentions" and index == "0":
        return f"middle_block.1.{tail}"
    raise ValueError(f"no original (SGM) name for UNet module 'mid_block.{rest}'")


def _parts(rest: str) -> tuple[int, str, int, str]:
    """``1.resnets.0.conv1`` -> (1, "resnets", 0, "conv1")."""
    pieces: Sequence[str] = rest.split(".", 3)
    if len(pieces) != 4 or not (pieces[0].isdigit() and pieces[2].isdigit()):
        raise ValueError(f"unexpected UNet block module {rest!r}")
    return int(pieces[0]), pieces[1], int(pieces[2]), pieces[3]


def _resnet_part(tail: str) -> str:
    if tail not in _RESNET_PARTS:
        raise ValueError(f"unexpected resnet module {tail!r}")
    return _RESNET_PARTS[tail]
