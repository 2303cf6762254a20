"""One strict way to read values people type: config files, environment variables, flags, requests.

Settings (``lorapg.config``), training configs (``lorapg.training.config``), generation requests and the
prompt tools all coerce through here, so a value one of them accepts is a value every other accepts:

- a whole number is whole: ``7860`` and ``"7860"`` are 7860, ``7860.9`` is refused (never truncated);
- a number is finite: ``nan`` and ``inf`` are refused everywhere;
- a yes/no is one of true/false, 1/0, yes/no, on/off (any case);
- ``true`` is not a number (JSON and TOML booleans would otherwise count as 1).

The ``to_*`` functions raise ``CoercionError`` (a ``ValueError``) whose message says what was expected;
callers name the field. ``coerce_field`` does that for dataclass fields, by their annotation.
"""

from __future__ import annotations

import math
import numbers
import os
import tomllib
from pathlib import Path
from typing import Any

from lorapg.errors import UserError, shorten
from lorapg.limits import RANDOM_SEED, SEED

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})
MAX_NUMERAL_CHARS = 64  # the longest text read as a number
SHOWN_CHARS = 40  # how much of a refused value a message repeats (a 10 MB value is not echoed)


class CoercionError(ValueError):
    """``value`` is not of the kind asked for; the message is what was expected ("a whole number")."""


def shown(value: object) -> str:
    """``repr(value)`` cut short: a message repeats enough of a refused value to recognise it."""
    return shorten(repr(value), SHOWN_CHARS)


def to_int(value: object) -> int:
    """A whole number from an int, a float with no fraction, or text such as ``"7860"`` or ``"7860.0"``."""
    if isinstance(value, bool):
        raise CoercionError("a whole number, not true/false")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str):
        text = _numeral(value, "a whole number")
        try:
            return int(text)  # exact; float() would round 2**64 + 1
        except ValueError:
            pass
        value = _text_to_float(text, "a whole number")
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise CoercionError("a whole number")


def to_float(value: object) -> float:
    """A finite number from an int, a float or numeric text; ``nan`` and ``inf`` are refused."""
    if isinstance(value, bool):
        raise CoercionError("a number, not true/false")
    if isinstance(value, str):
        value = _text_to_float(_numeral(value, "a number"), "a number")
    if isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
        if math.isfinite(number):
            return number
        raise CoercionError("a finite number")
    raise CoercionError("a number")


def to_bool(value: object) -> bool:
    """true/false, 1/0, yes/no, on/off (text in any case, or the ints 1 and 0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise CoercionError("true or false (also 1/0, yes/no, on/off)")


def to_text(value: object) -> str:
    """Text, a path, or a number written as text; lists, tables and true/false are refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)  # type: ignore[return-value]  # a str path; bytes paths never reach here
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return str(value)
    raise CoercionError("text")


def _numeral(text: str, expected: str) -> str:
    # No setting, seed or size needs more digits; a 4000-digit "number" would be parsed (quadratic in
    # its length) and then echoed by a range message.
    text = text.strip()
    if len(text) > MAX_NUMERAL_CHARS:
        raise CoercionError(expected)
    return text


def _text_to_float(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise CoercionError(expected) from None


def checked_number(label: str, value: object) -> float:
    """A finite number, or a UserError naming ``label`` (request fields: img2img, hires fix)."""
    try:
        number = to_float(value)
    except CoercionError:
        raise UserError(f"{label} must be a number, got {shown(value)}.") from None
    if not math.isfinite(number):
        raise UserError(f"{label} must be a number, got {shown(value)}.")
    return number


def checked_whole(label: str, value: object) -> int:
    try:
        return to_int(value)
    except CoercionError:
        raise UserError(f"{label} must be a whole number, got {shown(value)}.") from None


def checked_flag(label: str, value: object) -> bool:
    try:
        return to_bool(value)
    except CoercionError:
        raise UserError(f"{label} must be true or false, got {shown(value)}.") from None


def coerce_field(kind: str, value: object) -> Any:
    """``value`` as a dataclass field annotated ``kind`` (annotations are strings here).

    ``str | None``: ``None`` or ``""`` is None; ``str``: ``None`` is ``""``.
    """
    if kind == "bool":
        return to_bool(value)
    if kind == "int":
        return to_int(value)
    if kind == "float":
        return to_float(value)
    if kind == "Path":
        return Path(to_text(value)).expanduser()
    if kind.startswith("str | None") or kind.startswith("Path | None"):
        if value is None or value == "":
            return None
        return Path(to_text(value)).expanduser() if kind.startswith("Path") else to_text(value)
    if kind == "str":
        return "" if value is None else to_text(value)
    raise TypeError(f"no coercion for fields of type {kind!r}")  # a programming error, not a user's


def coerce_setting(label: str, kind: str, value: object) -> Any:
    """``coerce_field`` with the UserError users see: it names the setting and what to write."""
    try:
        return coerce_field(kind, value)
    except CoercionError as exc:
        raise UserError(f"{label}: {shown(value)} is not a valid {kind}; write {exc}.") from None


def parse_seed(value: object, label: str = "Seed") -> int | None:
    """A seed in ``SEED``'s range, or None for "pick one at random" (``-1``, None, ``""``, ``"random"``).

    The Generate tab, the CLI, the API and the prompt tools' LLM seed all read seeds here.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", str(RANDOM_SEED), "random"}):
        return None
    try:
        seed = to_int(value)
    except CoercionError:
        # str() first: nan, True and [1] are quoted like text, so the message reads the same for every type.
        raise UserError(
            f"{label} {shown(str(value))} is not a whole number; use {SEED.describe()} or {RANDOM_SEED} for random."
        ) from None
    if seed == RANDOM_SEED:
        return None
    if seed not in SEED:
        shown_seed = shorten(str(seed), SHOWN_CHARS)  # a 500-digit "seed" is not echoed in full
        raise UserError(f"{label} {shown_seed} is outside {SEED.describe()}; use {RANDOM_SEED} for a random seed.")
    return seed


def read_toml(path: Path, what: str = "Config file") -> dict[str, Any]:
    """The table in a TOML file, or a UserError that names the file and what is wrong with it.

    ``what`` is how the message calls the file ("Training config", "Training preset").
    """
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist.") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a TOML file.") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text ({exc.reason}); save it as UTF-8.") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{what} {path} is not valid TOML: {exc}.") from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read: {exc.strerror or exc}.") from None
