"""Where each training image is cut: the aspect-ratio bucket it trains at and the box resize+crop keeps.

The trainer and the Train tab's crop preview both call ``plan_crop`` / ``crop_to_plan``, so the box a
user sees is the box that trains. By default the box is centred (kohya's behaviour); a per-image
*focus point* moves it, and face-aware cropping (``TrainConfig.face_crop``) centres it on the largest
face OpenCV's bundled Haar cascade finds (no download). A focus point set by hand wins over a face.

Focus points live in one hidden sidecar per dataset, ``.lorapg-focus.json`` (``{"focus": {"img.png":
[x, y]}, "images": {"img.png": {"bytes": …, "mtime_ns": …, "sha256": …}}}``, x and y in 0..1 of the
image's width and height): one file rather than one per image so the dataset folder stays the plain
images + ``.txt`` layout other tools read, and hidden so that dataset validation and kohya ignore it.
It is written with ``atomic_write`` (a crash never leaves half a file).

A point belongs to the image it was set on, not to its name: ``images`` records that image's size,
mtime and SHA-256. A point whose image is gone, or whose file is now another image of the same name,
is ignored, and dropped at the next write (``Dataset.remove`` drops it at once). The check costs one
``stat`` per point; the hash is read only when the mtime differs (a copied folder keeps its points),
and the confirmed new mtime is saved so it is read once. A sidecar from before ``images`` existed is
trusted for every image it names that exists (copies and checkouts make any image look newer than
it), and its entries are stamped at the next write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from lorapg.atomic_files import atomic_write_text
from lorapg.errors import UserError, shorten

log = logging.getLogger(__name__)

FOCUS_FILE = ".lorapg-focus.json"
FACE_DETECT_SIDE = 640  # images are scaled down to this long side before face detection (speed)
PREVIEW_SIDE = 256  # long side of a rendered preview

Size = tuple[int, int]
Focus = tuple[float, float]
Box = tuple[int, int, int, int]  # left, top, width, height (OpenCV's face rectangle)
# A face detector: an RGB image -> face rectangles in its pixels. Injectable for tests.
Detector = Callable[[Image.Image], list[Box]]


# --- buckets (the trainer's: one definition) ------------------------------------------------------


def make_buckets(resolution: int, step: int, max_aspect: float = 2.0) -> list[Size]:
    """kohya-style buckets: sides in multiples of ``step``, area at most resolution², ratio ≤ max_aspect."""
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= resolution * 2:
        height = (area // width) // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect:
            buckets.add((width, height))
        width += step
    return sorted(buckets)


def assign_bucket(size: Size, buckets: list[Size]) -> Size:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def bucket_step(resolution: int, multiple: int = 64) -> int:
    """The multiple bucket sides use: the model's (VAE × UNet downsampling; 64 px for real models,
    kohya's), smaller only for the tiny sizes test models train at."""
    return max(multiple, 64) if resolution >= 256 else multiple


def buckets_for(resolution: int, step: int, bucketing: bool = True) -> list[Size]:
    return make_buckets(resolution, step) if bucketing else [(resolution, resolution)]


# --- the crop -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropPlan:
    """Resize ``size`` to ``resized`` (covering the bucket), then keep ``bucket`` from (left, top)."""

    size: Size  # the image's (width, height), EXIF rotation applied
    bucket: Size
    resized: Size
    left: int
    top: int
    source: str = "center"  # center | focus | face: what placed the box
    focus: Focus | None = None

    @property
    def crop(self) -> tuple[int, int]:
        """(top, left) in resized pixels, as SDXL's crop time ids want it."""
        return self.top, self.left

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The kept region in the original image's pixels: (left, top, right, bottom)."""
        sx, sy = self.size[0] / self.resized[0], self.size[1] / self.resized[1]
        return (
            self.left * sx,
            self.top * sy,
            (self.left + self.bucket[0]) * sx,
            (self.top + self.bucket[1]) * sy,
        )


def _offset(extent: int, keep: int, centre: float | None) -> int:
    """Where a window of ``keep`` px starts in ``extent`` px so that it is centred on ``centre`` (0..1),
    clamped inside; None: the middle (integer division, as the trainer always did)."""
    if centre is None:
        return (extent - keep) // 2
    return min(max(round(centre * extent - keep / 2), 0), extent - keep)


def plan_crop(size: Size, bucket: Size, focus: Focus | None = None, source: str = "") -> CropPlan:
    width, height = bucket
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    fx, fy = focus if focus is not None else (None, None)
    return CropPlan(
        size,
        bucket,
        resized,
        _offset(resized[0], width, fx),
        _offset(resized[1], height, fy),
        source or ("focus" if focus is not None else "center"),
        focus,
    )


def open_rgb(path: Path) -> Image.Image:
    """The image as trained on: EXIF rotation applied, RGB."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def oriented_size(path: Path, size: Size) -> Size:
    """``size`` (from the file's header) as the image is shown: EXIF orientations 5-8 turn it a quarter,
    so a phone's portrait photo stored landscape gets a portrait bucket. Reads the header only."""
    try:
        with Image.open(path) as image:
            turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # 0x0112: the EXIF Orientation tag
    except (OSError, SyntaxError, ValueError):
        return size
    return (size[1], size[0]) if turned else size


def crop_to_plan(image: Image.Image, plan: CropPlan) -> Image.Image:
    """The pixels that train: resized (Lanczos) to cover the bucket, then the plan's box."""
    resized = image.resize(plan.resized, Image.Resampling.LANCZOS)
    width, height = plan.bucket
    return resized.crop((plan.left, plan.top, plan.left + width, plan.top + height))


# --- focus points -------------------------------------------------------------------------------


def check_focus(x: object, y: object) -> Focus:
    """A focus point in 0..1 × 0..1, or a UserError naming the coordinate."""
    point = []
    for name, value in (("x", x), ("y", y)):
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise UserError(f"Focus {name} {shorten(value)!r} is not a number; give 0 (left/top) to 1.") from None
        if not 0.0 <= number <= 1.0 or math.isnan(number):
            raise UserError(f"Focus {name} is {number:g}; it must be between 0 (left/top) and 1 (right/bottom).")
        point.append(number)
    return point[0], point[1]


Stamp = dict[str, int | str]  # what identifies the image a point was set on: bytes, mtime_ns, sha256


class FocusPoints:
    """The focus sidecar of one dataset folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / FOCUS_FILE

    def load(self) -> dict[str, Focus]:
        """Each image's point, for the images they were set on (stale points are left out).

        Stat-only for an unchanged image. An image whose size matches but whose mtime does not (a copied
        folder) is hashed once: when the hash confirms it, its new mtime is saved so no later load (each
        crop preview, each training start) hashes it again."""
        with _folder_lock(self.folder):
            points, refreshed = self._current()
            if refreshed:
                self._save_quietly(points)
        return {file: point for file, (point, _stamp) in points.items()}

    def set(self, file: str, focus: Focus | None) -> None:
        """Set (or, with None, clear) one image's focus point; stale points are dropped on the way."""
        # Load-modify-save under the folder's lock: two clicks at once (two requests) would otherwise
        # both load the old file and the second save would drop the first point.
        with _folder_lock(self.folder):
            points, _refreshed = self._current()
            if focus is None:
                points.pop(file, None)
            else:
                points[file] = (focus, _stamp(self.folder / file))
            self._save(points)

    def forget(self, file: str) -> None:
        """Drop ``file``'s point (the app removed the image); no write when there is nothing to drop."""
        if not self.path.is_file():
            return
        with _folder_lock(self.folder):
            if file in self._read()[0]:
                points, _refreshed = self._current()
                points.pop(file, None)
                self._save(points)

    def _read(self) -> tuple[dict[str, Focus], dict[str, Stamp]]:
        """(points, stamps) as stored; empty when missing or unreadable."""
        if not self.path.is_file():
            return {}, {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            points = {str(file): check_focus(*point) for file, point in data.get("focus", {}).items()}
            stamps = data.get("images", {})
            if not isinstance(stamps, dict):
                raise ValueError("'images' is not an object")
            return points, stamps
        except (OSError, ValueError, TypeError, AttributeError, UserError) as exc:
            # A hand-edited, broken sidecar must not stop training: centred crops, and say so.
            log.warning("ignoring unreadable focus file %s (%s)", self.path, exc)
            return {}, {}

    def _current(self) -> tuple[dict[str, tuple[Focus, Stamp | None]], bool]:
        """The points still valid with their stamps (None: an entry from before stamps, stamped at the
        next write), and whether a hash refreshed a stamp (worth saving)."""
        points, stamps = self._read()
        current: dict[str, tuple[Focus, Stamp | None]] = {}
        refreshed = False
        for file, point in points.items():
            stored = stamps.get(file)
            valid, stamp = self._still_valid(file, stored)
            if not valid:
                log.info("ignoring the focus point of %s: the image it was set on is gone or replaced", file)
                continue
            current[file] = (point, stamp)
            refreshed = refreshed or (stamp is not None and stamp is not stored)
        return current, refreshed

    def _still_valid(self, file: str, stamp: object) -> tuple[bool, Stamp | None]:
        """(is ``file``'s point still valid, the stamp to keep for it)."""
        if Path(file).name != file or file.startswith("."):
            return False, None  # a hand-edited entry naming something outside the folder
        try:
            stat = (self.folder / file).stat()
        except OSError:
            return False, None  # the image is gone
        if not isinstance(stamp, dict):
            # A sidecar from before stamps: nothing to compare with. Its mtime proves nothing either
            # (cp -r, rsync without -t or a git checkout make every image newer), so the point is
            # trusted while its image exists and stamped at the next write.
            return True, None
        if stamp.get("bytes") != stat.st_size:
            return False, None
        if stamp.get("mtime_ns") == stat.st_mtime_ns:
            return True, stamp
        # Same size, other mtime: a copied folder, or another image of the same size. The content decides.
        fresh = _readable_stamp(self.folder / file)
        if fresh is not None and fresh["sha256"] == stamp.get("sha256"):
            return True, fresh
        return False, None

    def _save(self, points: dict[str, tuple[Focus, Stamp | None]]) -> None:
        """Write the sidecar; entries from before stamps are stamped (hashed) now, unreadable ones dropped."""
        stamped: dict[str, tuple[Focus, Stamp]] = {}
        for file, (point, stamp) in points.items():
            stamp = stamp if stamp is not None else _readable_stamp(self.folder / file)
            if stamp is not None:
                stamped[file] = (point, stamp)
        ordered = sorted(stamped.items())
        body = {
            "focus": {file: [round(x, 4), round(y, 4)] for file, ((x, y), _stamp) in ordered},
            "images": {file: stamp for file, (_point, stamp) in ordered},
        }
        atomic_write_text(self.path, json.dumps(body, indent=1) + "\n")

    def _save_quietly(self, points: dict[str, tuple[Focus, Stamp | None]]) -> None:
        """``_save`` from a read: a folder that cannot be written (read-only copy) only costs the next
        load the same hash."""
        try:
            self._save(points)
        except OSError as exc:
            log.info("could not save refreshed focus stamps in %s (%s)", self.path, exc)


def _readable_stamp(path: Path) -> Stamp | None:
    """``_stamp``, or None for a file that cannot be read: its point is then treated as stale."""
    try:
        return _stamp(path)
    except UserError:
        return None


def _stamp(path: Path) -> Stamp:
    """What identifies the image at ``path`` now."""
    digest = hashlib.sha256()
    try:
        stat = path.stat()
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise UserError(
            f"Image name {shorten(path.name)!r}: cannot read it ({type(exc).__name__}); pick another."
        ) from None
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


_folder_locks: dict[str, threading.Lock] = {}
_folder_locks_guard = threading.Lock()


def _folder_lock(folder: Path) -> threading.Lock:
    """One lock per dataset folder (by its real path), for this process: the app is single-process."""
    key = os.path.realpath(folder)
    with _folder_locks_guard:
        return _folder_locks.setdefault(key, threading.Lock())


# --- faces --------------------------------------------------------------------------------------


def haar_faces(image: Image.Image) -> list[Box]:
    """Frontal faces found by OpenCV's bundled Haar cascade (opencv-python-headless 4.x ships the
    cascade files; OpenCV 5's wheels do not)."""
    try:
        import cv2  # imported here: the app starts, and trains without face cropping, when it is missing
    except ImportError:
        raise UserError("Face-aware cropping needs OpenCV: pip install 'opencv-python-headless>=4.10,<5'.") from None
    cascade_file = Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / "haarcascade_frontalface_default.xml"
    if not cascade_file.is_file():
        raise UserError(
            "Face-aware cropping: this OpenCV has no bundled face cascade (OpenCV 5 dropped them); "
            "install 'opencv-python-headless>=4.10,<5' or turn face_crop off."
        )
    scale = min(1.0, FACE_DETECT_SIDE / max(image.size))
    small = image if scale == 1.0 else image.resize((round(image.width * scale), round(image.height * scale)))
    import numpy as np

    grey = np.asarray(small.convert("L"))
    side = max(24, min(small.size) // 10)  # ignore specks: a face worth cropping for is not tiny
    found = cv2.CascadeClassifier(str(cascade_file)).detectMultiScale(
        grey, scaleFactor=1.1, minNeighbors=4, minSize=(side, side)
    )
    return [tuple(round(v / scale) for v in face) for face in found]  # type: ignore[misc]


def face_focus(faces: Sequence[Box], size: Size) -> Focus | None:
    """The centre of the largest face, as a focus point; None when there is none."""
    if not len(faces):
        return None
    left, top, width, height = max(faces, key=lambda f: f[2] * f[3])
    return (left + width / 2) / size[0], (top + height / 2) / size[1]


def choose_focus(
    image: Image.Image, manual: Focus | None, face_aware: bool, detector: Detector | None = None
) -> tuple[Focus | None, str]:
    """The focus the crop centres on and what chose it: the user's point, else a face, else the middle."""
    if manual is not None:
        return manual, "focus"
    if face_aware:
        focus = face_focus((detector or haar_faces)(image), image.size)
        if focus is not None:
            return focus, "face"
    return None, "center"


def plan_image(
    image: Image.Image,
    buckets: list[Size],
    manual: Focus | None = None,
    face_aware: bool = False,
    detector: Detector | None = None,
) -> CropPlan:
    """One decoded image's plan: its bucket, then the box around its focus."""
    bucket = assign_bucket(image.size, buckets)
    focus, source = choose_focus(image, manual, face_aware, detector)
    return plan_crop(image.size, bucket, focus, source)
