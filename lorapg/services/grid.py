"""GridService: comparison grids (A1111's X/Y/Z plot) for the CLI, the REST API and the web UI's
X/Y/Z plot tab (``check`` previews a grid's count; a user may confirm a grid over max_grid_cells), and
a finished training run's epochs × scales grid (``submit_epochs``). Never imports gradio.

A grid is one job on the shared GPU queue that runs its cells in order through GenerationService,
so progress is "cell k of N" and cancel stops after the current cell (the grid drawn so far is
kept, unreached cells grey). Every cell is saved to the gallery by the generation result sink with
its own complete parameters; one labelled PNG per Z value is written to ``outputs/grids``.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lorapg.atomic_files import atomic_write
from lorapg.coercion import to_int
from lorapg.config import Settings
from lorapg.diffusion.engine import GenerationResult
from lorapg.diffusion.request import MAX_BATCH, MAX_SEED, GenerationRequest, parse_seed
from lorapg.errors import UserError, shorten
from lorapg.grid.axes import KINDS, LORA_PREFIX, Axis, apply_values, cell_count, check_prompt_sr, parse_axes
from lorapg.grid.render import GridLabels, render_grid
from lorapg.jobs import DONE, QUEUED, RUNNING, Job
from lorapg.limits import CFG_SCALE, LORA_SCALE, SEED, STEPS
from lorapg.services.generation import GenerationService

if TYPE_CHECKING:
    from lorapg.services.training import TrainingRun

log = logging.getLogger(__name__)

GRID = "grid"  # the job kind
# A grid over max_grid_cells runs only when the UI's user confirmed its exact count, and even then
# only up to this many times the limit: a typo (seed=1..1000 on two axes) must not queue a day of work.
CONFIRMED_FACTOR = 16
DEFAULT_EPOCH_SCALES = (0.5, 0.75, 1.0)


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
    restore_error: str | None = None  # a checkpoint axis' grid could not reload the user's model

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


@dataclass(frozen=True)
class GridCheck:
    """A grid checked without running it: what the UI previews before the user starts it."""

    cells: int  # all Z values together
    shape: str  # "3 × 2 × 2"
    grids: int  # one PNG per Z value
    limit: int  # Settings.max_grid_cells (0: none)

    @property
    def over_limit(self) -> bool:
        """More cells than max_grid_cells: the UI asks to confirm the count, the API refuses."""
        return bool(self.limit) and self.cells > self.limit


class UnknownGrid(UserError):
    """No grid job (or grid image) by that id: the API answers 404."""


class GridService:
    def __init__(self, settings: Settings, generation: GenerationService):
        self.settings = settings
        self.generation = generation

    @property
    def grids_dir(self) -> Path:
        return self.settings.outputs / "grids"

    def plan(
        self,
        base: GenerationRequest,
        x: str,
        y: str | None = None,
        z: str | None = None,
        *,
        confirmed_cells: int = 0,
        model: str | None = None,
    ) -> GridPlan:
        """Every cell's request, checked: a bad axis, value, LoRA or checkpoint fails here, before the queue.

        ``confirmed_cells``: the count a user confirmed (the UI), which lets a grid over
        max_grid_cells run; ``model``: every cell's model (a checkpoint axis overrides it), else the loaded one.
        """
        axes = parse_axes(x, y, z, self.settings.max_prompt_chars)
        self._check_count(axes, confirmed_cells)
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
        base_model = self.generation.check_model_ref(model) if model else None
        value_lists = [range(len(axis.values)) if axis is not None else range(1) for axis in axes]
        cells = []
        for index, (zi, yi, xi) in enumerate(itertools.product(*reversed(value_lists))):
            picked = [(axis, axis.values[vi]) for axis, vi in zip(axes, (xi, yi, zi), strict=True) if axis is not None]
            model_ref = next((models[value] for axis, value in picked if axis.kind == "checkpoint"), base_model)
            request = apply_values(picked, base)
            cells.append(Cell(index, (xi, yi, zi), self.generation.prepare(request), model_ref))
        return GridPlan(axes, cells)

    def _check_count(self, axes: list[Axis | None], confirmed_cells: int) -> int:
        """The cell count; over max_grid_cells only when ``confirmed_cells`` is that count (up to a hard cap)."""
        limit = self.settings.max_grid_cells
        count = cell_count(axes, 0)
        if not limit or count <= limit:
            return count
        if not confirmed_cells:
            cell_count(axes, limit)  # refused with the count (the API, the CLI, an unconfirmed UI grid)
        shape = _shape(axes)
        if confirmed_cells != count:
            raise UserError(
                f"The grid has {shape} = {count} cells now, not the {confirmed_cells} confirmed; "
                f"confirm {count} cells to make it."
            )
        if count > limit * CONFIRMED_FACTOR:
            raise UserError(
                f"The grid has {shape} = {count} cells; even confirmed, at most {limit * CONFIRMED_FACTOR} "
                f"({CONFIRMED_FACTOR} × max_grid_cells) are made: use fewer axis values."
            )
        return count

    def check(self, base: GenerationRequest, x: str, y: str | None = None, z: str | None = None) -> GridCheck:
        """Count and validate a grid without running it (the UI's preview); UserError names what is wrong.

        A grid over max_grid_cells passes here (``over_limit`` says so): the user may confirm its count.
        """
        axes = parse_axes(x, y, z, self.settings.max_prompt_chars)
        count = cell_count(axes, 0)
        self.plan(base, x, y, z, confirmed_cells=count)  # every other check, as the real run does them
        grids = len(axes[2].values) if axes[2] is not None else 1
        return GridCheck(count, _shape(axes), grids, self.settings.max_grid_cells)

    def axis_kinds(self) -> list[str]:
        """The kinds an axis may have, with ``lora:NAME`` spelled out for each LoRA in the library."""
        names = [info.name for info in self.generation.list_loras().loras]
        return [kind for kind in KINDS if kind != "lora:NAME"] + [f"{LORA_PREFIX}{name}" for name in names]

    def axis_hint(self, kind: str | None) -> str:
        """What the values of an axis of ``kind`` look like, and the names it may take."""
        kind = (kind or "").strip()
        if kind.lower().startswith(LORA_PREFIX):
            return f"Scales of {kind[len(LORA_PREFIX) :]}, {LORA_SCALE.describe()}, e.g. 0, 0.5, 1"
        hints = {
            "seed": f"Seeds, {SEED.describe()}, e.g. 1, 2, 3",
            "steps": f"Step counts, {STEPS.describe()}, e.g. 10, 20, 30",
            "cfg": f"CFG scales, {CFG_SCALE.describe()}, e.g. 4, 7, 10",
            "lora-scale": f"Scales of the lora-file axis' LoRA, {LORA_SCALE.describe()}, e.g. 0.5, 0.75, 1",
            "prompt-sr": "The text to replace (in the prompt), then its replacements, e.g. cat, dog, fox; "
            'quote a value holding a comma: "red, big"',
        }
        if kind in hints:
            return hints[kind]
        listed = {
            "lora-file": lambda: [info.name for info in self.generation.list_loras().loras],
            "sampler": self.generation.sampler_names,
            "checkpoint": self.generation.model_choices,
        }
        if kind in listed:
            return f"Names, comma-separated; available: {', '.join(listed[kind]()) or 'none'}"
        return "Choose a kind, then list its values, comma-separated (KIND=V1,V2,…)."

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
        confirmed_cells: int = 0,
        model: str | None = None,
    ) -> Job:
        """Queue the grid; ``out``: the grid PNG (several Z values: NAME-1.png, …), default ``outputs/grids``.
        ``confirmed_cells`` and ``model``: see ``plan``."""
        plan = self.plan(base, x, y, z, confirmed_cells=confirmed_cells, model=model)
        if self.generation.engine.model is None and not self.settings.model and not model:
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
        try:
            self._run_cells(plan, job, result, record)
        finally:
            # Restored whether the cells finished, were cancelled or one raised (an SDXL checkpoint
            # cell refusing an SD1 LoRA must not leave SDXL loaded for the user's next generation).
            if original is not None and any(cell.model_ref for cell in plan.cells):
                result.restore_error = self._restore_model(original, job)
        job.report(result.done, total, message=f"drawing the grid ({result.done} of {total} cells)")
        result.grids = self._write_grids(result, job.id, out)
        job.report(
            result.done, total, message=f"{result.done} of {total} cells" + (" (cancelled)" if result.cancelled else "")
        )
        return result

    def _run_cells(self, plan: GridPlan, job: Job, result: GridResult, record: bool) -> None:
        total = len(plan.cells)
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

    def _restore_model(self, original: str, job: Job) -> str | None:
        """Load the model the user had before a checkpoint axis (as A1111 does); the problem, if that fails.

        Never raises: called from a ``finally``, where raising would replace a failed cell's own error.
        """
        try:
            self.generation.engine.load_model(original)
            return None
        except Exception as exc:
            problem = (
                f"The model loaded before the grid ({shorten(original, 80)}) could not be loaded again "
                f"({type(exc).__name__}: {shorten(exc, 200)}); load a model before generating."
            )
            log.error("grid %s: %s", job.id, problem, exc_info=True)
            job.report(job.step, job.total, message=problem)
            return problem

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

    def cancel(self, job_id: str, owner: str | None = None) -> GridState:
        """Stop the grid after its current cell (the cells done so far are kept and drawn).

        ``owner``: the visitor asking; another visitor's grid is unknown to them, never cancelled."""
        self.generation.jobs.cancel(self.job(job_id, owner).id)
        return self.state(job_id)

    def grid_file(self, job_id: str, number: int) -> Path:
        """The grid PNG for the ``number``-th Z value (1-based), once drawn."""
        grids = self.state(job_id).grids
        if not 1 <= number <= len(grids):
            raise UnknownGrid(f"Grid {number} of job {shorten(job_id, 40)} does not exist (yet).")
        return grids[number - 1]

    def job(self, job_id: str, owner: str | None = None) -> Job:
        """The grid job ``job_id``; UserError for an unknown id, another kind of job or another owner's."""
        try:
            job = self.generation.jobs.get(job_id)
        except UserError:
            job = None
        if job is None or job.kind != GRID or (owner is not None and job.owner != owner):
            raise UnknownGrid(f"Unknown grid job id {shorten(job_id, 40)!r}.")
        return job

    # --- epochs × scales after a training run ----------------------------------------------------

    def submit_epochs(
        self,
        run: TrainingRun,
        scales: str | Sequence[float] = DEFAULT_EPOCH_SCALES,
        *,
        owner: str | None = None,
        **overrides,
    ) -> Job:
        """Queue the grid of a finished run's per-epoch LoRAs (and its final one: X) × ``scales`` (Y).

        The base is the run's sample image: its prompt (trigger word), seed and size, on the model
        it trained on. ``overrides``: GenerationRequest fields (steps, guidance_scale, …; None: the run's).
        """
        x, y = self.epochs_axes(run, scales)
        config = run.config
        base = GenerationRequest(
            prompt=config.sample_prompt.replace("{trigger}", config.trigger) or config.trigger,
            # None (CFG, sampler; steps without sample images): the trained family's defaults, filled in
            # by each cell's job (GenerationService.with_defaults); GenerationRequest's own are SD's.
            steps=config.sample_steps or None,
            guidance_scale=None,
            sampler=None,
            width=config.resolution or None,
            height=config.resolution or None,
            seed=config.sample_seed,
        )
        base = replace(base, **{key: value for key, value in overrides.items() if value is not None})
        return self.submit(base, x, y, owner=owner, model=config.model or None)

    def epochs_axes(self, run: TrainingRun, scales: str | Sequence[float] = DEFAULT_EPOCH_SCALES) -> tuple[str, str]:
        """(X, Y): ``lora-file=`` the run's per-epoch files then its final file, ``lora-scale=`` ``scales``;
        refused unless the run finished and its files are in the LoRA folder."""
        job, result = run.job, run.result
        what = f"Training run {shorten(job.id, 40)} ({shorten(run.config.name, 60)})"
        if job.status in (QUEUED, RUNNING):
            raise UserError(f"{what} is still {job.status}; make its epochs × scales grid once it is done.")
        if job.status != DONE or result is None or result.lora_path is None:
            raise UserError(f"{what} did not finish ({job.status}); an epochs × scales grid needs a finished run.")
        if not result.epoch_loras:
            raise UserError(
                f"{what} saved no per-epoch LoRA files (its last epoch is the LoRA itself); "
                "train two or more epochs (save_every_epochs 1) to compare epochs."
            )
        names = [self._library_name(path, what) for path in [*result.epoch_loras, result.lora_path]]
        text = scales if isinstance(scales, str) else ",".join(f"{float(scale):g}" for scale in scales)
        return f"lora-file={_csv_line(names)}", f"lora-scale={text}"

    def _library_name(self, path: Path, what: str) -> str:
        """The LoRA library's name for ``path`` (its path in the LoRA folder, without .safetensors)."""
        folder = self.generation.library.folder.resolve()
        path = Path(path).resolve()
        if not path.is_relative_to(folder):
            raise UserError(f"{what} wrote {path.name} outside the LoRA folder {folder}; copy it there first.")
        if not path.is_file():
            raise UserError(f"{what}: its LoRA file {path.name} no longer exists; train the run again.")
        return path.relative_to(folder).with_suffix("").as_posix()


def _shape(axes: list[Axis | None]) -> str:
    return " × ".join(str(len(axis.values)) for axis in axes if axis is not None)


def _csv_line(values: list[str]) -> str:
    """Axis values as one CSV line: a name holding a comma is quoted, as the axis parser reads it."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(values)
    return buffer.getvalue()
