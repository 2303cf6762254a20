"""LyCORIS, DoRA and diff files applied as weight patches, as AUTOMATIC1111 applies every network.

diffusers' loader refuses LoHa, LoKr, Tucker LoCon and diff files and silently drops DoRA's magnitudes,
so these files never become peft adapters: each selected file adds ``scale · ΔW`` to the weights of the
modules it names, every ΔW computed from the ORIGINAL weights (A1111's semantics, which matters for
DoRA). The originals are copied to CPU RAM the first time a file touching them is read and copied back
bit for bit when the selection changes, as ``LoraFuser`` does for peft layers; nothing runs per step.

Module names are kohya's: diffusers-style (``lora_unet_down_blocks_1_…``) or SGM-style
(``lora_unet_input_blocks_4_1_…``, what sd-scripts writes for SDXL), ``lora_te_``/``lora_te1_``/
``lora_te2_`` for the text encoders, with or without the ``text_model`` level transformers 5 dropped.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from lorapg.diffusion.lycoris import FormatError, group_modules, module_delta, module_kind

log = logging.getLogger(__name__)

_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
# Layers whose SGM name differs from diffusers' beyond the block numbering (ldm's ResBlock and the
# UNet's outer layers); the block numbering itself is diffusers' helper's job.
_SGM_LAYERS = [
    (r"_in_layers_0$", "_norm1"),
    (r"_in_layers_2$", "_conv1"),
    (r"_emb_layers_1$", "_time_emb_proj"),
    (r"_out_layers_0$", "_norm2"),
    (r"_out_layers_3$", "_conv2"),
    (r"_skip_connection$", "_conv_shortcut"),
    (r"_downsamplers_0_op$", "_downsamplers_0_conv"),
    (r"^lora_unet_input_blocks_", "lora_unet_down_blocks_"),
    (r"^lora_unet_middle_block_", "lora_unet_mid_block_"),
    (r"^lora_unet_output_blocks_", "lora_unet_up_blocks_"),
]
_SGM_OUTER = {
    "lora_unet_input_blocks_0_0": "lora_unet_conv_in",
    "lora_unet_time_embed_0": "lora_unet_time_embedding_linear_1",
    "lora_unet_time_embed_2": "lora_unet_time_embedding_linear_2",
    "lora_unet_label_emb_0_0": "lora_unet_add_embedding_linear_1",
    "lora_unet_label_emb_0_2": "lora_unet_add_embedding_linear_2",
    "lora_unet_out_0": "lora_unet_conv_norm_out",
    "lora_unet_out_2": "lora_unet_conv_out",
}


@dataclass
class ModulePatch:
    name: str  # the file's module name, for messages
    kind: str
    tensors: dict[str, torch.Tensor]  # suffix -> tensor, on CPU
    weight: torch.nn.Parameter | None
    bias: torch.nn.Parameter | None


@dataclass
class PatchFile:
    label: str  # the file's name as users know it
    stamp: tuple[float, int]  # (mtime, size) when read
    modules: list[ModulePatch]


class WeightPatches:
    """The patch files read into one pipeline, and which of them (at what scales) the weights hold."""

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe
        self._files: dict[str, PatchFile] = {}
        # parameter -> its exact CPU copy, made while the weights were the base weights
        self._originals: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._patched: list[torch.nn.Parameter] = []
        self.applied: Hashable | None = None  # the (name, scale) tuple the weights hold now
        self.files_read = 0
        self.apply_count = 0  # how many times patches were computed and added (tests read it)

    def is_loaded(self, name: str, stamp: tuple[float, int]) -> bool:
        return name in self._files and self._files[name].stamp == stamp

    def load(
        self, name: str, label: str, path: str, stamp: tuple[float, int], state: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Read a file and map its modules onto the pipeline. The weights must be the base weights now.

        ``state``: the file's tensors already read (and renamed to kohya's layout: compile mode).
        Raises FormatError (unknown keys or modules); shapes are checked when ΔW is computed.
        """
        self._files.pop(name, None)
        state = load_file(path) if state is None else state
        modules = group_modules(state)
        targets = resolve_modules(self.pipe, list(modules))
        patches = []
        for module_name, suffixes in modules.items():
            kind = module_kind(module_name, suffixes)
            layer = targets[module_name]
            tensors = {suffix: state[f"{module_name}.{suffix}"] for suffix in suffixes}
            weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
            patches.append(ModulePatch(module_name, kind, tensors, weight, bias))
            for param in (weight, bias):
                if isinstance(param, torch.nn.Parameter) and param not in self._originals:
                    # Copied once: the weights only ever change by patching or fusing, both undone exactly.
                    self._originals[param] = param.detach().to("cpu", copy=True)
        self._files[name] = PatchFile(label, stamp, patches)
        self.files_read += 1
        log.info("read %s as weight patches (%d modules)", label, len(patches))

    def forget(self, name: str) -> None:
        self._files.pop(name, None)

    def apply(self, key: Hashable, selections: Sequence[tuple[str, float]]) -> None:
        """Add ``scale · ΔW`` of each named file to the weights (which may hold fused peft deltas).

        All deltas are computed before any weight changes, so a file whose shapes do not fit leaves
        the weights untouched. A scale of 0 adds nothing at all: the base weights stay bit for bit.
        """
        if self._patched:
            raise RuntimeError("patches must be removed before others are applied")
        started = time.perf_counter()
        totals: dict[torch.nn.Parameter, torch.Tensor] = {}
        for name, scale in selections:
            if scale == 0:
                continue
            patch_file = self._files[name]
            for module in patch_file.modules:
                try:
                    self._add_module(totals, module, scale)
                except FormatError as exc:
                    raise FormatError(f"{patch_file.label}: {exc}") from None
                except (RuntimeError, ValueError, IndexError) as exc:
                    # Factors whose inner shapes do not fit together (a LoHa w1_a/w1_b pair, a
                    # many-valued alpha): torch says so in its own words; the file is named here.
                    detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                    raise FormatError(f"{patch_file.label}: module {module.name}: {detail}") from None
        with torch.no_grad():
            for param, delta in totals.items():
                self._patched.append(param)
                param.add_(delta.to(device=param.device, dtype=param.dtype))
        self.applied = key
        self.apply_count += 1
        log.debug("patched %d weights in %.1f ms", len(totals), (time.perf_counter() - started) * 1000)

    def _add_module(self, totals: dict, module: ModulePatch, scale: float) -> None:
        original = self._originals.get(module.weight) if module.weight is not None else None
        if original is not None:
            original = original.to(module.weight.device)
        bias_shape = tuple(module.bias.shape) if module.bias is not None else None
        delta, delta_bias = module_delta(module.name, module.kind, module.tensors, original, bias_shape)
        for param, change in ((module.weight, delta), (module.bias, delta_bias)):
            if change is not None:
                change = change.to(param.device) * scale
                totals[param] = totals[param] + change if param in totals else change

    def remove(self) -> None:
        """Copy the originals back into every patched weight; a no-op when nothing is patched."""
        with torch.no_grad():
            for param in self._patched:
                param.copy_(self._originals[param])
        self._patched = []
        self.applied = None


# --- module names -----------------------------------------------------------------------------------


def resolve_modules(pipe: DiffusionPipeline, names: list[str]) -> dict[str, torch.nn.Module]:
    """kohya module name -> the pipeline's layer (a peft-wrapped layer's base layer); FormatError if unknown."""
    index = module_index(pipe)
    sgm = _sgm_renames(pipe, [n for n in names if n in _SGM_OUTER or (n.startswith("lora_unet_") and _is_sgm(n))])
    found: dict[str, torch.nn.Module] = {}
    missing = []
    for name in names:
        candidates = _candidates(sgm.get(name, name))
        layer = next((index[c] for c in candidates if c in index), None)
        if layer is None:
            missing.append(name)
        else:
            found[name] = layer
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FormatError(f"no layer of the loaded model is called {missing[0]}{more}")
    return found


def _is_sgm(name: str) -> bool:
    return any(block in name for block in _SGM_BLOCKS)


def _candidates(name: str) -> list[str]:
    candidates = [name]
    # diffusers' SGM helper numbers inner layers as (resnets, attentions, upsamplers); an up block
    # without attentions has its upsampler at index 1, which it then calls attentions: try both.
    fixed = re.sub(r"^(lora_unet_up_blocks_\d+)_attentions_\d+_conv$", r"\1_upsamplers_0_conv", name)
    if fixed != name:
        candidates.append(fixed)
    return candidates


def _sgm_renames(pipe: DiffusionPipeline, names: list[str]) -> dict[str, str]:
    """SGM module name -> diffusers-style kohya name, through diffusers' own block mapping.

    The helper is called once per name: given several, it groups block ``1`` with blocks ``10`` and
    ``11`` (a substring match), which SD 1.x's twelve input and output blocks would get wrong.
    """
    renames = {}
    for old in names:
        if old in _SGM_OUTER:
            renames[old] = _SGM_OUTER[old]
            continue
        try:
            (new,) = _maybe_map_sgm_blocks_to_diffusers({old: old}, pipe.unet.config)
        except (ValueError, IndexError, KeyError) as exc:
            raise FormatError(f"its SGM block name {old} does not fit this UNet ({exc})") from None
        for pattern, replacement in _SGM_LAYERS:
            new = re.sub(pattern, replacement, new)
        renames[old] = new
    return renames


def module_index(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    """Every layer of the UNet and text encoders under the kohya names that may point at it."""
    index: dict[str, torch.nn.Module] = {}
    te_prefixes = ["lora_te1", "lora_te"] if getattr(pipe, "text_encoder_2", None) is not None else ["lora_te"]
    parts = [(["lora_unet"], pipe.unet, False), (te_prefixes, pipe.text_encoder, True)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts.append((["lora_te2"], pipe.text_encoder_2, True))
    for prefixes, component, is_text in parts:
        if component is None:
            continue
        for path, layer in _named_layers(component):
            flat = path.replace(".", "_")
            spellings = [flat]
            if is_text:
                # transformers 5 dropped CLIPTextModel's text_model level; kohya names still spell it.
                spellings.append(flat[len("text_model_") :] if flat.startswith("text_model_") else "text_model_" + flat)
            for prefix in prefixes:
                for spelling in spellings:
                    index.setdefault(f"{prefix}_{spelling}", layer)
    return index


def _named_layers(component: torch.nn.Module):
    """(path, layer) for every layer, seen through peft: a wrapped layer by its own path, its base layer."""
    for path, layer in component.named_modules():
        pieces = path.split(".")
        if "base_layer" in pieces or any(p.startswith("lora_") for p in pieces):
            continue  # peft's internals: the wrapper's path already stands for the layer
        if isinstance(layer, BaseTunerLayer):
            layer = layer.get_base_layer()
        yield path, layer
