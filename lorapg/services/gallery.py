"""The gallery as the UI and the CLI see it: list, show, star, delete, read any PNG, reuse.

Never imports gradio. Every method returns plain data or raises ``UserError``.

LoRAs named in a PNG are matched to local files so an image made elsewhere (or before a file was
renamed) can be made again: an exact file hash wins over a name, because the same name can hold a
different version of a LoRA, while the same hash is the same weights. A LoRA that matches nothing
is reported by name, never silently dropped.

Visitors: every method takes the ``owner`` asking (None where visitors are not kept apart). An
owner sees and reuses only their own images, unless the gallery is ``shared``; star and delete
touch only their own images either way. Another visitor's image looks exactly like a missing one.

Importing diffusers takes seconds, so the sampler and scale limits are imported only when
parameters are reused; ``python -m lorapg gallery list`` stays quick.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lorapg.config import Settings
from lorapg.diffusion.lora_library import LoraInfo, LoraLibrary
from lorapg.errors import UserError
from lorapg.gallery.a1111 import ParsedParameters, parse_parameters
from lorapg.gallery.png import read_png_parameters
from lorapg.gallery.records import (
    ControlNetUse,
    HiresUse,
    ImageRecord,
    Img2ImgUse,
    attachment_path,
    check_image_id,
    control_attachment,
    strip_lora_tags,
)
from lorapg.gallery.store import GalleryStore
from lorapg.hashing import lora_hash
from lorapg.limits import BATCH_SIZE

if TYPE_CHECKING:
    from lorapg.diffusion.request import GenerationRequest

log = logging.getLogger(__name__)

NO_PARAMETERS = "This PNG has no generation parameters."
# "Vary": A1111 users vary an image at 0.1-0.3 (the same composition, other details); 0.2 sits in the
# middle. A batch of the most images one generation makes (BATCH_SIZE.maximum).
VARY_STRENGTH = 0.2
VARY_COUNT = int(BATCH_SIZE.maximum)
BY_NAME, BY_HASH = "name", "hash"

# Sampler names other tools write (Fooocus and ComfyUI use k-diffusion ids) -> ours.
_SAMPLER_ALIASES = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "euler ancestral": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "ddim": "DDIM",
    "uni_pc": "UniPC",
    "uni_pc_bh2": "UniPC",
    "heun": "Heun",
    "lms": "LMS",
}


@dataclass(frozen=True)
class LoraMatch:
    """One LoRA named in a PNG or a gallery record, and the local file it maps to (if any)."""

    name: str  # as written in the PNG / record
    scale: float
    file_hash: str | None = None  # as written ("Lora hashes"), lower-case hex
    local_name: str | None = None  # library name of the matching file; None: missing here
    matched_by: str | None = None  # BY_NAME or BY_HASH
    note: str = ""  # e.g. "same name, different file"

    @property
    def missing(self) -> bool:
        return self.local_name is None


@dataclass(frozen=True)
class PngInfo:
    """What a PNG says about how it was made, with its LoRAs matched to local files."""

    text: str | None  # the raw ``parameters`` text; None when the PNG has none
    parsed: ParsedParameters
    loras: list[LoraMatch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def has_parameters(self) -> bool:
        return self.text is not None

    @property
    def missing_loras(self) -> list[str]:
        return [lora.name for lora in self.loras if lora.missing]


@dataclass(frozen=True)
class ReuseParameters:
    """Everything the Generate tab needs to make an image again; None leaves a widget as it is."""

    prompt: str
    negative_prompt: str = ""
    loras: list[tuple[str, float]] = field(default_factory=list)  # (local library name, scale)
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    model_name: str | None = None
    model_hash: str | None = None
    clip_skip: int = 1  # A1111 writes "Clip skip" only when it is over 1, so a PNG without it means 1
    # A1111 writes the variation only when its strength is over 0: a PNG without it means strength 0
    # (which resets a Generate tab left at another strength); the seed stays as it is then.
    variation_seed: int | None = None
    variation_strength: float = 0.0
    missing_loras: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be carried over, and why
    img2img: Img2ImgUse | None = None  # None: txt2img
    hires: HiresUse | None = None  # None: no hires fix
    init_image: Path | None = None  # the img2img result's init image and mask, kept beside it
    mask_image: Path | None = None
    controlnet: list[ControlNetUse] = field(default_factory=list)  # empty: no ControlNet
    control_images: list[Path | None] = field(default_factory=list)  # each unit's image kept beside the result

    def to_request(self, batch_size: int = 1) -> GenerationRequest:
        """The request that makes the image again (fields that were unknown take the defaults)."""
        from lorapg.diffusion.request import GenerationRequest, LoraRequest

        given = {
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "clip_skip": self.clip_skip,
            "variation_seed": self.variation_seed,
            "variation_strength": self.variation_strength,
        }
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            loras=tuple(LoraRequest(name, scale) for name, scale in self.loras),
            batch_size=batch_size,
            img2img=self.img2img_options(),
            hires=self.hires_options(),
            controlnet=self.control_units(),
            # Unknown (None, e.g. a Flux schnell record has no CFG): the job fills in the loaded family's
            # defaults (GenerationService.with_defaults), not GenerationRequest's SD ones.
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            sampler=self.sampler,
            **{key: value for key, value in given.items() if value is not None},
        )

    def control_units(self) -> tuple:
        """The ControlNet units whose image is still beside the result (a PNG alone has none: see ``notes``)."""
        from lorapg.diffusion.controlnet import ControlUnit, check_control_resize_mode

        units = []
        for index, use in enumerate(self.controlnet):
            image = self.control_images[index] if index < len(self.control_images) else None
            if image is None:
                continue
            thresholds = {"threshold_a": use.threshold_a, "threshold_b": use.threshold_b}
            units.append(
                ControlUnit(
                    model=use.model,
                    image=image,
                    module=use.module,
                    weight=use.weight,
                    guidance_start=use.guidance_start,
                    guidance_end=use.guidance_end,
                    resize_mode=check_control_resize_mode(f"ControlNet unit {index} resize mode", use.resize_mode),
                    **{key: value for key, value in thresholds.items() if value is not None},
                )
            )
        return tuple(units)

    def controlnet_form(self) -> dict:
        """The Generate tab's ControlNet fields (its one unit: the first restorable one); "None" without."""
        from lorapg.limits import CONTROL_RESIZE_MODES

        units = self.control_units()
        if not units:
            return {"controlnet_model": "None", "controlnet_image": None}
        unit = units[0]
        return {
            "controlnet_model": unit.model,
            "controlnet_image": str(unit.image),
            "controlnet_module": unit.module,
            "controlnet_weight": unit.weight,
            "controlnet_guidance_start": unit.guidance_start,
            "controlnet_guidance_end": unit.guidance_end,
            "controlnet_resize_mode": CONTROL_RESIZE_MODES[unit.resize_mode],
            "controlnet_threshold_a": unit.threshold_a,
            "controlnet_threshold_b": unit.threshold_b,
        }

    def form_notes(self) -> list[str]:
        """What the Generate tab's form cannot hold of these settings (``to_request``, the API's, keeps
        it all): a ControlNet unit after the first (the form has one), a hires target size that its
        factor does not give."""
        notes = []
        units = self.control_units()
        if len(units) > 1:
            notes.append(
                f"ControlNet: this image used {len(units)} units; the Generate form holds the first only, "
                "make it through the API (/sdapi/v1/txt2img) to use them all."
            )
        return notes + self._hires_size_notes()

    def _hires_size_notes(self) -> list[str]:
        from lorapg.diffusion.hires import HiresOptions, target_size

        options = self.hires_options()
        if options is None or not (options.resize_x or options.resize_y) or not (self.width and self.height):
            return []
        made = target_size(options, self.width, self.height)
        by_factor = target_size(HiresOptions(scale=self.hires_form()["hr_scale"]), self.width, self.height)
        if made == by_factor:
            return []
        return [
            f"Hires fix: this image was upscaled to {made[0]}×{made[1]}; the Generate form's factor gives "
            f"{by_factor[0]}×{by_factor[1]}, make it through the API (hr_resize_x, hr_resize_y) for the same size."
        ]

    def hires_options(self):
        """The request's hires options (None: no hires fix); fields the text left out take the defaults."""
        from lorapg.diffusion.hires import HiresOptions

        use = self.hires
        if use is None:
            return None
        given = {"scale": use.scale, "strength": use.denoising_strength}
        return HiresOptions(
            resize_x=use.resize_x,
            resize_y=use.resize_y,
            steps=use.steps,
            upscaler=use.upscaler,
            **{key: value for key, value in given.items() if value is not None},
        )

    def hires_form(self) -> dict:
        """The Generate tab's hires fields (A1111's API names); a target size as the factor it means here."""
        options = self.hires_options()
        if options is None:
            return {"enable_hr": False}
        scale = options.scale
        if (options.resize_x or options.resize_y) and self.width and self.height:
            scale = max(options.resize_x / self.width, options.resize_y / self.height)
        return {
            "enable_hr": True,
            "hr_upscaler": options.upscaler,
            "hr_scale": scale,
            "hr_second_pass_steps": options.steps,
            "hr_denoising_strength": options.strength,
        }

    def img2img_form(self) -> dict:
        """The Generate tab's img2img fields (``Img2ImgOptions``' names); empty for txt2img.

        Every setting comes back, inpainting's too, and each image that is still here: without its
        init image (a PNG alone holds none) or its mask, that field is None and ``notes`` says what to
        put in; the other image and the settings stay, so the form makes it as written once it is."""
        if self.img2img is None:
            return {}
        # Masked by what was written (A1111 writes "Mask blur" only for inpainting), not by which files
        # are left: a lost mask must not turn the form's inpainting settings into plain img2img.
        masked = self.img2img.mask_blur is not None
        options = _img2img_options(self.img2img, self.init_image, self.mask_image, masked=masked)
        return {item.name: getattr(options, item.name) for item in fields(options)}

    def img2img_options(self):
        """The request's img2img options (None without an init image: txt2img)."""
        if self.img2img is None or self.init_image is None:
            return None
        return _img2img_options(self.img2img, self.init_image, self.mask_image, masked=self.mask_image is not None)


def _img2img_options(use: Img2ImgUse, image: Path | None, mask: Path | None, *, masked: bool):
    """The options ``use`` describes; ``masked``: with its inpainting fields (the request: a mask was written
    and is here; the form: a mask was written)."""
    from lorapg.diffusion.img2img import FILL, ORIGINAL, Img2ImgOptions

    options = Img2ImgOptions(image=image, strength=use.denoising_strength, resize_mode=use.resize_mode)
    if not masked or use.mask_blur is None:
        return options
    return replace(
        options,
        mask=mask,
        mask_blur=use.mask_blur,
        inpainting_fill=FILL if use.masked_content == "fill" else ORIGINAL,
        only_masked=use.only_masked,
        only_masked_padding=options.only_masked_padding if use.only_masked_padding is None else use.only_masked_padding,
    )


@dataclass(frozen=True)
class ReuseBody:
    """A gallery image's settings as the request that makes it again, its kept images as bytes (the
    API sends them whole), the model it was made with, and what Reuse had to note."""

    request: GenerationRequest  # image fields hold bytes (never paths): nothing is read after this
    model_name: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VariationsPlan:
    """What "Vary" on a gallery image makes: the request (a batch) and what Reuse had to note."""

    request: GenerationRequest
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImageDetails:
    """One gallery image with the A1111 text inside its PNG (what other tools will read)."""

    record: ImageRecord
    parameters: str


class GalleryService:
    def __init__(
        self,
        store: GalleryStore,
        library: LoraLibrary,
        *,
        shared: bool = False,
        max_query_chars: int = Settings.max_prompt_chars,
        upscaler_models: Callable[[], list[str]] | None = None,
    ):
        """``upscaler_models``: the names of the upscaler model files now in models/upscalers, so Reuse
        keeps a "Hires upscaler" that names one (None: no models; such a name falls back to Latent)."""
        self.store = store
        self.library = library
        self.shared = shared
        self.upscaler_models = upscaler_models
        # A search is prompt words, so the prompt's limit (Settings.max_prompt_chars) applies.
        self.max_query_chars = max_query_chars

    # --- the gallery -------------------------------------------------------------------------

    def _seen_by(self, owner: str | None) -> str | None:
        """The owner filter for looking: none in a shared gallery."""
        return None if self.shared else owner

    def list(
        self,
        query: str | None = None,
        lora: str | None = None,
        limit: int | None = 200,
        owner: str | None = None,
        *,
        starred: bool | None = None,
        offset: int = 0,
    ) -> list[ImageRecord]:
        """Newest first; ``query`` words must all appear in the prompt, ``lora`` must be used;
        ``starred`` True/False keeps only starred/unstarred images; ``offset`` skips the newest."""
        self._check_filter("Prompt words", query)
        self._check_filter("LoRA", lora)
        return self.store.list(
            query=query, lora=lora, limit=limit, owner=self._seen_by(owner), starred=starred, offset=offset
        )

    def _check_filter(self, label: str, text: object) -> None:
        if text is not None and not isinstance(text, str):
            raise UserError(f"{label}: the search must be text, got {type(text).__name__}.")
        if text and self.max_query_chars > 0 and len(text) > self.max_query_chars:
            raise UserError(
                f"{label}: the search is {len(text)} characters, over the limit of "
                f"{self.max_query_chars} (max_prompt_chars); shorten it."
            )

    def get(self, image_id: int | str, owner: str | None = None) -> ImageRecord:
        image_id = self._check_id(image_id)
        try:
            return self.store.get(image_id, owner=self._seen_by(owner))
        except UserError:
            raise _missing(image_id) from None

    def delete(self, image_id: int | str, owner: str | None = None) -> None:
        image_id = self._check_id(image_id)
        try:
            self.store.delete(image_id, owner=owner)
        except UserError:
            raise self._not_yours(image_id, owner) from None
        log.info("gallery: deleted image #%d", image_id)

    def star(self, image_id: int | str, starred: bool = True, owner: str | None = None) -> ImageRecord:
        image_id = self._check_id(image_id)
        try:
            return self.store.set_starred(image_id, starred, owner=owner)
        except UserError:
            raise self._not_yours(image_id, owner) from None

    def _not_yours(self, image_id: int, owner: str | None) -> UserError:
        # In a shared gallery the visitor sees the image, so "missing" would be a lie.
        if self.shared and owner is not None and self._exists(image_id):
            return UserError(f"Image #{image_id} was made by another visitor; only they can change it.")
        return _missing(image_id)

    def _exists(self, image_id: int) -> bool:
        try:
            self.store.get(image_id)
        except UserError:
            return False
        return True

    def toggle_star(self, image_id: int | str, owner: str | None = None) -> ImageRecord:
        """Star an unstarred image, unstar a starred one (the Gallery tab's one button), in one
        transaction: clients toggling at once must each flip it, not both set the same value."""
        image_id = self._check_id(image_id)
        try:
            return self.store.toggle_starred(image_id, owner=owner)
        except UserError:
            raise self._not_yours(image_id, owner) from None

    def image_path(self, image_id: int | str, owner: str | None = None) -> Path:
        """The PNG file of a gallery image (served as is: its metadata chunk stays in it)."""
        return _file_of(self.get(image_id, owner))

    def show(self, image_id: int | str, owner: str | None = None) -> ImageDetails:
        """The record and the A1111 text read back from its PNG file."""
        record = self.get(image_id, owner)
        return ImageDetails(record, read_png_parameters(_file_of(record)) or NO_PARAMETERS)

    def export(self, folder: str | os.PathLike[str], query: str | None = None, lora: str | None = None) -> list[Path]:
        """Copy the (filtered) gallery's PNGs into ``folder``, byte for byte so other tools still
        read their parameters; return the new files, newest first."""
        target = Path(folder)
        if target.exists() and not target.is_dir():
            raise UserError(f"{target} is a file; give a folder to export into.")
        target.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for record in self.store.list(query=query, lora=lora, limit=None):
            if record.path is None or not record.path.is_file():
                log.warning("gallery export: the file of image #%s is missing; skipped", record.id)
                continue
            destination = target / f"{record.id:05d}-{record.seed if record.seed is not None else 'noseed'}.png"
            shutil.copyfile(record.path, destination)
            written.append(destination)
        return written

    def lora_names(self, owner: str | None = None) -> list[str]:
        """Names of the LoRAs used by images in the gallery (for the LoRA filter)."""
        names = {lora.name for record in self.list(limit=None, owner=owner) for lora in record.loras}
        return sorted(names, key=str.casefold)

    @staticmethod
    def _check_id(image_id: object) -> int:
        """Ids come from widgets and the command line as floats and strings."""
        return check_image_id(image_id)

    # --- PNG info ----------------------------------------------------------------------------

    def png_info(self, source: str | os.PathLike[str] | bytes) -> PngInfo:
        """Read any PNG (ours, A1111, Forge, Fooocus). UserError for non-PNG or damaged files."""
        if source is None or source == b"" or source == "":
            raise UserError("No file given; drop a PNG here.")
        text = read_png_parameters(source)
        if text is None:
            return PngInfo(None, ParsedParameters(), problems=[NO_PARAMETERS])
        parsed = parse_parameters(text)
        loras = self.match_loras([(name, scale, parsed.lora_hashes.get(name)) for name, scale in parsed.loras])
        return PngInfo(text, parsed, loras, list(parsed.problems))

    def match_loras(self, wanted: list[tuple[str, float, str | None]]) -> list[LoraMatch]:
        """Match (name, scale, hash) triples to local files: exact hash first, then name."""
        infos, _ = self.library.scan()
        hash_index = self._hash_index(infos) if any(h for _, _, h in wanted) else {}
        return [self._match_one(name, scale, file_hash, infos, hash_index) for name, scale, file_hash in wanted]

    def _match_one(
        self, name: str, scale: float, file_hash: str | None, infos: list[LoraInfo], hash_index: dict[str, str]
    ) -> LoraMatch:
        file_hash = file_hash.lower() if file_hash else None
        by_name = _find_by_name(name, infos)
        # A1111's 12-hex hash; Fooocus writes a full SHA-256 of the file, which we cannot compare.
        by_hash = hash_index.get(file_hash[:12]) if file_hash and len(file_hash) == 12 else None
        if by_hash is not None and (by_name is None or by_name.name != by_hash):
            return LoraMatch(name, scale, file_hash, by_hash, BY_HASH)
        if by_name is not None:
            note = ""
            if file_hash and len(file_hash) == 12 and self._hash_of(by_name.path) != file_hash:
                note = "Its file hash differs from the one in the PNG: a different version, so the image may differ."
            return LoraMatch(name, scale, file_hash, by_name.name, BY_NAME, note)
        return LoraMatch(name, scale, file_hash)

    def _hash_of(self, path: Path) -> str | None:
        # lorapg.hashing holds the one hash cache (per file version); nothing is cached here.
        try:
            return lora_hash(path)
        except UserError as exc:
            log.warning("cannot hash LoRA %s: %s", path, exc)
            return None

    def _hash_index(self, infos: list[LoraInfo]) -> dict[str, str]:
        """hash -> library name for every local LoRA (cached per file version)."""
        index: dict[str, str] = {}
        for info in infos:
            value = self._hash_of(info.path)
            if value is not None:
                index.setdefault(value, info.name)
        return index

    # --- reuse -------------------------------------------------------------------------------

    def reuse_parameters(
        self, source: int | str | PngInfo, current_model: str | None = None, owner: str | None = None
    ) -> ReuseParameters:
        """The Generate tab's values for a gallery image (by id) or a PNG read by ``png_info``.

        ``current_model``: the model the Generate tab will use; a different one is noted, since
        the same seed on another model gives another image.
        """
        if isinstance(source, PngInfo):
            if not source.has_parameters:
                raise UserError(NO_PARAMETERS)
            values = _values_from_parsed(source.parsed)
            matches = source.loras
            notes = list(source.problems)
        else:
            record = self.get(source, owner)
            values = _values_from_record(record)
            values.update(_attachments_of(record))
            matches = self.match_loras([(lora.name, lora.scale, lora.file_hash) for lora in record.loras])
            notes = []
        loras, lora_notes = _local_loras(matches)
        loras, scale_notes = _scales_within_limits(loras)
        lora_notes += scale_notes
        sampler, sampler_note = map_sampler(values.pop("sampler"))
        models = self.upscaler_models() if self.upscaler_models is not None else []
        values, limit_notes = _within_limits(values, models)
        notes += lora_notes + sampler_note + limit_notes
        notes += _model_note(values.get("model_name"), current_model)
        return ReuseParameters(
            loras=loras,
            sampler=sampler,
            missing_loras=[m.name for m in matches if m.missing],
            notes=notes,
            **values,
        )

    def reuse_body(
        self,
        image_id: int | str,
        current_model: str | None = None,
        owner: str | None = None,
        *,
        max_bytes: int | None = None,
    ) -> ReuseBody:
        """What the API's Reuse replies: the request that makes gallery image ``image_id`` again, its
        kept images read. ``max_bytes``: what one upload may be (None: no limit); a body whose images
        base64'd are larger could not be sent back, so it is refused (``ReuseTooLarge``) unread.
        Without its init image the request would make an unrelated txt2img image: ``InitImageNotKept``."""
        params = self.reuse_parameters(image_id, current_model=current_model, owner=owner)
        _check_init_image(image_id, params)
        files = _kept_files(params)
        _check_reply_size(image_id, files, max_bytes)
        data, params = _read_kept(params, files)
        _check_init_image(image_id, params)  # it may have gone while it was read
        return ReuseBody(_with_image_bytes(params.to_request(), data), params.model_name, list(params.notes))

    def variations_request(
        self,
        image_id: int | str,
        current_model: str | None = None,
        owner: str | None = None,
        *,
        count: int = VARY_COUNT,
        strength: float | None = None,
    ) -> VariationsPlan:
        """Vary: a batch of ``count`` variations of a gallery image, as an A1111 user makes them:
        the image's parameters and seed, random variation seeds (one for the batch, + i per image),
        and a moderate strength (``VARY_STRENGTH``) that keeps the composition and changes details.

        An image that is itself a variation gives its siblings: its seed and its own strength with new
        variation seeds (A1111 cannot express a variation of a variation either).
        """
        params = self.reuse_parameters(image_id, current_model=current_model, owner=owner)
        if params.seed is None:
            raise UserError(f"Image #{image_id} has no seed in its parameters; Vary needs the seed of the image.")
        chosen = strength if strength is not None else (params.variation_strength or VARY_STRENGTH)
        request = replace(params.to_request(batch_size=count), variation_seed=None, variation_strength=chosen)
        return VariationsPlan(request, list(params.notes))


# --- helpers -------------------------------------------------------------------------------


class ImageNotFound(UserError):
    """No such image (or not this visitor's): the REST API answers 404 for it, others a UserError."""


class InitImageNotKept(UserError):
    """An img2img result whose init image is gone: the REST API answers 409 (its body would be txt2img)."""


class ReuseTooLarge(UserError):
    """A Reuse body over the upload limit: the REST API answers 413."""


# Base64 sends 4 characters for every 3 bytes.
BASE64_GROWTH = 4 / 3


def _check_init_image(image_id: int | str, params: ReuseParameters) -> None:
    if params.img2img is not None and params.init_image is None:
        raise InitImageNotKept(
            f"The init image of image {image_id} is not kept (deleted, or the image came from elsewhere); "
            "its img2img settings cannot make it again without one: send POST /api/v1/generations with "
            "your own img2img.init_image."
        )


def _kept_files(params: ReuseParameters) -> dict[str, Path]:
    """The files the request sends, each by the name a message gives it (the units it keeps only)."""
    files: dict[str, Path] = {}
    if params.img2img is not None and params.init_image is not None:
        files["init image"] = params.init_image
        if params.mask_image is not None and params.img2img.mask_blur is not None:
            files["mask"] = params.mask_image
    for index, path in enumerate(params.control_images):
        if path is not None and index < len(params.controlnet):
            files[f"ControlNet unit {index} image"] = path
    return files


def _check_reply_size(image_id: int | str, files: dict[str, Path], max_bytes: int | None) -> None:
    """Refuse, before anything is read, a body whose images base64'd are over ``max_bytes``."""
    if not max_bytes:
        return
    sizes = {}
    for label, path in files.items():
        try:
            sizes[label] = path.stat().st_size
        except OSError:
            sizes[label] = 0  # gone already: _read_kept notes it
    if sum(sizes.values()) * BASE64_GROWTH <= max_bytes:
        return
    listed = ", ".join(f"{label} {size / 2**20:.1f} MB" for label, size in sizes.items() if size)
    raise ReuseTooLarge(
        f"The reuse body of image {image_id} would be over the upload limit of {max_bytes // 2**20} MB "
        f"(setting max_upload_mb) with its images base64'd ({listed}), so it could not be sent back; "
        "reuse it in the UI's gallery, or raise max_upload_mb."
    )


def _read_kept(params: ReuseParameters, files: dict[str, Path]) -> tuple[dict[Path, bytes], ReuseParameters]:
    """Each file's bytes; one that went since it was found (deleted, pruned) is left out as a missing
    one is, with the same note, instead of failing the whole reply."""
    data: dict[Path, bytes] = {}
    for label, path in files.items():
        try:
            data[path] = path.read_bytes()
        except OSError as exc:
            log.info("Reuse: %s %s could not be read (%s); left out", label, path, exc)
            params = _without_file(params, path)
    return data, params


def _without_file(params: ReuseParameters, path: Path) -> ReuseParameters:
    """``params`` as if ``path`` had never been kept, with the note that says so."""
    if path == params.init_image:
        return replace(params, init_image=None)  # the caller refuses an img2img body without it
    if path == params.mask_image:
        note = "Mask: this image was inpainted with a mask that is not here; paint or upload the mask to make it again."
        return replace(params, mask_image=None, notes=[*params.notes, note])
    index = params.control_images.index(path)
    images = [None if kept == path else kept for kept in params.control_images]
    note = f"ControlNet unit {index} ({params.controlnet[index].model}) has no control image here; it was left out."
    return replace(params, control_images=images, notes=[*params.notes, note])


def _with_image_bytes(request: GenerationRequest, data: dict[Path, bytes]) -> GenerationRequest:
    """``request`` with each kept file's path replaced by the bytes read from it."""
    img2img = request.img2img
    if img2img is not None:
        mask = None if img2img.mask is None else data[Path(img2img.mask)]
        img2img = replace(img2img, image=data[Path(img2img.image)], mask=mask)
    units = tuple(replace(unit, image=data[Path(unit.image)]) for unit in request.controlnet)
    return replace(request, img2img=img2img, controlnet=units)


def _file_of(record: ImageRecord) -> Path:
    if record.path is None or not record.path.is_file():
        raise ImageNotFound(f"The file of image #{record.id} is missing; list the gallery again to see what is left.")
    return record.path


def _missing(image_id: int) -> UserError:
    return ImageNotFound(f"No image with id {image_id} in the gallery (it was deleted or pruned).")


def _find_by_name(name: str, infos: list[LoraInfo]) -> LoraInfo | None:
    """Exact library name, then any case, then the file name alone (A1111 tags omit folders)."""
    wanted = name.strip()
    for test in (
        lambda info: info.name == wanted,
        lambda info: info.name.casefold() == wanted.casefold(),
        lambda info: info.path.stem.casefold() == wanted.casefold(),
    ):
        found = [info for info in infos if test(info)]
        if found:
            return found[0]
    return None


def _values_from_record(record: ImageRecord) -> dict:
    return {
        "prompt": record.prompt,
        "negative_prompt": record.negative_prompt,
        "steps": record.steps,
        "guidance_scale": record.guidance_scale,
        "sampler": record.sampler,
        "width": record.width,
        "height": record.height,
        "seed": record.seed,
        "model_name": record.model_name,
        "model_hash": record.model_hash,
        "clip_skip": record.clip_skip or 1,
        **_variation_values(record.variation_seed, record.variation_strength),
        "img2img": record.img2img,
        "hires": record.hires,
        "controlnet": record.controlnet,
    }


def _attachments_of(record: ImageRecord) -> dict:
    """The init image and mask kept beside an img2img result, and each ControlNet unit's image, where they exist."""
    if record.path is None:
        return {}
    found = {}
    if record.controlnet:
        images = [attachment_path(record.path, control_attachment(index)) for index in range(len(record.controlnet))]
        found["control_images"] = [path if path.is_file() else None for path in images]
    if record.img2img is None:
        return found
    kinds = {kind: attachment_path(record.path, kind) for kind in ("init", "mask")}
    return found | {f"{kind}_image": path for kind, path in kinds.items() if path.is_file()}


def _values_from_parsed(parsed: ParsedParameters) -> dict:
    return {
        # The LoRAs go into the LoRA list; left in the prompt they would be applied twice.
        "prompt": strip_lora_tags(parsed.prompt),
        "negative_prompt": parsed.negative_prompt,
        "steps": parsed.steps,
        # Forge's Flux dev text: "Distilled CFG Scale" is the guidance, its "CFG scale: 1" is not.
        "guidance_scale": parsed.guidance_scale if parsed.distilled_guidance is None else parsed.distilled_guidance,
        "sampler": parsed.sampler,
        "width": parsed.width,
        "height": parsed.height,
        "seed": parsed.seed,
        "model_name": parsed.model_name,
        "model_hash": parsed.model_hash,
        "clip_skip": parsed.clip_skip or 1,
        **_variation_values(parsed.variation_seed, parsed.variation_strength),
        "img2img": parsed.img2img,
        "hires": parsed.hires,
        "controlnet": parsed.controlnet,
    }


def _variation_values(seed: int | None, strength: float | None) -> dict:
    """Reuse's variation fields: strength 0 (off) unless both the seed and the strength were written."""
    if seed is None or not strength:
        return {"variation_seed": None, "variation_strength": 0.0}
    return {"variation_seed": seed, "variation_strength": strength}


def _local_loras(matches: list[LoraMatch]) -> tuple[list[tuple[str, float]], list[str]]:
    loras: list[tuple[str, float]] = []
    notes: list[str] = []
    for match in matches:
        if match.missing:
            notes.append(f"LoRA {match.name} is not in your LoRA folder; it was left out.")
        elif any(name == match.local_name for name, _ in loras):
            notes.append(f"LoRA {match.name} is listed twice; the first scale was kept.")
        else:
            loras.append((match.local_name, match.scale))
            if match.note:
                notes.append(f"LoRA {match.name}: {match.note}")
    return loras, notes


def map_sampler(name: str | None) -> tuple[str | None, list[str]]:
    """Our sampler for a name another tool wrote; an unknown one keeps our default, with a note."""
    from lorapg.diffusion.samplers import DEFAULT_SAMPLER, FLOW_SAMPLERS, SAMPLERS

    if not name:
        return None, []
    if name in SAMPLERS or name in FLOW_SAMPLERS:
        return name, []
    by_fold = {known.casefold(): known for known in SAMPLERS}
    folded = name.strip().casefold()
    karras = folded.endswith(" karras")
    base = folded.removesuffix(" karras")
    alias = _SAMPLER_ALIASES.get(base)
    candidate = (alias + (" Karras" if karras else "")) if alias else None
    for found in (by_fold.get(folded), candidate if candidate in SAMPLERS else None):
        if found:
            return found, []
    return DEFAULT_SAMPLER, [f"Sampler {name!r} is not available here; {DEFAULT_SAMPLER} is used instead."]


def _within_limits(values: dict, upscaler_models: Sequence[str] = ()) -> tuple[dict, list[str]]:
    """Clamp what the Generate tab cannot take (e.g. 150 steps from another tool), with a note.
    ``upscaler_models``: the upscaler model names a hires fix may name here."""
    from lorapg.diffusion.request import MAX_SEED, MAX_SIZE, MAX_STEPS, MIN_SIZE, MIN_STEPS
    from lorapg.limits import CFG_SCALE

    notes: list[str] = []
    steps = values.get("steps")
    if steps is not None and not MIN_STEPS <= steps <= MAX_STEPS:
        values["steps"] = min(max(steps, MIN_STEPS), MAX_STEPS)
        notes.append(f"Steps {steps} is outside {MIN_STEPS}–{MAX_STEPS}; {values['steps']} is used.")
    cfg = values.get("guidance_scale")
    if cfg is not None and cfg not in CFG_SCALE:
        values["guidance_scale"] = CFG_SCALE.clamp(cfg)
        notes.append(f"CFG scale {cfg:g} is outside {CFG_SCALE.describe()}; {values['guidance_scale']:g} is used.")
    seed = values.get("seed")
    if seed is not None and seed > MAX_SEED:
        values["seed"] = None
        notes.append(f"Seed {seed} is larger than {MAX_SEED}; the seed was left as it is.")
    notes += _img2img_notes(values)
    notes += _variation_within_limits(values)
    notes += _hires_within_limits(values, upscaler_models)
    notes += _controlnet_notes(values)
    for key, label in (("width", "Width"), ("height", "Height")):
        size = values.get(key)
        if size is not None and (not MIN_SIZE <= size <= MAX_SIZE or size % 8):
            values[key] = min(max(round(size / 8) * 8, MIN_SIZE), MAX_SIZE)
            notes.append(
                f"{label} {size} is not usable here (multiple of 8, {MIN_SIZE}–{MAX_SIZE}); {values[key]} is used."
            )
    return values, notes


def _img2img_notes(values: dict) -> list[str]:
    """An img2img / inpainting result whose init image or mask is not here (a PNG alone holds neither):
    its settings come back, and the note says what to put in to make it again."""
    use = values.get("img2img")
    if use is None:
        return []
    if values.get("init_image") is None:
        return [
            "Init image: this image was made with img2img from an init image that is not here; "
            "its settings are set, put the init image into img2img to make it again."
        ]
    if use.mask_blur is not None and values.get("mask_image") is None:
        return [
            "Mask: this image was inpainted with a mask that is not here; paint or upload the mask to make it again."
        ]
    return []


def _controlnet_notes(values: dict) -> list[str]:
    """Units Reuse cannot restore as written: without their image (a PNG alone), or with values out of range."""
    from lorapg.limits import CONTROL_GUIDANCE_END, CONTROL_GUIDANCE_START, CONTROL_RESIZE_MODES, CONTROL_WEIGHT

    uses, images = values.get("controlnet") or [], values.get("control_images") or []
    notes = []
    kept = []
    for index, use in enumerate(uses):
        if index >= len(images) or images[index] is None:
            notes.append(f"ControlNet unit {index} ({use.model}) has no control image here; it was left out.")
        modes = {name.casefold(): name for name in CONTROL_RESIZE_MODES.values()}
        fixed = replace(
            use,
            weight=CONTROL_WEIGHT.clamp(use.weight),
            guidance_start=CONTROL_GUIDANCE_START.clamp(use.guidance_start),
            guidance_end=CONTROL_GUIDANCE_END.clamp(use.guidance_end),
            resize_mode=modes.get(use.resize_mode.casefold(), CONTROL_RESIZE_MODES[1]),
        )
        if fixed != use:
            notes.append(f"ControlNet unit {index}: a value was outside this app's ranges; the nearest is used.")
        kept.append(fixed)
    if uses:
        values["controlnet"] = kept
    return notes


def _hires_within_limits(values: dict, upscaler_models: Sequence[str] = ()) -> list[str]:
    """A hires fix another tool wrote that this app cannot run as written: the nearest it can, with a note.
    An upscaler named by a model file in ``upscaler_models`` is kept, spelled as the file is."""
    from lorapg.diffusion.hires import LATENT, UPSCALERS
    from lorapg.limits import DENOISING_STRENGTH, HIRES_SCALE, HIRES_STEPS

    use = values.get("hires")
    if use is None:
        return []
    notes = []
    # Built-in names win over a model file of the same name, as the upscaler library decides.
    known = {name.casefold(): name for name in (*upscaler_models, *UPSCALERS)}
    if use.upscaler.casefold() not in known:
        notes.append(f"Hires upscaler {use.upscaler!r} is not available here; Latent is used instead.")
    upscaler = known.get(use.upscaler.casefold(), LATENT)
    scale = HIRES_SCALE.clamp(use.scale) if use.scale is not None else None
    steps = int(HIRES_STEPS.clamp(use.steps))
    strength = DENOISING_STRENGTH.clamp(use.denoising_strength) if use.denoising_strength is not None else None
    if (scale, steps, strength) != (use.scale, use.steps, use.denoising_strength):
        notes.append("A hires fix value was outside this app's ranges; the nearest allowed value is used.")
    values["hires"] = replace(use, upscaler=upscaler, scale=scale, steps=steps, denoising_strength=strength)
    return notes


def _variation_within_limits(values: dict) -> list[str]:
    """A variation another tool wrote that this app cannot make is dropped (strength 0), with a note."""
    from lorapg.diffusion.request import MAX_SEED
    from lorapg.limits import VARIATION_STRENGTH

    seed, strength = values.get("variation_seed"), values.get("variation_strength")
    if not strength:
        return []
    if strength not in VARIATION_STRENGTH:
        used = values["variation_strength"] = VARIATION_STRENGTH.clamp(strength)
        return [f"Variation strength {strength:g} is outside {VARIATION_STRENGTH.describe()}; {used:g} is used."]
    if seed is not None and seed > MAX_SEED:
        values["variation_seed"], values["variation_strength"] = None, 0.0
        return [f"Variation seed {seed} is larger than {MAX_SEED}; the variation was left out."]
    return []


def _scales_within_limits(loras: list[tuple[str, float]]) -> tuple[list[tuple[str, float]], list[str]]:
    from lorapg.diffusion.adapters import MAX_SCALE, MIN_SCALE

    kept: list[tuple[str, float]] = []
    notes: list[str] = []
    for name, scale in loras:
        clamped = min(max(scale, MIN_SCALE), MAX_SCALE)
        if clamped != scale:
            notes.append(f"LoRA {name}: scale {scale:g} is outside {MIN_SCALE:g}–{MAX_SCALE:g}; {clamped:g} is used.")
        kept.append((name, clamped))
    return kept, notes


def _model_note(model_name: str | None, current_model: str | None) -> list[str]:
    if not model_name or not current_model:
        return []
    current = Path(current_model.strip().rstrip("/\\")).name
    if model_name in (current, Path(current).stem):
        return []
    return [f"This image was made with model {model_name!r}; with {current!r} the same seed gives a different image."]
