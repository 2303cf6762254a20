"""What a LyCORIS-family LoRA file means: its format, read from its keys, and each module's ΔW.

kohya-layout files name one module per key prefix (``lora_unet_<path>.<suffix>``); the suffixes say
which decomposition the module stores. AUTOMATIC1111's ``extensions-builtin/Lora/network_*.py`` is the
reference for what each one means (the code here is written from that definition, not copied):

- LoRA/LoCon: ``ΔW = up @ down``; with a Tucker core ``lora_mid`` ``ΔW[o,i,k,l] = Σ up[o,a] mid[a,b,k,l] down[b,i]``.
- LoHa: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; with ``hada_t1``/``hada_t2`` each factor is a Tucker product.
- LoKr: ``ΔW = w1 ⊗ w2`` (Kronecker), each factor full or ``a @ b``; ``lokr_t2`` makes w2 a Tucker product.
- Full diffs: ``ΔW = diff``, ``Δbias = diff_b``; norm diffs ``w_norm``/``b_norm`` likewise for norm layers.
- IA3: ``ΔW = W ⊙ w``, one factor per output row (per input column when ``on_input``).
- Scale: ``alpha / rank`` where the format has a rank (a ``scale`` tensor overrides it), else 1.
- DoRA (``dora_scale``): the scaled ΔW is added to the ORIGINAL weight, the sum's column (or row) norms are
  replaced by the stored magnitudes, and the difference to the original weight is the patch.

These are pure functions of tensors; ``weight_patches`` maps module names to the model and applies them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where ΔW is computed: the LoRA list (and the gallery CLI) never needs it
    import torch

# Format labels users see in the LoRA list and the API.
LORA, LOCON, LOHA, LOKR, DORA = "LoRA", "LoCon", "LoHa", "LoKr", "DoRA"
FULL_DIFF, NORM_DIFF, IA3, OFT, GLORA = "Full diff", "Norm diff", "IA3", "OFT", "GLoRA"

# Module kind -> the suffixes that belong to it. One module holds the keys of exactly one kind.
_KIND_SUFFIXES: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "full": frozenset({"diff", "diff_b"}),
    "norm": frozenset({"w_norm", "b_norm"}),
    "ia3": frozenset({"weight", "on_input"}),
    "oft": frozenset({"oft_blocks", "oft_diag", "rescale"}),
    "glora": frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight"}),
}
_SHARED_SUFFIXES = frozenset({"alpha", "scale", "dora_scale"})  # may accompany any kind
_KIND_LABEL = {"lora": LORA, "loha": LOHA, "lokr": LOKR, "full": FULL_DIFF, "norm": NORM_DIFF, "ia3": IA3}
# Formats this app does not apply: a file using them is refused by name, never loaded wrongly.
REFUSED_KINDS = {"oft": OFT, "glora": GLORA}
# What each kind needs to mean anything (any one of the alternatives).
_REQUIRED: dict[str, tuple[frozenset[str], ...]] = {
    "lora": (frozenset({"lora_up.weight", "lora_down.weight"}),),
    "loha": (frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),),
    "lokr": (frozenset(),),  # checked by _lokr_complete
    "full": (frozenset({"diff"}), frozenset({"diff_b"})),
    "norm": (frozenset({"w_norm"}), frozenset({"b_norm"})),
    "ia3": (frozenset({"weight"}),),
}

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


class FormatError(ValueError):
    """A file's keys or shapes make no sense; the message names the module and the problem."""


def split_key(key: str) -> tuple[str, str]:
    """``lora_unet_x_y.hada_w1_a`` -> (``lora_unet_x_y``, ``hada_w1_a``)."""
    module, _, suffix = key.partition(".")
    return module, suffix


def group_modules(keys: Iterable[str]) -> dict[str, set[str]]:
    modules: dict[str, set[str]] = {}
    for key in keys:
        module, suffix = split_key(key)
        modules.setdefault(module, set()).add(suffix)
    return modules


def module_kind(module: str, suffixes: set[str]) -> str:
    """The one kind of decomposition a module's suffixes describe; FormatError if none or several."""
    unknown = sorted(
        s for s in suffixes if s not in _SHARED_SUFFIXES and not any(s in k for k in _KIND_SUFFIXES.values())
    )
    if unknown:
        raise FormatError(f"unknown key {module}.{unknown[0]}")
    kinds = sorted(kind for kind, names in _KIND_SUFFIXES.items() if suffixes & names)
    if not kinds:
        raise FormatError(f"module {module} has no weights (only {', '.join(sorted(suffixes))})")
    if len(kinds) > 1:
        labels = " and ".join(_KIND_LABEL.get(k) or REFUSED_KINDS[k] for k in kinds)
        raise FormatError(f"module {module} mixes {labels} keys, which cannot be combined")
    kind = kinds[0]
    if kind in _REQUIRED and not any(required <= suffixes for required in _REQUIRED[kind]):
        raise FormatError(f"module {module} is incomplete ({', '.join(sorted(suffixes))})")
    if kind == "lokr" and not _lokr_complete(suffixes):
        raise FormatError(f"module {module} is an incomplete LoKr ({', '.join(sorted(suffixes))})")
    if kind == "loha" and ("hada_t1" in suffixes) != ("hada_t2" in suffixes):
        raise FormatError(f"module {module} has only one of hada_t1/hada_t2")
    return kind


def _lokr_complete(suffixes: set[str]) -> bool:
    has_1 = "lokr_w1" in suffixes or {"lokr_w1_a", "lokr_w1_b"} <= suffixes
    has_2 = "lokr_w2" in suffixes or {"lokr_w2_a", "lokr_w2_b"} <= suffixes
    return has_1 and has_2


def file_format(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, bool]:
    """(label, needs_patches) for a kohya-layout file, from its tensor names and shapes only.

    ``needs_patches`` is False only for what diffusers' own loader converts exactly: plain LoRA and
    LoCon without a Tucker core and without DoRA. Raises FormatError for keys no format explains.
    """
    modules = group_modules(shapes)
    kinds = {name: module_kind(name, suffixes) for name, suffixes in modules.items()}
    present = set(kinds.values())
    refused = sorted(present & REFUSED_KINDS.keys())
    if refused:
        return REFUSED_KINDS[refused[0]], True
    dora = any("dora_scale" in suffixes for suffixes in modules.values())
    tucker = any("lora_mid.weight" in suffixes for suffixes in modules.values())
    main = sorted(present - {"full", "norm"})
    if not main:
        return (FULL_DIFF if "full" in present else NORM_DIFF), True
    labels = [_lora_label(shapes, tucker) if kind == "lora" else _KIND_LABEL[kind] for kind in main]
    label = "+".join(labels)
    if dora:
        label = DORA if label in (LORA, LOCON) else f"{label} (DoRA)"
    return label, present != {"lora"} or dora or tucker


def _lora_label(shapes: Mapping[str, tuple[int, ...]], tucker: bool) -> str:
    """LoCon when a module is a convolution with a kernel wider than 1×1 (kohya's conv_dim)."""
    conv = any(
        key.endswith("lora_down.weight") and len(shape) == 4 and shape[2:] != (1, 1) for key, shape in shapes.items()
    )
    return LOCON if conv or tucker else LORA


# --- ΔW of one module ----------------------------------------------------------------------------


def module_delta(
    name: str, kind: str, tensors: Mapping[str, torch.Tensor], weight: torch.Tensor | None, bias_shape: tuple | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(ΔW, Δbias) of one module at multiplier 1, in float32 on ``weight``'s device.

    ``weight`` is the module's ORIGINAL weight: DoRA and IA3 read its values, every kind checks its shape.
    """
    import torch

    device = weight.device if weight is not None else torch.device("cpu")
    t = {key: value.to(device=device, dtype=torch.float32) for key, value in tensors.items()}
    original = weight.to(device=device, dtype=torch.float32) if weight is not None else None
    raw, rank, delta_bias = _raw_delta(name, kind, t, original)
    delta = None
    if raw is not None:
        if weight is None:
            raise FormatError(f"module {name} changes a weight, but the model's layer has none")
        if raw.numel() != weight.numel():
            raise FormatError(
                f"module {name} has shape {tuple(raw.shape)}, but the model's weight is {tuple(weight.shape)}"
            )
        delta = raw.reshape(weight.shape) * _scale(t, rank)
        if "dora_scale" in t:
            delta = _weight_decompose(name, delta, original, t["dora_scale"])
    if delta_bias is not None:
        if bias_shape is None:
            raise FormatError(f"module {name} changes a bias, but the model's layer has none")
        if delta_bias.numel() != _numel(bias_shape):
            raise FormatError(
                f"module {name} has a bias of {delta_bias.numel()} values, the model's has {_numel(bias_shape)}"
            )
        delta_bias = delta_bias.reshape(bias_shape)
    return delta, delta_bias


def _numel(shape: tuple) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _raw_delta(
    name: str, kind: str, t: Mapping[str, torch.Tensor], original: torch.Tensor | None
) -> tuple[torch.Tensor | None, int | None, torch.Tensor | None]:
    """(unscaled ΔW, the rank alpha divides by or None, Δbias) for one module's tensors."""
    if kind == "lora":
        return _lora(t), t["lora_down.weight"].shape[0], None
    if kind == "loha":
        return _loha(t), t["hada_w1_b"].shape[0], None
    if kind == "lokr":
        return _lokr(t), _lokr_rank(t), None
    if kind == "full":
        return t.get("diff"), None, t.get("diff_b")
    if kind == "norm":
        return t.get("w_norm"), None, t.get("b_norm")
    if kind == "ia3":
        return _ia3(name, t, original), None, None
    raise FormatError(f"{kind} modules are not supported")


def _flat(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.reshape(matrix.shape[0], -1)


def _lora(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    import torch

    up, down = _flat(t["lora_up.weight"]), _flat(t["lora_down.weight"])
    mid = t.get("lora_mid.weight")
    if mid is None:
        return up @ down  # a conv's kernel dims are in down's columns: reshaped to the weight later
    # Tucker (LoCon with a mid weight): the kernel lives in the core; up and down are 1×1.
    core = torch.tensordot(up, mid, dims=([1], [0]))  # [out, r_down, k, l]
    return torch.tensordot(core, down, dims=([1], [0])).permute(0, 3, 1, 2)  # [out, in, k, l]


def _tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """``W[o,i,k,l] = Σ core[a,b,k,l] out_factor[a,o] in_factor[b,i]`` (LyCORIS stores both factors as [r, n])."""
    import torch

    mixed = torch.tensordot(out_factor.t(), core, dims=([1], [0]))  # [o, b, k, l]
    return torch.tensordot(mixed, in_factor, dims=([1], [0])).permute(0, 3, 1, 2)


def _loha(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "hada_t1" in t:
        first = _tucker(t["hada_t1"], _flat(t["hada_w1_a"]), _flat(t["hada_w1_b"]))
        second = _tucker(t["hada_t2"], _flat(t["hada_w2_a"]), _flat(t["hada_w2_b"]))
    else:
        first = _flat(t["hada_w1_a"]) @ _flat(t["hada_w1_b"])
        second = _flat(t["hada_w2_a"]) @ _flat(t["hada_w2_b"])
    return first * second


def _lokr(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    import torch

    w1 = t["lokr_w1"] if "lokr_w1" in t else _flat(t["lokr_w1_a"]) @ _flat(t["lokr_w1_b"])
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], _flat(t["lokr_w2_a"]), _flat(t["lokr_w2_b"]))
    else:
        w2 = _flat(t["lokr_w2_a"]) @ _flat(t["lokr_w2_b"])
    w1 = w1.reshape(w1.shape[0], w1.shape[1], *([1] * (w2.dim() - 2)))  # a conv's kernel comes from w2
    # For a 2-D w2 holding a conv's flattened [out2, in2·k·k], the 2-D product reshapes to the same
    # [out, in, k, k] layout as the 4-D one: column c·(in2·k·k) + d·k·k + p·k + q is input c·in2 + d.
    return torch.kron(w1, w2.contiguous())  # kron refuses the permuted view a Tucker product is


def _lokr_rank(t: Mapping[str, torch.Tensor]) -> int | None:
    """The rank alpha divides by: w2's when factorised, else w1's; None (scale 1) when both are full."""
    if "lokr_w2_b" in t:
        return t["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in t:
        return t["lokr_w1_b"].shape[0]
    return None


def _ia3(name: str, t: Mapping[str, torch.Tensor], original: torch.Tensor | None) -> torch.Tensor:
    """IA3 rescales the original weight: ``ΔW = W ⊙ w``, w one factor per output row (or input column).

    A1111 broadcasts the same way for linear layers; for a convolution its per-input case would broadcast
    over the kernel, so here the factor always goes along the channel axis it names.
    """
    if original is None:
        raise FormatError(f"module {name} rescales a weight, but the model's layer has none")
    factors = t["weight"].reshape(-1)
    on_input = bool(t["on_input"].item()) if "on_input" in t else False
    axis = 1 if on_input else 0
    if factors.numel() != original.shape[axis]:
        side = "input" if on_input else "output"
        raise FormatError(
            f"module {name} has {factors.numel()} {side} factors, but the model's weight is {tuple(original.shape)}"
        )
    shape = [1] * original.dim()
    shape[axis] = -1
    return original * factors.reshape(shape)


def _scale(t: Mapping[str, torch.Tensor], rank: int | None) -> float:
    if "scale" in t:
        return float(t["scale"].item())
    if rank and "alpha" in t:
        return float(t["alpha"].item()) / rank
    return 1.0


def _weight_decompose(name: str, delta: torch.Tensor, original: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: rescale ``original + delta`` to the stored magnitudes; return its difference to ``original``.

    kohya and A1111 store one magnitude per input column (shape ``[1, in, …]``); LyCORIS's
    ``wd_on_out`` stores one per output row (``[out, 1, …]``). The shape says which.
    """

    merged = original + delta
    out_features, in_features = merged.shape[0], merged.shape[1]
    ones = [1] * (merged.dim() - 2)
    if magnitude.numel() == in_features and magnitude.shape[0] == 1:
        norm = merged.transpose(0, 1).reshape(in_features, -1).norm(dim=1).reshape(1, in_features, *ones)
        magnitude = magnitude.reshape(1, in_features, *ones)
    elif magnitude.numel() == out_features:
        norm = merged.reshape(out_features, -1).norm(dim=1).reshape(out_features, 1, *ones)
        magnitude = magnitude.reshape(out_features, 1, *ones)
    else:
        raise FormatError(
            f"module {name} has a dora_scale of shape {tuple(magnitude.shape)} for a weight of {tuple(merged.shape)}"
        )
    return merged * (magnitude / norm) - original
