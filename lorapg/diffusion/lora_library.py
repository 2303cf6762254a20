"""The LoRA library: every ``.safetensors`` under the LoRA folder, described from its header.

Scanning reads only safetensors headers (names, shapes, metadata), never tensor data, so listing a
folder of hundreds of LoRAs stays fast and can be repeated on every refresh.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from lorapg.diffusion.families import FLUX, SD1, SD2, SD3, SDXL
from lorapg.diffusion.lycoris import DORA, KOHYA_PREFIXES, LORA, FormatError, file_format
from lorapg.errors import UserError

log = logging.getLogger(__name__)

KOHYA, DIFFUSERS = "kohya", "diffusers"
# The text encoder hidden size that cross-attention keys/values read, per family.
_CROSS_ATTENTION_DIM = {768: SD1, 1024: SD2, 2048: SDXL}


@dataclass(frozen=True)
class LoraInfo:
    name: str  # path relative to the LoRA folder, without ".safetensors", "/"-separated
    path: Path
    family: str | None  # SD1 / SD2 / SDXL / FLUX / SD3, or None when the file does not say
    layout: str  # KOHYA or DIFFUSERS
    trigger_words: tuple[str, ...] = ()
    description: str = ""
    size_bytes: int = 0
    mtime: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    format: str = LORA  # what the keys say: LoRA, LoCon, LoHa, LoKr, DoRA, Full diff, IA3, OFT… (lycoris)
    weight_patches: bool = False  # True: applied as weight patches, not as a peft adapter (adapters)


class LoraLibrary:
    """Lists and resolves LoRA files inside one folder; names never escape that folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def scan(self) -> tuple[list[LoraInfo], list[str]]:
        """All readable LoRAs, sorted by name, and one message per file that could not be read."""
        infos: list[LoraInfo] = []
        problems: list[str] = []
        if not self.folder.is_dir():
            return infos, problems
        root = self.folder.resolve()
        for path in sorted(self.folder.rglob("*.safetensors")):
            if any(part.startswith(".") for part in path.relative_to(self.folder).parts):
                continue  # hidden: the manager's trash (.trash/), other tools' caches
            try:
                if not path.resolve().is_relative_to(root):
                    raise UserError(f"{path.name} links outside the LoRA folder {self.folder}; copy the file in.")
                infos.append(self.describe(path))
            except UserError as exc:
                problems.append(str(exc))
                log.warning("skipping LoRA: %s", exc)
        return infos, problems

    def resolve(self, name_or_path: str) -> LoraInfo:
        """Find a LoRA by library name or by a path to a file inside the LoRA folder."""
        return self.describe(self.resolve_path(name_or_path))

    def resolve_path(self, name_or_path: str) -> Path:
        text = (name_or_path or "").strip()
        if not text:
            raise UserError("Empty LoRA name.")
        root = self.folder.resolve()
        candidate = Path(text).expanduser()
        if not candidate.is_absolute():
            as_path = Path(text) if text.endswith(".safetensors") else Path(text + ".safetensors")
            # A path typed relative to the working directory (models/loras/x.safetensors) is
            # accepted when it lands inside the folder; otherwise it is a name in the folder.
            candidate = as_path.resolve() if as_path.resolve().is_relative_to(root) else root / as_path
        resolved = candidate.resolve()
        if not resolved.is_relative_to(root):
            raise UserError(
                f"LoRA {text!r} is outside the LoRA folder {self.folder}. "
                "Copy the file into that folder (or point --lora-dir at its folder)."
            )
        hidden = any(part.startswith(".") for part in resolved.relative_to(root).parts)
        if hidden or not resolved.is_file():  # hidden: the trash (.trash/) holds deleted LoRAs
            raise UserError(
                f"Unknown LoRA {text!r}: no such file in {self.folder}. Refresh the list or check the name."
            )
        return resolved

    def describe(self, path: Path) -> LoraInfo:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises several error types for corrupt files
            raise UserError(f"LoRA file {path.name} is corrupt or not a safetensors file ({exc}).") from None
        if not shapes or not all("lora" in key or key.endswith(".alpha") for key in shapes):
            raise UserError(f"{path.name} is not a LoRA (its tensors have no LoRA weights).")
        try:
            label, patches = describe_format(shapes)
        except FormatError as exc:
            raise UserError(
                f"LoRA file {path.name}: {exc}; it is in no format this app knows "
                "(LoRA, LoCon, LoHa, LoKr, DoRA, IA3, full or norm diffs)."
            ) from None
        stat = path.stat()
        sidecar = _read_sidecar(path)
        triggers = sidecar.get("trigger_words") or _trigger_words_from_metadata(metadata)
        return LoraInfo(
            name=path.resolve().relative_to(self.folder.resolve()).with_suffix("").as_posix(),
            path=path.resolve(),
            family=detect_lora_family(metadata, shapes),
            layout=KOHYA if any(k.startswith("lora_") for k in shapes) else DIFFUSERS,
            trigger_words=tuple(triggers),
            description=sidecar.get("description") or metadata.get("modelspec.description", ""),
            size_bytes=stat.st_size,
            mtime=stat.st_mtime,
            metadata=metadata,
            format=label,
            weight_patches=patches,
        )


def describe_format(shapes: dict[str, tuple[int, ...]]) -> tuple[str, bool]:
    """(format label, needs weight patches). Only kohya-layout files can hold LyCORIS modules."""
    if any(key.startswith(KOHYA_PREFIXES) for key in shapes):
        return file_format(shapes)
    # diffusers/peft layout: diffusers' loader reads it, peft's DoRA (lora_magnitude_vector) included.
    return (DORA if any("lora_magnitude_vector" in key for key in shapes) else LORA), False


def detect_lora_family(metadata: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """SD1 / SD2 / SDXL / FLUX from kohya or modelspec metadata, then from tensor names and shapes."""
    base = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    base = base.lower()
    if "flux" in base or any(_is_flux_lora_key(k) for k in shapes):
        return FLUX
    if _says_sd3(metadata) or any(_is_sd3_lora_key(k) for k in shapes):
        return SD3
    if "xl" in base:
        return SDXL
    if "v2" in base or "sd_v2" in base:
        return SD2
    if "v1" in base:
        return SD1
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in shapes):
        # A second CLIP encoder beside a transformer is SD 3's (Flux's second encoder is T5, which takes no
        # LoRA in diffusers); beside a UNet it is SDXL's.
        return SD3 if any(k.startswith("transformer.") for k in shapes) else SDXL
    for key, shape in shapes.items():
        # The down projection of a cross-attention key reads the text encoder's hidden states
        # (as do a LoHa's w*_b factors and a full diff's columns).
        reads_input = "lora_down" in key or "lora_A" in key or key.endswith(_LYCORIS_READS_INPUT)
        if "attn2" in key and "to_k" in key and reads_input and len(shape) == 2:
            return _CROSS_ATTENTION_DIM.get(shape[1])
    return None


# sd-scripts' ss_base_model_version for SD 3.x (library/sd3_utils.py analyze_state_dict_state: the words it
# appends to modelspec.architecture's "stable-diffusion-3-").
_SD_SCRIPTS_SD3_VERSIONS = {"5-large", "5-medium", "medium"}


def _says_sd3(metadata: dict[str, str]) -> bool:
    """Our exporter writes ``stable-diffusion-v3-…``; sd-scripts ``stable-diffusion-3-5-large/lora``, ``sd3`` tools."""
    architecture = metadata.get("modelspec.architecture", "").lower()
    version = metadata.get("ss_base_model_version", "").strip().lower()
    return (
        "sd3" in architecture
        or "-v3" in architecture
        or architecture.startswith("stable-diffusion-3")
        or "sd3" in version
        or version in _SD_SCRIPTS_SD3_VERSIONS
    )


_LYCORIS_READS_INPUT = (".hada_w1_b", ".hada_w2_b", ".diff")
# Module names only Flux has: kohya (sd-scripts) ``lora_unet_double_blocks_0_…``, diffusers/ai-toolkit
# ``transformer.single_transformer_blocks.0.…``, XLabs ``double_blocks.0.processor…`` and ComfyUI
# ``diffusion_model.double_blocks.0.…`` (SD 3.5 has ``transformer_blocks`` but no single blocks).
_FLUX_LORA_MARKERS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "double_blocks.", "single_blocks.")


def _is_sd3_lora_key(key: str) -> bool:
    """SD 3.x in Stability's names (kohya ``lora_unet_joint_blocks_0_…``, ComfyUI ``diffusion_model.joint_blocks.``).

    diffusers' SD 3 layout (``transformer.transformer_blocks.…``) names the same modules as Flux's double
    blocks: such a file says no family, and one made for the other model fails on its shapes when loaded.
    """
    return key.removeprefix("diffusion_model.").startswith(("lora_unet_joint_blocks_", "joint_blocks."))


def _is_flux_lora_key(key: str) -> bool:
    key = key.removeprefix("diffusion_model.").removeprefix("transformer.")
    return key.startswith(_FLUX_LORA_MARKERS) or key.startswith("single_transformer_blocks.")


def _trigger_words_from_metadata(metadata: dict[str, str]) -> list[str]:
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        return [w.strip() for w in phrase.split(",") if w.strip()]
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        per_folder = json.loads(raw)
        counts: Counter[str] = Counter()
        for tags in per_folder.values():
            counts.update({tag.strip(): int(n) for tag, n in tags.items()})
    except (ValueError, AttributeError, TypeError):
        return []
    if not counts:
        return []
    # Trigger words appear in (nearly) every caption: keep the tags that tie the top count.
    top = counts.most_common(1)[0][1]
    return [tag for tag, n in counts.most_common(3) if n == top and tag]


def _read_sidecar(path: Path) -> dict:
    """Trigger words and a description from files other tools write next to a LoRA.

    ``NAME.json`` (AUTOMATIC1111: "activation text", "description"; ours: "trigger_words"),
    ``NAME.civitai.info`` (civitai helper: "trainedWords") or ``NAME.txt`` (one line of words).
    """
    result: dict = {}
    for candidate in (path.with_suffix(".json"), path.with_suffix(".civitai.info")):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.warning("ignoring unreadable sidecar %s", candidate)
                continue
            words = data.get("trigger_words") or data.get("trainedWords") or data.get("activation text") or []
            if isinstance(words, str):
                words = words.split(",")
            if not isinstance(words, list):
                words = []  # a number or an object where a list belongs: a sidecar written by hand
            # Items may be numbers in hand-written files: every word is text from here on.
            result.setdefault("trigger_words", [str(w).strip() for w in words if str(w).strip()])
            if isinstance(data.get("description"), str):
                result.setdefault("description", data["description"])
    text_file = path.with_suffix(".txt")
    if "trigger_words" not in result and text_file.is_file():
        words = text_file.read_text(encoding="utf-8", errors="replace").split(",")
        result["trigger_words"] = [w.strip() for w in words if w.strip()]
    return result
