"""TrainConfig: strict TOML, presets as data, flags over file over preset, UI → file → headless."""

from __future__ import annotations

import pytest

from lorapg.errors import UserError
from lorapg.train_cli import train_overrides
from lorapg.training.config import TrainConfig, load_config, to_toml, write_config
from lorapg.training.presets import PRESETS_DIR, load_preset, preset_names


def test_presets_load_and_every_value_is_commented():
    assert preset_names() == ["character", "concept", "demo-concept", "style"]
    for name in preset_names():
        preset = load_preset(name)
        assert preset.description and preset.values["rank"] >= 1
        lines = (PRESETS_DIR / f"{name}.toml").read_text().splitlines()
        settings = [line for line in lines if "=" in line and not line.startswith(("#", "description"))]
        assert settings and all("#" in line for line in settings), name
    assert load_preset("style").values["train_text_encoder"] is False
    with pytest.raises(UserError, match="Unknown training preset 'anime'"):
        load_preset("anime")


def test_unknown_and_misspelled_keys_are_errors_naming_the_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('name = "x"\nlearning_rate = 1e-4\n')
    with pytest.raises(UserError, match="Unknown training setting 'learning_rate' in .*run.toml"):
        load_config(path)
    path.write_text('name = "x"\nrank = "sixteen"\n')
    with pytest.raises(UserError, match="'rank'.*'sixteen' is not a valid int"):
        load_config(path)
    path.write_text('[train]\nname = "x"\n')
    with pytest.raises(UserError, match=r"unexpected table \[train\]"):
        load_config(path)
    path.write_text("name = \n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rank", 0, "'rank' is 0; it must be between 1 and 256"),
        ("unet_lr", 5, "'unet_lr' is 5"),
        ("epochs", 0, "'epochs'"),
        ("resolution", 100, "multiple of 8"),
        ("lr_scheduler", "sometimes", "use one of constant"),
        ("optimizer", "sgd", "'optimizer'"),
    ],
)
def test_out_of_range_values_are_refused(key, value, message):
    with pytest.raises(UserError, match=message):
        load_config(None, {key: value})


def test_precedence_defaults_preset_file_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "character"\nname = "fox"\nepochs = 3\nrank = 8\n')
    config = load_config(path)
    assert (config.epochs, config.rank) == (3, 8)  # file over preset
    assert config.repeats == load_preset("character").values["repeats"]  # preset over defaults
    assert config.sample_steps == TrainConfig().sample_steps  # defaults where nobody says
    flagged = load_config(path, {"epochs": "5", "unet_lr": "2e-4", "preset": "style"})
    assert (flagged.epochs, flagged.unet_lr, flagged.rank) == (5, 2e-4, 8)
    assert flagged.train_text_encoder is False  # the flag's preset replaced the file's


def test_cli_flags_map_to_fields(tmp_path):
    from lorapg.cli import build_parser

    args = build_parser().parse_args(
        [
            "train",
            "--images",
            "imgs",
            "--trigger",
            "zqx",
            "--lr",
            "3e-4",
            "--max-steps",
            "7",
            "--out",
            str(tmp_path / "loras" / "mine.safetensors"),
            "--model",
            "m",
        ]
    )
    overrides = train_overrides(args)
    assert overrides["unet_lr"] == "3e-4" and overrides["max_steps"] == "7" and overrides["model"] == "m"
    assert overrides["name"] == "mine" and overrides["out"] == str(tmp_path / "loras")
    config = load_config(None, overrides)
    assert (config.unet_lr, config.max_steps, config.trigger) == (3e-4, 7, "zqx")


def test_config_round_trips_through_the_file(tmp_path):
    config = load_config(
        None,
        {
            "preset": "concept",
            "name": 'my "quoted" lora',
            "trigger": "zqx, fox",
            "images": str(tmp_path / "a b"),
            "epochs": 4,
            "noise_offset": 0.07,
        },
    )
    path = write_config(config, tmp_path / "cfg" / "config.toml")
    assert load_config(path) == config
    assert to_toml(config).count("\n") == len(TrainConfig.__dataclass_fields__) + 1
