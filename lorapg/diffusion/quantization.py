"""Quantized storage for the large parts of Flux.1 and SD 3.5: the transformer and the T5 encoder.

``nf4``: bitsandbytes' 4-bit NormalFloat (``Linear4bit`` layers holding ``Params4bit``), as diffusers'
and transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` make them.
``fp8``: weights stored as ``float8_e4m3fn`` and cast up to the compute dtype one layer at a time
(diffusers' layerwise casting hooks), halving bf16's memory at a small cost in quality.

Why the layers are converted after loading instead of passing a quantization config to
``from_pretrained``: diffusers' bitsandbytes quantizer refuses to run without a GPU ("No GPU found"),
while bitsandbytes itself quantizes on CPU too. One code path then serves both, and a CPU test covers
what a GPU user runs. The cost: the unquantized weights pass through CPU RAM once while loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorapg.diffusion.families import family_label, is_transformer_family
from lorapg.errors import UserError, shorten
from lorapg.residency import out_of_memory_as_user_error

log = logging.getLogger(__name__)

NONE, FP8, NF4 = "none", "fp8", "nf4"
MODES = (NONE, FP8, NF4)
COMPONENTS = ("transformer", "t5")  # the names --quantize-components takes
FP8_STORAGE = getattr(torch, "float8_e4m3fn", None)
# diffusers' own choice for layerwise casting: embeddings and norms stay in the compute dtype.
FP8_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


@dataclass(frozen=True)
class QuantizePlan:
    """What each large component is stored as; ``none`` leaves it in the pipeline's dtype."""

    transformer: str = NONE
    t5: str = NONE

    @property
    def active(self) -> bool:
        return any(mode != NONE for mode in (self.transformer, self.t5))

    def describe(self) -> str:
        return f"transformer={self.transformer}, t5={self.t5}"


def parse_plan(quantize: str | None, components: str | None = "") -> QuantizePlan:
    """``quantize`` for both components, then ``components`` ("transformer=nf4,t5=fp8") per component."""
    mode = _mode(quantize or NONE, "quantize")
    modes = dict.fromkeys(COMPONENTS, mode)
    for item in (components or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in COMPONENTS:
            raise UserError(
                f"Setting quantize_components: {shorten(item.strip(), 60)!r} is not COMPONENT=MODE; "
                f"write e.g. transformer=nf4,t5=fp8 (components: {', '.join(COMPONENTS)})."
            )
        modes[name] = _mode(value, "quantize_components")
    return QuantizePlan(**modes)


def _mode(value: str, field: str) -> str:
    mode = str(value).strip().lower()
    if mode not in MODES:
        raise UserError(f"Setting {field}: {shorten(value, 40)!r} is not one of {', '.join(MODES)}; pick one of them.")
    return mode


def check_plan(plan: QuantizePlan, family: str | None) -> None:
    """Refuse, before anything heavy, what this model or this machine cannot do."""
    if not plan.active:
        return
    if not is_transformer_family(family):
        raise UserError(
            f"Setting quantize ({plan.describe()}) applies to Flux.1 and SD 3.5 models only; this model is "
            f"{family_label(family)}. Set quantize to none for it (an SD 1.x/SDXL UNet fits an 8 GB GPU in fp16)."
        )
    check_machine(plan)


def check_machine(plan: QuantizePlan) -> None:
    """A UserError naming ``quantize`` when this machine cannot store weights as ``plan`` asks."""
    modes = {plan.transformer, plan.t5}
    if NF4 in modes:
        bitsandbytes_module()
    if FP8 in modes:
        _check_fp8()


def bitsandbytes_module():
    """bitsandbytes, or a UserError saying what to install when it is missing or broken."""
    try:
        import bitsandbytes
    except Exception as exc:  # ImportError, or a RuntimeError from a build without this machine's backend
        raise UserError(
            f"Setting quantize=nf4 needs bitsandbytes, which cannot be loaded here ({shorten(exc, 120)}). "
            "Install it (pip install 'bitsandbytes>=0.45'), or use quantize=fp8 or none."
        ) from None
    return bitsandbytes


def _check_fp8() -> None:
    try:
        if FP8_STORAGE is None:
            raise TypeError("torch has no float8_e4m3fn")
        torch.ones(2).to(FP8_STORAGE).to(torch.float32)
    except (TypeError, RuntimeError) as exc:
        raise UserError(
            f"Setting quantize=fp8 needs float8 tensors, which this PyTorch cannot make ({shorten(exc, 120)}). "
            "Upgrade torch (2.1 or newer), or use quantize=nf4 or none."
        ) from None


def quantize_pipeline(
    pipe,
    family: str,
    plan: QuantizePlan,
    device: torch.device,
    compute_dtype: torch.dtype,
    *,
    keep_on_cpu: bool = False,
    training: bool = False,
) -> None:
    """Convert the pipeline's transformer and T5 encoder in place as ``plan`` says.

    NF4 weights are quantized on ``device`` (fast on a GPU), one layer at a time, and stay there, or
    go back to CPU RAM with ``keep_on_cpu`` (the residency manager moves them when used);
    bitsandbytes moves quantized weights between devices, never between dtypes.
    ``training``: a training run asked (it offers no fp8, so errors do not suggest "the other mode").
    """
    home = torch.device("cpu") if keep_on_cpu else device
    check_plan(plan, family)
    for name, mode in (("transformer", plan.transformer), ("t5", plan.t5)):
        module = component(pipe, name)
        if mode == NONE or module is None:
            continue
        _convert(module, name, mode, device, compute_dtype, home, training)
        log.info("%s stored as %s (compute in %s)", name, mode, str(compute_dtype).removeprefix("torch."))


def _convert(module, name: str, mode: str, device, compute_dtype, home, training: bool) -> None:
    """One component converted; its failures as UserErrors that say what to change."""
    again = "start the run again" if training else "load the model again"
    empty_cache = torch.cuda.empty_cache if device.type == "cuda" else None
    try:
        # Out of memory is not the mode's fault: the app's one OOM message, before the generic one below.
        with out_of_memory_as_user_error(
            f"while storing the {name} as {mode}", f"Close other programs that use the GPU and {again}.", empty_cache
        ):
            _CONVERTERS[mode](module, device, compute_dtype, home)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        advice = "Set the run's quantize to none." if training else "Set quantize to none, or try the other mode."
        raise UserError(
            f"Setting quantize: {mode} could not be applied to the {name} here ({shorten(exc, 160)}). {advice}"
        ) from None


def component(pipe, name: str) -> torch.nn.Module | None:
    """The pipeline's transformer, or its T5 encoder (Flux: text_encoder_2, SD 3: text_encoder_3)."""
    if name == "transformer":
        return getattr(pipe, "transformer", None)
    for attribute in ("text_encoder_3", "text_encoder_2"):
        module = getattr(pipe, attribute, None)
        if module is not None and type(module).__name__.startswith("T5"):
            return module
    return None


def to_nf4(module: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype, home: torch.device) -> int:
    """Replace every ``nn.Linear`` of ``module`` (except those the model keeps in fp32) with an NF4
    ``Linear4bit``; returns how many were replaced. The replaced weights are frozen."""
    bnb = bitsandbytes_module()
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())  # T5's "wo", as transformers does
    targets = [
        (name, child)
        for name, child in module.named_modules()
        if type(child) is torch.nn.Linear and not any(part in keep for part in name.split("."))
    ]
    for name, linear in targets:
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        # Params4bit quantizes when it is first moved to a device. Moving it between devices later is safe
        # only before it has run: bitsandbytes 0.50 repacks a Linear4bit's weights into a CPU-only layout
        # after an eval-mode forward on an AVX512-BF16 CPU, and a later .to("cuda") keeps that layout
        # (garbage output). No NF4 module may run on the CPU before it moves to a GPU.
        _set_submodule(module, name, quantized.to(device).to(home))
    return len(targets)


def to_fp8(module: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype, home: torch.device) -> None:
    """float8 storage, each layer cast to ``compute_dtype`` only while it runs."""
    _cast_layers_to_fp8(module, compute_dtype)
    # peft creates a LoRA adapter in its base layer's weight dtype unless the layer names a
    # ``compute_dtype`` (as bitsandbytes' layers do): without it every LoRA loaded later would be stored,
    # and so rounded, in float8 (a LoRA with std 0.003 loses a fifth of its entries to exact zeros).
    for layer in module.modules():
        if any(p.dtype == FP8_STORAGE for p in layer.parameters(recurse=False)):
            layer.compute_dtype = compute_dtype


def _cast_layers_to_fp8(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    if hasattr(module, "enable_layerwise_casting"):  # a diffusers model: its own skip list
        module.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=compute_dtype)
        return
    from diffusers.hooks import apply_layerwise_casting

    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    apply_layerwise_casting(
        module,
        storage_dtype=FP8_STORAGE,
        compute_dtype=compute_dtype,
        skip_modules_pattern=FP8_SKIP_PATTERNS + keep,
        # The token embedding stays: T5's first parameter is what transformers reports as the model's
        # dtype, and pipelines cast the prompt embeddings (and so the latents) to it.
        skip_modules_classes=(torch.nn.Embedding,),
    )


_CONVERTERS: dict[str, Callable] = {NF4: to_nf4, FP8: to_fp8}


def _set_submodule(root: torch.nn.Module, dotted: str, module: torch.nn.Module) -> None:
    parent_name, _, child_name = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, module)


# bitsandbytes' NF4 layer, and diffusers' layer for a GGUF file's quantized weights (Q8_0, Q4_K, …).
QUANTIZED_LAYERS = ("Linear4bit", "GGUFLinear")


def is_quantized(module: torch.nn.Module | None) -> bool:
    """Whether ``module`` holds NF4 or GGUF layers or float8-stored weights (what LoRA fusing must not touch)."""
    if module is None:
        return False
    return any(
        type(child).__name__ in QUANTIZED_LAYERS or any(p.dtype == FP8_STORAGE for p in child.parameters(recurse=False))
        for child in module.modules()
    )
