"""CaptionService: auto-captioning and caption editing for the Train tab, the CLI and the API.

Never imports gradio. The captioner is a model like the others: built on first use, kept while the
same one is asked for, registered with the residency manager ("drop and reload", as the prompt
tools' LLM) so training's exclusive hold on the GPU unloads it; with no residency manager (CPU-only)
it is released when the caption run ends (see ``_held_for_this_run``). Captioning runs as a job on the
shared GPU queue (``start``) or in the caller's thread (``caption``, for the CLI).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapg.captioning import editing, memory
from lorapg.captioning.base import Captioner, CaptionOptions
from lorapg.captioning.runner import CaptionReport, Progress, caption_dataset
from lorapg.captioning.sources import (
    BLIP,
    BLIP2,
    FLORENCE2,
    HUB_IDS,
    KINDS,
    WD14,
    CaptionerSource,
    folder_names,
    locate,
    resolve,
)
from lorapg.config import Settings
from lorapg.errors import UserError, shorten
from lorapg.jobs import Job, JobQueue
from lorapg.training.dataset import Dataset, DatasetStore

log = logging.getLogger(__name__)

CAPTIONER_RESIDENT_NAME = "captioner"
CAPTION_JOB = "caption"
# Salesforce/blip2-opt-2.7b's parameters: checked against free RAM before its ~15 GB are downloaded.
HUB_BLIP2_PARAMS = 3_870_000_000


def build_captioner(source: CaptionerSource, device: str, allow_pickle: bool = False) -> Captioner:
    """``allow_pickle``: a transformers folder may load .bin (pickled) weights (--allow-pickle)."""
    from lorapg.captioning.transformers_models import Blip2Captioner, BlipCaptioner, Florence2Captioner
    from lorapg.captioning.wd14 import Wd14Tagger

    if source.kind == WD14:  # ONNX: no pickles
        return Wd14Tagger(source.folder, source.label, device)
    kinds: dict[str, Callable[..., Captioner]] = {
        BLIP: BlipCaptioner,
        BLIP2: Blip2Captioner,
        FLORENCE2: Florence2Captioner,
    }
    return kinds[source.kind](source.folder, source.label, device, allow_pickle=allow_pickle)


@dataclass(frozen=True)
class DatasetView:
    """The Train tab's view of a dataset: (image path, file) per image, caption table rows, validation."""

    images: list[tuple[str, str]]
    table: list[dict[str, str]]
    summary: str

    @property
    def captions(self) -> dict[str, str]:
        """file -> caption as the table shows them: what a later save compares the edited table with."""
        return {row["file"]: row["caption"] for row in self.table}


@dataclass(frozen=True)
class SavedCaptions:
    changed: list[str]
    stale: list[str]  # edited in the table, but changed on disk since it was loaded: not saved

    def note(self) -> str:
        """One line for the UI: what was saved and what was not, and what to do about it."""
        saved = f"Saved {len(self.changed)} caption(s)."
        if not self.stale:
            return saved
        files = ", ".join(shorten(file, 60) for file in self.stale[:10]) + (" …" if len(self.stale) > 10 else "")
        return (
            f"{saved} Not saved: {files}: changed since the table was loaded (another edit); "
            "they now show the saved caption, edit them again."
        )


def _spaced(caption: str) -> str:
    """A caption with its whitespace as ``checked_caption`` writes it: a table cell and a file compare equal."""
    return " ".join(str(caption or "").split())


class CaptionService:
    def __init__(
        self,
        settings: Settings,
        stores: Callable[[str | None], DatasetStore],
        jobs: JobQueue | None = None,
        *,
        residency: Any = None,
        device: str = "cpu",
        allow_any_path: bool = False,
    ):
        """``stores(owner)``: the datasets of a visitor (None: the shared ones), as TrainingService has them.

        ``allow_any_path``: a captioner may be any folder on this machine (the CLI, run by the owner);
        otherwise (UI, API) only blip / blip2 / florence2 / wd14 or a folder name in ``<models_dir>/captioners``.
        """
        self.settings = settings
        self.stores = stores
        self.jobs = jobs
        self.residency = residency
        self.device = device
        self.allow_any_path = allow_any_path
        self._choice: str | None = None
        self._captioner: Captioner | None = None
        self._lock = threading.Lock()
        self._runs = 0  # caption runs in progress: without residency the captioner leaves after the last

    # --- captioning ------------------------------------------------------------------------------

    @property
    def captioners_dir(self) -> Path:
        return Path(self.settings.models_dir) / "captioners"

    def captioner_choices(self) -> list[str]:
        """What the UI offers: the hub captioners, then the saved ones in ``captioners_dir``."""
        return [*KINDS, *folder_names(self.captioners_dir)]

    def check_captioner(self, choice: str) -> None:
        """Refuse a captioner this caller may not use, without loading or downloading it."""
        locate(choice, self._allowed_dir())

    def _allowed_dir(self) -> Path | None:
        return None if self.allow_any_path else self.captioners_dir

    def captioner(self, choice: str) -> Captioner:
        """The captioner for ``choice``, built once (a different choice releases the previous one)."""
        with self._lock:
            if self._captioner is not None and self._choice == choice:
                return self._captioner
            if self._captioner is not None:
                self._captioner.release()
            self._check_download(choice)
            source = resolve(choice, self._allowed_dir())
            captioner = build_captioner(source, self.device, self.settings.allow_pickle)
            if self.residency is not None:
                self.residency.register(
                    CAPTIONER_RESIDENT_NAME,
                    captioner.estimated_bytes(),
                    to_gpu=captioner.ensure_loaded,
                    drop=captioner.release,
                )
            self._choice, self._captioner = choice, captioner
            return captioner

    def _check_download(self, choice: str) -> None:
        """The hub BLIP-2 on CPU: refused before a download it could not load (RAM is what it is there;
        on a GPU the residency manager may still free VRAM, so the check waits for the load)."""
        if self.device == "cpu" and locate(choice, self._allowed_dir()) == BLIP2:
            memory.check_fits(f"{BLIP2} ({HUB_IDS[BLIP2]})", HUB_BLIP2_PARAMS, 4, self.device)

    def caption(
        self,
        name: str,
        choice: str,
        options: CaptionOptions,
        owner: str | None = None,
        progress: Progress | None = None,
        should_cancel: Callable[[], bool] = lambda: False,
    ) -> CaptionReport:
        """Caption dataset ``name`` now, in this thread."""
        dataset = self.dataset(name, owner)
        options = options.checked()
        captioner = self.captioner(choice)
        with self._resident(captioner):
            captioner.ensure_loaded()  # a model that cannot load fails here, before any image
            return caption_dataset(dataset, captioner, options, progress, should_cancel)

    def start(self, name: str, choice: str, options: CaptionOptions, owner: str | None = None) -> Job:
        """Queue captioning on the GPU queue; the job reports per image and its result is the report."""
        if self.jobs is None:
            raise UserError("Captioning jobs need the app's job queue; run `python -m lorapg dataset caption` instead.")
        dataset = self.dataset(name, owner)  # bad input is refused now, not inside the job
        options = options.checked()
        self.check_captioner(choice)

        def work(job: Job) -> CaptionReport:
            def report(done: int, total: int, file: str) -> None:
                job.report(done, total, message=f"captioned {file}")

            # The model is resolved (maybe downloaded) and loaded here, in the job, not in the request.
            return self.caption(dataset.name, choice, options, owner, report, job.cancel_requested)

        return self.jobs.submit(CAPTION_JOB, work, owner=owner, total=len(dataset.image_paths()))

    def job(self, job_id: str, owner: str | None = None) -> Job:
        if self.jobs is None:
            raise UserError(f"Unknown caption job {shorten(job_id, 40)!r}.")
        job = self.jobs.get(job_id)
        if job.kind != CAPTION_JOB or job.owner != owner:
            raise UserError(f"Unknown caption job {shorten(job_id, 40)!r}.")
        return job

    def release(self) -> None:
        with self._lock:
            if self._captioner is not None:
                self._captioner.release()

    def _resident(self, captioner: Captioner):
        if self.residency is None:
            return self._held_for_this_run(captioner)
        return self.residency.use(CAPTIONER_RESIDENT_NAME)

    @contextlib.contextmanager
    def _held_for_this_run(self, captioner: Captioner) -> Iterator[None]:
        """Without a residency manager (CPU-only, ZeroGPU) nothing would ever evict the captioner: it
        leaves RAM when the last caption run ends. Chosen over "when training starts or after an idle
        time": on CPU its weights (BLIP ~1.8 GB, BLIP-2 ~16 GB in fp32) would sit next to the pipeline
        and the trainer for nothing, while captioning is a step people run once per dataset and a reload
        from the page cache costs seconds next to the minutes a CPU run takes."""
        with self._lock:
            self._runs += 1
        try:
            yield
        finally:
            with self._lock:
                self._runs -= 1
                # Another run may still be captioning with it (a job next to a direct ``caption`` call).
                if self._runs == 0:
                    captioner.release()

    # --- editing ---------------------------------------------------------------------------------

    def dataset(self, name: str, owner: str | None = None) -> Dataset:
        return self.stores(owner).get(name)

    def names(self, owner: str | None = None) -> list[str]:
        return self.stores(owner).names()

    def captions(self, name: str, owner: str | None = None) -> list[dict[str, str]]:
        return [row.as_dict() for row in editing.rows(self.dataset(name, owner))]

    def table(self, name: str, owner: str | None = None) -> list[dict[str, str]]:
        """The Train tab's caption table: thumbnail (a data: URL of the dataset's own image), file, caption."""
        return editing.table_rows(self.dataset(name, owner))

    def set_caption(self, name: str, file: str, caption: str, owner: str | None = None) -> dict[str, str]:
        dataset = self.dataset(name, owner)
        dataset.set_caption(file, editing.checked_caption(caption, self.settings.max_prompt_chars))
        return {"file": file, "caption": dataset.caption(file)}

    def view(self, name: str, owner: str | None = None) -> DatasetView:
        """What the Train tab shows of a dataset: its images, the caption table and the validation summary."""
        dataset = self.dataset(name, owner)
        images = dataset.images()
        return DatasetView(
            images=[(str(image.path), image.file) for image in images],
            table=[editing.table_row(dataset, image) for image in images],
            summary=dataset.validate().summary(),
        )

    def set_captions(self, name: str, captions: dict[str, str], owner: str | None = None) -> list[str]:
        """Several captions at once (the API): all checked before any is written; the changed."""
        return self.save_captions(name, captions, None, owner).changed

    def save_captions(
        self, name: str, captions: dict[str, str], expected: dict[str, str] | None, owner: str | None = None
    ) -> SavedCaptions:
        """Save an edited caption table. ``expected``: the captions the table showed when it was loaded.

        Only the cells the user changed (caption != expected) are written, so a save never writes back a
        stale row over an edit made since (find/replace, another tab, the API). A changed cell whose file
        changed since too is skipped and reported: the two edits conflict and the user decides. A file
        ``expected`` lacks (an API client with no loaded table) is compared with the caption on disk."""
        dataset = self.dataset(name, owner)
        current = {row.file: row.caption for row in editing.rows(dataset)}
        expected = expected or {}
        changed: dict[str, str] = {}
        stale: list[str] = []
        for file, caption in captions.items():
            if file not in current:
                raise UserError(f"No image {shorten(file, 60)!r} in dataset {name}; reload the table.")
            caption = editing.checked_caption(caption, self.settings.max_prompt_chars)
            before, now = _spaced(expected.get(file, current[file])), _spaced(current[file])
            if caption in (before, now):
                continue  # not edited in the table (whatever is on disk now stays), or already saved
            if now != before:
                stale.append(file)
            else:
                changed[file] = caption
        for file, caption in changed.items():
            dataset.set_caption(file, caption)
        if stale:
            log.info("caption save in %s skipped %d row(s) changed since the table was loaded", name, len(stale))
        return SavedCaptions(list(changed), stale)

    def tag_frequency(self, name: str, trigger: str = "", repeats: int = 1, owner: str | None = None):
        return editing.tag_frequency(self.dataset(name, owner), trigger, repeats)

    def find_replace(self, name: str, find: str, replace: str, regex: bool = False, owner: str | None = None):
        limit = self.settings.max_prompt_chars
        return editing.find_replace(self.dataset(name, owner), find, replace, regex=regex, max_chars=limit)

    def add_tag(self, name: str, tag: str, position: str = editing.END, owner: str | None = None) -> list[str]:
        return editing.add_tag(self.dataset(name, owner), tag, position, max_chars=self.settings.max_prompt_chars)

    def remove_tag(self, name: str, tag: str, owner: str | None = None) -> list[str]:
        return editing.remove_tag(self.dataset(name, owner), tag)
