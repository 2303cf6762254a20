"""``python -m lorapg gallery list|show|delete|export`` against a gallery in a temp folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from PIL import Image

from lorapg.gallery import GalleryStore, ImageRecord, LoraUse, read_png_parameters
from tests import process_factory

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in process_factory.test_env().items() if not key.startswith("LORAPG_")}
    return process_factory.run(["-m", "lorapg", "gallery", *args], cwd=REPO, env=env, timeout=60)


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    folder = tmp_path / "outputs"
    store = GalleryStore(folder / "gallery.sqlite3", folder / "images", keep=0)
    store.add(
        ImageRecord(
            prompt="a red fox, forest",
            seed=11,
            steps=4,
            sampler="Euler a",
            loras=[LoraUse("style", 0.7, "0123456789ab")],
        ),
        Image.new("RGB", (8, 8), (200, 0, 0)),
    )
    store.add(ImageRecord(prompt="a blue whale", seed=22, steps=4), Image.new("RGB", (8, 8), (0, 0, 200)))
    return folder


def test_list_show_delete_export(outputs: Path, tmp_path: Path) -> None:
    listed = run_cli("list", "--outputs", str(outputs))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["2", "1"]  # newest first
    assert "style:0.7" in lines[1] and "a red fox, forest" in lines[1]

    filtered = run_cli("list", "--outputs", str(outputs), "--lora", "style")
    assert [line.split("\t")[0] for line in filtered.stdout.splitlines()] == ["1"]

    shown = run_cli("show", "1", "--outputs", str(outputs))
    assert shown.returncode == 0, shown.stderr
    assert "Steps: 4, Sampler: Euler a" in shown.stdout and "<lora:style:0.7>" in shown.stdout

    exported = run_cli("export", str(tmp_path / "export"), "--outputs", str(outputs))
    assert exported.returncode == 0, exported.stderr
    files = sorted((tmp_path / "export").glob("*.png"))
    assert [f.name for f in files] == ["00001-11.png", "00002-22.png"]
    assert "Seed: 11" in (read_png_parameters(files[0]) or "")  # metadata travels with the copy

    deleted = run_cli("delete", "2", "--outputs", str(outputs))
    assert deleted.returncode == 0, deleted.stderr
    assert [line.split("\t")[0] for line in run_cli("list", "--outputs", str(outputs)).stdout.splitlines()] == ["1"]


@pytest.mark.parametrize(("command", "ident"), [("show", "999"), ("delete", "abc"), ("show", "-3")])
def test_bad_ids_exit_2_with_one_line(outputs: Path, command: str, ident: str) -> None:
    result = run_cli(command, ident, "--outputs", str(outputs))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error:")
    assert result.stdout == ""
