"""Editing a dataset's captions in bulk: tag counts, find/replace, add or remove a tag everywhere.

Tags are a caption's comma-separated parts, as kohya counts them for ``ss_tag_frequency``; the counts
here come from the export's own ``tag_frequency`` over the captions the trainer would train on
(trigger word first, as ``build_caption`` puts it), so they are the numbers a trained LoRA records.
Every caption file is replaced with ``atomic_write``.

The Train tab's caption table shows each image's thumbnail as a ``data:`` URL made here from the
dataset's own files: nothing is served from disk by path, so a table cell can never name a file
outside the dataset folder.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from lorapg.errors import UserError, shorten
from lorapg.training.dataset import Dataset, DatasetImage

log = logging.getLogger(__name__)

START, END = "start", "end"
# Longer patterns are not a caption edit; the cap also bounds what one regex can cost (see compiled_find).
MAX_FIND_CHARS = 200
# Long side of a caption-table thumbnail: enough to tell images apart, ~2-4 kB each as WebP, so a
# 200-image dataset's table stays well under a megabyte on every refresh and save.
THUMB_SIDE = 96


@dataclass(frozen=True)
class CaptionRow:
    file: str
    caption: str

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "caption": self.caption}


def rows(dataset: Dataset) -> list[CaptionRow]:
    return [CaptionRow(image.file, image.caption) for image in dataset.images()]


def table_rows(dataset: Dataset) -> list[dict[str, str]]:
    """The caption table: per image its thumbnail (a data: URL, "" when unreadable), file and caption."""
    return [table_row(dataset, image) for image in dataset.images()]


def table_row(dataset: Dataset, image: DatasetImage) -> dict[str, str]:
    return {"thumbnail": thumbnail_url(dataset, image.path), "file": image.file, "caption": image.caption}


def thumbnail_url(dataset: Dataset, path: Path, side: int = THUMB_SIDE) -> str:
    """A small WebP of ``path`` as a data: URL; "" for a file outside the dataset folder (a symlink
    pointing elsewhere), an unreadable image or one over the dataset's pixel limit."""
    folder = dataset.folder.resolve()
    real = Path(path).resolve()
    if real.parent != folder or not real.is_file():
        return ""
    stat = real.stat()
    # Keyed on size and mtime: an edited or replaced image gets a new thumbnail.
    return _cached_thumbnail(str(real), stat.st_size, stat.st_mtime_ns, side, dataset.max_pixels)


@functools.lru_cache(maxsize=1024)
def _cached_thumbnail(path: str, size: int, mtime_ns: int, side: int, max_pixels: int) -> str:
    try:
        with Image.open(path) as image:
            # The header first: a decompression bomb is never decoded (the dataset's max_image_pixels).
            if 0 < max_pixels < image.width * image.height:
                return ""
            image.draft("RGB", (side * 2, side * 2))  # JPEG: decode at a reduced scale (much faster)
            thumb = ImageOps.exif_transpose(image).convert("RGB")
        thumb.thumbnail((side, side))
        out = io.BytesIO()
        thumb.save(out, format="WEBP", quality=75)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        log.info("no thumbnail for %s (%s)", path, type(exc).__name__)
        return ""
    return "data:image/webp;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def checked_caption(caption: str, max_chars: int) -> str:
    caption = " ".join(str(caption or "").split())
    if 0 < max_chars < len(caption):
        raise UserError(
            f"Caption is {len(caption)} characters; at most {max_chars} are allowed (max_prompt_chars). Shorten it."
        )
    return caption


def tag_frequency(dataset: Dataset, trigger: str = "", repeats: int = 1) -> list[tuple[str, int]]:
    """(tag, images using it), most frequent first: the ``ss_tag_frequency`` a training run records.

    With a trigger word the captions are the ones the trainer builds (trigger first); without one,
    the caption files as they are. Only images training would use (validation's trainable ones).
    """
    from lorapg.training.export import tag_frequency as kohya_tag_frequency  # torch: loaded only here
    from lorapg.training.trainer import build_caption

    report = dataset.validate()
    captions = [dataset.caption(check.file) for check in report.trainable(drop_near_duplicates=False)]
    if trigger.strip():
        captions = [build_caption(trigger.strip(), caption) for caption in captions]
    folder_key = f"{repeats}_{trigger.strip() or dataset.name}"
    counts = json.loads(kohya_tag_frequency(captions, folder_key))[folder_key]
    return [(tag, int(count)) for tag, count in counts.items()]


def find_replace(dataset: Dataset, find: str, replace: str, *, regex: bool = False, max_chars: int = 0) -> list[str]:
    """Replace ``find`` in every caption (plain text, or a Python regex); the files changed."""
    if not find:
        raise UserError("Find is empty; type the text to replace.")
    if len(find) > MAX_FIND_CHARS:
        raise UserError(f"Find is {len(find)} characters; at most {MAX_FIND_CHARS} are allowed. Shorten it.")
    if regex:
        pattern = compiled_find(find)
        check_replacement(pattern, replace)
        edit = lambda caption: pattern.sub(replace, caption)  # noqa: E731
    else:
        edit = lambda caption: caption.replace(find, replace)  # noqa: E731
    return _rewrite(dataset, edit, max_chars)


def compiled_find(find: str) -> re.Pattern[str]:
    # Python's re has no timeout: a catastrophic-backtracking pattern (``(a+)+$``) can still spin on
    # a long caption. The length cap and short captions make that unlikely; nothing here can rule it
    # out without running the pattern in another process.
    try:
        return re.compile(find)
    except (re.error, RecursionError, OverflowError) as exc:
        raise UserError(f"Find {shorten(find, 40)!r} is not a valid regular expression ({exc}); fix it.") from None


def check_replacement(pattern: re.Pattern[str], replace: str) -> None:
    """Refuse a replacement template ``pattern`` cannot fill (``\\1`` with no group): before any file changes.

    re compiles the template on every ``sub``, even over an empty string, so this finds every such error.
    """
    try:
        pattern.sub(replace, "")
    except (re.error, IndexError) as exc:
        raise UserError(
            f"Replace {shorten(replace, 40)!r} is not a valid replacement for this pattern ({exc}); "
            "refer only to groups the find pattern has (\\1, \\g<name>), or write \\\\ for a backslash."
        ) from None


def add_tag(dataset: Dataset, tag: str, position: str = END, *, max_chars: int = 0) -> list[str]:
    """Add ``tag`` to every caption that lacks it, first or last; the files changed."""
    tag = _checked_tag(tag)
    if position not in (START, END):
        raise UserError(f"Position {shorten(position, 20)!r} is not start or end; pick one.")

    def edit(caption: str) -> str:
        tags = split_tags(caption)
        if tag in tags:
            return caption
        return ", ".join([tag, *tags] if position == START else [*tags, tag])

    return _rewrite(dataset, edit, max_chars)


def remove_tag(dataset: Dataset, tag: str) -> list[str]:
    """Remove ``tag`` (an exact comma-separated part) from every caption; the files changed."""
    tag = _checked_tag(tag)
    return _rewrite(dataset, lambda caption: ", ".join(t for t in split_tags(caption) if t != tag), 0)


def _checked_tag(tag: str) -> str:
    tag = " ".join(str(tag or "").split())
    if not tag or "," in tag:
        raise UserError("Tag must be one non-empty tag without commas; type it again.")
    return tag


def _rewrite(dataset: Dataset, edit, max_chars: int) -> list[str]:
    """Apply ``edit`` to every caption; all are checked before any file is written."""
    planned: list[tuple[str, str]] = []
    for row in rows(dataset):
        new = " ".join(edit(row.caption).split())
        if new != row.caption:
            planned.append((row.file, checked_caption(new, max_chars)))
    for file, caption in planned:
        dataset.set_caption(file, caption)
    return [file for file, _ in planned]
