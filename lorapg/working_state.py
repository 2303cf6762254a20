"""The working prompt, kept on disk so a restart or a closed browser tab never loses it.

One small JSON file holds what the user is working on: prompt, negative prompt, keywords, the LoRA
selection with its scales, and the generation parameters (clip skip included). It is rewritten atomically (temp file in
the same folder, then ``os.replace``), so a crash mid-write leaves the previous version, never half
a file. Reading is forgiving: a missing, corrupt or hand-edited file gives the defaults for what
cannot be read, with a log line, because losing a draft must never stop the app from starting.

A public app keeps one file per visitor (``VisitorWorkingStates``): a draft is private.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lorapg.atomic_files import atomic_write
from lorapg.hosting.visitors import visitor_key

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class WorkingValues:
    """What the user is working on. None for a parameter means "the app's default"."""

    prompt: str = ""
    negative_prompt: str = ""
    keywords: str = ""
    loras: tuple[tuple[str, float], ...] = ()  # selected LoRAs in order, each with its scale
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    clip_skip: int | None = None  # A1111's "Clip skip"; files written before it existed lack it (the default)
    extra: dict[str, Any] = field(default_factory=dict)  # room for other tabs' fields

    @property
    def lora_names(self) -> list[str]:
        return [name for name, _ in self.loras]

    @property
    def lora_scales(self) -> dict[str, float]:
        return dict(self.loras)


_TEXT_FIELDS = ("prompt", "negative_prompt", "keywords")
_INT_FIELDS = ("steps", "width", "height", "seed", "batch_size", "clip_skip")


def _read_field(name: str, raw: Any) -> Any:
    """The value of one field from JSON; ValueError when it has the wrong type."""
    if name in _TEXT_FIELDS:
        if not isinstance(raw, str):
            raise ValueError("not text")
        return raw
    if raw is None:
        return None
    if name in _INT_FIELDS:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or int(raw) != raw:
            raise ValueError("not a whole number")
        return int(raw)
    if name == "guidance_scale":
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError("not a number")
        return float(raw)
    if name == "sampler":
        if not isinstance(raw, str):
            raise ValueError("not text")
        return raw
    if name == "loras":
        return _read_loras(raw)
    if name == "extra":
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        return raw
    raise ValueError("unknown field")


def _read_loras(raw: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(raw, list):
        raise ValueError("not a list")
    loras = []
    for item in raw:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or isinstance(item[1], bool)
            or not isinstance(item[1], int | float)
        ):
            raise ValueError(f"entry {item!r} is not [name, scale]")
        loras.append((item[0], float(item[1])))
    return tuple(loras)


def values_from_dict(data: dict[str, Any]) -> WorkingValues:
    """Build values from a decoded file; a broken field falls back to its default on its own."""
    known = {f.name for f in fields(WorkingValues)}
    values: dict[str, Any] = {}
    for name, raw in data.items():
        if name == "version":
            continue
        if name not in known:
            log.info("working state: ignoring unknown field %r", name)
            continue
        try:
            values[name] = _read_field(name, raw)
        except ValueError as exc:
            log.warning("working state: field %r is unusable (%s); using the default", name, exc)
    return WorkingValues(**values)


class WorkingState:
    """The working-state file at ``path`` (e.g. ``outputs/working_state.json``)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        # Gradio runs change handlers on several threads; the read-merge-write must not interleave.
        self._lock = threading.Lock()

    def for_owner(self, owner: str | None) -> WorkingState:
        """The state of visitor ``owner``: this one file, where visitors are not kept apart."""
        return self

    def load(self) -> WorkingValues:
        """The saved values; defaults (logged) when the file is missing or cannot be read."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return WorkingValues()
        except OSError as exc:
            log.warning("cannot read the working state %s (%s); starting empty", self.path, exc)
            return WorkingValues()
        try:
            data = json.loads(text)
        except ValueError as exc:
            log.warning("the working state %s is corrupt (%s); starting empty", self.path, exc)
            return WorkingValues()
        if not isinstance(data, dict):
            log.warning("the working state %s is not a JSON object; starting empty", self.path)
            return WorkingValues()
        return values_from_dict(data)

    def save(self, values: WorkingValues) -> None:
        """Write ``values`` atomically. Errors are logged, not raised: typing must never fail."""
        with self._lock:
            self._write(values)

    def update(self, **changes: Any) -> WorkingValues:
        """Change some fields (the others, e.g. keywords from another tab, are kept); return all."""
        if "loras" in changes:
            changes["loras"] = tuple((str(name), float(scale)) for name, scale in changes["loras"])
        with self._lock:
            values = replace(self.load(), **changes)
            self._write(values)
        return values

    def _write(self, values: WorkingValues) -> None:
        data = {"version": FORMAT_VERSION, **asdict(values)}
        data["loras"] = [list(item) for item in values.loras]
        try:
            with atomic_write(self.path, "w") as handle:
                json.dump(data, handle, ensure_ascii=False, indent=1)
        except (OSError, TypeError, ValueError) as exc:
            log.warning("could not save the working state to %s: %s", self.path, exc)


class VisitorWorkingStates:
    """One working-state file per visitor under ``folder``, named by a hash of the visitor's id."""

    MAX_OPEN = 10_000  # states kept in memory (each holds the lock that orders its file's writes)

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self._states: OrderedDict[str, WorkingState] = OrderedDict()
        self._lock = threading.Lock()

    def for_owner(self, owner: str | None) -> WorkingState:
        key = visitor_key(owner or "")
        with self._lock:
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = WorkingState(self.folder / f"{key}.json")
                while len(self._states) > self.MAX_OPEN:
                    self._states.popitem(last=False)
            self._states.move_to_end(key)
            return state
