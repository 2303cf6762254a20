"""The working prompt survives restarts: atomic writes, forgiving reads."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from lorapg.working_state import WorkingState, WorkingValues


@pytest.fixture
def state(tmp_path: Path) -> WorkingState:
    return WorkingState(tmp_path / "outputs" / "working_state.json")


def sample() -> WorkingValues:
    return WorkingValues(
        prompt='a fox, "quoted": colon\nsecond line — 桜 🦊',
        negative_prompt="blurry, lowres",
        keywords="fox, forest",
        loras=(("style", 0.7), ("sub/detail", 1.2)),
        steps=4,
        guidance_scale=6.5,
        sampler="Euler a",
        width=64,
        height=128,
        seed=123,
        batch_size=2,
        clip_skip=2,
    )


def test_round_trip_keeps_every_field(state: WorkingState) -> None:
    state.save(sample())
    assert state.load() == sample()
    assert state.load().lora_scales == {"style": 0.7, "sub/detail": 1.2}


def test_clip_skip_is_kept_and_older_files_without_it_still_load(state: WorkingState, caplog) -> None:
    state.update(clip_skip=2)
    assert json.loads(state.path.read_text(encoding="utf-8"))["clip_skip"] == 2
    assert state.load().clip_skip == 2
    # A file written before clip skip was kept: every field it has is restored, clip skip is the default.
    older = {"version": 1, "prompt": "an old draft", "steps": 12, "sampler": "Euler", "loras": [["style", 0.5]]}
    state.path.write_text(json.dumps(older), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="lorapg.working_state"):
        values = state.load()
    assert values == WorkingValues(prompt="an old draft", steps=12, sampler="Euler", loras=(("style", 0.5),))
    assert values.clip_skip is None
    assert caplog.text == ""  # nothing about the file is unusable
    # A hand-edited value of the wrong type falls back to the default alone.
    state.path.write_text(json.dumps({**older, "clip_skip": "two"}), encoding="utf-8")
    assert state.load() == values


def test_missing_file_gives_defaults(state: WorkingState) -> None:
    assert state.load() == WorkingValues()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "", "\x00\x01"])
def test_corrupt_file_gives_defaults_and_logs(state: WorkingState, content: str, caplog) -> None:
    state.path.parent.mkdir(parents=True)
    state.path.write_text(content, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lorapg.working_state"):
        assert state.load() == WorkingValues()
    assert "working state" in caplog.text


def test_a_broken_field_falls_back_alone(state: WorkingState, caplog) -> None:
    state.path.parent.mkdir(parents=True)
    data = {"prompt": "kept", "steps": "many", "loras": [["style", "high"]], "seed": 7, "future_field": 1}
    state.path.write_text(json.dumps(data), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lorapg.working_state"):
        values = state.load()
    assert values == WorkingValues(prompt="kept", seed=7)
    assert "'steps'" in caplog.text and "'loras'" in caplog.text


def test_update_changes_some_fields_and_keeps_the_rest(state: WorkingState) -> None:
    state.save(sample())
    state.update(prompt="new prompt", loras=[["style", 0.5]])
    values = state.load()
    assert values.prompt == "new prompt"
    assert values.loras == (("style", 0.5),)
    assert values.keywords == "fox, forest"  # another tab's field survives the Generate tab's save
    assert values.steps == 4


def test_writes_are_atomic_and_leave_no_temp_files(state: WorkingState, monkeypatch) -> None:
    state.save(sample())

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    state.save(WorkingValues(prompt="half written"))  # logged, not raised: typing must not fail
    monkeypatch.undo()
    assert state.load() == sample()
    assert sorted(p.name for p in state.path.parent.iterdir()) == ["working_state.json"]


def test_file_is_plain_json_with_a_version(state: WorkingState) -> None:
    state.save(sample())
    data = json.loads(state.path.read_text(encoding="utf-8"))
    assert data["version"] == 1
    assert data["loras"] == [["style", 0.7], ["sub/detail", 1.2]]
    assert data["prompt"] == sample().prompt
