"""Fuse the active LoRA selection into the base weights, so an active LoRA costs nothing per step.

An unfused peft adapter adds two small matmuls to every targeted layer on every step (1.16× per
image with three LoRAs on the tiny model); A1111 and Forge patch the weights instead, and so does
this. Whenever a non-empty selection is activated, its deltas (at the scales ``set_adapters``
gave them) are merged into the weights, and taken out again before anything changes the selection:
the same selection used again finds the weights ready and does nothing.

It fuses from the first use, not from the second: the README promises that the same request gives
the same bytes, and an unfused first image would differ from a fused second one by a level.

Unfusing must give the exact base weights back, or images would drift with the history of
selections. peft's ``unmerge`` subtracts the delta again, which is not exact (in fp16/bf16 an ulp
or more, growing with every cycle); so on first fuse each targeted weight is copied to CPU RAM
(never GPU memory: the residency manager's byte count of the pipeline stays true) and unfuse
copies it back, bit for bit. The price is RAM: one copy of the weights LoRAs touch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Iterator, Sequence

import torch
from diffusers import DiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer

log = logging.getLogger(__name__)


class LoraFuser:
    """Tracks which selection the weights hold and fuses/unfuses the pipeline's peft layers."""

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe
        self.enabled = True  # off: adapters run unfused, per step (the bench's reference)
        self._fused: Hashable | None = None  # the selection the weights hold now, if any
        self._merged: list[BaseTunerLayer] = []
        self._layers: list[BaseTunerLayer] | None = None  # every peft layer in the pipeline, found once
        # layer -> its base parameters with their CPU copies (made once, reused by every fuse)
        self._originals: dict[BaseTunerLayer, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        self._unfusable: Hashable | None = None  # a selection whose merge failed: it runs unfused
        self.fuse_count = 0  # how many times weights were fused (tests and the bench read it)

    @property
    def fused(self) -> Hashable | None:
        return self._fused

    def holds(self, key: Hashable) -> bool:
        """True when the weights already hold exactly this selection: nothing to do this time."""
        return self._fused is not None and self._fused == key

    def should_fuse(self, key: Hashable) -> bool:
        return self.enabled and bool(key) and self._fused != key and key != self._unfusable

    def adapters_changed(self) -> None:
        """A LoRA file is about to be loaded or removed: peft may wrap other layers afterwards."""
        self.unfuse()  # the weights are the base weights again, so copies made later are exact too
        self._layers = None
        self._originals.clear()
        self._unfusable = None

    def fuse(self, key: Hashable, adapter_names: Sequence[str]) -> None:
        """Merge the named adapters, at the scales ``set_adapters`` gave them, into the weights.

        A layer type peft cannot merge leaves the selection unfused: slower per step, same image.
        """
        self.unfuse()
        try:
            self._merge(key, adapter_names)
        except Exception as exc:  # peft raises several types for layers it cannot merge
            log.warning("could not fuse the LoRA selection (%s); it runs unfused", exc)
            self.unfuse()
            self._unfusable = key

    def _merge(self, key: Hashable, adapter_names: Sequence[str]) -> None:
        started = time.perf_counter()
        names = set(adapter_names)
        if self._layers is None:
            self._layers = list(_tuner_layers(self.pipe))
        for layer in self._layers:
            present = sorted(names & layer._get_available_adapters())
            if not present:
                continue
            self._remember_originals(layer)
            # Keep the layer in the list before merging: if the merge fails half-way, unfuse still restores it.
            self._merged.append(layer)
            layer.merge(adapter_names=present)
        self._fused = key
        self.fuse_count += 1
        log.debug("fused %d LoRA(s) into %d layers in %.1f ms", len(names), len(self._merged), _ms(started))

    def unfuse(self) -> None:
        """Take the fused deltas out again; a no-op when nothing is fused."""
        if self._fused is None and not self._merged:
            return
        started = time.perf_counter()
        for layer in self._merged:
            # The copy brings the exact weights back, so peft's unmerge (which computes every
            # delta again to subtract it) is skipped; only its bookkeeping is undone.
            self._restore_originals(layer)
            _forget_merge(layer)
        log.debug("unfused %d layers in %.1f ms", len(self._merged), _ms(started))
        self._merged = []
        self._fused = None

    def _remember_originals(self, layer: BaseTunerLayer) -> None:
        if layer not in self._originals:
            # Made once: the base weights only ever change by fusing, which unfuse undoes.
            self._originals[layer] = [(p, p.detach().to("cpu", copy=True)) for p in _base_parameters(layer)]

    def _restore_originals(self, layer: BaseTunerLayer) -> None:
        with torch.no_grad():
            for param, original in self._originals.get(layer, ()):
                param.copy_(original)


def _tuner_layers(pipe: DiffusionPipeline) -> Iterator[BaseTunerLayer]:
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for module in component.modules():
                if isinstance(module, BaseTunerLayer):
                    yield module


def _forget_merge(layer: BaseTunerLayer) -> None:
    """What peft's ``unmerge`` does besides the subtraction: mark the layer unmerged, drop DoRA norms."""
    caches = getattr(layer, "_caches", None)
    if caches is not None:
        for name in layer.merged_adapters:
            caches.pop(f"{name}-weight_norm", None)
    layer.merged_adapters = []


def _base_parameters(layer: BaseTunerLayer) -> list[torch.nn.Parameter]:
    """The base layer's own weight and bias: what a merge may change (a LoRA bias changes the bias)."""
    base = layer.get_base_layer()
    return [p for p in base.parameters(recurse=False) if p is not None]


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
