"""The app's own REST API for LoRAs, models, jobs, memory and prompt tools (``/api/v1``), on a real
app on 127.0.0.1 with a tiny SD 1.x model, a tiny SDXL model to switch to and a tiny in-process LLM."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests

from lorapg.hashing import lora_hash
from tests.app_server import running_app
from tests.test_prompting_backends import build_tiny_chat_model

AUTH = ("u", "p")
PRESETS = {"cinematic", "dark", "fight", "hd", "manga", "painted", "portrait", "vibrant"}


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-library")
    loras, models = root / "loras", root / "models"
    shutil.copytree(tiny_models["loras"], loras)
    shutil.copytree(tiny_models["sdxl"], models / "tiny-xl")  # a second model to load
    llm = build_tiny_chat_model(root / "llm")
    with running_app(
        "--api",
        "--api-auth",
        ":".join(AUTH),
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(loras),
        "--models-dir",
        str(models),
        "--outputs",
        str(root / "outputs"),
        "--threads",
        "1",
        "--llm-backend",
        "transformers",
        "--llm-model",
        str(llm),
    ) as url:
        yield {"base": url + "api/v1", "loras": loras, "xl": models / "tiny-xl", "sd15": tiny_models["sd15"]}


def get(app, route: str, **kwargs) -> requests.Response:
    return requests.get(f"{app['base']}/{route}", auth=AUTH, timeout=120, **kwargs)


def post(app, route: str, body=None, **kwargs) -> requests.Response:
    return requests.post(f"{app['base']}/{route}", json=body, auth=AUTH, timeout=120, **kwargs)


def follow(app, job_id: str, timeout: float = 120.0) -> dict:
    """Poll the job until it has finished (the condition, not a time, ends the wait)."""
    deadline = time.monotonic() + timeout
    while True:
        state = get(app, f"jobs/{job_id}").json()
        if state["status"] in ("done", "error", "cancelled") or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def sse_events(response: requests.Response) -> list[tuple[str, dict]]:
    """``(event, data)`` per Server-Sent Event, read line by line as they arrive."""
    events, name, data = [], None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            data.append(line.partition(":")[2].strip())
        elif not line and data:
            events.append((name or "message", json.loads("\n".join(data))))
            name, data = None, []
    return events


# --- LoRAs -----------------------------------------------------------------------------------


def test_loras_are_listed_with_family_format_trigger_words_and_hash_and_problems_apart(app):
    reply = get(app, "loras")
    assert reply.status_code == 200
    listing = reply.json()
    by_name = {lora["name"]: lora for lora in listing["loras"]}
    assert {"style", "style_kohya", "other", "triggered", "notes", "xl/xl_style"} <= set(by_name)
    triggered = by_name["triggered"]
    assert (triggered["family"], triggered["layout"], triggered["trigger_words"]) == ("sd1", "kohya", ["zqstyle"])
    assert triggered["format"] == "LoRA"
    assert triggered["metadata"]["ss_base_model_version"] == "sd_v1"
    assert "ss_tag_frequency" not in triggered["metadata"]  # a summary; the whole header is on /loras/{name}
    assert by_name["xl/xl_style"]["family"] == "sdxl" and by_name["style"]["layout"] == "diffusers"
    assert by_name["notes"]["trigger_words"] == ["inkwash", "brush"]  # from the sidecar JSON
    path = app["loras"] / "triggered.safetensors"
    assert triggered["size_bytes"] == path.stat().st_size and triggered["hash"] == lora_hash(path)
    # The corrupt file is a problem line, not a LoRA.
    assert "broken" not in by_name and any("broken.safetensors" in line for line in listing["problems"])


def test_one_lora_has_its_whole_metadata_and_an_unknown_one_is_404(app):
    one = get(app, "loras/triggered").json()
    assert one["name"] == "triggered" and "zqstyle" in one["metadata"]["ss_tag_frequency"]
    assert get(app, "loras/xl/xl_style").json()["family"] == "sdxl"  # a name inside a subfolder
    missing = get(app, "loras/no_such_lora")
    assert missing.status_code == 404
    assert "no_such_lora" in missing.json()["errors"] and "/api/v1/loras" in missing.json()["errors"]


def test_refresh_lists_a_lora_added_while_the_app_runs(app):
    shutil.copy(app["loras"] / "other.safetensors", app["loras"] / "added_later.safetensors")
    reply = post(app, "loras/refresh")
    assert reply.status_code == 200
    assert "added_later" in {lora["name"] for lora in reply.json()["loras"]}


# --- models and jobs -------------------------------------------------------------------------


def test_loading_a_second_model_is_a_job_followed_to_done_then_current_shows_it(app):
    choices = get(app, "models").json()
    xl = next(choice for choice in choices if choice["name"] == "tiny-xl")
    assert not xl["loaded"] and any(choice["configured"] for choice in choices)
    reply = post(app, "models/load", {"model": xl["ref"]})
    assert reply.status_code == 202
    job_id = reply.json()["job_id"]
    state = follow(app, job_id)
    assert (state["kind"], state["status"], state["error"]) == ("load-model", "done", None)
    current = get(app, "models/current").json()
    assert (current["ref"], current["family"], current["loaded"]) == (xl["ref"], "sdxl", True)
    assert current["load_job"]["id"] == job_id and current["load_job"]["status"] == "done"
    assert next(c for c in get(app, "models").json() if c["name"] == "tiny-xl")["loaded"]


def test_a_bad_model_ref_is_a_400_naming_the_field_and_queues_nothing(app):
    before = get(app, "models/current").json()["load_job"]
    reply = post(app, "models/load", {"model": str(app["xl"].parent / "missing.safetensors")})
    assert reply.status_code == 400
    body = reply.json()
    assert body["error"] == "UserError" and body["errors"].startswith("model: ") and "does not exist" in body["errors"]
    assert get(app, "models/current").json()["load_job"] == before  # nothing was queued
    missing = post(app, "models/load", {})
    assert missing.status_code == 422 and missing.json()["errors"].startswith("model:")


def test_an_unknown_job_is_404(app):
    reply = get(app, "jobs/nosuchjob")
    assert reply.status_code == 404 and "nosuchjob" in reply.json()["errors"]


# --- memory ----------------------------------------------------------------------------------


def test_workers_lists_the_one_local_worker_with_its_model(app):
    listed = get(app, "workers").json()["workers"]
    assert len(listed) == 1
    assert listed[0]["index"] == 0 and listed[0]["device"] == "cpu" and listed[0]["state"] in {"idle", "running"}


def test_memory_status_and_free_on_cpu(app):
    status = get(app, "memory").json()
    assert status == {"device": "cpu", "residency": None, "report": None, "freed": None}
    freed = post(app, "memory/free")
    assert freed.status_code == 200 and freed.json()["freed"] == []


# --- prompt tools ----------------------------------------------------------------------------


def test_presets_are_the_eight_rewrite_presets(app):
    listing = get(app, "prompts/presets").json()
    assert {preset["name"] for preset in listing["presets"]} == PRESETS and listing["problems"] == []
    hd = next(preset for preset in listing["presets"] if preset["name"] == "hd")
    assert hd["llm"] is False and "masterpiece" in hd["style_words"]


def test_enhance_with_the_tiny_llm_plain_and_streamed_as_tokens_then_complete(app):
    body = {"keywords": "red fox, snowy forest", "loras": ["triggered"], "seed": 2}
    plain = post(app, "prompts/enhance", body)
    assert plain.status_code == 200
    result = plain.json()
    assert result["backend"] != "Rules (no LLM)" and not result["fell_back"] and result["seed"] == 2
    assert result["prompt"].startswith("zqstyle") and "red fox" in result["prompt"]
    with requests.post(f"{app['base']}/prompts/enhance/stream", json=body, auth=AUTH, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    names = [name for name, _ in events]
    assert names[-1] == "complete" and names.count("complete") == 1
    tokens = [data["text"] for name, data in events if name == "token"]
    assert tokens and set(names[:-1]) == {"token"} and all(isinstance(text, str) and text for text in tokens)
    assert events[-1][1] == result  # the same seed writes the same prompt, streamed or not


def test_rewrite_with_a_rules_preset_streams_only_complete(app):
    body = {"prompt": "a red fox", "preset": "hd"}
    with requests.post(f"{app['base']}/prompts/rewrite/stream", json=body, auth=AUTH, stream=True, timeout=120) as r:
        events = sse_events(r)
    assert [name for name, _ in events] == ["complete"]
    assert events[0][1]["prompt"] == "a red fox, masterpiece, best quality, highly detailed, 8k"
    assert post(app, "prompts/rewrite", body).json()["prompt"] == events[0][1]["prompt"]


@pytest.mark.parametrize("route", ["prompts/rewrite", "prompts/rewrite/stream"])
def test_an_unknown_preset_is_a_400_naming_preset_before_any_event(app, route):
    reply = post(app, route, {"prompt": "a fox", "preset": "sepia"})
    assert reply.status_code == 400 and reply.headers["content-type"].startswith("application/json")
    assert "preset 'sepia'" in reply.json()["errors"]
    no_preset = post(app, route, {"prompt": "a fox"})
    assert no_preset.status_code == 422 and no_preset.json()["errors"].startswith("preset:")


def test_bad_enhance_input_names_the_field(app):
    wrong_type = post(app, "prompts/enhance/stream", {"keywords": ["red fox"]})
    assert wrong_type.status_code == 422 and wrong_type.json()["errors"].startswith("keywords:")
    unknown_lora = post(app, "prompts/enhance", {"keywords": "fox", "loras": ["nope"]})
    assert unknown_lora.status_code == 400 and "Unknown LoRA 'nope'" in unknown_lora.json()["errors"]


def test_every_route_needs_the_password(app):
    for route in ("loras", "models/current", "memory", "prompts/presets", "jobs/x"):
        reply = requests.get(f"{app['base']}/{route}", timeout=30)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Basic"
    assert requests.post(f"{app['base']}/prompts/enhance/stream", json={"keywords": "x"}, timeout=30).status_code == 401
