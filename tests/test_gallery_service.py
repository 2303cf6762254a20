"""GalleryService: PNG info from any tool, LoRAs matched by name or hash, and Reuse that gives back
the same pixels on a tiny model."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo as PilPngInfo
from safetensors.torch import save_file

from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.diffusion.samplers import DEFAULT_SAMPLER
from lorapg.errors import UserError
from lorapg.gallery import GalleryStore, ImageRecord, LoraUse
from lorapg.hashing import lora_hash
from lorapg.services.gallery import BY_HASH, BY_NAME, NO_PARAMETERS, GalleryService, map_sampler
from lorapg.ui.texts import png_info_text
from tests.tiny_models import tiny_runtime

# --------------------------------------------------------------------------------------------
# Helpers


def write_lora(path: Path, seed: int = 0) -> Path:
    """A small kohya-layout LoRA file; the tensor values (and so the hash) depend on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {
        f"{key}.lora_down.weight": torch.randn(4, 768, generator=generator),
        f"{key}.lora_up.weight": torch.randn(320, 4, generator=generator),
        f"{key}.alpha": torch.tensor(4.0),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return path


def png_bytes(parameters: str | None) -> bytes:
    info = PilPngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.fixture
def service(tmp_path: Path) -> GalleryService:
    store = GalleryStore(tmp_path / "gallery.sqlite3", tmp_path / "images", keep=0)
    return GalleryService(store, LoraLibrary(tmp_path / "loras"))


def a1111_text(lora_hashes: str) -> str:
    """Infotext as A1111 1.10 writes it (hand-written from the documented layout)."""
    return (
        "masterpiece, a castle on a hill, <lora:old_name:0.6> <lora:ghost:0.5>\n"
        "Negative prompt: lowres, bad anatomy\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234567, "
        f"Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Hires upscale: 2, "
        f'Lora hashes: "{lora_hashes}", Version: v1.10.1'
    )


# --------------------------------------------------------------------------------------------
# PNG info


def test_reuse_restores_a1111_weights_break_and_clip_skip(service: GalleryService) -> None:
    text = (
        "(masterpiece:1.2), a [blurry] castle BREAK at dawn\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Clip skip: 2"
    )
    reuse = service.reuse_parameters(service.png_info(png_bytes(text)))
    assert reuse.prompt == "(masterpiece:1.2), a [blurry] castle BREAK at dawn"  # the syntax is kept as written
    assert reuse.clip_skip == 2 and reuse.to_request().clip_skip == 2
    # A1111 leaves "Clip skip" out when it is 1: reusing such a PNG resets a slider left at 2.
    plain = service.reuse_parameters(service.png_info(png_bytes("a castle\nSteps: 20, Seed: 5, Size: 512x512")))
    assert plain.clip_skip == 1


def test_png_info_reads_a1111_png_and_matches_renamed_lora_by_hash(service: GalleryService, tmp_path: Path) -> None:
    local = write_lora(tmp_path / "loras" / "styles" / "castle_v2.safetensors", seed=1)
    text = a1111_text(f"old_name: {lora_hash(local)}, ghost: abcdef123456")
    info = service.png_info(png_bytes(text))

    assert info.text == text
    assert info.parsed.steps == 20 and info.parsed.sampler == "DPM++ 2M Karras"
    assert (info.parsed.width, info.parsed.height, info.parsed.seed) == (512, 768, 1234567)
    old, ghost = info.loras
    assert (old.local_name, old.matched_by, old.scale) == ("styles/castle_v2", BY_HASH, 0.6)
    assert ghost.missing and ghost.file_hash == "abcdef123456"
    assert info.missing_loras == ["ghost"]
    summary = png_info_text(info)
    assert "ghost" in summary and "missing" in summary
    assert "**Hires fix:** Latent ×2" in summary

    reuse = service.reuse_parameters(info)
    assert reuse.prompt == "masterpiece, a castle on a hill,"  # tags move to the LoRA list
    assert reuse.loras == [("styles/castle_v2", 0.6)]
    assert reuse.missing_loras == ["ghost"]
    assert any("ghost" in note for note in reuse.notes)
    assert (reuse.steps, reuse.guidance_scale, reuse.sampler, reuse.seed) == (20, 7.5, "DPM++ 2M Karras", 1234567)
    assert (reuse.width, reuse.height, reuse.model_name) == (512, 768, "v1-5-pruned-emaonly")


def test_lora_matched_by_name_when_png_has_no_hash(service: GalleryService, tmp_path: Path) -> None:
    write_lora(tmp_path / "loras" / "sub" / "Old_Name.safetensors")
    info = service.png_info(png_bytes("a castle <lora:old_name:0.8>\nSteps: 4, Seed: 1, Sampler: Euler"))
    (match,) = info.loras
    # A1111 tags carry the file name only, in any case; the library name includes the folder.
    assert (match.local_name, match.matched_by) == ("sub/Old_Name", BY_NAME)


def test_same_name_but_different_file_is_flagged(service: GalleryService, tmp_path: Path) -> None:
    write_lora(tmp_path / "loras" / "old_name.safetensors", seed=3)
    info = service.png_info(png_bytes(a1111_text("old_name: 0123456789ab")))
    old = info.loras[0]
    assert old.matched_by == BY_NAME and "differs" in old.note
    assert any("differs" in note for note in service.reuse_parameters(info).notes)


def test_hash_wins_over_a_name_that_holds_other_weights(service: GalleryService, tmp_path: Path) -> None:
    write_lora(tmp_path / "loras" / "old_name.safetensors", seed=3)  # same name, other weights
    exact = write_lora(tmp_path / "loras" / "renamed.safetensors", seed=4)
    info = service.png_info(png_bytes(a1111_text(f"old_name: {lora_hash(exact)}")))
    assert (info.loras[0].local_name, info.loras[0].matched_by) == ("renamed", BY_HASH)


def test_png_without_parameters_says_so(service: GalleryService) -> None:
    info = service.png_info(png_bytes(None))
    assert not info.has_parameters
    assert png_info_text(info) == NO_PARAMETERS
    with pytest.raises(UserError, match="no generation parameters"):
        service.reuse_parameters(info)


def test_non_png_and_truncated_png_are_user_errors(service: GalleryService, tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image", encoding="utf-8")
    whole = png_bytes("a cat\nSteps: 4, Seed: 1, Sampler: Euler")
    for bad in (jpeg.getvalue(), text_file, whole[: len(whole) // 2], whole[:20], b"", tmp_path / "absent.png"):
        with pytest.raises(UserError):
            service.png_info(bad)


def test_broken_fields_and_foreign_samplers_become_notes(service: GalleryService) -> None:
    text = "a cat\nSteps: 150, Sampler: Restart, CFG scale: 7, Seed: banana, Size: 500x500"
    info = service.png_info(png_bytes(text))
    assert any("Seed" in problem for problem in info.problems)
    reuse = service.reuse_parameters(info)
    assert reuse.sampler == DEFAULT_SAMPLER
    assert reuse.seed is None  # broken: the Generate tab keeps its own
    assert reuse.steps == 50 and (reuse.width, reuse.height) == (496, 496)
    notes = " ".join(reuse.notes)
    assert "'Restart'" in notes and "Steps 150" in notes and "Width 500" in notes


@pytest.mark.parametrize(
    ("written", "ours"),
    [
        ("Euler a", "Euler a"),
        ("euler_ancestral", "Euler a"),
        ("dpmpp_2m_sde_gpu", "DPM++ 2M SDE"),
        ("DPM++ 2M SDE Karras", "DPM++ 2M SDE Karras"),
        ("dpm++ 2m karras", "DPM++ 2M Karras"),
        ("UniPC", "UniPC"),
    ],
)
def test_sampler_names_from_other_tools(written: str, ours: str) -> None:
    assert map_sampler(written) == (ours, [])


# --------------------------------------------------------------------------------------------
# The gallery


def test_ids_are_checked(service: GalleryService) -> None:
    stored = service.store.add(
        ImageRecord(prompt="a cat", seed=1, loras=[LoraUse("style", 0.5)]), Image.new("RGB", (8, 8))
    )
    assert service.get(str(stored.id)).prompt == "a cat"
    assert service.toggle_star(stored.id).starred
    assert not service.toggle_star(float(stored.id)).starred
    assert service.lora_names() == ["style"]
    for bad in ("abc", -1, 0, 2.5, True):
        with pytest.raises(UserError, match="Image id must be a whole number ≥ 1, got"):
            service.get(bad)
    for call in (service.get, service.delete, service.show, service.toggle_star):
        with pytest.raises(UserError, match="(?i)no image with id 999"):
            call(999)
    service.delete(stored.id)
    assert service.list() == []


# --------------------------------------------------------------------------------------------
# Reuse on a tiny model


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory):
    return tiny_runtime(tmp_path_factory.mktemp("reuse"))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_reuse_reproduces_the_original_pixels(runtime) -> None:
    original = runtime.service.generate(
        GenerationRequest(
            prompt="a watercolor fox, misty: forest",
            negative_prompt="blurry",
            loras=(LoraRequest("style", 0.7),),
            steps=3,
            guidance_scale=6.5,
            sampler="Euler a",
            width=64,
            height=64,
            seed=4242,
        )
    )
    (record,) = original.saved
    service = GalleryService(runtime.gallery, runtime.library)

    reuse = service.reuse_parameters(record.id, current_model=runtime.settings.model)
    assert reuse.loras == [("style", 0.7)] and reuse.notes == []
    again = runtime.service.generate(reuse.to_request())
    assert np.array_equal(pixels(again.images[0]), pixels(original.images[0]))
    with Image.open(record.path) as on_disk:  # the gallery PNG holds the same pixels
        assert np.array_equal(pixels(on_disk), pixels(original.images[0]))

    # The same through PNG Info: the file alone is enough to make the image again.
    from_png = service.reuse_parameters(service.png_info(record.path))
    assert from_png.to_request() == reuse.to_request()

    # The comparison can fail: another LoRA scale gives other pixels.
    other = runtime.service.generate(replace(reuse.to_request(), loras=(LoraRequest("style", 0.2),)))
    assert not np.array_equal(pixels(other.images[0]), pixels(original.images[0]))


def test_reuse_notes_another_model(runtime) -> None:
    service = GalleryService(runtime.gallery, runtime.library)
    record = runtime.gallery.list(limit=1)[0]
    notes = service.reuse_parameters(record.id, current_model="/models/other-model").notes
    assert any("other-model" in note for note in notes)


def test_gallery_service_and_working_state_import_without_diffusers() -> None:
    """The CLI's gallery commands stay quick (no gradio: tests/test_services_layer.py)."""
    import subprocess
    import sys

    code = (
        "import sys, lorapg.services.gallery, lorapg.working_state; "
        "print(sorted(m for m in ('diffusers', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]"
