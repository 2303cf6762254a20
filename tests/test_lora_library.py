"""The LoRA library: listing from headers, trigger words, families, and safe name resolution."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import save_file

from lorapg.diffusion.families import SD1, SD3, SDXL
from lorapg.diffusion.lora_library import DIFFUSERS, KOHYA, LoraLibrary
from lorapg.errors import UserError


def test_scan_lists_every_lora_with_layout_family_and_triggers(tiny_models):
    infos, problems = LoraLibrary(tiny_models["loras"]).scan()
    by_name = {info.name: info for info in infos}
    assert set(by_name) == {"style", "style_kohya", "other", "xl/xl_style", "triggered", "notes"}
    assert by_name["style"].layout == DIFFUSERS and by_name["style_kohya"].layout == KOHYA
    assert by_name["xl/xl_style"].family == SDXL  # a second text encoder means SDXL
    assert by_name["triggered"].family == SD1  # from ss_base_model_version
    assert by_name["triggered"].trigger_words == ("zqstyle",)  # the tag present in every caption
    assert by_name["notes"].trigger_words == ("inkwash", "brush")  # A1111 sidecar JSON
    assert by_name["notes"].description == "ink"
    assert len(problems) == 1 and "broken.safetensors" in problems[0] and "corrupt" in problems[0]


def test_files_added_while_running_appear_on_rescan(tiny_models, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    library = LoraLibrary(folder)
    assert library.scan()[0] == []
    shutil.copy(tiny_models["loras"] / "style.safetensors", folder / "new_one.safetensors")
    assert [info.name for info in library.scan()[0]] == ["new_one"]


def test_modelspec_trigger_phrase_and_txt_sidecar(tmp_path, tiny_models):
    import torch

    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}
    save_file(tensors, str(tmp_path / "spec.safetensors"), metadata={"modelspec.trigger_phrase": "qqcat, neon"})
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    (tmp_path / "plain.txt").write_text("ribbon style\n")
    infos = {info.name: info for info in LoraLibrary(tmp_path).scan()[0]}
    assert infos["spec"].trigger_words == ("qqcat", "neon")
    assert infos["plain"].trigger_words == ("ribbon style",)


@pytest.mark.parametrize(
    ("words", "expected"), [(["ok", 3], ("ok", "3")), (7, ()), ({"a": 1}, ()), ("one, two", ("one", "two"))]
)
def test_hand_written_civitai_sidecars_with_loose_types_still_list(tmp_path, words, expected):
    """A .civitai.info whose trainedWords holds numbers (or is no list at all) once failed the scan."""
    import json

    import torch

    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}
    save_file(tensors, str(tmp_path / "loose.safetensors"))
    (tmp_path / "loose.civitai.info").write_text(json.dumps({"trainedWords": words}))
    infos, problems = LoraLibrary(tmp_path).scan()
    assert problems == [] and infos[0].trigger_words == expected


def test_a_checkpoint_that_is_not_a_lora_is_reported(tmp_path):
    import torch

    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(tmp_path / "full.safetensors"))
    infos, problems = LoraLibrary(tmp_path).scan()
    assert infos == [] and "not a LoRA" in problems[0]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/hostname", "..", "xl/../../outside"])
def test_names_and_paths_never_escape_the_folder(tiny_models, bad):
    with pytest.raises(UserError, match="outside the LoRA folder|Unknown LoRA"):
        LoraLibrary(tiny_models["loras"]).resolve(bad)


def test_a_symlink_pointing_outside_is_refused(tiny_models, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(tiny_models["loras"] / "style.safetensors", outside)
    (folder / "sneaky.safetensors").symlink_to(outside)
    with pytest.raises(UserError, match="outside the LoRA folder"):
        LoraLibrary(folder).resolve("sneaky")


def test_resolve_by_name_and_by_path_inside_the_folder(tiny_models):
    library = LoraLibrary(tiny_models["loras"])
    assert library.resolve("style").name == "style"
    assert library.resolve(str(tiny_models["loras"] / "xl" / "xl_style.safetensors")).name == "xl/xl_style"
    with pytest.raises(UserError, match="Unknown LoRA 'nope'"):
        library.resolve("nope")
    with pytest.raises(UserError, match="corrupt"):
        library.resolve("broken")


def test_scan_reports_a_symlink_leading_outside_instead_of_failing(tiny_models, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(tiny_models["loras"] / "style.safetensors", folder / "inside.safetensors")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(tiny_models["loras"] / "style.safetensors", outside)
    (folder / "linked.safetensors").symlink_to(outside)
    infos, problems = LoraLibrary(folder).scan()
    assert [info.name for info in infos] == ["inside"]
    assert len(problems) == 1 and "links outside the LoRA folder" in problems[0]


@pytest.mark.parametrize(
    ("architecture", "version"),
    [
        ("stable-diffusion-3-5-large/lora", "5-large"),
        ("stable-diffusion-3-5-medium/lora", "5-medium"),
        ("stable-diffusion-3-medium/lora", "medium"),
        ("", "5-large"),  # an older sd-scripts without modelspec
        ("stable-diffusion-3-5-large/lora", ""),
    ],
)
def test_sd_scripts_sd3_metadata_names_sd3_for_a_text_encoder_only_file(tmp_path, architecture, version):
    """sd-scripts (library/sd3_utils.py, sai_model_spec.py) names SD 3.x so; two CLIP encoders alone look like SDXL."""
    import torch

    metadata = {key: value for key, value in (("modelspec.architecture", architecture),
                                               ("ss_base_model_version", version)) if value}  # fmt: skip
    tensors = {
        f"{prefix}text_model_encoder_layers_0_self_attn_q_proj.{part}": torch.zeros(shape)
        for prefix in ("lora_te1_", "lora_te2_")
        for part, shape in (("lora_down.weight", (4, 32)), ("lora_up.weight", (32, 4)), ("alpha", ()))
    }
    save_file(tensors, str(tmp_path / "te_only.safetensors"), metadata=metadata)
    assert LoraLibrary(tmp_path).resolve("te_only").family == SD3
    save_file(tensors, str(tmp_path / "no_metadata.safetensors"))
    assert LoraLibrary(tmp_path).resolve("no_metadata").family == SDXL  # what the names alone say
