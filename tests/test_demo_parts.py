"""The demo model's parts that need no trained weights: world, tokenizer, judge, recipe, datasets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from lorapg.demo.concepts import CONCEPTS, JUDGE_PALETTE, JUDGE_SHAPES, STORED_SCALE, write_concept_datasets
from lorapg.demo.judge import judge_image
from lorapg.demo.shapes import COLOURS, SHAPES, Scene, all_scenes, held_out_scenes, render, training_scenes
from lorapg.demo.vocabulary import caption_words, write_tokenizer


def test_world_has_150_scenes_and_20_held_out_never_trained():
    scenes, held, train = all_scenes(), held_out_scenes(), training_scenes()
    assert len(scenes) == 150 and len(held) == 20 and len(train) == 130
    assert not set(held) & set(train)
    assert all(s.colour != s.background for s in scenes)
    assert held == held_out_scenes()  # seeded: the same split every time


def test_tokenizer_makes_each_caption_word_one_token_and_spells_unknown_words(tmp_path):
    tokenizer = write_tokenizer(tmp_path / "tok")
    for word in caption_words():
        assert tokenizer.tokenize(word) == [word + "</w>"]
    # A LoRA's new word is still tokenized (character by character), never mapped to "unknown".
    pieces = tokenizer.tokenize("ring")
    assert pieces == ["r", "i", "n", "g</w>"] and tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(pieces)


@pytest.mark.parametrize("noise", [0.0, 25.0])
def test_judge_reads_back_every_drawn_scene_including_new_concepts(noise):
    rng = np.random.default_rng(3)
    scenes = all_scenes() + [Scene("ring", "red", "blue"), Scene("star", "magenta", "green")]
    for scene in scenes:
        image = render(scene, rng).astype(np.float32)
        image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
        verdict = judge_image(image, JUDGE_PALETTE, JUDGE_SHAPES)
        assert (verdict.shape, verdict.colour, verdict.background) == (scene.shape, scene.colour, scene.background)


def test_judge_is_not_fooled_by_a_blank_or_wrong_image():
    blank = np.full((32, 32, 3), COLOURS["blue"], dtype=np.uint8)
    assert judge_image(blank).shape is None and judge_image(blank).background == "blue"
    circle = render(Scene("circle", "red", "blue"), np.random.default_rng(0))
    verdict = judge_image(circle, COLOURS, SHAPES)
    assert verdict.shape == "circle" and verdict.colour != "blue"
    # Upscaled images (as the datasets store them) are judged at the model's size.
    big = Image.fromarray(circle).resize((256, 256), Image.NEAREST)
    assert judge_image(big).shape == "circle"


def test_specks_in_a_smudge_are_no_shape_not_the_least_bad_template():
    """What the demo model draws for a word it does not know: a smudge with a few odd pixels."""
    rng = np.random.default_rng(5)
    smudge = np.full((32, 32, 3), COLOURS["blue"], dtype=np.uint8)
    specks = rng.choice(16 * 16, size=6, replace=False)
    smudge[8 + specks // 16, 8 + specks % 16] = COLOURS["red"]
    verdict = judge_image(smudge, JUDGE_PALETTE, JUDGE_SHAPES)
    assert verdict.colour == "red" and verdict.shape is None
    # The same specks grown into a drawn ring are a ring again: the floor only rejects non-shapes.
    ring = render(Scene("ring", "red", "blue"), rng)
    assert judge_image(ring, JUDGE_PALETTE, JUDGE_SHAPES).shape == "ring"


def test_concept_datasets_are_trainable_with_captions(tmp_path):
    from lorapg.training.dataset import Dataset

    folders = write_concept_datasets(tmp_path, images_per_concept=6, prior_images=10)
    assert set(folders) == {"ring", "magenta", "prior"}
    ring = Dataset(folders["ring"])
    report = ring.require_trainable()
    assert len(report.valid) == 6 and not report.invalid
    captions = [ring.caption(c.file) for c in report.valid]
    assert all(" ring on a " in c for c in captions)
    with Image.open(ring.image_paths()[0]) as image:
        assert image.size == (32 * STORED_SCALE, 32 * STORED_SCALE)
    prior = Dataset(folders["prior"])
    assert all(not any(c.word in prior.caption(p.name) for c in CONCEPTS.values()) for p in prior.image_paths())


def test_concept_datasets_have_no_near_duplicates_so_every_image_is_trained_on(tmp_path):
    """The trainer keeps near duplicates (a repeat weighs its scene double), so the drawn datasets hold none."""
    from lorapg.training.dataset import Dataset

    folders = write_concept_datasets(tmp_path)  # the sizes `python -m lorapg.demo loras` trains on
    for name, folder in folders.items():
        report = Dataset(folder).validate()
        assert len(report.valid) == 40 and not report.invalid, (name, report.summary())
        assert not report.near_duplicates, (name, report.summary())
        assert len(report.trainable(drop_near_duplicates=True)) == 40, name
    # Repeats are redrawn, not dropped: more images than scenes still covers (nearly) every scene.
    captions = {p.read_text(encoding="utf-8").strip() for p in folders["ring"].glob("*.txt")}
    assert captions == {scene.caption for scene in CONCEPTS["ring"].scenes()}
    magenta = {p.read_text(encoding="utf-8").strip() for p in folders["magenta"].glob("*.txt")}
    assert len(magenta) >= len(CONCEPTS["magenta"].scenes()) - 1


def test_a_scene_that_cannot_be_drawn_apart_again_is_an_error_not_a_near_duplicate(tmp_path):
    from lorapg.demo.concepts import write_dataset

    # A small magenta star on red differs from another drawing only in a few pixels' blue.
    with pytest.raises(RuntimeError, match="distinct drawings"):
        write_dataset(tmp_path / "star", [Scene("star", "magenta", "red")], 6, seed=0)


def test_recipe_runs_end_to_end_and_saves_a_model_the_app_loads(tmp_path):
    """The training command on a few steps: the folder it writes goes through the app's own loader."""
    from lorapg.demo.evaluate import generate, load_engine
    from lorapg.demo.training import Recipe, train_demo_model

    recipe = replace(
        Recipe(threads=1),
        vae_steps=2,
        vae_batch=4,
        vae_pool=8,
        jitters_per_scene=1,
        diffusion_steps=2,
        batch=4,
        warmup=1,
    )
    messages = []
    folder = train_demo_model(tmp_path / "demo", recipe, messages.append)
    assert any("latent scaling factor" in m for m in messages)
    assert {p.name for p in folder.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder", "tokenizer"}
    assert not list(tmp_path.glob(".*tokenizer"))  # the scratch tokenizer folder is cleaned up
    engine = load_engine(folder, tmp_path / "loras", threads=1)
    assert engine.model.native_size == 32 and engine.model.family == "sd1"
    images = generate(engine, "a red circle on a blue background", seed=0, count=2)
    assert [image.size for image in images] == [(32, 32), (32, 32)]


def test_regularization_images_keep_their_own_captions_and_loss_weight(tmp_path):
    """Prior preservation: the trigger goes on concept images only; regularization images weigh less."""
    from lorapg.demo.concepts import write_dataset
    from lorapg.training.config import TrainConfig
    from lorapg.training.trainer import Trainer

    concept = write_dataset(tmp_path / "concept", [Scene("ring", "red", "blue")], 2, seed=0)
    prior = write_dataset(tmp_path / "prior", training_scenes(), 3, seed=1)
    config = TrainConfig(
        name="x", images=str(concept), trigger="ring", regularization_images=str(prior), prior_loss_weight=0.25
    )
    items = Trainer(config, lora_dir=tmp_path / "loras", work_dir=tmp_path / "work")._read_dataset()
    concept_items = [i for i in items if i.path.parent == concept]
    prior_items = [i for i in items if i.path.parent == prior]
    assert len(concept_items) == 2 and len(prior_items) == 3
    # The caption already names the trigger: kept as written (the prompt people type), not "ring, a red ring…".
    assert all(i.caption == "a red ring on a blue background" and i.loss_weight == 1.0 for i in concept_items)
    assert all(i.caption == (prior / f"{i.path.stem}.txt").read_text().strip() for i in prior_items)
    assert all(i.loss_weight == 0.25 for i in prior_items)


def test_a_missing_regularization_folder_is_a_clear_error(tmp_path):
    from lorapg.config import Settings
    from lorapg.demo.concepts import write_dataset
    from lorapg.errors import UserError
    from lorapg.jobs import JobQueue
    from lorapg.services.training import TrainingService

    images = write_dataset(tmp_path / "concept", [Scene("ring", "red", "blue")], 2, seed=0)
    jobs = JobQueue()
    try:
        service = TrainingService(Settings(lora_dir=tmp_path / "loras", models_dir=tmp_path), jobs)
        config = service.config_for(
            {"name": "x", "images": str(images), "trigger": "ring", "regularization_images": str(tmp_path / "nowhere")}
        )
        with pytest.raises(UserError, match="Regularization folder .*nowhere does not exist"):
            service.prepare(config)
    finally:
        jobs.shutdown()


@pytest.mark.parametrize(
    "argument, message",
    [
        (["--prompt", "star,red"], "is not SHAPE,COLOUR,BACKGROUND"),
        (["--prompt", "hexagon,red,blue"], "unknown shape 'hexagon'"),
        (["--prompt", "star,teal,blue"], "unknown colour 'teal'"),
        (["--lora", "demo-ring"], "is not NAME:SCALE"),
    ],
)
def test_sheet_command_rejects_malformed_arguments_in_one_line(tmp_path, capsys, argument, message):
    from lorapg.demo.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sheet", "--out", str(tmp_path / "sheet.png"), *argument])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "sheet.png").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["effect", "--lora", "demo-ring", "--concept", "ring", "--prompts", "0"],
        ["effect", "--lora", "demo-ring", "--concept", "ring", "--ordinary", "-3"],
        ["effect", "--lora", "demo-ring", "--concept", "ring", "--seeds", "two"],
        ["evaluate", "--seeds", "0"],
        ["loras", "--seeds", "0"],
    ],
)
def test_counts_must_be_whole_numbers_of_at_least_one(capsys, command):
    from lorapg.demo.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "is not a whole number of at least 1" in error and "Traceback" not in error
