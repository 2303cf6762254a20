"""Editing a dataset's captions in bulk: tag counts, find/replace, add or remove a tag everywhere.

Tags are a caption's comma-separated parts, as kohya counts them for ``ss_tag_frequency``; the counts
here come from the export's own ``tag_frequency`` over the captions the trainer would train on
(trigger word first, as ``build_caption`` puts it), so they are the numbers a trained LoRA records.
Every caption file is replaced with ``atomic_write``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from lorapg.errors import UserError, shorten
from lorapg.training.dataset import Dataset

START, END = "start", "end"
# Longer patterns are not a caption edit; the cap also bounds what one regex can cost (see compiled_find).
MAX_FIND_CHARS = 200


@dataclass(frozen=True)
class CaptionRow:
    file: str
    caption: str

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "caption": self.caption}


def rows(dataset: Dataset) -> list[CaptionRow]:
    return [CaptionRow(image.file, image.caption) for image in dataset.images()]


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
