"""Per-family defaults where the caller leaves a field out: the service, the CLI, /api/v1 and /sdapi/v1.

Tiny Flux dev, Flux schnell and SD 3.5 pipelines (tests/tiny_flux.py), 32 px native, through the
user's path (a diffusers folder). An explicit value always wins; a left-out sampler is the family's
flow-matching one, so no "sampler does not apply" warning.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from lorapg.api import api_routes
from lorapg.api.auth import ApiAccess
from lorapg.cli import main
from lorapg.config import load_settings
from lorapg.diffusion.families import FLUX
from lorapg.diffusion.flux import FLUX_DEV, FLUX_SCHNELL, SD35_LARGE
from lorapg.diffusion.request import A1111_DEFAULTS, GenerationRequest
from lorapg.diffusion.samplers import DEFAULT_FLOW_SAMPLER, SAMPLERS
from lorapg.gallery.a1111 import format_parameters, parse_parameters
from lorapg.gallery.records import record_from_parsed
from lorapg.jobs import Job
from lorapg.services.a1111 import a1111_sampler_names
from lorapg.services.build import build_services
from lorapg.services.gallery import ImageDetails, PngInfo
from lorapg.services.generation import defaults_for_request
from lorapg.services.grid import GridService
from lorapg.services.lora_manager import build_lora_manager
from lorapg.services.training import TrainingRun
from lorapg.training.config import TrainConfig
from lorapg.training.trainer import TrainResult
from lorapg.ui.texts import image_details_text, png_info_text
from tests.tiny_flux import build_flux_pipeline, build_sd3_pipeline, save_peft_transformer_lora

LEFT_OUT = {"steps": None, "guidance_scale": None, "sampler": None}
LEFT_OUT_CFG = {"guidance_scale": None, "sampler": None}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("family-defaults")
    torch.set_num_threads(1)
    build_flux_pipeline(root / "flux-dev")
    build_flux_pipeline(root / "flux-schnell", guidance_embeds=False)
    build_sd3_pipeline(root / "sd3")
    (root / "loras").mkdir()
    return {"root": root, "dev": root / "flux-dev", "schnell": root / "flux-schnell", "sd3": root / "sd3"}


def settings_for(models: dict, model: str):
    root = models["root"]
    values = {
        "model": str(models[model]),
        "lora_dir": str(root / "loras"),
        "outputs": str(root / "outputs"),
        "models_dir": str(root / "models"),
        "device": "cpu",
        "threads": 1,
        "gallery_keep": 0,
    }
    return load_settings(None, values)


@pytest.fixture(scope="module")
def runtime(models):
    services = build_services(settings_for(models, "dev"), prompts=False)
    yield services
    services.jobs.shutdown()


def cli_args(models: dict, model: str, out) -> list[str]:
    root = models["root"]
    return [
        "generate",
        "--model",
        str(models[model]),
        "--lora-dir",
        str(root / "loras"),
        "--outputs",
        str(root / "cli-outputs"),
        "--models-dir",
        str(root / "models"),
        "--threads",
        "1",
        "--no-gallery",
        "--prompt",
        "a red fox",
        "--seed",
        "3",
        "--out",
        str(out),
    ]


# --- the service -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "defaults"), [("dev", FLUX_DEV), ("schnell", FLUX_SCHNELL), ("sd3", SD35_LARGE)])
def test_left_out_fields_get_the_family_s_defaults(runtime, models, model, defaults):
    service = runtime.service
    service.load_model(str(models[model]))
    result = service.generate(GenerationRequest("a red fox", seed=1, **LEFT_OUT), record=False)
    used = result.request
    assert (used.steps, used.sampler) == (defaults.steps, DEFAULT_FLOW_SAMPLER)
    assert used.guidance_scale == pytest.approx(defaults.guidance_scale)
    assert (used.width, used.height) == (32, 32)  # the tiny model's native size, as the Generate tab's
    assert result.warnings == []  # no swapped sampler, no ignored CFG for schnell


def test_an_explicit_value_always_wins(runtime, models):
    service = runtime.service
    service.load_model(str(models["dev"]))
    request = GenerationRequest("a red fox", seed=1, steps=2, guidance_scale=1.5, sampler="Euler Beta")
    used = service.generate(request, record=False).request
    assert (used.steps, used.sampler) == (2, "Euler Beta")
    assert used.guidance_scale == pytest.approx(1.5)


# --- the CLI ---------------------------------------------------------------------------------------------


def test_cli_generate_without_steps_or_cfg_uses_schnell_s(models, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(cli_args(models, "schnell", out)) == 0
    parameters = Image.open(out).text["parameters"]
    assert "Steps: 4," in parameters and "Sampler: Euler," in parameters
    assert "warning" not in capsys.readouterr().err  # neither a swapped sampler nor an ignored CFG


def test_cli_explicit_steps_and_cfg_win(models, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main([*cli_args(models, "dev", out), "--steps", "2", "--cfg", "2.5"]) == 0
    parameters = Image.open(out).text["parameters"]
    assert "Steps: 2," in parameters and "CFG scale: 1," in parameters  # Flux dev, as Forge writes it
    assert "Distilled CFG Scale: 2.5" in parameters


# --- /api/v1 and /sdapi/v1 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(runtime, models):
    runtime.service.load_model(str(models["dev"]))
    return TestClient(FastAPI(routes=api_routes(runtime, ApiAccess(enabled=True))))


def finished_request(runtime, job_id: str) -> GenerationRequest:
    job = runtime.jobs.get(job_id)
    job.wait()
    assert job.error is None
    return job.result.request


def test_api_v1_fields_left_out_of_the_json_get_flux_dev_s(runtime, models, client):
    runtime.service.load_model(str(models["dev"]))
    reply = client.post("/api/v1/generations", json={"prompt": "a red fox", "seed": 2})
    assert reply.status_code == 202, reply.text
    used = finished_request(runtime, reply.json()["job_id"])
    assert (used.steps, used.sampler) == (FLUX_DEV.steps, DEFAULT_FLOW_SAMPLER)
    assert used.guidance_scale == pytest.approx(FLUX_DEV.guidance_scale)
    sent = {"prompt": "a red fox", "seed": 2, "steps": 2, "cfg_scale": 1.5, "sampler": "Euler Beta"}
    used = finished_request(runtime, client.post("/api/v1/generations", json=sent).json()["job_id"])
    assert (used.steps, used.sampler, used.guidance_scale) == (2, "Euler Beta", pytest.approx(1.5))


def test_sdapi_defaults_only_fields_absent_from_the_body(runtime, models, client):
    runtime.service.load_model(str(models["dev"]))
    reply = client.post("/sdapi/v1/txt2img", json={"prompt": "a red fox", "seed": 2, "width": 32, "height": 32})
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    assert (info["steps"], info["sampler_name"], info["scheduler"]) == (FLUX_DEV.steps, "Euler", "Simple")
    assert info["cfg_scale"] == pytest.approx(FLUX_DEV.guidance_scale)
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "a red fox", "steps": 1}).json()["info"])
    assert (info["width"], info["height"]) == (32, 32)  # the model's native size, not A1111's 512
    # What an A1111 client sends (its own defaults) is used as sent.
    sent = {"prompt": "a red fox", "seed": 2, "steps": 3, "cfg_scale": 7, "width": 64, "height": 64}
    info = json.loads(client.post("/sdapi/v1/txt2img", json={**sent, "sampler_name": "Euler"}).json()["info"])
    assert (info["steps"], info["width"]) == (3, 64) and info["cfg_scale"] == pytest.approx(7)


def test_sdapi_samplers_are_the_loaded_family_s(runtime, models, client):
    runtime.service.load_model(str(models["dev"]))
    names = [item["name"] for item in client.get("/sdapi/v1/samplers").json()]
    assert names == ["Euler", "UniPC"]  # Forge's names for the flow-matching samplers
    # Forge's "Euler" + "Beta" schedule is this app's Euler Beta for a flow-matching model.
    body = {"prompt": "a red fox", "steps": 1, "width": 32, "height": 32, "sampler_name": "Euler", "scheduler": "beta"}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.json()["info"])["scheduler"] == "Beta"


def test_sdapi_samplers_without_a_model_are_the_sd_ones():
    assert a1111_sampler_names(None) == list(dict.fromkeys(s.a1111_sampler for s in SAMPLERS.values()))
    assert "DPM++ 2M" in a1111_sampler_names(None) and "DPM++ 2M" not in a1111_sampler_names(FLUX)


# --- Flux dev's distilled guidance in the PNG parameters, as Forge writes it ---------------------------------

# How A1111-compatible readers split the last line into fields (A1111's infotext_utils pattern).
A1111_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_fields(parameters: str) -> dict[str, str]:
    return {key: value for key, value in A1111_FIELD.findall(parameters.strip().splitlines()[-1])}


@pytest.mark.parametrize(
    ("model", "cfg", "distilled"), [("dev", "1", "2.5"), ("schnell", None, None), ("sd3", "2.5", None)]
)
def test_guidance_is_written_as_forge_does_and_read_back(runtime, models, model, cfg, distilled):
    service, gallery = runtime.service, runtime.gallery_service
    service.load_model(str(models[model]))
    result = service.generate(GenerationRequest("a red fox", seed=4, steps=2, guidance_scale=2.5, sampler=None))
    record = result.saved[0]
    parameters = Image.open(gallery.image_path(record.id)).text["parameters"]
    fields = a1111_fields(parameters)
    assert (fields.get("CFG scale"), fields.get("Distilled CFG Scale")) == (cfg, distilled)
    assert (fields["Steps"], fields["Seed"], fields["Size"]) == ("2", "4", "32x32")
    parsed = parse_parameters(parameters)
    assert not parsed.problems and not parsed.extra
    restored = 2.5 if cfg else None  # schnell: no guidance written, Reuse keeps the form's
    assert gallery.reuse_parameters(record.id).guidance_scale == restored
    assert (
        gallery.reuse_parameters(gallery.png_info(gallery.image_path(record.id).read_bytes())).guidance_scale
        == restored
    )
    # Written again from the stored record (the gallery's text), the same fields come back.
    assert format_parameters(gallery.get(record.id)) == parameters


def test_a_forge_flux_dev_text_restores_its_distilled_guidance(runtime):
    forge = (
        "a red fox\nSteps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, "
        "Seed: 1, Size: 896x1152, Model: flux1-dev-bnb-nf4-v2, Version: f2.0.1v1.10.1-previous-313"
    )
    parsed = parse_parameters(forge)
    assert parsed.guidance_scale == pytest.approx(1) and parsed.distilled_guidance == pytest.approx(3.5)
    record = record_from_parsed(parsed)
    assert record.guidance_scale == pytest.approx(3.5) and record.distilled_guidance
    assert "CFG scale: 1, " in format_parameters(record) and "Distilled CFG Scale: 3.5" in format_parameters(record)


# --- internal callers leave out what they do not choose (issue 17 review, item 1) -------------------------


def flux_lora(runtime, name: str) -> str:
    """A Flux LoRA file in the LoRA folder (diffusers/peft layout), its library name."""
    pipe = runtime.engine.model.pipe
    save_peft_transformer_lora(runtime.settings.lora_dir / f"{name}.safetensors", pipe, strength=0.01)
    return name


def used_flux_dev_s(used: GenerationRequest) -> None:
    # Not GenerationRequest's SD values (CFG 7, DPM++ 2M Karras, which Flux would swap with a warning).
    assert used.sampler == DEFAULT_FLOW_SAMPLER
    assert used.guidance_scale == pytest.approx(FLUX_DEV.guidance_scale)


def test_lora_manager_test_runs_at_the_family_s_defaults(runtime, models):
    runtime.service.load_model(str(models["dev"]))
    manager = build_lora_manager(runtime)
    job = manager.test(flux_lora(runtime, "fox_test"), steps=1, seed=1)
    used = finished_request(runtime, job.id)
    assert used.steps == 1  # the one it chose
    used_flux_dev_s(used)


def test_epochs_grid_of_a_flux_run_uses_the_family_s_guidance_and_sampler(runtime, models, tmp_path):
    runtime.service.load_model(str(models["dev"]))
    final, epoch = flux_lora(runtime, "fox_run"), flux_lora(runtime, "fox_run-e0001")
    loras = runtime.settings.lora_dir
    config = TrainConfig(name=final, trigger="zq", sample_steps=1)
    run = TrainingRun(Job("train"), config, tmp_path / "config.toml")
    run.job.status = "done"
    run.job.result = TrainResult(final, loras / f"{final}.safetensors", FLUX, 1, 1, False, None)
    run.job.result.epoch_loras = [loras / f"{epoch}.safetensors"]
    job = GridService(runtime.settings, runtime.service).submit_epochs(run, [1.0])
    job.wait()
    assert job.error is None, job.error
    for cell in job.result.cells:
        assert cell.request.steps == 1  # the run's sample steps
        used_flux_dev_s(cell.request)
        assert cell.warnings == []


def test_reusing_a_record_without_cfg_takes_the_loaded_family_s(runtime, models):
    service, gallery = runtime.service, runtime.gallery_service
    service.load_model(str(models["schnell"]))
    record = service.generate(GenerationRequest("a red fox", seed=4, steps=1, **LEFT_OUT_CFG)).saved[0]
    assert gallery.get(record.id).guidance_scale is None  # schnell: no CFG written
    service.load_model(str(models["dev"]))
    request = gallery.reuse_body(record.id).request  # Reuse by id (the API's)
    used = finished_request(runtime, service.submit_generation(request).id)
    assert used.steps == 1  # the record's
    assert used.guidance_scale == pytest.approx(FLUX_DEV.guidance_scale)
    # Vary (an SD model then) leaves it out too, rather than sending GenerationRequest's CFG 7.
    assert gallery.variations_request(record.id, count=1).request.guidance_scale is None


# --- /sdapi/v1 with no model loaded yet: decided when the job runs (issue 17 review, items 2 and 6) ------------


@pytest.fixture
def unloaded(models):
    """The app before its first generation: the configured model (Flux schnell) not loaded yet."""
    services = build_services(settings_for(models, "schnell"), prompts=False)
    assert services.engine.model is None
    yield services, TestClient(FastAPI(routes=api_routes(services, ApiAccess(enabled=True))))
    services.jobs.shutdown()


def test_sdapi_refuses_a_bad_partial_body_without_loading_a_model(unloaded):
    services, client = unloaded
    reply = client.post("/sdapi/v1/txt2img", json={"prompt": "a red fox", "cfg_scale": 1000})
    assert reply.status_code == 400, reply.text
    assert "1000" in reply.text
    assert services.engine.model is None  # refused before any load (a real Flux loads for minutes)


def test_sdapi_partial_body_before_a_load_gets_the_family_s_and_echoes_them(unloaded):
    services, client = unloaded
    reply = client.post("/sdapi/v1/txt2img", json={"prompt": "a red fox", "seed": 2, "steps": 1})
    assert reply.status_code == 200, reply.text
    info, echoed = json.loads(reply.json()["info"]), reply.json()["parameters"]
    # schnell's, decided once the job had loaded it: not A1111's CFG 7 at 512 px.
    assert (info["steps"], info["width"], info["sampler_name"], info["scheduler"]) == (1, 32, "Euler", "Simple")
    assert info["cfg_scale"] == pytest.approx(FLUX_SCHNELL.guidance_scale)
    # The echo shows what ran for the fields left out (not A1111's placeholders), the rest as sent.
    assert (echoed["steps"], echoed["width"], echoed["height"], echoed["sampler_name"]) == (1, 32, 32, "Euler")
    assert echoed["cfg_scale"] == pytest.approx(FLUX_SCHNELL.guidance_scale) and echoed["seed"] == 2


def test_a1111_defaults_on_sd_are_chosen_when_the_job_runs(runtime):
    """The marker an /sdapi/v1 request carries: A1111's API values on SD, the family's on Flux."""
    request = GenerationRequest("a red fox", extra={A1111_DEFAULTS: True}, **LEFT_OUT)
    on_sd = defaults_for_request(request, None)  # no model: SD
    assert (on_sd.steps, on_sd.sampler, on_sd.width, on_sd.height) == (20, "Euler", 512, 512)
    assert on_sd.guidance_scale == pytest.approx(7)
    runtime.service.load_model(str(runtime.settings.model))  # Flux dev
    on_flux = runtime.service.with_defaults(request)
    assert (on_flux.steps, on_flux.width) == (FLUX_DEV.steps, None)  # None: the model's native size
    plain = defaults_for_request(GenerationRequest("a red fox", **LEFT_OUT), None)  # not from /sdapi/v1
    assert (plain.steps, plain.sampler, plain.width) == (30, "DPM++ 2M Karras", None)


# --- the PNG Info and Gallery texts show Flux dev's guidance (issue 17 review, item 4) ---------------------------

FORGE_DEV = (
    "a red fox\nSteps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, "
    "Seed: 1, Size: 896x1152, Model: flux1-dev-bnb-nf4-v2"
)


def test_png_info_and_gallery_details_show_the_distilled_guidance():
    parsed = parse_parameters(FORGE_DEV)
    text = png_info_text(PngInfo(FORGE_DEV, parsed))
    assert "**CFG scale:** 1" in text and "**Distilled CFG Scale:** 3.5" in text
    details = image_details_text(ImageDetails(record_from_parsed(parsed), FORGE_DEV))
    assert "**Distilled CFG Scale:** 3.5" in details and "CFG scale" not in details  # the guidance that ran


def test_flux_dev_at_guidance_0_is_still_written_as_distilled_guidance(runtime, models):
    """Told apart from schnell by the model, not by the value (issue 17 review, item 5)."""
    service, gallery = runtime.service, runtime.gallery_service
    service.load_model(str(models["dev"]))
    result = service.generate(GenerationRequest("a red fox", seed=4, steps=1, guidance_scale=0, sampler=None))
    assert result.guidance_distilled
    record = result.saved[0]
    fields = a1111_fields(Image.open(gallery.image_path(record.id)).text["parameters"])
    assert (fields.get("CFG scale"), fields.get("Distilled CFG Scale")) == ("1", "0")
    assert gallery.get(record.id).distilled_guidance
    assert gallery.reuse_parameters(record.id).guidance_scale == 0  # Reuse gives 0, not the family's 3.5


def test_a_remote_worker_s_model_decides_its_defaults(runtime, models):
    """A Ray worker's model has no pipeline on the app's side: its info says schnell (issue 17 review, item 7)."""
    from lorapg.services.ray_workers import GenerationActor, RemoteEngine

    runtime.service.load_model(str(models["dev"]))  # the primary worker has another model
    actor = GenerationActor(settings_for(models, "schnell"), "cpu", "wa")
    remote = RemoteEngine(None, None, actor.info())  # the info the app keeps of the worker
    used = runtime.service.with_defaults(GenerationRequest("a red fox", **LEFT_OUT), remote)
    assert used.steps == FLUX_SCHNELL.steps and used.guidance_scale == pytest.approx(0)  # not dev's 28 at 3.5
