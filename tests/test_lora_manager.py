"""The LoRA manager (service and ``python -m lorapg lora …``): listing with previews, per-epoch files and
grouped metadata; rename, delete into the trash and restore, each moving a LoRA's files together;
refusals for bad names, taken names and LoRAs in use; "test" through the generation service."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading

import pytest
import torch
from PIL import Image

from lorapg.cli import main
from lorapg.config import Settings
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.errors import UserError
from lorapg.jobs import DONE, JobQueue
from lorapg.services.generation import GenerationService
from lorapg.services.lora_manager import LoraManager, UnknownLora
from lorapg.services.training import TrainingService
from lorapg.training.export import tag_frequency
from lorapg.working_state import WorkingState
from tests.training_data import write_images

CIVITAI = {"id": 7, "modelId": 42, "name": "v1.0", "baseModel": "SD 1.5", "trainedWords": ["zqstyle"]}


@pytest.fixture()
def loras(tiny_models, tmp_path):
    """A copy of the tiny LoRAs with what other tools and training leave next to them."""
    folder = tmp_path / "loras"
    shutil.copytree(tiny_models["loras"], folder)
    (folder / "broken.safetensors").unlink()
    Image.new("RGB", (8, 8), "red").save(folder / "triggered.preview.png")
    (folder / "triggered.civitai.info").write_text(json.dumps(CIVITAI), encoding="utf-8")
    (folder / "triggered.txt").write_text("zqstyle", encoding="utf-8")
    epochs = folder / "triggered_epochs"
    epochs.mkdir()
    for epoch in (1, 2):
        shutil.copy(folder / "triggered.safetensors", epochs / f"triggered-e{epoch:04d}.safetensors")
    return folder


def manager_for(folder, tmp_path, **kwargs) -> LoraManager:
    return LoraManager(LoraLibrary(folder), models_dir=tmp_path / "models", **kwargs)


def by_name(listing: dict) -> dict[str, dict]:
    return {lora["name"]: lora for lora in listing["loras"]}


def test_listing_shows_previews_epochs_hashes_and_grouped_metadata(loras, tmp_path):
    # A LoRA without a sidecar image shows its training run's last sample.
    samples = tmp_path / "models" / "training" / "other" / "samples"
    samples.mkdir(parents=True)
    for epoch in (1, 2):
        Image.new("RGB", (8, 8), "blue").save(samples / f"epoch-{epoch:04d}.png")
    manager = manager_for(loras, tmp_path)

    listed = by_name(manager.list())
    assert listed["triggered"]["preview"] == str(loras / "triggered.preview.png")
    assert listed["other"]["preview"] == str(samples / "epoch-0002.png")
    assert listed["style"]["preview"] is None
    # Per-epoch files are listed with their LoRA, not as LoRAs of their own.
    assert [e["name"] for e in listed["triggered"]["epochs"]] == [
        "triggered_epochs/triggered-e0001",
        "triggered_epochs/triggered-e0002",
    ]
    assert not any(name.startswith("triggered_epochs/") for name in listed)
    assert listed["triggered"]["format"] == "LoRA" and listed["triggered"]["family"] == "sd1"

    info = manager.info("triggered")
    assert info["sha256"] == hashlib.sha256((loras / "triggered.safetensors").read_bytes()).hexdigest()
    assert info["groups"]["training"] == {"ss_base_model_version": "sd_v1"}
    assert info["groups"]["tag_frequency"] == [
        {"tag": "zqstyle", "count": 12},
        {"tag": "1girl", "count": 7},
        {"tag": "outdoors", "count": 3},
    ]
    assert info["civitai"]["model_id"] == 42 and info["civitai"]["trained_words"] == ["zqstyle"]
    assert info["civitai"]["url"] == "https://civitai.com/models/42"
    with pytest.raises(UnknownLora, match="name: no LoRA 'nope'"):
        manager.info("nope")


def test_tag_counts_match_what_training_writes(loras, tmp_path):
    """The chart's numbers are the ones ``ss_tag_frequency`` records: tags summed over folders."""
    from lorapg.services.lora_manager import tag_counts

    raw = tag_frequency(["zq, red", "zq, blue", "zq"], "10_zq")
    assert tag_counts(raw) == [{"tag": "zq", "count": 3}, {"tag": "red", "count": 1}, {"tag": "blue", "count": 1}]
    merged = json.dumps({"1_a": {"x": 2}, "2_b": {"x": 3, "y": 1}})
    assert tag_counts(merged) == [{"tag": "x", "count": 5}, {"tag": "y", "count": 1}]
    assert tag_counts("{not json") == []


def test_rename_moves_sidecars_and_epoch_files_together(loras, tmp_path):
    manager = manager_for(loras, tmp_path)
    before = manager.info("triggered")["hash"]
    renamed = manager.rename("triggered", "sub/inkfox")
    assert renamed["name"] == "sub/inkfox" and renamed["hash"] == before
    assert renamed["preview"] == str(loras / "sub" / "inkfox.preview.png")
    assert [e["name"] for e in renamed["epochs"]] == [
        "sub/inkfox_epochs/inkfox-e0001",
        "sub/inkfox_epochs/inkfox-e0002",
    ]
    assert renamed["trigger_words"] == ["zqstyle"]  # read from the moved .civitai.info
    leftovers = [p.name for p in loras.iterdir() if p.name.startswith("triggered")]
    assert leftovers == []
    assert (loras / "sub" / "inkfox.civitai.info").is_file() and (loras / "sub" / "inkfox.txt").is_file()


@pytest.mark.parametrize(
    ("new_name", "message"),
    [
        ("other", "new_name: a LoRA (or its files) named 'other' exists already"),
        ("../outside", "new_name: '../outside' has an empty, '..' or hidden part"),
        ("/tmp/abs", "new_name: '/tmp/abs' is not a name inside the LoRA folder"),
        (".trash/x", "new_name: '.trash/x' has an empty, '..' or hidden part"),
        ("", "new_name: give a LoRA name"),
    ],
)
def test_rename_refuses_taken_and_escaping_names(loras, tmp_path, new_name, message):
    manager = manager_for(loras, tmp_path)
    files = sorted(p.relative_to(loras) for p in loras.rglob("*"))
    with pytest.raises(UserError) as caught:
        manager.rename("triggered", new_name)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert sorted(p.relative_to(loras) for p in loras.rglob("*")) == files  # nothing moved


def test_a_move_that_fails_half_way_puts_back_what_it_moved(loras, tmp_path):
    (loras / "fox_epochs").write_text("a file where the per-epoch folder would go", encoding="utf-8")
    files = sorted(p.relative_to(loras) for p in loras.rglob("*"))
    with pytest.raises(UserError, match="Could not move .*nothing was changed"):
        manager_for(loras, tmp_path).rename("triggered", "fox")
    assert sorted(p.relative_to(loras) for p in loras.rglob("*")) == files


def test_a_sidecar_of_the_target_name_counts_as_taken(loras, tmp_path):
    (loras / "fresh.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="new_name: .*'fresh'.*fresh.json"):
        manager_for(loras, tmp_path).rename("notes", "fresh")
    assert (loras / "notes.safetensors").is_file() and (loras / "notes.json").is_file()


def test_delete_goes_to_a_hidden_trash_and_restore_brings_everything_back(loras, tmp_path):
    manager = manager_for(loras, tmp_path)
    files = sorted(p.relative_to(loras) for p in loras.rglob("*") if p.is_file())
    entry = manager.delete("triggered")
    assert entry["name"] == "triggered" and "triggered_epochs/triggered-e0002.safetensors" in entry["files"]
    names = {info.name for info in LoraLibrary(loras).scan()[0]}
    assert not any(name.startswith(("triggered", ".trash")) for name in names)  # the trash is never scanned
    assert [e["id"] for e in manager.trash()] == [entry["id"]]
    with pytest.raises(UserError, match="Unknown LoRA"):  # a prompt tag cannot reach into the trash either
        LoraLibrary(loras).resolve(f".trash/{entry['id']}/triggered")
    with pytest.raises(UnknownLora):
        manager.info("triggered")

    restored = manager.restore("triggered")
    assert restored["name"] == "triggered" and len(restored["epochs"]) == 2
    assert sorted(p.relative_to(loras) for p in loras.rglob("*") if p.is_file()) == files
    assert manager.trash() == []


def test_restore_onto_a_name_taken_again_is_refused_and_keeps_the_trash(loras, tmp_path):
    manager = manager_for(loras, tmp_path)
    entry = manager.delete("notes")
    shutil.copy(loras / "other.safetensors", loras / "notes.safetensors")
    with pytest.raises(UserError, match="name: a LoRA named 'notes' exists again"):
        manager.restore(entry["id"])
    assert manager.trash()[0]["id"] == entry["id"]
    with pytest.raises(UnknownLora, match="name: nothing named 'never' in the trash"):
        manager.restore("never")


def test_a_lora_in_the_generate_selection_is_not_deleted_or_renamed(loras, tmp_path):
    state = WorkingState(tmp_path / "outputs" / "working_state.json")
    state.update(loras=[("style", 0.8)])
    manager = manager_for(loras, tmp_path, selection=lambda: state.load().lora_names)
    for action in (lambda: manager.delete("style"), lambda: manager.rename("style", "fresh")):
        with pytest.raises(UserError, match="name: LoRA 'style' is in the current LoRA selection"):
            action()
    assert (loras / "style.safetensors").is_file()
    state.update(loras=[])
    assert manager.delete("style")["name"] == "style"


def test_read_only_manager_refuses_changes(loras, tmp_path):
    manager = manager_for(loras, tmp_path, read_only=True)
    with pytest.raises(UserError, match="only its owner can rename or delete"):
        manager.delete("style")
    assert manager.list()["loras"]  # listing still works


def test_a_lora_a_queued_training_run_writes_is_not_deleted(loras, tiny_models, tmp_path):
    settings = Settings(
        model=str(tiny_models["sd15"]), lora_dir=loras, models_dir=tmp_path / "models", outputs=tmp_path / "out"
    )
    jobs = JobQueue()
    release = threading.Event()
    try:
        blocker = jobs.submit("block", lambda job: release.wait(60))  # the training stays queued behind it
        training = TrainingService(settings, jobs)
        write_images(tmp_path / "images", 2)
        config = training.config_for(
            {"name": "other", "trigger": "zq", "images": str(tmp_path / "images"), "overwrite": True}
        )
        run = training.submit(config)
        manager = manager_for(loras, tmp_path, training=training)
        with pytest.raises(UserError, match=f"name: training run {run.job.id} \\(queued\\) writes LoRA 'other'"):
            manager.delete("other")
        training.cancel(run.job.id)
        release.set()
        assert blocker.wait(60) and run.job.wait(60)
        assert manager.delete("other")["name"] == "other"  # the run is over: no longer in use
    finally:
        release.set()
        jobs.shutdown()


def test_test_generates_with_the_lora_at_one_and_its_trigger_words(loras, tiny_models, tmp_path):
    settings = Settings(model=str(tiny_models["sd15"]), lora_dir=loras, outputs=tmp_path / "out", device="cpu")
    jobs = JobQueue()
    engine = DiffusionEngine(LoraLibrary(loras), torch.device("cpu"), torch.float32)
    generation = GenerationService(settings, engine, engine.library, jobs)
    try:
        manager = manager_for(loras, tmp_path, generation=generation)
        request = manager.test_request("notes", steps=2, seed=5)
        assert request.prompt == "inkwash, brush"
        assert [(lora.name, lora.scale) for lora in request.loras] == [("notes", 1.0)]
        job = manager.test("notes", steps=2, seed=5)
        assert job.wait(120) and job.status == DONE, job.error
        assert job.result.images and [s.info.name for s in job.result.loras] == ["notes"]
        with pytest.raises(UnknownLora):
            manager.test("missing")
    finally:
        jobs.shutdown()


def test_a_generated_image_becomes_the_preview(loras, tmp_path):
    manager = manager_for(loras, tmp_path)
    assert manager.preview("style") is None
    path = manager.set_preview("style", Image.new("RGB", (8, 8), "green"))
    assert path == loras / "style.preview.png" and manager.preview("style") == path
    assert Image.open(path).getpixel((0, 0)) == (0, 128, 0)
    with pytest.raises(UserError, match="image: generate a test image first"):
        manager.set_preview("style", None)
    # The new sidecar moves with the LoRA.
    assert manager.rename("style", "green")["preview"] == str(loras / "green.preview.png")


def test_test_without_the_engine_says_so(loras, tmp_path):
    with pytest.raises(UserError, match="needs the generation engine"):
        manager_for(loras, tmp_path).test("notes")


# --- the command line ------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list_info_rm_restore_rename(loras, tmp_path, capsys):
    common = ("--lora-dir", str(loras), "--outputs", str(tmp_path / "out"), "--models-dir", str(tmp_path / "m"))
    code, out, _ = run_cli(capsys, "lora", "list", *common)
    assert code == 0
    rows = {line.split("\t")[0]: line for line in out.splitlines()}
    assert set(rows) == {"style", "style_kohya", "other", "xl/xl_style", "triggered", "notes"}
    assert "zqstyle" in rows["triggered"] and "2 epoch file(s)" in rows["triggered"]

    code, out, _ = run_cli(capsys, "lora", "info", "triggered", *common)
    assert code == 0 and "tags: zqstyle (12), 1girl (7), outdoors (3)" in out and "civitai.com/models/42" in out

    code, out, _ = run_cli(capsys, "lora", "rm", "notes", *common)
    assert code == 0 and out.startswith("moved notes to the trash")
    assert not (loras / "notes.safetensors").exists()
    code, out, _ = run_cli(capsys, "lora", "trash", *common)
    assert "\tnotes\t2 file(s)" in out
    code, out, _ = run_cli(capsys, "lora", "restore", "notes", *common)
    assert code == 0 and out.strip() == "restored notes" and (loras / "notes.json").is_file()
    code, out, _ = run_cli(capsys, "lora", "rename", "notes", "ink", *common)
    assert code == 0 and out.strip() == "renamed notes to ink" and (loras / "ink.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("rm", "nope"), "error: name: no LoRA 'nope'"),
        (("rename", "other", "style"), "error: new_name: a LoRA (or its files) named 'style' exists already"),
        (("rename", "other", "../x"), "error: new_name: '../x' has an empty, '..' or hidden part"),
        (("restore", "nope"), "error: name: nothing named 'nope' in the trash"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(loras, tmp_path, capsys, argv, message):
    code, out, err = run_cli(capsys, "lora", *argv, "--lora-dir", str(loras), "--outputs", str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err


def test_cli_refuses_to_delete_the_lora_the_app_has_selected(loras, tmp_path, capsys):
    outputs = tmp_path / "out"
    WorkingState(outputs / "working_state.json").update(loras=[("other", 1.0)])
    code, _, err = run_cli(capsys, "lora", "rm", "other", "--lora-dir", str(loras), "--outputs", str(outputs))
    assert code == 2 and "is in the current LoRA selection" in err
    assert (loras / "other.safetensors").is_file()


# --- review fixes: races, trash records, civitai types, epoch selection, linked previews ----------


def test_a_name_taken_during_the_move_is_not_overwritten(loras, tmp_path, monkeypatch):
    """Another process takes the name between the check and the move: the move refuses, under the lock."""
    from lorapg.services import lora_manager

    real_move_all = lora_manager._move_all
    seen_locked = []

    def taken_meanwhile(*args, **kwargs):
        seen_locked.append(lora_manager._MOVES_LOCK.locked())
        (loras / "fresh.safetensors").write_bytes(b"another LoRA")
        return real_move_all(*args, **kwargs)

    monkeypatch.setattr(lora_manager, "_move_all", taken_meanwhile)
    with pytest.raises(UserError) as caught:
        manager_for(loras, tmp_path).rename("notes", "fresh")
    message = str(caught.value)
    assert message.startswith("new_name: a LoRA (or its files) named 'fresh' exists already (fresh.safetensors)")
    assert "\n" not in message
    assert (loras / "fresh.safetensors").read_bytes() == b"another LoRA"
    assert (loras / "notes.safetensors").is_file() and (loras / "notes.json").is_file()
    assert seen_locked == [True]


def test_rename_delete_and_restore_move_under_the_module_lock(loras, tmp_path, monkeypatch):
    """The UI and the API build separate managers: the lock they share is the module's."""
    from lorapg.services import lora_manager

    real_move_all = lora_manager._move_all
    seen_locked = []

    def recording(*args, **kwargs):
        seen_locked.append(lora_manager._MOVES_LOCK.locked())
        return real_move_all(*args, **kwargs)

    monkeypatch.setattr(lora_manager, "_move_all", recording)
    manager_for(loras, tmp_path).rename("notes", "ink")
    entry = manager_for(loras, tmp_path).delete("ink")
    manager_for(loras, tmp_path).restore(entry["id"])
    assert seen_locked == [True, True, True]
    assert not lora_manager._MOVES_LOCK.locked()


def write_trash_entry(loras, entry_id: str, record: dict, files: dict[str, bytes]) -> None:
    entry = loras / ".trash" / entry_id
    for rel, data in files.items():
        (entry / rel).parent.mkdir(parents=True, exist_ok=True)
        (entry / rel).write_bytes(data)
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "entry.json").write_text(json.dumps({"id": entry_id, **record}), encoding="utf-8")


@pytest.mark.parametrize(
    "files",
    [
        ["evil.safetensors", "../../escaped.txt"],
        ["evil.safetensors", "sub/../../../escaped.txt"],
        ["/abs/evil.safetensors"],
        ["linked/evil.safetensors"],
        ["evil.safetensors", 7],
        "evil.safetensors",
    ],
)
def test_a_trash_record_leading_outside_is_skipped_and_not_restored(loras, tmp_path, files):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.safetensors").write_bytes(b"outside")
    write_trash_entry(loras, "good", {"name": "good", "deleted_at": 1.0, "files": ["good.safetensors"]}, {})
    write_trash_entry(
        loras,
        "evil",
        {"name": "evil", "deleted_at": 2.0, "files": files},
        {"evil.safetensors": b"x", "../escaped.txt": b"stays"},
    )
    (loras / ".trash" / "evil" / "linked").symlink_to(outside)
    manager = manager_for(loras, tmp_path)
    assert [entry["id"] for entry in manager.trash()] == ["good"]
    with pytest.raises(UnknownLora, match="name: nothing named 'evil' in the trash"):
        manager.restore("evil")
    assert (loras / ".trash" / "escaped.txt").read_bytes() == b"stays"
    assert not (tmp_path.parent / "escaped.txt").exists() and not (loras / "evil.safetensors").exists()
    assert (outside / "evil.safetensors").read_bytes() == b"outside"


@pytest.mark.parametrize("deleted_at", ["yesterday", None, True, float("nan"), [1]])
def test_a_trash_record_without_a_numeric_time_is_skipped(loras, tmp_path, deleted_at):
    manager = manager_for(loras, tmp_path)
    entry = manager.delete("notes")
    write_trash_entry(loras, "odd", {"name": "odd", "deleted_at": deleted_at, "files": ["odd.safetensors"]}, {})
    assert [e["id"] for e in manager.trash()] == [entry["id"]]  # no TypeError from the sort
    assert manager.restore("notes")["name"] == "notes"


def test_delete_writes_the_trash_record_before_moving_and_removes_it_when_the_move_fails(loras, tmp_path, monkeypatch):
    from lorapg.services import lora_manager

    real_move_all = lora_manager._move_all
    records = []

    def check_then_fail(moves, *args, **kwargs):
        entry = loras / ".trash"
        records.extend(json.loads(path.read_text(encoding="utf-8")) for path in entry.glob("*/entry.json"))
        # The last file vanishes before its turn: a real move failure, after the others moved.
        kept = tmp_path / "kept-epoch.safetensors"
        shutil.move(moves[-1][0], kept)
        try:
            return real_move_all(moves, *args, **kwargs)
        finally:
            shutil.move(kept, moves[-1][0])

    monkeypatch.setattr(lora_manager, "_move_all", check_then_fail)
    files = sorted(p.relative_to(loras) for p in loras.rglob("*") if p.is_file())
    with pytest.raises(UserError, match="Could not move triggered-e0002.safetensors .*nothing was changed"):
        manager_for(loras, tmp_path).delete("triggered")
    assert [(r["name"], len(r["files"])) for r in records] == [("triggered", 6)]
    assert list((loras / ".trash").iterdir()) == []  # neither the record nor an empty entry stays
    assert sorted(p.relative_to(loras) for p in loras.rglob("*") if p.is_file()) == files


def test_civitai_info_with_loose_types_is_coerced(loras, tmp_path):
    loose = {"modelId": "123", "id": "v2", "trainedWords": "foo, bar", "model": {"name": 5}, "baseModel": "SD 1.5"}
    (loras / "triggered.civitai.info").write_text(json.dumps(loose), encoding="utf-8")
    civitai = manager_for(loras, tmp_path).info("triggered")["civitai"]
    assert civitai == {
        "model": None,
        "version": None,
        "base_model": "SD 1.5",
        "trained_words": ["foo", "bar"],
        "description": None,
        "model_id": 123,
        "version_id": None,
        "url": "https://civitai.com/models/123",
    }
    # (Non-string list items are left out: the library's own sidecar reader fails on them first.)
    odd = {"modelId": True, "trainedWords": ["ok", " "], "name": ["v"]}
    (loras / "triggered.civitai.info").write_text(json.dumps(odd), encoding="utf-8")
    civitai = manager_for(loras, tmp_path).info("triggered")["civitai"]
    assert civitai["trained_words"] == ["ok"] and civitai["model_id"] is None and civitai["url"] is None


def test_a_selected_epoch_file_keeps_its_lora_from_moving(loras, tmp_path):
    manager = manager_for(loras, tmp_path, selection=lambda: ["style", "triggered_epochs/triggered-e0001"])
    files = sorted(p.relative_to(loras) for p in loras.rglob("*"))
    for action in (lambda: manager.delete("triggered"), lambda: manager.rename("triggered", "fox")):
        with pytest.raises(UserError) as caught:
            action()
        assert str(caught.value).startswith(
            "name: LoRA 'triggered_epochs/triggered-e0001', a per-epoch file of 'triggered', "
            "is in the current LoRA selection"
        )
    assert sorted(p.relative_to(loras) for p in loras.rglob("*")) == files


def test_previews_and_samples_that_link_outside_are_not_served(loras, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "white").save(secret)
    (loras / "style.preview.png").symlink_to(secret)
    samples = tmp_path / "models" / "training" / "other" / "samples"
    samples.mkdir(parents=True)
    (samples / "epoch-0001.png").symlink_to(secret)
    manager = manager_for(loras, tmp_path)
    assert manager.preview("style") is None and manager.preview("other") is None
    assert manager.info("other")["samples"] == []
    listed = by_name(manager.list())
    assert listed["style"]["preview"] is None and listed["other"]["preview"] is None
    # A link that stays inside the folder is still a preview.
    (loras / "style.preview.png").unlink()
    (loras / "style.preview.png").symlink_to(loras / "triggered.preview.png")
    assert manager.preview("style") == loras / "style.preview.png"


def test_a_trash_record_that_cannot_be_written_moves_nothing(loras, tmp_path, monkeypatch):
    import errno

    from lorapg.services import lora_manager

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lora_manager, "atomic_write_text", disk_full)
    with pytest.raises(UserError, match="name: could not write the trash record \\(No space left on device\\)"):
        manager_for(loras, tmp_path).delete("notes")
    assert (loras / "notes.safetensors").is_file() and list((loras / ".trash").iterdir()) == []
