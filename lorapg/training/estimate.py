"""How long a training run will take on this machine, from the speed its finished runs measured.

The step count comes from the dataset and the schedule (images × repeats × epochs / batch size);
the seconds per step from earlier runs of the same base model, at the same size when there are
some (else scaled by pixel count from another size). With no measured run the answer is
"unknown": a number made up from another machine would mislead more than it helps.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from lorapg.training.run_store import RunRecord

RECENT = 5  # the newest measured runs that count: the machine, drivers and load change over time


@dataclass(frozen=True)
class DurationEstimate:
    steps: int
    seconds: float | None  # None: no run of this model has been measured here yet
    basis: str  # where the number comes from, for the user

    def text(self) -> str:
        steps = f"{self.steps} step{'' if self.steps == 1 else 's'}"
        if self.seconds is None:
            return f"Estimated duration: unknown until the first run ({steps}; {self.basis})."
        return f"Estimated duration: about {format_duration(self.seconds)} ({steps}; {self.basis})."


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def estimate_duration(
    steps: int, model: str, resolution: int | None, batch_size: int, measured: Sequence[RunRecord]
) -> DurationEstimate:
    """``measured``: finished runs with a speed, newest first (``RunStore.measured``)."""
    same_model = [run for run in measured if run.model == model]
    if not same_model:
        return DurationEstimate(steps, None, "the speed is measured by finished runs of this model on this machine")
    same_size = [run for run in same_model if run.resolution == resolution][:RECENT]
    if same_size:
        per_step = statistics.median(_per_step(run, batch_size, 1.0) for run in same_size)
        where = f"at {resolution} px" if resolution else "at this size"
        basis = f"{per_step:.2f} s/step measured on this machine {where}, {len(same_size)} run(s)"
        return DurationEstimate(steps, steps * per_step + _overhead(same_size), basis)
    sized = [run for run in same_model if run.resolution][:RECENT]
    if not resolution or not sized:
        return DurationEstimate(steps, None, "no run at this size was measured on this machine yet")
    # Another size: a step's cost grows with its pixel count (roughly: attention grows faster).
    per_step = statistics.median(_per_step(run, batch_size, (resolution / run.resolution) ** 2) for run in sized)
    basis = f"rough: scaled from {len(sized)} run(s) at {sized[0].resolution} px on this machine"
    return DurationEstimate(steps, steps * per_step + _overhead(sized), basis)


def _per_step(run: RunRecord, batch_size: int, area_ratio: float) -> float:
    """Seconds per step of ``run`` scaled to ``batch_size`` images of ``area_ratio`` times its size."""
    assert run.seconds_per_step is not None
    return run.seconds_per_step * batch_size / max(run.batch_size, 1) * area_ratio


def _overhead(runs: Sequence[RunRecord]) -> float:
    """Loading the model and writing files: the part of a run that does not grow with its steps."""
    values = [run.overhead_s for run in runs if run.overhead_s is not None]
    return statistics.median(values) if values else 0.0
