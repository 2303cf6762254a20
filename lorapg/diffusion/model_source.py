"""Where a base model comes from: a Hugging Face id, a local diffusers folder or a single file.

Resolving the reference is separate from loading it so that bad input (a missing path, a pickled
checkpoint) is refused before anything heavy happens, with a message the user can act on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from lorapg.diffusion.families import FLUX, SD1, SD2, SD3, SDXL
from lorapg.diffusion.gguf_header import GgufHeader, GgufHeaderError, check_tensor_extents, read_gguf_header
from lorapg.errors import UserError, check_ref_length, shorten

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
# A GGUF-quantized transformer (city96's FLUX.1-dev-gguf and the like): a header of names and shapes,
# then raw blocks of quantized numbers; nothing in it is executed when read.
GGUF_SUFFIX = ".gguf"
FOLDER, SINGLE_FILE, HUB = "folder", "single_file", "hub"


@dataclass(frozen=True)
class ModelSource:
    ref: str  # what the user typed
    kind: str  # FOLDER, SINGLE_FILE or HUB
    path: Path | None  # local folder or file; None for a hub id not yet downloaded
    family: str | None = None  # known before loading for single files (from tensor names)
    # A folder's .bin weights are pickles: loaded only when the owner allowed pickles (--allow-pickle).
    allow_pickle: bool = field(default=False, compare=False)

    @property
    def display_name(self) -> str:
        return Path(self.ref).stem if self.kind == SINGLE_FILE else Path(self.ref.rstrip("/")).name


def resolve_model_source(
    ref: str, *, allow_pickle: bool = False, allowed_roots: Sequence[Path] | None = None
) -> ModelSource:
    """Classify ``ref``; raise UserError for a path that is missing or unsafe to load.

    ``allowed_roots``: when the app is reachable by others, the only folders (or files) a local
    path may point into (see ``space_mode.local_model_roots``); None lets the owner load any path.
    """
    ref = _checked_text(ref)
    if allowed_roots is not None and not _inside(Path(ref).expanduser(), allowed_roots):
        # Decided before touching the file system, so the answer is the same whether or not the
        # path exists: a visitor learns nothing about the server's files.
        if _looks_like_path(ref):
            raise UserError(
                f"Model path {shorten(ref)} is outside this app's models folder. This app is reachable from "
                "other machines, so it loads local models only from there: pick one from the list."
            )
        return ModelSource(ref, HUB, None)
    path = Path(ref).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as exc:  # "File name too long", permission denied on a parent, …
        raise UserError(f"Model path {shorten(ref)} cannot be read ({exc.strerror}).") from None
    if is_dir:
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"{shorten(ref)} is a folder but not a diffusers model (no model_index.json). "
                "Point at the folder that holds model_index.json, or at a single .safetensors file."
            )
        return ModelSource(ref, FOLDER, path, allow_pickle=allow_pickle)
    if is_file:
        return _single_file(ref, path, allow_pickle)
    if _looks_like_path(ref):
        raise UserError(f"Model path {shorten(ref)} does not exist.")
    return ModelSource(ref, HUB, None)


def _checked_text(ref: object) -> str:
    """``ref`` stripped, or a UserError naming the field for what no path or hub id can contain."""
    if ref is None:
        ref = ""
    if not isinstance(ref, str):
        raise UserError(f"Base model must be text (a hub id or a path), not {type(ref).__name__}.")
    ref = ref.strip()
    if not ref:
        raise UserError("No base model given. Pass a Hugging Face id, a diffusers folder or a .safetensors file.")
    check_ref_length(ref, "Base model")
    if any(ord(c) < 32 or ord(c) == 127 for c in ref):
        raise UserError(f"Base model {shorten(ref)!r} contains a control character; retype the path or hub id.")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in ref):
        raise UserError("Base model contains an invalid character (a lone UTF-16 surrogate); retype it.")
    return ref


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path`` is one of ``roots`` or lies under one, after resolving "..", not symlinks:
    the owner may link models into the models folder; a visitor cannot create links there."""
    target = Path(os.path.abspath(path))
    return any(target.is_relative_to(os.path.abspath(Path(root).expanduser())) for root in roots)


def _single_file(ref: str, path: Path, allow_pickle: bool) -> ModelSource:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(
                f"{shorten(path.name)} is a pickled checkpoint ({suffix}); loading one can run arbitrary code. "
                "Convert it to .safetensors, or pass --allow-pickle if you trust its source."
            )
        return ModelSource(ref, SINGLE_FILE, path, None)
    if suffix == GGUF_SUFFIX:
        return ModelSource(ref, SINGLE_FILE, path, detect_gguf_family(path))
    if suffix != ".safetensors":
        raise UserError(
            f"{shorten(path.name)}: unsupported model file type {shorten(suffix, 20)!r}; use a .safetensors "
            "checkpoint (or a .gguf Flux.1 / SD 3.5 transformer)."
        )
    return ModelSource(ref, SINGLE_FILE, path, detect_checkpoint_family(path))


def is_gguf(source: ModelSource) -> bool:
    """Whether ``source`` is a GGUF-quantized transformer file (loaded with diffusers' GGUF quantizer)."""
    return source.kind == SINGLE_FILE and source.path is not None and source.path.suffix.lower() == GGUF_SUFFIX


def refuse_gguf_training(ref: str, field: str = "model") -> None:
    """A UserError naming ``field`` when ``ref`` is a GGUF transformer: diffusers' GGUF layers are
    inference-only (its quantizer says is_trainable = False), so a run on one would fail at its first step."""
    if Path(ref).suffix.lower() != GGUF_SUFFIX:
        return
    raise UserError(
        f"Setting {field}: {shorten(Path(ref).name)} is a GGUF-quantized transformer, which can generate but not "
        "be trained on; train on the model's .safetensors file or diffusers folder (quantize=nf4 to save memory)."
    )


_MODEL_FILE_SUFFIXES = PICKLE_SUFFIXES | {".safetensors", GGUF_SUFFIX}


def model_files(folder: Path) -> list[Path]:
    """The single-file base models directly in ``folder``: .safetensors checkpoints and .gguf transformers
    (any case: FLUX1-DEV-Q8_0.GGUF loads too). Not recursive: the language models' GGUFs (models/llm) and
    the LoRAs' folder are below the folders searched."""
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if (path.suffix == ".safetensors" or path.suffix.lower() == GGUF_SUFFIX) and path.is_file()
    )


def _looks_like_path(ref: str) -> bool:
    # A hub id is "owner/name" exactly; anything with more parts, a drive, a dot-prefix or a file
    # suffix was meant as a local path.
    if ref.startswith((".", "/", "~")) or "\\" in ref or Path(ref).suffix.lower() in _MODEL_FILE_SUFFIXES:
        return True
    return ref.count("/") != 1


# A Flux transformer file: BFL's original names (``double_blocks.0.img_attn.qkv.weight``, ComfyUI adds
# ``model.diffusion_model.``) or diffusers' (``single_transformer_blocks.0.attn.to_q.weight``).
_FLUX_MARKERS = ("double_blocks.", "single_blocks.", "single_transformer_blocks.")


def is_flux_transformer_key(key: str) -> bool:
    key = key.removeprefix("model.diffusion_model.").removeprefix("transformer.")
    return key.startswith(_FLUX_MARKERS)


def is_sd3_transformer_key(key: str) -> bool:
    """SD 3.x: Stability's ``joint_blocks.`` names, or diffusers' MMDiT (``pos_embed`` + ``context_embedder``)."""
    key = key.removeprefix("model.diffusion_model.").removeprefix("transformer.")
    return key.startswith(("joint_blocks.", "pos_embed.proj."))


def detect_checkpoint_family(path: Path) -> str:
    """Tell SD 1.x, SD 2.x, SDXL, SD 3.5 and Flux.1 apart from the tensor names of a checkpoint file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{shorten(path.name)} is not a readable .safetensors file ({shorten(exc, 200)}).") from None
    if any(is_flux_transformer_key(k) for k in keys) and not any("lora" in k for k in keys):
        return FLUX
    if any(is_sd3_transformer_key(k) for k in keys) and not any("lora" in k for k in keys):
        return SD3
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return SDXL
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return SD2
    if any(k.startswith("cond_stage_model.transformer.") for k in keys) or any(
        k.startswith("model.diffusion_model.") for k in keys
    ):
        return SD1
    raise UserError(
        f"{path.name} does not look like a Stable Diffusion or Flux checkpoint (no UNet, transformer or text "
        "encoder tensors). "
        "Is it a LoRA? Put LoRAs in the LoRA folder instead."
    )


def gguf_module():
    """The ``gguf`` package, or a UserError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UserError(
            "Setting model: a .gguf transformer needs the gguf package, which is not installed; "
            "run `pip install 'gguf>=0.10'` and load the model again."
        ) from None
    return gguf


def read_gguf(path: Path) -> GgufHeader:
    """The checked header of GGUF file ``path``, or a UserError naming model.

    Read with a bounded parser, never gguf's GGUFReader: that one trusts the header's counts, and a corrupt
    or crafted file (an array "longer" than the file) keeps it looping and allocating forever.
    """
    quant_sizes = gguf_module().GGML_QUANT_SIZES
    try:
        header = read_gguf_header(path)
        check_tensor_extents(header, quant_sizes)
    except (OSError, GgufHeaderError) as exc:
        raise UserError(
            f"Setting model: {shorten(path.name)} is not a readable GGUF file ({shorten(exc, 160)}); "
            "download it again or pick another file."
        ) from None
    return header


def gguf_tensor_names(path: Path) -> tuple[list[str], str]:
    """The tensor names of a GGUF file and its ``general.architecture`` ("" when absent)."""
    header = read_gguf(path)
    return header.names, header.architecture


# city96's converter also makes GGUFs of SD 1.x/SDXL UNets; diffusers loads GGUF only for transformers.
_GGUF_UNET_MARKERS = ("input_blocks.", "down_blocks.", "model.diffusion_model.input_blocks.")


def detect_gguf_family(path: Path) -> str:
    """Flux.1 or SD 3.5 from a GGUF transformer's tensor names; a UserError saying what any other GGUF is."""
    header = read_gguf(path)
    names, architecture = header.names, header.architecture
    for family, is_family_key in ((FLUX, is_flux_transformer_key), (SD3, is_sd3_transformer_key)):
        if any(is_family_key(name) for name in names):
            _check_loadable_gguf(path, header)
            return family
    if any(name.startswith(_GGUF_UNET_MARKERS) for name in names):
        what = "a Stable Diffusion UNet"
    elif any(name.startswith(("blk.", "token_embd.", "output.")) for name in names):
        what = f"a language model ({shorten(architecture, 40)})" if architecture else "a language model"
    else:
        what = f"a {shorten(architecture, 40)} model" if architecture else "tensors of no known model"
    raise UserError(
        f"Setting model: {shorten(path.name)} is a GGUF file holding {what}, not a Flux.1 or SD 3.5 transformer. "
        "Pick a Flux.1 / SD 3.5 transformer .gguf (e.g. from city96/FLUX.1-dev-gguf) or a .safetensors checkpoint."
    )


# A transformer's header holds a few metadata values; diffusers' GGUFReader builds a numpy view per array
# item, so a "transformer" with a vocabulary-sized array is refused before it gets there.
MAX_TRANSFORMER_ARRAY_ITEMS = 65_536


def _check_loadable_gguf(path: Path, header: GgufHeader) -> None:
    """Refuse what diffusers would fail on only after reading gigabytes: quantization types it cannot
    dequantize (IQ2_XS, IQ3_S, TQ1_0, …), and metadata far larger than a transformer's."""
    if header.array_items > MAX_TRANSFORMER_ARRAY_ITEMS:
        raise UserError(
            f"Setting model: {shorten(path.name)} has {header.array_items} metadata array items, far more than a "
            "Flux.1 / SD 3.5 transformer holds (corrupt or crafted); download it again or pick another file."
        )
    supported = supported_gguf_types()
    unsupported = sorted({tensor.type for tensor in header.tensors} - set(supported))
    if unsupported:
        names = ", ".join(gguf_type_name(kind) for kind in unsupported)
        raise UserError(
            f"Setting model: {shorten(path.name)} holds tensors quantized as {shorten(names, 80)}, which diffusers "
            f"cannot dequantize; pick a file quantized as one of {', '.join(map(gguf_type_name, supported))}."
        )


def supported_gguf_types() -> list[int]:
    """GGML types diffusers loads: F32 and F16 as plain tensors, the rest through its dequantizers."""
    gguf = gguf_module()
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    plain = [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16]
    return [int(kind) for kind in dict.fromkeys(plain + list(SUPPORTED_GGUF_QUANT_TYPES))]


def gguf_type_name(kind: int) -> str:
    try:
        return gguf_module().GGMLQuantizationType(kind).name
    except ValueError:
        return f"type {kind}"
