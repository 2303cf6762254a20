"""Upscaler models (A1111's Extras and hires-fix upscalers): ESRGAN, Real-ESRGAN, 4x-UltraSharp, SwinIR, …

The files live in ``<models_dir>/upscalers/`` and are read by spandrel, which detects the architecture
from the weights. ``.safetensors`` files load without running any code; ``.pth`` / ``.pt`` files are
pickles and load only with ``--allow-pickle`` (checked before spandrel opens them). Besides the models,
"Lanczos" and "Nearest" resize with PIL, and "None" leaves the image as it is (A1111's names).

A model runs tile by tile with overlapping edges that are blended (a linear ramp), so a 4× of a 1024 px
image needs a tile's activations, not the whole image's. Importing this module needs neither torch nor
spandrel (spandrel takes seconds to import): listing the upscalers stays quick for the CLI and the API.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from lorapg.coercion import shown
from lorapg.errors import UserError, shorten

if TYPE_CHECKING:
    import torch

    from lorapg.residency import ResidencyManager

log = logging.getLogger(__name__)

NONE, LANCZOS, NEAREST = "None", "Lanczos", "Nearest"
# A1111's plain resizers (its "upscalers" without a model), in the order it lists them.
RESIZERS = {LANCZOS: Image.Resampling.LANCZOS, NEAREST: Image.Resampling.NEAREST}
BUILT_IN = (NONE, *RESIZERS)
SAFE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pth", ".pt")
DEFAULT_TILE = 256  # input pixels per tile side (A1111's ESRGAN default is 192); 0 = the whole image at once
TILE_OVERLAP = 16  # input pixels two neighbouring tiles share, blended so no seam shows
MAX_PASSES = 3  # a 2× model asked for 8× runs three times, as A1111's does; more would only blur
RESIDENT_PREFIX = "upscaler: "  # its name in the residency manager's status
# "4x-UltraSharp", "RealESRGAN_x4plus", "2x_foo": the factor the file name promises (listing only).
_NAME_SCALE = re.compile(r"(?:^|[^a-z0-9])(?:x(\d)|(\d)x)(?:[^a-z0-9]|plus|$)", re.IGNORECASE)


class UpscaleCancelled(UserError):
    """A cancel seen between tiles (or passes): the upscale stopped, there is no image."""

    def __init__(self) -> None:
        super().__init__("Upscaling was cancelled.")


def _check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise UpscaleCancelled()


@dataclass(frozen=True)
class UpscalerFile:
    name: str  # the file name without its suffix: what A1111 shows and the API takes
    path: Path

    @property
    def pickled(self) -> bool:
        return self.path.suffix.lower() in PICKLE_SUFFIXES

    @property
    def named_scale(self) -> int | None:
        """The factor the file name states ("4x-UltraSharp": 4), for listings that load nothing."""
        match = _NAME_SCALE.search(self.name)
        return int(match.group(1) or match.group(2)) if match else None


@dataclass
class _Loaded:
    """A model in memory and the file it was read from, as it was then."""

    path: Path
    stamp: tuple[int, int]  # the file's (size, mtime_ns) when read: another value means another file
    resident_name: str  # its name in the residency manager ("" without one)
    descriptor: object
    users: int = 0  # upscales running on it now: it is not forgotten under them


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class UpscalerLibrary:
    """The upscalers in one folder, loaded on first use and kept (upscaler models are small)."""

    def __init__(
        self,
        folder: Path,
        *,
        allow_pickle: bool = False,
        device: str = "cpu",
        residency: ResidencyManager | None = None,
        tile: int = DEFAULT_TILE,
    ):
        self.folder = Path(folder)
        self.allow_pickle = allow_pickle
        self.device = device
        self.residency = residency
        self.tile = tile
        self._loaded: dict[str, _Loaded] = {}  # by the upscaler's name, casefolded
        self._lock = threading.Lock()

    # --- listing -----------------------------------------------------------------------------

    def files(self) -> list[UpscalerFile]:
        """The model files now in the folder (re-read each call); a .safetensors wins over a pickle of
        the same name. A name that is also a built-in one is left out (the built-in is meant)."""
        found = self._scan()
        self._forget_gone(found)
        return sorted(found.values(), key=lambda item: item.name.casefold())

    def _scan(self) -> dict[str, UpscalerFile]:
        """The folder's model files by casefolded name (read without the lock: it may be stale at once)."""
        if not self.folder.is_dir():
            return {}
        found: dict[str, UpscalerFile] = {}
        for path in sorted(self.folder.iterdir()):
            suffix = path.suffix.lower()
            if not path.is_file() or suffix not in (SAFE_SUFFIX, *PICKLE_SUFFIXES):
                continue
            known = found.get(path.stem.casefold())
            if path.stem.casefold() in {name.casefold() for name in BUILT_IN}:
                continue
            if known is None or (known.pickled and suffix == SAFE_SUFFIX):
                found[path.stem.casefold()] = UpscalerFile(path.stem, path)
        return found

    def _forget_gone(self, found: dict[str, UpscalerFile]) -> None:
        """Models whose file was deleted or replaced by another (a .pth by a .safetensors) leave memory
        and the residency manager now, not when (if ever) their name is used again."""
        with self._lock:
            if not any(_gone(key, loaded, found) for key, loaded in self._loaded.items()):
                return
            # ``found`` was read before the lock was taken: a job may have loaded a file since that
            # the stale view lacks. The folder is read again here, so only what is gone NOW goes.
            now = self._scan()
            for key, loaded in list(self._loaded.items()):
                if _gone(key, loaded, now) and not loaded.users:
                    self._forget(key)  # one in use (here or in the residency manager) stays until a later listing

    def names(self) -> list[str]:
        """Every upscaler's name: the built-in ones first, then the models."""
        return [*BUILT_IN, *(item.name for item in self.files())]

    def find(self, name: object, field: str = "Upscaler") -> str | UpscalerFile:
        """A built-in name (as spelled here) or the model file ``name`` means (case-insensitive);
        otherwise a UserError that names ``field`` and lists the choices."""
        text = name.strip() if isinstance(name, str) else ""
        for built_in in BUILT_IN:
            if text.casefold() == built_in.casefold():
                return built_in
        for item in self.files():
            if text.casefold() == item.name.casefold():
                return item
        choices = ", ".join(f'"{choice}"' for choice in self.names())
        raise UserError(
            f"{field} {shown(name)} is not available; pick one of {choices} (upscaler models go in {self.folder})."
        )

    # --- running -----------------------------------------------------------------------------

    def upscale(
        self,
        image: Image.Image,
        name: str,
        size: tuple[int, int],
        field: str = "Upscaler",
        should_cancel: Callable[[], bool] | None = None,
    ) -> Image.Image:
        """``image`` upscaled by upscaler ``name`` to exactly ``size`` (width, height).

        A model runs until the image is at least that large (at most MAX_PASSES times; once when
        ``size`` is the image's own), then a Lanczos resize gives the exact size, as A1111 does
        (``model_passes``). ``size`` must be checked by the caller
        (``check_size``); "None" returns the image unchanged. ``should_cancel`` is asked before each
        tile of a model's passes: True raises UpscaleCancelled there.
        """
        found = self.find(name, field)
        image = image.convert("RGB")
        if found == NONE:
            return image
        if isinstance(found, str):
            return image.resize(size, resample=RESIZERS[found])
        with self._in_use(found, field) as descriptor:
            # Pinned once around every pass: a listing between two passes must not forget the model
            # (its file deleted or replaced meanwhile) under the next one.
            for _ in range(model_passes(*image.size, size, int(descriptor.scale))):
                image = self._run(found, descriptor, image, should_cancel)
        if image.size != size:
            image = image.resize(size, resample=Image.Resampling.LANCZOS)
        return image

    def model_scale(self, name: str) -> int:
        """The factor one pass of model ``name`` makes (1 for the built-in resizers)."""
        found = self.find(name)
        return 1 if isinstance(found, str) else int(self.load(found).scale)

    def load(self, item: UpscalerFile, field: str = "Upscaler"):
        """The spandrel descriptor of ``item``, loaded once (again when the file changed: another
        file of that name, or another size or modification time). ``field`` names the upscaler in
        the refusal when the file is gone."""
        loaded = self._acquire(item, field, pin=False)
        return loaded.descriptor

    @contextmanager
    def _in_use(self, item: UpscalerFile, field: str) -> Iterator[object]:
        """``item``'s descriptor, kept loaded (and, with a residency manager, on the device) until
        the block ends: neither a listing nor another file of that name removes it meanwhile."""
        loaded = self._acquire(item, field, pin=True)
        try:
            placed = self.residency.use(loaded.resident_name) if self.residency is not None else nullcontext()
            with placed:
                yield loaded.descriptor
        finally:
            with self._lock:
                loaded.users -= 1

    def _acquire(self, item: UpscalerFile, field: str, pin: bool) -> _Loaded:
        """The loaded model of ``item`` (read now if need be), its ``users`` counted up when ``pin``.

        The file is read outside the lock (a model takes seconds to read), so listings do not wait
        for it; of two threads that read the same file at once, the first to register wins and the
        other's copy is dropped, so one model is registered."""
        key = item.name.casefold()
        stamp = self._stamp_or_refuse(item, field)
        with self._lock:
            ready = self._current(key, item, stamp, pin)
        if ready is not None:
            return ready
        try:
            descriptor = _read_model(item, self.allow_pickle)
        except FileNotFoundError:  # deleted after the stamp was taken
            raise self._gone_error(item, field) from None
        if self.residency is None:
            descriptor.to(self.device)  # CPU, or a device nothing else shares; outside the lock too
        with self._lock:
            ready = self._current(key, item, stamp, pin)
            if ready is not None:  # another thread read and registered it meanwhile: theirs is used
                return ready
            # Cached only once registered: a failed registration must not leave a model in use
            # that the residency manager does not count.
            resident_name = self._register(item, descriptor)
            loaded = _Loaded(item.path, stamp, resident_name, descriptor, users=1 if pin else 0)
            self._loaded[key] = loaded
            return loaded

    def _current(self, key: str, item: UpscalerFile, stamp: tuple[int, int], pin: bool) -> _Loaded | None:
        """The cached model when it was read from this file as it is (counted up when ``pin``); None
        when it must be read, an older one forgotten first. Called with the lock held."""
        cached = self._loaded.get(key)
        if cached is not None and (cached.path, cached.stamp) == (item.path, stamp):
            if pin:
                cached.users += 1
            return cached
        if cached is not None and (cached.users or not self._forget(key)):
            raise UserError(
                f"Upscaler {item.name!r} changed on disk while in use; try again when the current job ends."
            )
        return None

    def _stamp_or_refuse(self, item: UpscalerFile, field: str) -> tuple[int, int]:
        try:
            return _stamp(item.path)
        except OSError:  # deleted (or made unreadable) since find() listed it
            raise self._gone_error(item, field) from None

    def _gone_error(self, item: UpscalerFile, field: str) -> UserError:
        return UserError(
            f"{field} {shown(item.name)} is not available: its file {item.path.name} is gone from {self.folder}; "
            "pick another upscaler or put the file back."
        )

    def _forget(self, key: str) -> bool:
        """Drop a loaded model (called with the lock held); False when it is in use (it stays)."""
        loaded = self._loaded[key]
        if self.residency is not None and not self.residency.unregister(loaded.resident_name):
            return False
        del self._loaded[key]
        log.info("unloaded upscaler %s (%s changed or is gone)", loaded.path.stem, loaded.path.name)
        return True

    def _register(self, item: UpscalerFile, descriptor) -> str:
        """The model registered; returns its residency name ("" without a manager: placed already)."""
        if self.residency is None:
            return ""
        size = sum(p.numel() * p.element_size() for p in descriptor.model.parameters())
        name = RESIDENT_PREFIX + item.name
        self.residency.register(
            name,
            size,
            to_gpu=lambda: descriptor.to(self.device),
            to_cpu=lambda: descriptor.to("cpu"),
        )
        return name

    def _run(self, item: UpscalerFile, descriptor, image: Image.Image, should_cancel) -> Image.Image:
        import torch

        def run() -> Image.Image:
            tensor = _to_tensor(image).to(descriptor.device, descriptor.dtype)
            tile = self.tile if descriptor.tiling.name != "INTERNAL" else 0  # it tiles itself
            output = tiled_upscale(descriptor, tensor, descriptor.scale, tile, TILE_OVERLAP, should_cancel)
            return _to_image(output)

        # One pass; the caller (upscale) holds the model in use around all of them.
        with torch.inference_mode():
            if self.residency is None:
                return run()
            return self.residency.run_with_oom_retry(
                run,
                keep=RESIDENT_PREFIX + item.name,
                advice="Lower the tile size (setting upscale_tile) or upscale a smaller image.",
            )


def _gone(key: str, loaded: _Loaded, found: dict[str, UpscalerFile]) -> bool:
    """Whether the file a model was read from is no longer the one its name means in ``found``."""
    return key not in found or found[key].path != loaded.path


def _read_model(item: UpscalerFile, allow_pickle: bool):
    """spandrel's descriptor for the file: safetensors read by safetensors, pickles only with the flag."""
    if item.pickled and not allow_pickle:
        raise UserError(
            f"Upscaler {item.name!r} is a pickle file ({item.path.suffix}), which can run code when loaded; "
            "convert it to .safetensors or start with --allow-pickle if you trust it."
        )
    import spandrel
    from safetensors.torch import load_file

    try:
        if item.pickled:
            state = spandrel.ModelLoader("cpu").load_state_dict_from_file(item.path)
        else:
            state = spandrel.canonicalize_state_dict(load_file(str(item.path), device="cpu"))
        descriptor = spandrel.ModelLoader("cpu").load_from_state_dict(state)
    except FileNotFoundError:
        raise  # deleted while being opened: the caller says the upscaler is not available
    except spandrel.UnsupportedModelError:
        raise UserError(
            f"Upscaler {item.name!r} ({item.path.name}) is not a model architecture spandrel knows "
            "(ESRGAN, Real-ESRGAN, SwinIR, …); remove it from the upscalers folder."
        ) from None
    except Exception as exc:  # a damaged file, or a pickle spandrel's restricted unpickler refuses
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]  # a bare assert's message is empty
        raise UserError(
            f"Upscaler {item.name!r} ({item.path.name}) could not be read: {shorten(first_line)}; replace the file."
        ) from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels != 3:
        raise UserError(
            f"Upscaler {item.name!r} is a {descriptor.architecture.name} model that does not take an RGB "
            "image (an inpainting or a grayscale model); remove it from the upscalers folder."
        )
    log.info("loaded upscaler %s: %s, %d×", item.name, descriptor.architecture.name, descriptor.scale)
    return descriptor.eval()


def model_passes(width: int, height: int, size: tuple[int, int], model_scale: int) -> int:
    """How many times a model_scale× model runs to make ``size`` from a width × height image.

    As A1111's ``Upscaler.upscale``: until the image covers the size (at most MAX_PASSES times), but
    once at scale 1 (the result the image's own size: the model's work, resized back down with
    Lanczos), and none when the result is smaller (Lanczos alone). A 1× model (a restoration model)
    runs once: it would not grow the image by running again."""
    if model_scale <= 1 or size == (width, height):
        return 1
    passes, factor = 0, 1
    while passes < MAX_PASSES and (width * factor < size[0] or height * factor < size[1]):
        passes, factor = passes + 1, factor * model_scale
    return passes


def check_size(width: int, height: int, scale: float, model_scale: int, max_pixels: int, field: str) -> tuple[int, int]:
    """The result's size for ``scale`` (rounded, at least 1 px), or a UserError when it, or the largest
    image a model pass makes on the way, is over ``max_pixels`` (Settings.max_image_pixels; 0 = no limit)."""
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    largest = size
    # Each model pass makes a model_scale× image (the last one may overshoot, and a pass at scale 1
    # makes one too before the Lanczos resize back down).
    for done in range(1, model_passes(width, height, size, model_scale) + 1):
        factor = model_scale**done
        largest = max(largest, (width * factor, height * factor), key=lambda pair: pair[0] * pair[1])
    pixels = largest[0] * largest[1]
    if max_pixels > 0 and pixels > max_pixels:
        raise UserError(
            f"{field}: upscaling {width}×{height} makes {largest[0]}×{largest[1]} ({pixels / 1e6:.1f} megapixels), "
            f"over the limit of {max_pixels / 1e6:g} megapixels (setting max_image_pixels); "
            "lower the scale or upscale a smaller image."
        )
    return size


# --- tiles -------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one side start: every ``tile - overlap`` pixels, the last flush with the end."""
    if tile <= 0 or length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    return [*range(0, length - tile, stride), length - tile]


def _ramp(length: int, overlap: int, rises: bool, falls: bool) -> torch.Tensor:
    """A tile's blending weight along one side: rising over the overlap from an inner edge, 1 elsewhere.
    Image borders get no ramp (nothing else covers them); weights never reach 0, so every pixel counts."""
    import torch

    weight = torch.ones(length)
    width = min(overlap, length // 2)
    if width > 0:
        edge = (torch.arange(width, dtype=torch.float32) + 0.5) / width
        if rises:
            weight[:width] = edge
        if falls:
            weight[length - width :] = edge.flip(0)
    return weight


def tiled_upscale(
    run: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scale: int,
    tile: int,
    overlap: int,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """``run`` over ``image`` (1×C×H×W) tile by tile, the overlaps blended; ``tile`` 0: in one piece.

    The result is accumulated on the CPU in float32 (the output of a 4× of 1024 px is 200 MB there),
    so the device holds one tile's activations at a time.
    """
    import torch

    _, channels, height, width = image.shape
    tile = tile if tile > 0 else max(height, width)
    overlap = min(overlap, tile // 2)
    if height <= tile and width <= tile:
        _check_cancel(should_cancel)
        return run(image).float().cpu()
    out = torch.zeros(1, channels, height * scale, width * scale)
    total = torch.zeros(1, 1, height * scale, width * scale)
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            _check_cancel(should_cancel)  # between tiles: a long upscale stops within one tile's time
            bottom, right = min(top + tile, height), min(left + tile, width)
            piece = run(image[:, :, top:bottom, left:right]).float().cpu()
            rows = _ramp(piece.shape[2], overlap * scale, top > 0, bottom < height)
            columns = _ramp(piece.shape[3], overlap * scale, left > 0, right < width)
            weight = rows[:, None] * columns[None, :]
            area = (slice(None), slice(None), slice(top * scale, bottom * scale), slice(left * scale, right * scale))
            out[area] += piece * weight
            total[area] += weight
    return out / total


def _to_tensor(image: Image.Image) -> torch.Tensor:
    import numpy as np
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def _to_image(tensor: torch.Tensor) -> Image.Image:
    import numpy as np

    array = tensor.squeeze(0).clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
    return Image.fromarray(np.round(array * 255.0).astype(np.uint8), "RGB")


def scale_text(value: float) -> str:
    """How a scale is written in parameters and names: 4, 2.5 (A1111's number style)."""
    return str(int(value)) if math.isclose(value, round(value)) else f"{value:g}"
