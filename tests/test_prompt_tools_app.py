"""Prompt tools in the real app, through gradio_client: enhance, a preset, token count, switching
the LLM backend while the app runs (a real SSE server on loopback), and the fallback note."""

from __future__ import annotations

import shutil

import pytest
from gradio_client import Client

from tests.app_server import running_app
from tests.test_prompting_streaming import closed_port, sse_server


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-app")
    loras = root / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    with running_app(
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(loras),
        "--outputs",
        str(root / "out"),
        "--threads",
        "1",
        "--llm-backend",
        "rules",
        "--no-preload",
    ) as url:
        client = Client(url, verbose=False)
        yield client


def enhance(client: Client, keywords: str, loras: list[str] | None = None, prompt: str = ""):
    return client.predict(
        keywords_text=keywords, selected=loras or [], current_prompt=prompt, seed=-1, api_name="/enhance"
    )


def test_enhance_with_the_rules_backend_puts_trigger_words_first(app) -> None:
    prompt, status = enhance(app, "red fox, snowy forest", ["triggered"], prompt="an old prompt")
    assert prompt.startswith("zqstyle, red fox, snowy forest, highly detailed")
    assert "Rules (no LLM)" in status and "rules used" not in status
    with pytest.raises(Exception, match="Type a few keywords"):
        enhance(app, "   ")


def test_rewrite_preset_and_token_count_with_the_loaded_model(app) -> None:
    assert "tokens (load a base model" in app.predict(text="a red fox", api_name="/token_count")
    assert "SD 1" in app.predict(api_name="/load_model")[0]  # the configured tiny model, default argument
    prompt, status = app.predict(preset="hd", current_prompt="a red fox", selected=[], seed=-1, api_name="/rewrite")
    assert prompt == "a red fox, masterpiece, best quality, highly detailed, 8k"
    assert "HD preset (no LLM)" in status and "/ 75 tokens" in status
    counted = app.predict(text="a red fox", api_name="/token_count")
    assert counted.endswith("/ 75 tokens") and int(counted.split(" / ")[0]) > 0
    with pytest.raises(Exception, match="Unknown rewrite preset 'sepia'"):
        app.predict(preset="sepia", current_prompt="a fox", selected=[], seed=-1, api_name="/rewrite")


def test_switching_to_an_openai_server_streams_and_falls_back_when_it_is_down(app) -> None:
    with sse_server() as server:
        status = app.predict(backend="openai", model="m", url=server.base_url, api_key="", api_name="/llm_settings")
        assert "Prompt backend: m @ " in status
        job = app.submit(keywords_text="fox, snow", selected=[], current_prompt="", seed=5, api_name="/enhance")
        job.result(timeout=60)
        outputs = job.outputs()
        assert outputs[-1][0] == "a red fox, snowy forest, soft light" and "seed 5" in outputs[-1][1]
        assert any("is writing" in status for _, status in outputs[:-1])
        assert server.bodies[0]["stream"] is True and server.bodies[0]["seed"] == 5
    try:
        app.predict(
            backend="openai",
            model="m",
            url=f"http://127.0.0.1:{closed_port()}/v1",
            api_key="",
            api_name="/llm_settings",
        )
        prompt, status = enhance(app, "red fox")
        assert prompt.startswith("red fox, highly detailed")
        assert "rules used: Cannot reach the LLM server" in status
        with pytest.raises(Exception, match="needs the server's base URL"):
            app.predict(backend="openai", model="", url="", api_key="", api_name="/llm_settings")
    finally:
        assert "Rules" in app.predict(backend="rules", model="", url="", api_key="", api_name="/llm_settings")


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"keywords_text": "red " * 8000}, r"Keywords has 32000 characters; at most 8000 .*max_prompt_chars"),
        ({"keywords_text": ["red fox"]}, r"Keywords must be text, not list"),
        ({"keywords_text": "red\0fox"}, r"Keywords contains a null character"),
        ({"seed": "seven"}, r"LLM seed 'seven' is not a whole number"),
        ({"seed": 1.5}, r"LLM seed '1.5' is not a whole number"),
    ],
)
def test_bad_enhance_input_is_refused_naming_the_field(app, inputs, message) -> None:
    # Before: 32 KB of "red red …" took 65 s (and 10 MB never answered), a list was enhanced as the
    # text "['red fox']", and a text seed failed in Gradio with "Could not preprocess input component".
    values = {"keywords_text": "red fox", "selected": [], "current_prompt": "", "seed": -1, **inputs}
    with pytest.raises(Exception, match=message):
        app.predict(**values, api_name="/enhance")
    assert enhance(app, "red fox")[0].startswith("red fox")  # still serving


def test_bad_rewrite_input_is_refused_naming_the_field(app) -> None:
    with pytest.raises(Exception, match="Prompt must be text, not list"):
        app.predict(preset="hd", current_prompt=["a fox"], selected=[], seed=-1, api_name="/rewrite")
    with pytest.raises(Exception, match="LLM seed 'nan' is not a whole number"):
        app.predict(preset="hd", current_prompt="a fox", selected=[], seed="nan", api_name="/rewrite")  # JSON: no NaN
