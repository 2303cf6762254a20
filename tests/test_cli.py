"""``python -m lorapg generate`` end to end in a subprocess, as a user runs it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from PIL import Image

from lorapg.cli import main
from tests import process_factory
from tests.reproducibility import assert_batch_item_matches_alone, assert_visibly_different

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return process_factory.run(["-m", "lorapg", *args], cwd=cwd, env=process_factory.test_env())


@pytest.fixture()
def base_args(tiny_models, tmp_path):
    return [
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(tiny_models["loras"]),
        "--outputs",
        str(tmp_path / "outputs"),
        "--threads",
        "1",
    ]


def test_generate_writes_pngs_prints_seed_and_records_gallery(base_args, tmp_path):
    out = tmp_path / "picture.png"
    done = run_cli(
        "generate",
        *base_args,
        "--prompt",
        "a castle <lora:other:0.4>",
        "--lora",
        "style:0.7",
        "--steps",
        "3",
        "--seed",
        "77",
        "--batch",
        "2",
        "--sampler",
        "Euler a",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "seed: 77" in done.stdout
    first, second = tmp_path / "picture-1.png", tmp_path / "picture-2.png"
    text = Image.open(first).text["parameters"]
    assert text.startswith("a castle <lora:style:0.7> <lora:other:0.4>")
    assert "Seed: 77" in text and "Sampler: Euler a" in text and "Size: 64x64" in text
    assert "Seed: 78" in Image.open(second).text["parameters"]
    assert len(list((tmp_path / "outputs" / "images").rglob("*.png"))) == 2
    # The gallery's WAL was merged into its database on the way out (the exit freezes the heap, so
    # nothing is collected then): no -wal file is left beside it.
    assert (tmp_path / "outputs" / "gallery.sqlite3").is_file()
    assert not (tmp_path / "outputs" / "gallery.sqlite3-wal").exists()

    again = run_cli(
        "generate",
        *base_args,
        "--prompt",
        "a castle <lora:other:0.4>",
        "--lora",
        "style:0.7",
        "--steps",
        "3",
        "--seed",
        "78",
        "--sampler",
        "Euler a",
        "--out",
        str(tmp_path / "again.png"),
        "--no-gallery",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    # Seed 78 alone runs other matrix kernels than in the batch: visually identical, within the stated bound.
    assert_batch_item_matches_alone(Image.open(second), Image.open(tmp_path / "again.png"))
    assert_visibly_different(Image.open(first), Image.open(tmp_path / "again.png"))
    assert len(list((tmp_path / "outputs" / "images").rglob("*.png"))) == 2  # --no-gallery


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "Steps must be 1–50"),
        (["--steps", "51"], "Steps must be 1–50"),
        (["--width", "20"], "Width must be 32–2048"),
        (["--width", "99999"], "Width must be 32–2048"),
        (["--seed", "4294967296"], "outside 0–4294967295"),
        (["--seed", "abc"], "not a whole number"),
        (["--lora", "style:1.6"], "scale 1.6 is outside 0–1.5"),
        (["--lora", "unknown_lora"], "Unknown LoRA 'unknown_lora'"),
        (["--lora", "../../outside:0.5"], "outside the LoRA folder"),
        (["--lora", "broken"], "corrupt"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(base_args, tmp_path, extra, message, capsys):
    # In-process (the same main() the subprocess runs) to keep the suite fast; the subprocess
    # tests below cover the real entry point.
    code = main(["generate", *base_args, "--prompt", "x", "--steps", "2", *extra, "--out", str(tmp_path / "x.png")])
    stderr = capsys.readouterr().err
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "x.png").exists()


def test_missing_model_and_pickle_are_refused(tmp_path):
    missing = run_cli(
        "generate",
        "--model",
        str(tmp_path / "nope"),
        "--prompt",
        "x",
        "--out",
        "x.png",
        "--outputs",
        str(tmp_path / "o"),
        cwd=tmp_path,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    refused = run_cli(
        "generate",
        "--model",
        str(pickle),
        "--prompt",
        "x",
        "--out",
        "x.png",
        "--outputs",
        str(tmp_path / "o"),
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr and "Traceback" not in refused.stderr
