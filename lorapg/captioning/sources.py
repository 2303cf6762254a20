"""Which captioner a user's choice means, and where its files are.

A choice is a short name (``blip``, ``blip2``, ``florence2``, ``wd14``: a hub repo downloaded once into
the Hugging Face cache) or a local folder in one of four layouts, detected from its files (the app's UI
and API take such a folder only by its name in ``<models_dir>/captioners``; the CLI any path):

* ``model.onnx`` + ``selected_tags.csv``: a WD14-family tagger as SmilingWolf's repos lay it out;
* ``config.json`` with ``model_type`` ``blip``: BLIP saved with ``save_pretrained``;
* ``config.json`` with ``model_type`` ``blip-2``: BLIP-2 saved with ``save_pretrained`` (loaded only
  where its memory estimate fits: see ``lorapg.captioning.memory``);
* ``config.json`` with ``model_type`` ``florence2``: Florence-2 in transformers' native format.

A folder whose config asks for remote code (``auto_map``, as ``microsoft/Florence-2-base`` does) is
refused with a pointer to the native repo: this app never runs a model repo's own Python.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lorapg.errors import UserError, check_ref_length, shorten

log = logging.getLogger(__name__)

BLIP, BLIP2, FLORENCE2, WD14 = "blip", "blip2", "florence2", "wd14"
KINDS = (BLIP, BLIP2, FLORENCE2, WD14)
HUB_IDS = {
    BLIP: "Salesforce/blip-image-captioning-large",
    BLIP2: "Salesforce/blip2-opt-2.7b",
    # The transformers-native conversion; microsoft/Florence-2-base needs trust_remote_code.
    FLORENCE2: "florence-community/Florence-2-base",
    WD14: "SmilingWolf/wd-vit-tagger-v3",
}
# Only what each model needs: a tagger repo also holds other formats.
HUB_FILES = {
    BLIP: ["*.json", "*.safetensors", "*.txt"],
    BLIP2: ["*.json", "*.safetensors", "*.txt"],
    FLORENCE2: ["*.json", "*.safetensors", "*.txt"],
    WD14: ["model.onnx", "selected_tags.csv", "config.json"],
}
WD14_FILES = ("model.onnx", "selected_tags.csv")
# What a folder NAME may not hold: path separators, a drive colon, shell wildcards, control characters.
_UNSAFE_NAME = re.compile(r'[/\\:*?"<>|\x00-\x1f]')


@dataclass(frozen=True)
class CaptionerSource:
    kind: str
    folder: Path
    label: str


def resolve(choice: str, captioners_dir: Path | None = None) -> CaptionerSource:
    """The kind and local folder of ``choice`` (downloading a hub model on first use).

    ``captioners_dir``: where the app (UI, API) looks for a captioner folder by its NAME; no other
    folder is accepted. None lets ``choice`` be any folder on this machine: the CLI's owner only.
    """
    located = locate(choice, captioners_dir)
    if isinstance(located, str):
        repo = HUB_IDS[located]
        return CaptionerSource(located, download(repo, HUB_FILES[located]), repo)
    return CaptionerSource(detect_kind(located), located, str(located))


def locate(choice: str, captioners_dir: Path | None = None) -> str | Path:
    """A hub kind (``blip`` …) or the folder ``choice`` names, checked without loading or downloading."""
    choice = check_ref_length((choice or "").strip(), "Captioner")
    if not choice:
        raise UserError(f"Captioner is empty; choose {', '.join(KINDS)} or a local folder.")
    if choice.lower() in HUB_IDS:
        return choice.lower()
    if captioners_dir is not None:
        return _named_folder(choice, captioners_dir)
    folder = Path(choice).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"Captioner {shorten(choice)!r} is neither {', '.join(KINDS)} nor an existing folder; "
            "pick one of those names or give the folder of a saved captioning model."
        )
    return folder


def folder_names(captioners_dir: Path) -> list[str]:
    """The captioner folders the app offers: sub-folders of ``captioners_dir`` (none when it is missing)."""
    try:
        return sorted(p.name for p in Path(captioners_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _named_folder(choice: str, captioners_dir: Path) -> Path:
    """``captioners_dir/choice`` when ``choice`` is one folder NAME there; a path is refused before any
    file-system look-up, so the answer says nothing about what exists elsewhere on the server."""
    choices = ", ".join([*KINDS, *folder_names(captioners_dir)])
    refusal = (
        f"Captioner {shorten(choice)!r} is not one of {choices}; choose one of those "
        f"(a saved model is a folder NAME in {captioners_dir})."
    )
    if _UNSAFE_NAME.search(choice) or choice.startswith(".") or ".." in choice:
        raise UserError(refusal)
    folder = Path(captioners_dir) / choice
    # A symlink the owner put in the folder may point elsewhere: the owner chose it, so it is kept.
    if not folder.is_dir():
        raise UserError(refusal)
    return folder


def detect_kind(folder: Path) -> str:
    """Which layout ``folder`` has (see the module doc), or a UserError saying what is missing."""
    if all((folder / name).is_file() for name in WD14_FILES):
        return WD14
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"Captioner folder {folder} holds neither model.onnx + selected_tags.csv (a WD14 tagger) nor "
            "config.json (BLIP, BLIP-2 or Florence-2 saved with save_pretrained); point to such a folder."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"Captioner folder {folder}: config.json is not readable JSON ({exc}); save the model again."
        ) from None
    model_type = str(config.get("model_type", "")) if isinstance(config, dict) else ""
    if isinstance(config, dict) and config.get("auto_map"):
        raise UserError(
            f"Captioner folder {folder} needs the model repo's own code (trust_remote_code), which this app "
            f"never runs; use the transformers-native {HUB_IDS[FLORENCE2]} (captioner florence2) instead."
        )
    if model_type == "blip":
        return BLIP
    if model_type == "blip-2":
        return BLIP2
    if model_type == "florence2":
        return FLORENCE2
    raise UserError(
        f"Captioner folder {folder} holds a {model_type or 'unknown'} model; only BLIP, BLIP-2, Florence-2 "
        "and WD14 taggers caption datasets here."
    )


def download(repo: str, patterns: list[str]) -> Path:
    """The local snapshot of ``repo``: the cache's when it has one, else downloaded (clear message offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    from lorapg.prompting.backends import _hub_reachable  # the prompt tools' 3 s check: one rule for both

    # Checked first: the download runs on the GPU queue, and an unreachable hub would hold it for minutes.
    if constants.HF_HUB_OFFLINE or not _hub_reachable():
        raise UserError(
            f"Captioner {repo} is not in the local Hugging Face cache and the hub is offline or cannot be reached. "
            "Download it while online, or give the folder of a saved captioning model."
        )
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    log.info("downloading captioner %s", repo)
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: first
        raise UserError(
            f"Captioner {repo} is gated on the Hugging Face hub: accept its licence there while logged in, "
            "then log in here with `hf auth login` (or set HF_TOKEN) and try again."
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"Captioner {repo} was not found on the Hugging Face hub; give a local folder instead."
        ) from None
    except (ConnectionError, OSError) as exc:
        raise UserError(
            f"Could not download captioner {repo}: the Hugging Face hub cannot be reached ({type(exc).__name__}). "
            "Check your network, or give the folder of a saved captioning model."
        ) from None
