"""Rewrite presets: the eight shipped files, and how a broken or misspelled file is reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorapg.errors import UserError
from lorapg.prompting.presets import load_presets

SHIPPED = Path(__file__).resolve().parents[1] / "presets" / "rewrite"
EIGHT = ["fight", "portrait", "cinematic", "dark", "vibrant", "manga", "painted", "hd"]

GOOD = """
name = "{name}"
label = "Sketch"
llm = true
instruction = "Turn it into a pencil sketch."
style_words = ["pencil sketch", "graphite"]
"""


def _copy_shipped(tmp_path: Path) -> Path:
    folder = tmp_path / "rewrite"
    shutil.copytree(SHIPPED, folder)
    return folder


def test_all_eight_shipped_presets_load_in_display_order() -> None:
    catalog = load_presets(SHIPPED)
    assert catalog.errors == []
    assert catalog.names() == EIGHT
    for preset in catalog:
        assert preset.label and preset.instruction and preset.style_words
        assert preset.source is not None and preset.source.stem == preset.name


def test_only_hd_skips_the_llm_and_appends_the_quality_words() -> None:
    catalog = load_presets(SHIPPED)
    assert [p.name for p in catalog if not p.llm] == ["hd"]
    assert catalog.get("hd").style_words == ("masterpiece", "best quality", "highly detailed", "8k")


def test_instructions_are_single_spaced_text() -> None:
    for preset in load_presets(SHIPPED):
        assert "\n" not in preset.instruction and "  " not in preset.instruction
        assert len(preset.instruction.split()) >= 25  # precise, not a one-liner


def test_a_user_adds_a_preset_by_adding_a_file(tmp_path: Path) -> None:
    folder = _copy_shipped(tmp_path)
    (folder / "sketch.toml").write_text(GOOD.format(name="sketch"), encoding="utf-8")
    catalog = load_presets(folder)
    assert catalog.errors == []
    assert catalog.names() == [*EIGHT, "sketch"]  # no order key: after the shipped ones
    assert catalog.get("sketch").style_words == ("pencil sketch", "graphite")


def test_broken_file_is_reported_by_name_and_the_others_still_load(tmp_path: Path) -> None:
    folder = _copy_shipped(tmp_path)
    (folder / "broken.toml").write_text('name = "broken"\nlabel = [unclosed', encoding="utf-8")
    catalog = load_presets(folder)
    assert catalog.names() == EIGHT
    assert len(catalog.errors) == 1
    assert catalog.errors[0].startswith("broken.toml: ")


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    text = GOOD.format(name="sketch").replace("style_words", "style_word")
    (folder / "sketch.toml").write_text(text, encoding="utf-8")
    catalog = load_presets(folder)
    assert len(catalog) == 0
    assert len(catalog.errors) == 1
    message = catalog.errors[0]
    assert message.startswith("sketch.toml: ")
    assert "style_word" in message and "unknown" in message


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda t: t.replace('name = "sketch"', 'name = "other"'), "file name"),
        (lambda t: t.replace("llm = true", 'llm = "yes"'), "llm"),
        (lambda t: t.replace('["pencil sketch", "graphite"]', "[]"), "style_words"),
        (lambda t: t.replace('["pencil sketch", "graphite"]', '["a, b"]'), "commas"),
        (lambda t: t.replace('label = "Sketch"\n', ""), "missing"),
        (lambda t: t + "order = 1.5\n", "order"),
    ],
)
def test_invalid_values_are_reported(tmp_path: Path, edit, reason: str) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "sketch.toml").write_text(edit(GOOD.format(name="sketch")), encoding="utf-8")
    catalog = load_presets(folder)
    assert len(catalog) == 0
    assert catalog.errors[0].startswith("sketch.toml: ")
    assert reason in catalog.errors[0]


def test_missing_folder_is_an_error_not_a_crash(tmp_path: Path) -> None:
    catalog = load_presets(tmp_path / "nope")
    assert len(catalog) == 0 and catalog.errors


def test_unknown_preset_name_is_a_user_error() -> None:
    with pytest.raises(UserError, match="available: fight"):
        load_presets(SHIPPED).get("fihgt")
