"""``python -m lorapg dataset list|validate|caption``: training datasets from the command line.

The same ``CaptionService`` the Train tab and ``/api/v1/datasets`` use, over the shared datasets
(``models/datasets``), built without the diffusion engines: captioning loads only the captioner.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from lorapg.captioning.base import DEFAULT_MAX_LENGTH, SENTENCE, STYLES, CaptionOptions

log = logging.getLogger(__name__)


def add_dataset_parser(commands: argparse._SubParsersAction, add_settings: Callable[[argparse.ArgumentParser], None]):
    dataset = commands.add_parser("dataset", help="list, validate or auto-caption training datasets")
    actions = dataset.add_subparsers(dest="dataset_command", required=True)
    listing = actions.add_parser("list", help="every dataset: name, images, images with a caption")
    validate = actions.add_parser("validate", help="which images can be trained on, and why others cannot")
    caption = actions.add_parser("caption", help="write a .txt caption beside each image with a captioning model")
    for action in (validate, caption):
        action.add_argument("name", help="dataset name as `dataset list` shows it")
    caption.add_argument(
        "--captioner", required=True, help="blip, blip2, florence2, wd14 (downloaded once) or a saved model folder"
    )
    caption.add_argument("--style", choices=STYLES, default=SENTENCE, help="a sentence or comma-separated tags")
    caption.add_argument("--trigger", default="", help="trigger word put first in every caption")
    caption.add_argument(
        "--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="most words or tags per caption (default 40)"
    )
    caption.add_argument("--batch-size", type=int, default=4, help="images per model call (default 4)")
    caption.add_argument("--overwrite", action="store_true", help="replace existing captions (default: fill missing)")
    for action in (listing, validate, caption):
        add_settings(action)


def caption_service(settings, device: str = "cpu"):
    from lorapg.services.captions import CaptionService
    from lorapg.training.dataset import DatasetLimits, DatasetStore

    store = DatasetStore(Path(settings.models_dir) / "datasets", DatasetLimits.from_settings(settings))
    # The CLI is run by the owner: a captioner may be any folder on this machine.
    return CaptionService(settings, lambda owner: store, device=device, allow_any_path=True)


def run_dataset(args: argparse.Namespace, settings) -> int:
    command = args.dataset_command
    device = "cpu"
    if command == "caption":  # torch (seconds to import) only where a model runs
        from lorapg.devices import pick_device

        device = str(pick_device(settings.device))
    service = caption_service(settings, device)
    if command == "list":
        names = service.names()
        for name in names:
            rows = service.captions(name)
            print(f"{name}\t{len(rows)} image(s)\t{sum(1 for r in rows if r['caption'])} captioned")
        if not names:
            print(f"no datasets in {Path(settings.models_dir) / 'datasets'}", file=sys.stderr)
    elif command == "validate":
        report = service.dataset(args.name).validate()
        print(report.summary())
        return 0 if report.valid else 1
    elif command == "caption":
        return _caption(service, args)
    return 0


def _caption(service, args: argparse.Namespace) -> int:
    options = CaptionOptions(args.style, args.trigger, args.max_length, args.overwrite, args.batch_size)

    def progress(done: int, total: int, file: str) -> None:
        print(f"[{done}/{total}] {file}", file=sys.stderr, flush=True)

    try:
        report = service.caption(args.name, args.captioner, options, progress=progress)
    finally:
        service.release()
    for file, reason in report.skipped.items():
        print(f"skipped {file}: {reason}", file=sys.stderr)
    print(report.summary())
    return 1 if report.skipped and not report.written else 0
