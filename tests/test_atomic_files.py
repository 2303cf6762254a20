"""Files written through a temp file get the mode a plain open() gives, and are all-or-nothing.

Every writer runs under umask 022, 002 and 077 (set with ``os.umask`` for the test, restored
after): the files must come out 0644, 0664 and 0600, as ``open(path, "w")`` would make them.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorapg import atomic_files
from lorapg.atomic_files import atomic_write, atomic_write_bytes, atomic_write_text, current_umask
from lorapg.config import load_settings
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.gallery import GalleryStore, ImageRecord
from lorapg.services.prompts import PromptService
from lorapg.training import checkpoints
from lorapg.training.config import TrainConfig, load_config, write_config
from lorapg.training.export import export_kohya
from lorapg.working_state import WorkingState, WorkingValues

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=["umask022", "umask002", "umask077"])
def umask(request) -> int:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_open_mode(folder: Path) -> int:
    """What the kernel gives a file made with open(): the reference every writer must match."""
    reference = folder / "made-with-open.txt"
    with open(reference, "w") as handle:
        handle.write("x")
    try:
        return mode(reference)
    finally:
        reference.unlink()


def expected(umask: int) -> int:
    return {0o022: 0o644, 0o002: 0o664, 0o077: 0o600}[umask]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial")]


def tiny_lora_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 8, generator=generator),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(8, 4, generator=generator),
    }


def export_tiny_lora(path: Path) -> Path:
    return export_kohya(tiny_lora_state(), path, family="sd1", alpha=2.0, metadata={"ss_network_dim": "4"})


# --------------------------------------------------------------------------------------------
# The primitive


def test_current_umask_reads_the_umask_without_changing_it(umask: int, tmp_path: Path) -> None:
    assert current_umask() == umask
    # The fallback where /proc is missing sees the read/write bits, all a file's mode needs.
    assert atomic_files._umask_by_probe(tmp_path) == umask & 0o666
    assert os.umask(umask) == umask  # unchanged by the reads above
    assert list(tmp_path.iterdir()) == []  # the probe cleans up after itself


def test_atomic_write_gives_the_mode_of_a_plain_open(umask: int, tmp_path: Path) -> None:
    assert atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    with atomic_write(tmp_path / "sub" / "c.bin") as handle:
        handle.write(b"abc")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "sub" / "c.bin").read_bytes() == b"abc"
    reference = plain_open_mode(tmp_path)
    assert reference == expected(umask)
    for name in ("a.bin", "b.txt", "sub/c.bin"):
        assert mode(tmp_path / name) == reference, name
    assert no_temp_files(tmp_path)


def test_replacing_a_private_file_gives_it_the_umask_mode(tmp_path: Path) -> None:
    # Files written before this fix are 0600; the next save must widen them, as the brief asks.
    target = tmp_path / "old.json"
    target.write_text("{}")
    target.chmod(0o600)
    old = os.umask(0o022)
    try:
        atomic_write_text(target, "[]")
    finally:
        os.umask(old)
    assert mode(target) == 0o644 and target.read_text() == "[]"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "data.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_write(target, "w") as handle:
        handle.write("half of the new")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]

    def disk_full(*_args) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_two_writers_of_one_path_never_share_a_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "shared.safetensors"
    # Both writers are open at once (nested, so the overlap is certain, not a matter of timing).
    with atomic_write(target) as first:
        first.write(b"first")
        with atomic_write(target) as second:
            second.write(b"second")
            temps = sorted(p.name for p in tmp_path.iterdir())
            assert len(temps) == 2 and len(set(temps)) == 2
            assert all(re.fullmatch(r"\.shared\.safetensors\.[0-9a-f]{16}\.tmp", name) for name in temps)
        assert target.read_bytes() == b"second"  # the second writer's file is complete on its own
    assert target.read_bytes() == b"first"  # the last one to finish wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.safetensors"]


def test_temp_names_are_hidden_and_never_listed_as_pngs_or_loras(tmp_path: Path) -> None:
    from lorapg.gallery.png import is_temp_file

    png_temp = atomic_files.temp_path_for(tmp_path / "0001-5.png")
    lora_temp = atomic_files.temp_path_for(tmp_path / "style.safetensors")
    assert png_temp.name.startswith(".") and is_temp_file(png_temp)  # the gallery's repair removes it
    assert lora_temp.name.startswith(".") and lora_temp.suffix == ".tmp"
    assert atomic_files.temp_path_for(tmp_path / "x") != atomic_files.temp_path_for(tmp_path / "x")


def test_every_atomic_write_in_the_package_goes_through_atomic_files() -> None:
    # One implementation: a second one would again differ in mode, durability or temp naming.
    offenders = []
    for source in (REPO / "lorapg").rglob("*.py"):
        if source.name == "atomic_files.py":
            continue
        # A line marked "# move-only" moves a finished file (written with open()) into place: no temp write.
        lines = [line for line in source.read_text(encoding="utf-8").splitlines() if "# move-only" not in line]
        if re.search(r"\bmkstemp\(|\bos\.replace\(|\.tmp[\"']|\.with_suffix\([^)]*partial", "\n".join(lines)):
            offenders.append(source.relative_to(REPO).as_posix())
    assert offenders == []


# --------------------------------------------------------------------------------------------
# Every writer of the product


def test_gallery_png_follows_the_umask(umask: int, tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "gallery.sqlite", tmp_path / "images", keep=0)
    record = ImageRecord(
        prompt="a cat",
        negative_prompt="",
        seed=5,
        steps=4,
        guidance_scale=7.0,
        sampler="Euler a",
        model_name="tiny",
        model_hash="0123456789",
    )
    stored = store.add(record, Image.new("RGB", (8, 8), (10, 100, 200)))
    assert stored.path.is_file()
    assert mode(stored.path) == expected(umask)
    assert no_temp_files(tmp_path / "images")


def test_exported_lora_follows_the_umask(umask: int, tmp_path: Path) -> None:
    path = export_tiny_lora(tmp_path / "loras" / "mine.safetensors")
    assert mode(path) == expected(umask)
    assert set(load_file(str(path))) == {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
    }
    assert no_temp_files(tmp_path)


def test_training_config_follows_the_umask(umask: int, tmp_path: Path) -> None:
    config = TrainConfig(name="mine", trigger="zq", images=str(tmp_path))
    path = write_config(config, tmp_path / "runs" / "mine" / "config.toml")
    assert mode(path) == expected(umask)
    assert load_config(path).name == "mine"
    assert no_temp_files(tmp_path)


def test_working_state_follows_the_umask(umask: int, tmp_path: Path) -> None:
    state = WorkingState(tmp_path / "state" / "working_state.json")
    state.save(WorkingValues(prompt="a fox"))
    assert mode(state.path) == expected(umask)
    assert state.load().prompt == "a fox"
    assert sorted(p.name for p in state.path.parent.iterdir()) == ["working_state.json"]


def test_checkpoint_files_follow_the_umask(umask: int, tmp_path: Path) -> None:
    lora = tiny_lora_state()
    path = checkpoints.save_checkpoint(
        tmp_path, step=3, epoch=1, batch=0, lora=lora, state={"losses": torch.zeros(0, 2)}, keep=2
    )
    assert {mode(path / "lora.safetensors"), mode(path / "state.pt")} == {expected(umask)}
    saved = checkpoints.load_checkpoint(path)
    assert saved.step == 3 and torch.equal(saved.lora[next(iter(lora))], next(iter(lora.values())))
    assert no_temp_files(tmp_path)


def test_style_notes_follow_the_umask(umask: int, tmp_path: Path) -> None:
    export_tiny_lora(tmp_path / "loras" / "mine.safetensors")
    settings = load_settings(
        overrides={
            "models_dir": tmp_path / "models",
            "lora_dir": tmp_path / "loras",
            "device": "cpu",
            "llm_backend": "rules",
        },
        environ={},
    )
    service = PromptService(settings, LoraLibrary(settings.lora_dir), None)
    service.set_style_note("mine", "ink wash")
    (notes,) = (tmp_path / "models").iterdir()
    assert mode(notes) == expected(umask)
    assert json.loads(notes.read_text(encoding="utf-8")) == {"mine": "ink wash"}
