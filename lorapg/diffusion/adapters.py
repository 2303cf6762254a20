"""LoRA adapters attached to one loaded pipeline.

Each LoRA file is read once and kept as a named peft adapter inside the pipeline; changing the
selection or the scales afterwards is ``set_adapters`` (milliseconds), with no file I/O and no
base-model reload. A file that changes on disk (same name, new mtime/size) is read again. The
active selection is then fused into the weights (``lora_fusing``), so it costs nothing per step.

Files diffusers cannot load as they are meant (LoHa, LoKr, Tucker LoCon, DoRA, IA3, full and norm diffs:
``LoraInfo.weight_patches``) are weight patches instead (``weight_patches``), added after the peft
selection is fused and removed before anything changes; both kinds mix freely in one selection.

In compile mode (``patch_everything``) every file is a weight patch: peft wrappers would change the
compiled UNet's structure and recompile it (``compile_mode`` says why).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

from diffusers import DiffusionPipeline

from lorapg.diffusion.compile_mode import LayoutError, diffusers_lora_as_kohya
from lorapg.diffusion.families import family_label, is_transformer_family
from lorapg.diffusion.lora_fusing import LoraFuser
from lorapg.diffusion.lora_layouts import left_out_warning, readable_lora
from lorapg.diffusion.lora_library import KOHYA, LoraInfo
from lorapg.diffusion.lora_parts import UnsupportedPart
from lorapg.diffusion.lycoris import REFUSED_KINDS, FormatError
from lorapg.diffusion.weight_patches import WeightPatches
from lorapg.errors import UserError
from lorapg.limits import LORA_SCALE

log = logging.getLogger(__name__)

MIN_SCALE, MAX_SCALE = float(LORA_SCALE.minimum), float(LORA_SCALE.maximum)  # the range lives in lorapg.limits


@dataclass(frozen=True)
class LoraSelection:
    info: LoraInfo
    scale: float


def check_scale(name: str, scale: float) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise UserError(f"LoRA {name}: scale {scale!r} is not a number.") from None
    if not MIN_SCALE <= value <= MAX_SCALE:
        raise UserError(f"LoRA {name}: scale {value:g} is outside {MIN_SCALE:g}–{MAX_SCALE:g}.")
    return value


class AdapterSet:
    """The adapters loaded into ``pipe``, keyed by file identity."""

    def __init__(self, pipe: DiffusionPipeline, family: str, *, patch_everything: bool = False):
        self.pipe = pipe
        self.family = family
        self.patch_everything = patch_everything  # compile mode: no file ever becomes a peft adapter
        self._loaded: dict[str, tuple[float, int]] = {}  # adapter name -> (mtime, size) when read
        self._left_out: dict[str, str] = {}  # adapter name -> the warning naming the modules it lacks
        self.files_read = 0  # how many LoRA files were read into this pipeline (tests check this)
        self._disabled = False  # True after disable_lora(): no LoRA was selected last time
        self.fuser = LoraFuser(pipe)  # the active selection lives in the weights: no per-step cost
        self.patches = WeightPatches(pipe)  # LyCORIS/DoRA/diff files: added to the weights, never per step

    def activate(self, selections: list[LoraSelection]) -> None:
        """Load what is new, then make exactly ``selections`` active at their scales."""
        key = selection_key(selections)
        if self.fuser.holds(key):
            return  # the weights already hold exactly this selection (its patches included)
        plain = [s for s in selections if not self._as_patch(s.info)]
        patched = [s for s in selections if self._as_patch(s.info)]
        # Loading, deleting or re-scaling adapters must see the base weights: unfused and unpatched
        # (the fuser's and the patches' CPU copies are then copies of the base weights).
        self.fuser.unfuse()
        self.patches.remove()
        try:
            for selection in patched:
                self._ensure_patch_file(selection.info)
            self._apply(plain)
            if self.fuser.should_fuse(key):
                self.fuser.fuse(key, [adapter_name(s.info) for s in plain])
            self._apply_patches(key, patched)
        except BaseException:
            # Whatever failed half-way (a bad file, out of memory while adding a delta), the weights go
            # back to the base and nothing claims to hold this selection: the next call starts afresh
            # instead of returning early with an image that silently lacks a LoRA.
            self.fuser.unfuse()
            self.patches.remove()
            raise

    def warnings(self, selections: list[LoraSelection]) -> list[str]:
        """One line per selected LoRA (at a scale other than 0) that loaded with modules left out."""
        return [self._left_out[n] for s in selections if s.scale and (n := adapter_name(s.info)) in self._left_out]

    def computes_deltas(self, selections: list[LoraSelection]) -> bool:
        """True when ``activate(selections)`` would compute LoRA deltas into weights (fuse or patch): that
        arithmetic rounds differently on each device, so the caller runs it where the weights run."""
        return bool(selections) and not self.fuser.holds(selection_key(selections))

    def _as_patch(self, info: LoraInfo) -> bool:
        return info.weight_patches or self.patch_everything

    def _apply_patches(self, key: tuple, patched: list[LoraSelection]) -> None:
        if not patched:
            return
        try:
            self.patches.apply(key, [(adapter_name(s.info), s.scale) for s in patched])
        except FormatError as exc:
            # No weight was changed; nothing may claim to hold this selection, so the next call retries.
            self.fuser.unfuse()
            raise UserError(f"LoRA {exc}. It was probably made for another base model.") from None

    def _ensure_patch_file(self, info: LoraInfo) -> None:
        name = adapter_name(info)
        stamp = (info.mtime, info.size_bytes)
        if self.patches.is_loaded(name, stamp):
            return
        if info.format in REFUSED_KINDS.values():
            raise UserError(
                f"LoRA {info.name} is in the {info.format} format, which this app cannot apply yet. "
                "Use a LoRA, LoCon, LoHa, LoKr, DoRA, IA3 or diff version of it."
            )
        self._check_family(info)
        if is_transformer_family(self.family):
            # Weight patches find layers by the UNet's kohya names; Flux/SD 3.5 transformers have none.
            raise UserError(
                f"LoRA {info.name} is a {info.format} file; LyCORIS and DoRA formats are not supported for "
                f"{family_label(self.family)} yet: use a plain LoRA version of it."
            )
        _check_present(info)
        try:
            self.patches.load(name, info.name, str(info.path), stamp, state=self._renamed_state(info))
        except LayoutError as exc:
            raise UserError(f"LoRA {info.name} cannot be used with --compile: {exc}.") from None
        except FormatError as exc:
            raise UserError(
                f"LoRA {info.name} does not fit the loaded {family_label(self.family)} model ({exc}). "
                "It was probably made for another base model."
            ) from None
        except Exception as exc:  # safetensors raises several types for a file cut short or replaced
            self.patches.forget(name)
            raise UserError(f"LoRA file {info.name} could not be read ({_first_line(exc)}).") from None
        self.files_read += 1

    def _apply(self, selections: list[LoraSelection]) -> None:
        for selection in selections:
            self._ensure_loaded(selection.info)
        if not selections:
            if self._loaded and not self._disabled:
                self.pipe.disable_lora()
                self._disabled = True
            return
        if self._disabled:  # walks every layer of the pipeline: only when needed
            self.pipe.enable_lora()
            self._disabled = False
        self.pipe.set_adapters(
            [adapter_name(s.info) for s in selections], adapter_weights=[s.scale for s in selections]
        )

    def _renamed_state(self, info: LoraInfo) -> dict | None:
        """A diffusers-layout file renamed to kohya's layout (compile mode); None: patches read the file."""
        if info.layout == KOHYA:
            return None
        return diffusers_lora_as_kohya(self.pipe, str(info.path))

    def _ensure_loaded(self, info: LoraInfo) -> None:
        name = adapter_name(info)
        stamp = (info.mtime, info.size_bytes)
        if self._loaded.get(name) == stamp:
            return
        self.fuser.adapters_changed()
        if name in self._loaded:
            self.pipe.delete_adapters(name)
            del self._loaded[name]
        self._left_out.pop(name, None)
        self._check_family(info)
        _check_present(info)
        try:
            # SD 3 kohya/ComfyUI names and some Flux spellings are renamed first (lora_layouts).
            readable = readable_lora(self.pipe, self.family, info.path, info.name)
            self.pipe.load_lora_weights(readable.source, adapter_name=name)
        except UserError:  # the file could not be read
            self._discard(name)
            raise
        except UnsupportedPart as exc:  # a DoRA magnitude, bias… the renaming cannot carry
            self._discard(name)
            raise UserError(f"LoRA {info.name}: {exc}.") from None
        except Exception as exc:  # shape mismatches and unknown key layouts surface as many types
            self._discard(name)
            raise UserError(
                f"LoRA {info.name} does not fit the loaded {family_label(self.family)} model "
                f"({_first_line(exc)}). It was probably made for another base model."
            ) from None
        if not any(name in names for names in self.pipe.get_list_adapters().values()):
            self._discard(name)  # else a retry finds the name taken ("adapter name already in use")
            raise UserError(f"LoRA {info.name}: none of its layers match the loaded {family_label(self.family)} model.")
        self._loaded[name] = stamp
        if readable.left_out:
            self._left_out[name] = left_out_warning(info.name, readable.left_out)
        self.files_read += 1
        log.info("loaded LoRA %s as adapter %s", info.name, name)

    def _check_family(self, info: LoraInfo) -> None:
        if info.family and info.family != self.family:
            raise UserError(
                f"LoRA {info.name} was made for {family_label(info.family)}, but the loaded base model is "
                f"{family_label(self.family)}. Pick a {family_label(self.family)} LoRA or switch the base model."
            )

    def _discard(self, name: str) -> None:
        try:
            self.pipe.delete_adapters(name)
        except Exception:  # a half-injected adapter may not be registered everywhere; nothing to undo
            log.debug("no adapter %s to discard", name)


def selection_key(selections: list[LoraSelection]) -> tuple:
    """What makes two selections the same: the files (as read: mtime, size) and their scales."""
    return tuple((adapter_name(s.info), s.info.mtime, s.info.size_bytes, s.scale) for s in selections)


def adapter_name(info: LoraInfo) -> str:
    """peft adapter names become module attribute keys: letters, digits and underscores only.

    A short hash of the library name keeps ``a-b`` and ``a_b`` (or ``sub/x`` and ``sub_x``) apart.
    """
    digest = hashlib.sha1(info.name.encode("utf-8")).hexdigest()[:8]
    readable = re.sub(r"\W", "_", info.name)
    return f"lora_{readable}_{digest}"


def _check_present(info: LoraInfo) -> None:
    """A file renamed, deleted or moved to the trash since the request was checked (the LoRA manager)."""
    if not info.path.is_file():
        raise UserError(f"LoRA {info.name} is no longer in the LoRA folder (renamed or deleted?). Refresh the list.")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
