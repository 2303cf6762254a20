"""The gallery: PNGs with A1111 metadata on disk, indexed in SQLite. No UI code here."""

from lorapg.gallery.a1111 import ParsedParameters, format_parameters, parse_parameters
from lorapg.gallery.png import read_png_parameters, save_png_atomically
from lorapg.gallery.records import (
    ImageRecord,
    LoraUse,
    record_from_parsed,
    strip_lora_tags,
)
from lorapg.gallery.store import GalleryStore

__all__ = [
    "GalleryStore",
    "ImageRecord",
    "LoraUse",
    "ParsedParameters",
    "format_parameters",
    "parse_parameters",
    "read_png_parameters",
    "record_from_parsed",
    "save_png_atomically",
    "strip_lora_tags",
]
