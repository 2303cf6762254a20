"""Samplers by the names users know from AUTOMATIC1111, mapped to diffusers schedulers.

Each scheduler is built from the model's own scheduler config (kept from load time), so switching
samplers never compounds settings from an earlier switch; the same sampler again reuses its scheduler.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from lorapg.diffusion.families import family_label, is_transformer_family
from lorapg.errors import UserError


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler_class: type
    options: dict[str, Any] = field(default_factory=dict)
    # A1111 >= 1.8 writes the sampler and the noise schedule as two fields ("DPM++ 2M" + "Karras").
    a1111_sampler: str = ""
    a1111_schedule: str = "Automatic"


_SDE = {"algorithm_type": "sde-dpmsolver++"}
_KARRAS = {"use_karras_sigmas": True}

SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("Euler a", EulerAncestralDiscreteScheduler, a1111_sampler="Euler a"),
        Sampler("Euler", EulerDiscreteScheduler, a1111_sampler="Euler"),
        Sampler("DPM++ 2M", DPMSolverMultistepScheduler, a1111_sampler="DPM++ 2M"),
        Sampler("DPM++ 2M Karras", DPMSolverMultistepScheduler, _KARRAS, "DPM++ 2M", "Karras"),
        Sampler("DPM++ 2M SDE", DPMSolverMultistepScheduler, _SDE, "DPM++ 2M SDE"),
        Sampler("DPM++ 2M SDE Karras", DPMSolverMultistepScheduler, {**_SDE, **_KARRAS}, "DPM++ 2M SDE", "Karras"),
        Sampler("DDIM", DDIMScheduler, a1111_sampler="DDIM"),
        Sampler("UniPC", UniPCMultistepScheduler, a1111_sampler="UniPC"),
        Sampler("Heun", HeunDiscreteScheduler, a1111_sampler="Heun"),
        Sampler("LMS", LMSDiscreteScheduler, a1111_sampler="LMS"),
    ]
}
DEFAULT_SAMPLER = "DPM++ 2M Karras"

# Flow-matching models (Flux, SD 3.5) are sampled along sigmas the pipeline computes (with the
# resolution-dependent shift ``mu``), which only schedulers whose ``set_timesteps`` takes ``sigmas``
# and ``mu`` accept: diffusers 0.42's FlowMatchEulerDiscrete and UniPC (flow sigmas). A1111-Forge
# names them "Euler" with the schedules "Simple" / "Beta", and "UniPC".
_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("Euler", FlowMatchEulerDiscreteScheduler, a1111_sampler="Euler", a1111_schedule="Simple"),
        Sampler("Euler Beta", FlowMatchEulerDiscreteScheduler, {"use_beta_sigmas": True}, "Euler", "Beta"),
        Sampler("UniPC", UniPCMultistepScheduler, _FLOW, a1111_sampler="UniPC", a1111_schedule="Simple"),
    ]
}
DEFAULT_FLOW_SAMPLER = "Euler"


def samplers_for(family: str | None) -> dict[str, Sampler]:
    """The samplers that apply to ``family`` (None: the Stable Diffusion ones)."""
    return FLOW_SAMPLERS if is_transformer_family(family) else SAMPLERS


def get_sampler(name: str, family: str | None = None) -> Sampler:
    table = samplers_for(family)
    try:
        return table[name]
    except KeyError:
        pass
    if name in SAMPLERS or name in FLOW_SAMPLERS:
        raise UserError(
            f"Sampler {name!r} does not apply to {family_label(family)} models. Choose one of: {', '.join(table)}."
        )
    raise UserError(f"Unknown sampler {name!r}. Choose one of: {', '.join(table)}.")


def check_sampler_name(name: str, family: str | None = None) -> None:
    """Refuse a name no table knows; with an SD ``family``, refuse the flow-matching ones too.

    A transformer family (or no model yet) accepts an SD name here: its engine then swaps in the
    family's own sampler with a warning (the request's default sampler is an SD one).
    """
    if family is not None and not is_transformer_family(family):
        get_sampler(name, family)
    elif name not in FLOW_SAMPLERS:
        get_sampler(name, None)


def any_sampler(name: str) -> Sampler:
    """The sampler called ``name`` in either table (the SD one where both have the name)."""
    return SAMPLERS.get(name) or FLOW_SAMPLERS[name]


def make_scheduler(name: str, base_config: Any, family: str | None = None):
    """A fresh scheduler for ``name`` built from the model's original scheduler config."""
    sampler = get_sampler(name, family)
    return sampler.scheduler_class.from_config(base_config, **sampler.options)


# Schedulers ``scheduler_for`` made -> (sampler name, the base config they were made from).
_MADE_FOR: weakref.WeakKeyDictionary[Any, tuple[str, Any]] = weakref.WeakKeyDictionary()


def scheduler_for(name: str, base_config: Any, current: Any = None, family: str | None = None):
    """The scheduler for ``name``: ``current`` again when this function made it for ``name`` from
    ``base_config``, else a fresh one (``make_scheduler``).

    Building one parses the config and recomputes its noise tables (about a millisecond, on every
    generation). Reusing it is what a plain diffusers pipeline does between calls: each call's
    ``set_timesteps`` recomputes the timesteps and sigmas from the config and resets the step state
    (step index, multistep history), so the image is the same as with a fresh scheduler, even after
    a cancelled run.
    """
    made = _MADE_FOR.get(current) if current is not None else None
    if made is not None and made[0] == name and made[1] is base_config:
        return current
    scheduler = make_scheduler(name, base_config, family)
    _MADE_FOR[scheduler] = (name, base_config)
    return scheduler
