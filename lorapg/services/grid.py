"""GridService: comparison grids (A1111's X/Y/Z plot) for the CLI and the REST API. Never imports gradio.

A grid is one job on the shared GPU queue that runs its cells in order through GenerationService,
so progress is "cell k of N" and cancel stops after the current cell (the grid drawn so far is
kept, unreached cells grey). Every cell is saved to the gallery by the generation result sink with
its own complete parameters; one labelled PNG per Z value is written to ``outputs/grids``.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lorapg.atomic_files import atomic_write
from lorapg.coercion import to_int
from lorapg.config import Settings
from lorapg.diffusion.engine import GenerationResult
from lorapg.diffusion.request import MAX_BATCH, MAX_SEED, GenerationRequest, parse_seed
from lorapg.errors import UserError, shorten
from lorapg.grid.axes import Axis, apply_value, cell_count, check_prompt_sr, parse_axes
from lorapg.grid.render import GridLabels, render_grid
from lorapg.jobs import Job
from lorapg.services.generation import GenerationService

log = logging.getLogger(__name__)

GRID = "grid"  # the job kind


@dataclass(frozen=True)
class Cell:
    index: int  # 0-based, in run order (X fastest, then Y, then Z)
    position: tuple[int, int, int]  # value indexes on X, Y, Z (0 for a missing axis)
    request: GenerationRequest  # prepared: checked, LoRA tags moved to the LoRA list
    model_ref: str | None  # the checkpoint axis' value, else None (the loaded model)


@dataclass(frozen=True)
class GridPlan:
    axes: list[Axis | None]  # X, Y, Z
    cells: list[Cell]

    def shape(self) -> tuple[int, int, int]:
        return tuple(len(axis.values) if axis is not None else 1 for axis in self.axes)


@dataclass
class GridResult:
    plan: GridPlan
    cells: list[GenerationResult | None]  # None: not generated (cancelled before it)
    grids: list[Path] = field(default_factory=list)  # one per Z value
    cancelled: bool = False  # the job queue reads this: stopped early, with what was done kept

    @property
    def done(self) -> int:
        return sum(result is not None for result in self.cells)

    def image_ids(self) -> list[int]:
        return [record.id for result in self.cells if result is not None for record in result.saved if record.id]


@dataclass(frozen=True)
class GridState:
    job_id: str
    status: str  # queued, running, done, error or cancelled (stopped after a cell)
    cell: int  # cells finished so far
    cells: int
    message: str
    grids: list[Path]  # one PNG per Z value, once drawn
    image_ids: list[int]  # the cells' gallery images
    error: str | None


class UnknownGrid(UserError):
    """No grid job (or grid image) by that id: the API answers 404."""


class GridService:
    def __init__(self, settings: Settings, generation: GenerationService):
        self.settings = settings
        self.generation = generation

    @property
    def grids_dir(self) -> Path:
        return self.settings.outputs / "grids"

    def plan(self, base: GenerationRequest, x: str, y: str | None = None, z: str | None = None) -> GridPlan:
        """Every cell's request, checked: a bad axis, value, LoRA or checkpoint fails here, before the queue."""
        axes = parse_axes(x, y, z, self.settings.max_prompt_chars)
        cell_count(axes, self.settings.max_grid_cells)
        base = self.generation.prepare(base)  # checks every field, the batch size's type included
        if to_int(base.batch_size) != 1:
            raise UserError("Batch size must be 1 in a grid: each cell is one image (add a seed axis for more).")
        check_prompt_sr(axes, base)
        if parse_seed(base.seed) is None:
            # One random seed for every cell, so the cells differ only by their axes (as A1111 does).
            base = replace(base, seed=random.randint(0, MAX_SEED - MAX_BATCH))
        if parse_seed(base.variation_seed, "Variation seed") is None:
            # Likewise one variation seed (used only at a variation strength over 0).
            base = replace(base, variation_seed=random.randint(0, MAX_SEED - MAX_BATCH))
        models = {
            value: self.generation.check_model_ref(value)
            for axis in axes
            if axis is not None and axis.kind == "checkpoint"
            for value in axis.values
        }
        value_lists = [range(len(axis.values)) if axis is not None else range(1) for axis in axes]
        cells = []
        for index, (zi, yi, xi) in enumerate(itertools.product(*reversed(value_lists))):
            request, model_ref = base, None
            for axis, vi in zip(axes, (xi, yi, zi), strict=True):
                if axis is None:
                    continue
                value = axis.values[vi]
                if axis.kind == "checkpoint":
                    model_ref = models[value]
                request = apply_value(axis, value, request, (base.prompt, base.negative_prompt))
            cells.append(Cell(index, (xi, yi, zi), self.generation.prepare(request), model_ref))
        return GridPlan(axes, cells)

    def submit(
        self,
        base: GenerationRequest,
        x: str,
        y: str | None = None,
        z: str | None = None,
        *,
        out: Path | None = None,
        owner: str | None = None,
        record: bool = True,
    ) -> Job:
        """Queue the grid; ``out``: the grid PNG (several Z values: NAME-1.png, …), default ``outputs/grids``."""
        plan = self.plan(base, x, y, z)
        if self.generation.engine.model is None and not self.settings.model:
            raise UserError("No base model is loaded yet; load one first, then make the grid.")
        work = lambda job: self._run(plan, job, out, record)  # noqa: E731
        return self.generation.jobs.submit(GRID, work, owner=owner, total=len(plan.cells))

    def run(
        self,
        base: GenerationRequest,
        x: str,
        y: str | None = None,
        z: str | None = None,
        *,
        out: Path | None = None,
        record: bool = True,
        on_progress: Callable[[Job], None] | None = None,
    ) -> GridResult:
        """Submit and wait: the CLI's call."""
        return self.generation._wait(self.submit(base, x, y, z, out=out, record=record), on_progress)

    def _run(self, plan: GridPlan, job: Job, out: Path | None, record: bool) -> GridResult:
        total = len(plan.cells)
        result = GridResult(plan, [None] * total)
        original = self.generation.engine.model.source.ref if self.generation.engine.model else None
        for cell in plan.cells:
            if job.cancel_requested():
                result.cancelled = True
                break
            k = cell.index + 1
            job.report(cell.index, total, message=f"cell {k} of {total}")

            def report(step, steps, preview=None, message="", k=k, index=cell.index):
                job.report(index, total, preview, message or f"cell {k} of {total}: step {step} of {steps}")

            # Never cancelled mid-cell: a cancel takes effect between cells, so every finished cell is whole.
            result.cells[cell.index] = self.generation.run_in_job(
                cell.request,
                job,
                model_ref=cell.model_ref,
                report=report,
                should_cancel=lambda: False,
                record=record,
            )
        if original is not None and any(cell.model_ref for cell in plan.cells):
            # A checkpoint axis leaves the model the user had loaded, as A1111 does.
            self.generation.engine.load_model(original)
        job.report(result.done, total, message=f"drawing the grid ({result.done} of {total} cells)")
        result.grids = self._write_grids(result, job.id, out)
        job.report(
            result.done, total, message=f"{result.done} of {total} cells" + (" (cancelled)" if result.cancelled else "")
        )
        return result

    def _write_grids(self, result: GridResult, job_id: str, out: Path | None) -> list[Path]:
        plan = result.plan
        columns, rows, layers = plan.shape()
        images = [cell.images[0] if cell is not None else None for cell in result.cells]
        done = next((image for image in images if image is not None), None)
        if done is None:
            return []  # cancelled before the first cell: nothing to draw
        paths = []
        x_axis, y_axis, z_axis = plan.axes
        for zi in range(layers):
            grid_cells = [
                [images[zi * rows * columns + yi * columns + xi] for xi in range(columns)] for yi in range(rows)
            ]
            title = x_axis.title if z_axis is None else f"{z_axis.title}: {z_axis.labels()[zi]}    {x_axis.title}"
            labels = GridLabels(
                title, x_axis.labels(), y_axis.title if y_axis else None, y_axis.labels() if y_axis else None
            )
            grid = render_grid(grid_cells, labels, done.size)
            path = self._grid_path(out, job_id, zi, layers)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as handle:
                grid.save(handle, format="PNG")
            log.info("grid %s: %s", job_id, path)
            paths.append(path)
        return paths

    def _grid_path(self, out: Path | None, job_id: str, zi: int, layers: int) -> Path:
        suffix = f"-{zi + 1}" if layers > 1 else ""
        if out is None:
            return self.grids_dir / f"grid-{job_id}{suffix}.png"
        out = Path(out)
        if out.suffix.lower() != ".png":
            return out / f"grid-{job_id}{suffix}.png"  # a folder
        return out.with_name(f"{out.stem}{suffix}.png")

    def state(self, job_id: str) -> GridState:
        """Where grid ``job_id`` stands, for callers that watch it (the API)."""
        job = self.job(job_id)
        result = job.result if isinstance(job.result, GridResult) else None
        return GridState(
            job_id=job.id,
            status=job.status,
            cell=result.done if result else job.step,
            cells=len(result.cells) if result else job.total,
            message=job.message,
            grids=list(result.grids) if result else [],
            image_ids=result.image_ids() if result else [],
            error=job.error,
        )

    def cancel(self, job_id: str) -> GridState:
        """Stop the grid after its current cell (the cells done so far are kept and drawn)."""
        self.generation.jobs.cancel(self.job(job_id).id)
        return self.state(job_id)

    def grid_file(self, job_id: str, number: int) -> Path:
        """The grid PNG for the ``number``-th Z value (1-based), once drawn."""
        grids = self.state(job_id).grids
        if not 1 <= number <= len(grids):
            raise UnknownGrid(f"Grid {number} of job {shorten(job_id, 40)} does not exist (yet).")
        return grids[number - 1]

    def job(self, job_id: str) -> Job:
        """The grid job ``job_id``; UserError for an unknown id or another kind of job."""
        try:
            job = self.generation.jobs.get(job_id)
        except UserError:
            job = None
        if job is None or job.kind != GRID:
            raise UnknownGrid(f"Unknown grid job id {shorten(job_id, 40)!r}.")
        return job
