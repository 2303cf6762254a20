"""Variations (A1111's variation seed and strength) on a tiny SD 1.x model: the engine, the PNG text,
Reuse, the gallery's "Vary" and the CLI."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from lorapg.cli import main
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, validate
from lorapg.diffusion.variation_noise import image_seeds, slerp, variation_seeds
from lorapg.errors import UserError
from lorapg.gallery.a1111 import format_parameters, parse_parameters
from lorapg.gallery.records import ImageRecord
from lorapg.services.gallery import VARY_COUNT, VARY_STRENGTH
from tests.reproducibility import as_pixels, assert_same_bytes
from tests.tiny_models import tiny_runtime

BASE = GenerationRequest(prompt="a red fox in the snow", steps=3, seed=1234, sampler="Euler")


@pytest.fixture(scope="module")
def engine(tiny_models) -> DiffusionEngine:
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32)
    engine.load_model(str(tiny_models["sd15"]))
    return engine


def images(engine: DiffusionEngine, **overrides) -> list[np.ndarray]:
    return [as_pixels(image) for image in engine.generate(replace(BASE, **overrides)).images]


# --- the noise -------------------------------------------------------------------------------


def test_slerp_ends_are_the_two_noises_and_the_middle_keeps_the_scale():
    generator = torch.Generator().manual_seed(0)
    low, high = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    assert torch.allclose(slerp(0.0, low, high), low, atol=1e-6)
    assert torch.equal(slerp(1.0, low, high), high)  # A1111's slerp at 1 is the variation noise itself
    middle = slerp(0.5, low, high)
    # A straight average would shrink the noise to ~0.71 of its norm; the spherical blend keeps it.
    assert abs(middle.norm() / low.norm() - 1) < 0.15
    assert torch.allclose(slerp(0.3, low, low), low, atol=1e-6)  # the same noise twice: no division by 0


def test_a_varied_batch_keeps_its_seed_and_counts_variation_seeds_up_as_a1111_does():
    plain = validate(replace(BASE, batch_size=3), 64)
    assert image_seeds(plain) == [1234, 1235, 1236] and variation_seeds(plain) == []
    varied = validate(replace(BASE, batch_size=3, variation_seed=50, variation_strength=0.2), 64)
    assert image_seeds(varied) == [1234, 1234, 1234] and variation_seeds(varied) == [50, 51, 52]
    random_seed = validate(replace(BASE, variation_seed=-1, variation_strength=0.2), 64)
    assert random_seed.variation_seed is not None  # picked, so the PNG can name it
    assert validate(BASE, 64).variation_seed is None  # strength 0: nothing to pick


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("variation_strength", 1.5, "Variation strength must be 0–1"),
        ("variation_strength", -0.1, "Variation strength must be 0–1"),
        ("variation_strength", "lots", "Variation strength must be a number"),
        ("variation_seed", 2**32, "Variation seed 4294967296 is outside"),
        ("variation_seed", "abc", "Variation seed 'abc' is not a whole number"),
    ],
)
def test_bad_variation_fields_name_the_field(field, value, words):
    with pytest.raises(UserError, match=words):
        validate(replace(BASE, **{"variation_strength": 0.2, field: value}), 64)


def test_variation_seeds_of_a_batch_stay_in_range():
    with pytest.raises(UserError, match="Variation seed 4294967295 \\+ batch 2 runs past"):
        validate(replace(BASE, batch_size=2, variation_seed=2**32 - 1, variation_strength=0.5), 64)


def test_a_variation_with_an_init_image_is_refused_by_name():
    """img2img starts from the init image's latents: the variation noise would be dropped without a word."""
    from lorapg.diffusion.img2img import Img2ImgOptions

    init = Img2ImgOptions(image=Image.new("RGB", (64, 64), "gray"))
    with pytest.raises(UserError, match="Variation strength applies to txt2img only"):
        validate(replace(BASE, variation_strength=0.2, img2img=init), 64)
    assert validate(replace(BASE, img2img=init), 64).variation_strength == 0  # off: img2img as usual


# --- the engine ------------------------------------------------------------------------------


def test_strength_zero_is_exactly_the_base_image(engine):
    base = images(engine)
    # A variation seed at strength 0 changes nothing: the pipeline draws its own noise, as before.
    assert_same_bytes(images(engine, variation_seed=99, variation_strength=0.0)[0], base[0])
    result = engine.generate(replace(BASE, variation_seed=99))
    assert result.variation_seeds == [] and result.seeds == [1234]


def test_a_small_strength_stays_close_to_the_base_and_differs_from_it(engine):
    base, other_seed = images(engine)[0], images(engine, seed=99)[0]
    slight = images(engine, variation_seed=99, variation_strength=0.05)[0]
    assert not np.array_equal(slight, base)
    # Close: a small fraction of the distance to another seed's image.
    assert np.abs(slight - base).mean() < 0.25 * np.abs(other_seed - base).mean()


def test_strength_one_gives_the_variation_seeds_image(engine):
    # A1111's slerp at 1 returns the variation seed's noise; with a non-ancestral sampler that is its image.
    full = images(engine, variation_seed=99, variation_strength=1.0)[0]
    seed_99 = images(engine, seed=99)[0]
    difference = np.abs(full - seed_99)
    assert difference.max() <= 2 and difference.mean() <= 0.1  # other code path (latents given): a tolerance


def test_a_variation_batch_is_several_variations_of_one_image(engine):
    batch = engine.generate(replace(BASE, batch_size=3, variation_seed=7, variation_strength=0.2))
    assert batch.seeds == [1234] * 3 and batch.variation_seeds == [7, 8, 9]
    pixels = [as_pixels(image) for image in batch.images]
    assert not np.array_equal(pixels[0], pixels[1])
    alone = images(engine, variation_seed=8, variation_strength=0.2)[0]  # image 1 made alone
    assert np.abs(pixels[1] - alone).max() <= 8


def test_sdxl_varies_too(tiny_models):
    xl = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32)
    xl.load_model(str(tiny_models["sdxl"]))
    base, seed_99 = images(xl, steps=2)[0], images(xl, steps=2, seed=99)[0]
    assert_same_bytes(images(xl, steps=2, variation_seed=99, variation_strength=0.0)[0], base)
    assert not np.array_equal(images(xl, steps=2, variation_seed=99, variation_strength=0.05)[0], base)
    assert np.abs(images(xl, steps=2, variation_seed=99, variation_strength=1.0)[0] - seed_99).max() <= 2


# --- the PNG text ----------------------------------------------------------------------------


def test_png_text_has_the_variation_only_when_the_strength_is_over_zero():
    record = ImageRecord(prompt="a fox", seed=5, steps=20, width=512, height=512, version="v")
    assert "Variation" not in format_parameters(record)
    varied = replace(record, variation_seed=77, variation_strength=0.25, clip_skip=2)
    text = format_parameters(varied)
    assert "Seed: 5, Size: 512x512, Variation seed: 77, Variation seed strength: 0.25, Clip skip: 2" in text
    parsed = parse_parameters(text)
    assert (parsed.variation_seed, parsed.variation_strength) == (77, 0.25)
    assert parsed.extra == {} and parsed.problems == []
    broken = parse_parameters("a fox\nSteps: 20, Seed: 5, Variation seed: x, Variation seed strength: lots")
    assert broken.variation_seed is None and broken.variation_strength is None
    assert len([p for p in broken.problems if "Variation seed" in p]) == 2


# --- the gallery: record, Reuse, Vary --------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return tiny_runtime(tmp_path_factory.mktemp("variations"))


def test_the_gallery_keeps_the_variation_and_reuse_makes_the_same_image(runtime):
    made = runtime.service.generate(replace(BASE, variation_seed=31, variation_strength=0.3, clip_skip=2))
    (record,) = made.saved
    assert (record.seed, record.variation_seed, record.variation_strength) == (1234, 31, 0.3)
    gallery = runtime.gallery_service
    stored = gallery.get(record.id)  # read back from the database, not the record just made
    # Kept in the row's A1111 text (no columns of their own), Clip skip with them.
    assert (stored.variation_seed, stored.variation_strength, stored.clip_skip) == (31, 0.3, 2)
    text = gallery.show(record.id).parameters  # the PNG's own text
    assert "Seed: 1234," in text and "Variation seed: 31, Variation seed strength: 0.3," in text
    by_id = gallery.reuse_parameters(record.id)
    by_png = gallery.reuse_parameters(gallery.png_info(str(record.path)))
    for reuse in (by_id, by_png):
        assert (reuse.seed, reuse.variation_seed, reuse.variation_strength, reuse.clip_skip) == (1234, 31, 0.3, 2)
    again = runtime.service.generate(by_id.to_request(), record=False)
    assert_same_bytes(again.images[0], made.images[0])  # the same request on the same code path


def test_reuse_of_an_image_without_a_variation_turns_it_off(runtime):
    (record,) = runtime.service.generate(replace(BASE, seed=5)).saved
    reuse = runtime.gallery_service.reuse_parameters(record.id)
    assert (reuse.variation_seed, reuse.variation_strength) == (None, 0.0)


def test_reuse_notes_a_variation_this_app_cannot_make(runtime):
    from tests.test_gallery_service import png_bytes

    gallery = runtime.gallery_service
    text = "a fox\nSteps: 20, Seed: 5, Size: 64x64, Variation seed: 3, Variation seed strength: 1.7"
    reuse = gallery.reuse_parameters(gallery.png_info(png_bytes(text)))
    assert reuse.variation_strength == 1.0 and any("Variation strength 1.7" in note for note in reuse.notes)


def test_vary_makes_a_batch_of_variations_of_the_image(runtime):
    (record,) = runtime.service.generate(replace(BASE, seed=4321)).saved
    plan = runtime.gallery_service.variations_request(record.id)
    request = plan.request
    assert (request.seed, request.batch_size, request.variation_strength) == (4321, VARY_COUNT, VARY_STRENGTH)
    assert request.variation_seed is None  # random: picked when the job runs
    result = runtime.service.generate(request)
    first = result.variation_seeds[0]
    assert result.seeds == [4321] * VARY_COUNT and result.variation_seeds == list(range(first, first + VARY_COUNT))
    assert [saved.variation_seed for saved in result.saved] == result.variation_seeds
    original = as_pixels(Image.open(record.path))
    distances = [np.abs(as_pixels(image) - original).mean() for image in result.images]
    other_seed = np.abs(as_pixels(runtime.service.generate(replace(BASE, seed=99), record=False).images[0]) - original)
    assert all(0 < distance < other_seed.mean() for distance in distances)  # near the image, yet not it
    # A variation varied again gives its siblings: its seed and its own strength, new variation seeds.
    (varied,) = runtime.service.generate(replace(BASE, seed=4321, variation_seed=3, variation_strength=0.35)).saved
    sibling = runtime.gallery_service.variations_request(varied.id, count=2).request
    assert (sibling.seed, sibling.variation_seed, sibling.batch_size) == (4321, None, 2)
    assert sibling.variation_strength == 0.35


def test_vary_refuses_an_image_without_a_seed(runtime, tmp_path):
    stored = runtime.gallery.add(ImageRecord(prompt="made elsewhere"), Image.new("RGB", (64, 64)))
    with pytest.raises(UserError, match=f"Image #{stored.id} has no seed"):
        runtime.gallery_service.variations_request(stored.id)


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_takes_the_variation_flags_and_writes_them_into_the_pngs(tiny_models, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_models["sd15"]), "--lora-dir", str(tiny_models["loras"])]
    args += ["--outputs", str(tmp_path / "outputs"), "--threads", "1", "--prompt", "a fox", "--steps", "2"]
    args += ["--seed", "77", "--batch", "2", "--variation-seed", "5", "--variation-strength", "0.3"]
    assert main([*args, "--out", str(tmp_path / "fox.png")]) == 0
    out = capsys.readouterr().out
    assert "seed=77\tvariation_seed=5" in out and "seed=77\tvariation_seed=6" in out
    first, second = (Image.open(tmp_path / f"fox-{n}.png").text["parameters"] for n in (1, 2))
    assert "Seed: 77," in first and "Variation seed: 5, Variation seed strength: 0.3," in first
    assert "Seed: 77," in second and "Variation seed: 6, Variation seed strength: 0.3," in second


def test_cli_refuses_a_bad_variation_strength_in_one_line(tiny_models, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_models["sd15"]), "--lora-dir", str(tiny_models["loras"])]
    args += ["--outputs", str(tmp_path / "outputs"), "--prompt", "x", "--variation-strength", "2"]
    assert main([*args, "--out", str(tmp_path / "x.png")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: Variation strength must be 0–1 (0 = off), got 2."]
