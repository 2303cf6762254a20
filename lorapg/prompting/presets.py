"""Rewrite presets: one TOML file each in a folder, checked strictly, loaded leniently.

A user adds a style by dropping a file into ``presets/rewrite/``. One broken file must not take the
other presets down with it, so ``load_presets`` collects per-file errors (file name + reason) next
to the presets that did load; the UI shows them. Unknown keys are errors rather than being ignored,
because a silently ignored ``style_word = [...]`` is a bug the user never finds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorapg.coercion import read_toml
from lorapg.errors import UserError

logger = logging.getLogger(__name__)

# The id is used in file names, URLs and API calls, so keep it boring.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_REQUIRED = ("name", "label", "instruction", "style_words", "llm")
_OPTIONAL = ("order",)
_DEFAULT_ORDER = 1000  # presets without an explicit order go after the built-in eight


@dataclass(frozen=True)
class RewritePreset:
    """One style transformation.

    ``instruction`` is what the LLM is told to do; ``style_words`` are what the rules backend
    appends when no LLM answers (and the whole job when ``llm`` is false, as for HD).
    """

    name: str
    label: str
    instruction: str
    style_words: tuple[str, ...]
    llm: bool = True
    order: int = _DEFAULT_ORDER
    source: Path | None = None


@dataclass
class PresetCatalog:
    """The presets that loaded, in display order, plus one message per file that did not."""

    presets: dict[str, RewritePreset] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def get(self, name: str) -> RewritePreset:
        try:
            return self.presets[name]
        except KeyError:
            known = ", ".join(self.presets) or "none loaded"
            raise UserError(f"Unknown rewrite preset {name!r} (available: {known}).") from None

    def names(self) -> list[str]:
        return list(self.presets)

    def __contains__(self, name: object) -> bool:
        return name in self.presets

    def __iter__(self) -> Iterator[RewritePreset]:
        return iter(self.presets.values())

    def __len__(self) -> int:
        return len(self.presets)


def parse_preset(
    data: Mapping[str, Any], *, expected_name: str | None = None, source: Path | None = None
) -> RewritePreset:
    """Validate one preset's table; raise ``ValueError``/``TypeError`` with a reason to act on."""
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        allowed = ", ".join((*_REQUIRED, *_OPTIONAL))
        raise ValueError(f"unknown key(s) {', '.join(unknown)} (allowed: {allowed})")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")

    name = data["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name must be lowercase letters, digits, '-' or '_', got {name!r}")
    # The file name is the id a user sees in the folder; two different ids would confuse them and
    # would let two files claim the same preset.
    if expected_name is not None and name != expected_name:
        raise ValueError(f"name {name!r} must match the file name {expected_name!r}")

    label = data["label"]
    if not isinstance(label, str) or not label.strip():
        raise ValueError("label must be a non-empty string")
    instruction = data["instruction"]
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("instruction must be a non-empty string")
    llm = data["llm"]
    if not isinstance(llm, bool):
        raise TypeError(f"llm must be true or false, got {llm!r}")

    words = data["style_words"]
    if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError("style_words must be a list of non-empty strings")
    if not words:
        raise ValueError("style_words must not be empty (the rules backend needs them)")
    bad = [w for w in words if "," in w]
    if bad:
        raise ValueError(f"style_words are single phrases, without commas: {bad!r}")

    order = data.get("order", _DEFAULT_ORDER)
    if not isinstance(order, int) or isinstance(order, bool):
        raise TypeError(f"order must be an integer, got {order!r}")

    return RewritePreset(
        name=name,
        label=label.strip(),
        instruction=" ".join(instruction.split()),
        style_words=tuple(" ".join(w.split()) for w in words),
        llm=llm,
        order=order,
        source=source,
    )


def load_presets(folder: str | Path) -> PresetCatalog:
    """Load every ``*.toml`` in ``folder``; report bad files in ``errors`` instead of raising."""
    folder = Path(folder)
    catalog = PresetCatalog()
    if not folder.is_dir():
        catalog.errors.append(f"{folder}: preset folder not found")
        logger.warning("rewrite preset folder %s not found", folder)
        return catalog

    loaded: list[RewritePreset] = []
    for path in sorted(folder.glob("*.toml")):
        try:
            data = read_toml(path, "Rewrite preset")  # the app's one TOML reader
            loaded.append(parse_preset(data, expected_name=path.stem, source=path))
        except (UserError, OSError, ValueError, TypeError) as exc:
            message = f"{path.name}: {exc}"
            catalog.errors.append(message)
            logger.warning("skipping rewrite preset %s", message)

    for preset in sorted(loaded, key=lambda p: (p.order, p.name)):
        catalog.presets[preset.name] = preset
    return catalog
