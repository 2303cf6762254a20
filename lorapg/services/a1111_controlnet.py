"""A1111's ControlNet extension API (Mikubill/sd-webui-controlnet), as far as this app runs it.

txt2img's ``alwayson_scripts.controlnet.args`` is a list of units (``image`` or ``input_image``
base64, ``module``, ``model``, ``weight``, ``guidance_start``, ``guidance_end``, ``resize_mode``,
``threshold_a``/``b``, ``control_mode``, ``enabled``); ``/controlnet/model_list`` and
``/controlnet/module_list`` list what can be asked for. Written from the extension's documented API,
not its code. Never imports gradio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorapg.coercion import CoercionError, shown, to_bool
from lorapg.diffusion.controlnet import ControlUnit
from lorapg.errors import UserError
from lorapg.limits import CONTROL_PREPROCESSORS

ARGS_FIELD = "alwayson_scripts.controlnet.args"
EXTENSION_API_VERSION = 2  # GET /controlnet/version: the units-in-alwayson_scripts API
BALANCED = ("0", "balanced")  # control_mode: the extension's default, which is what diffusers runs
# unit key -> ControlUnit field, for the values passed through as given (the request checks them)
_PASSED = {
    "module": "module",
    "model": "model",
    "weight": "weight",
    "guidance_start": "guidance_start",
    "guidance_end": "guidance_end",
    "resize_mode": "resize_mode",
}


def units_from_scripts(scripts: Any, decode: Callable[[str, str], bytes]) -> tuple[ControlUnit, ...]:
    """The ControlNet units of an ``alwayson_scripts`` object (other scripts are ignored, as unknown keys).

    ``decode(value, field)``: a base64 image field's bytes, within the upload limit.
    """
    if not isinstance(scripts, dict):
        return ()
    script = next((value for key, value in scripts.items() if str(key).casefold() == "controlnet"), None)
    if script is None:
        return ()
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise UserError(f"{ARGS_FIELD} must be a list of ControlNet units (objects), got {shown(args)}.")
    units = []
    for index, arg in enumerate(args):
        field = f"{ARGS_FIELD}[{index}]"
        if not isinstance(arg, dict):
            raise UserError(f"{field} must be an object (module, model, image, weight, ...), got {shown(arg)}.")
        if _enabled(field, arg.get("enabled", True)):
            units.append(_unit(field, arg, decode))
    return tuple(units)


def _enabled(field: str, value: Any) -> bool:
    try:
        return to_bool(value)
    except CoercionError:
        raise UserError(f"{field}.enabled must be true or false, got {shown(value)}.") from None


def _unit(field: str, arg: dict, decode: Callable[[str, str], bytes]) -> ControlUnit:
    mode = arg.get("control_mode")
    if mode is not None and str(mode).strip().casefold() not in BALANCED:
        raise UserError(f"{field}.control_mode {shown(mode)} is not available here; use 0 (Balanced).")
    values = {ours: arg[theirs] for theirs, ours in _PASSED.items() if arg.get(theirs) is not None}
    for key in ("threshold_a", "threshold_b"):
        value = arg.get(key)
        # The extension sends -1 (or its slider's value) where a preprocessor has no such setting.
        if value is not None and not (isinstance(value, int | float) and value < 0):
            values[key] = value
    image = arg.get("image") or arg.get("input_image")
    if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...} form
        image = image.get("image")
    if image:
        values["image"] = decode(image, f"{field}.image")
    return ControlUnit(**{"model": "", **values})


def module_list() -> list[str]:
    return list(CONTROL_PREPROCESSORS)
