"""Model and LoRA hashes must equal what A1111 computes, or other tools will not match files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorapg import hashing
from lorapg.errors import UserError


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    hashing.clear_cache()


def write_lora(path: Path, metadata: dict[str, str] | None = None) -> None:
    torch.manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {
        f"{key}.lora_down.weight": torch.randn(4, 32),
        f"{key}.lora_up.weight": torch.randn(32, 4),
        f"{key}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, str(path), metadata=metadata)


def test_lora_hash_is_sha256_of_bytes_after_header(tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    write_lora(path, {"ss_output_name": "style"})
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    json.loads(data[8 : 8 + header_length])  # the header really is where we think it is
    expected = hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]
    assert hashing.lora_hash(path) == expected
    # Not the plain file hash: that would change whenever metadata is edited.
    assert expected != hashlib.sha256(data).hexdigest()[:12]


def test_lora_hash_ignores_metadata_changes(tmp_path: Path) -> None:
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(first, {"ss_output_name": "a"})
    write_lora(second, {"ss_output_name": "a much longer name", "modelspec.title": "B"})
    assert first.read_bytes() != second.read_bytes()
    assert hashing.lora_hash(first) == hashing.lora_hash(second)


def test_model_hash_is_first_10_hex_of_sha256(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    payload = os.urandom(3 * 1024 * 1024 + 17)  # crosses the 1 MiB read chunks
    path.write_bytes(payload)
    assert hashing.model_hash(path) == hashlib.sha256(payload).hexdigest()[:10]


def test_cache_notices_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"first version")
    first = hashing.model_hash(path)
    assert hashing.model_hash(path) == first  # served from the cache
    path.write_bytes(b"second version, longer")
    later = path.stat().st_mtime_ns + 1_000_000_000  # coarse clocks: force a new mtime
    os.utime(path, ns=(later, later))
    expected = hashlib.sha256(b"second version, longer").hexdigest()[:10]
    assert hashing.model_hash(path) == expected


def test_bad_files_raise_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        hashing.model_hash(tmp_path / "missing.safetensors")
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(UserError, match="too short"):
        hashing.lora_hash(short)
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes((10_000).to_bytes(8, "little") + b"{}")
    with pytest.raises(UserError, match="not a valid .safetensors"):
        hashing.lora_hash(lying)
    with pytest.raises(UserError, match="not a file"):
        hashing.model_hash(tmp_path)


def test_one_cache_entry_per_file_and_room_for_a_large_library(tmp_path: Path, monkeypatch) -> None:
    """The gallery relies on this cache alone (no cache of its own): a 300-LoRA library stays cached."""
    paths = []
    for index in range(300):
        path = tmp_path / f"lora{index}.safetensors"
        path.write_bytes((2).to_bytes(8, "little") + b"{}" + index.to_bytes(4, "little"))
        paths.append(path)
    first = [hashing.lora_hash(path) for path in paths]

    def no_more_reads(*_args: object) -> str:
        raise AssertionError("hashed again: the cache lost an entry")

    monkeypatch.setattr(hashing, "_sha256_from", no_more_reads)
    assert [hashing.lora_hash(path) for path in paths] == first
    monkeypatch.undo()

    # A file rewritten many times takes one entry, not one per version.
    versions = tmp_path / "versions.bin"
    for version in range(5):
        versions.write_bytes(b"v" * (version + 1))
        hashing.model_hash(versions)
    assert sum(1 for kind, path in hashing._cache if path == str(versions.resolve())) == 1
