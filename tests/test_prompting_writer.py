"""PromptWriter rules: trigger words, HD without a model, the token budget, and the fallbacks."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lorapg.errors import UserError
from lorapg.prompting.backends import RulesBackend
from lorapg.prompting.presets import PresetCatalog, load_presets
from lorapg.prompting.tokens import CLIP_CONTENT_LIMIT, count_clip_tokens
from lorapg.prompting.writer import DETAIL_WORDS, LoraHint, PromptWriter
from tests.test_prompting_tokens import make_clip_tokenizer

SHIPPED_PRESETS = Path(__file__).resolve().parents[1] / "presets" / "rewrite"
HD_WORDS = "masterpiece, best quality, highly detailed, 8k"
ANIME = LoraHint(name="anime_v2", trigger_words=["anm style"], style="flat cel-shaded anime")
INK = LoraHint(name="inkwash", trigger_words=["inkwash", "sumi-e"], style="ink wash painting")


@dataclass
class RecordingBackend:
    """Answers with fixed text (or raises) and remembers every call."""

    reply: str | BaseException = "a red fox in a snowy forest, soft light"
    delay_s: float = 0.0
    name: str = "fake"
    label: str = "Fake LLM"
    calls: list[dict] = field(default_factory=list)

    def complete(self, system: str, user: str, *, seed: int | None, max_new_tokens: int, timeout_s: float) -> str:
        self.calls.append(
            {"system": system, "user": user, "seed": seed, "max_new_tokens": max_new_tokens, "timeout_s": timeout_s}
        )
        if self.delay_s:
            time.sleep(self.delay_s)
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply


@pytest.fixture(scope="module")
def presets() -> PresetCatalog:
    return load_presets(SHIPPED_PRESETS)


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory: pytest.TempPathFactory):
    return make_clip_tokenizer(tmp_path_factory.mktemp("clip"))


def _writer(presets: PresetCatalog, backend=None, **kwargs) -> PromptWriter:
    return PromptWriter(backend or RecordingBackend(), presets, **kwargs)


# -- enhance -----------------------------------------------------------------------------------


def test_enhance_uses_the_cleaned_model_answer(presets: PresetCatalog) -> None:
    backend = RecordingBackend(reply='Sure! Here is your prompt:\n"a red fox, snowy forest"')
    result = _writer(presets, backend).enhance("fox, snow, calm", [], seed=5)
    assert result.text == "calm, a red fox, snowy forest"  # the dropped keyword is put back
    assert result.backend_label == "Fake LLM" and not result.fell_back and result.reason is None
    assert result.seed == 5 and backend.calls[0]["seed"] == 5
    assert "fox, snow, calm" in backend.calls[0]["user"]


def test_trigger_words_are_put_in_front_when_the_model_drops_them(presets) -> None:
    result = _writer(presets).enhance("fox", [ANIME, INK])
    assert result.text == ("anm style, inkwash, sumi-e, a red fox in a snowy forest, soft light")


def test_trigger_words_the_model_kept_are_not_repeated(presets) -> None:
    backend = RecordingBackend(reply="a fox, Anm Style, snowy forest, (inkwash:1.2), sumi-e")
    result = _writer(presets, backend).enhance("fox", [ANIME, INK])
    assert result.text == "a fox, Anm Style, snowy forest, (inkwash:1.2), sumi-e"


def test_lora_styles_and_triggers_go_into_the_system_prompt(presets) -> None:
    backend = RecordingBackend()
    _writer(presets, backend).enhance("fox", [ANIME, INK])
    system = backend.calls[0]["system"]
    for text in ("anime_v2", "flat cel-shaded anime", "anm style", "ink wash painting", "sumi-e"):
        assert text in system


def test_empty_keywords_are_a_user_error(presets) -> None:
    with pytest.raises(UserError):
        _writer(presets).enhance("   ", [])


def test_random_seed_is_reported_when_none_given(presets) -> None:
    backend = RecordingBackend()
    result = _writer(presets, backend).enhance("fox", [])
    assert isinstance(result.seed, int) and backend.calls[0]["seed"] == result.seed


# -- rewrite -----------------------------------------------------------------------------------


def test_rewrite_sends_the_preset_instruction_and_the_prompt(presets) -> None:
    backend = RecordingBackend(reply="a red fox mid-leap, dutch angle, motion lines")
    result = _writer(presets, backend).rewrite("a red fox", "fight", [ANIME])
    call = backend.calls[0]
    assert presets.get("fight").instruction in call["system"]
    assert "a red fox" in call["user"]
    assert result.text == "anm style, a red fox mid-leap, dutch angle, motion lines"


def test_hd_appends_quality_words_without_calling_the_llm(presets) -> None:
    backend = RecordingBackend()
    writer = _writer(presets, backend)
    first = writer.rewrite("a red fox, snowy forest", "hd", [], seed=1)
    second = writer.rewrite("a red fox, snowy forest", "hd", [], seed=2)
    assert backend.calls == []
    assert first.text == second.text == f"a red fox, snowy forest, {HD_WORDS}"
    assert not first.fell_back and "HD" in first.backend_label


def test_hd_never_duplicates_words_already_there(presets) -> None:
    writer = _writer(presets)
    result = writer.rewrite("(Masterpiece:1.2), a fox, highly detailed fur, 8K", "hd", [])
    assert result.text == "(Masterpiece:1.2), a fox, highly detailed fur, 8K, best quality"
    # Applying it again changes nothing.
    assert writer.rewrite(result.text, "hd", []).text == result.text


def test_hd_keeps_trigger_words(presets) -> None:
    result = _writer(presets).rewrite("a fox", "hd", [ANIME])
    assert result.text == f"anm style, a fox, {HD_WORDS}"


def test_unknown_preset_and_empty_prompt_are_user_errors(presets) -> None:
    writer = _writer(presets)
    with pytest.raises(UserError, match="Unknown rewrite preset"):
        writer.rewrite("a fox", "sepia", [])
    with pytest.raises(UserError):
        writer.rewrite("  ", "fight", [])


# -- fallback to the rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "reason_part"),
    [
        (RuntimeError("CUDA out of memory"), "CUDA out of memory"),
        (UserError("LLM server http://x/v1/chat/completions answered HTTP 500"), "HTTP 500"),
        ("<|im_end|>", "no usable prompt"),
        ("I'm sorry, I can't help with that.", "no usable prompt"),
        ("", "no usable prompt"),
    ],
)
def test_failures_fall_back_to_rules_with_a_reason(presets, reply, reason_part: str) -> None:
    writer = _writer(presets, RecordingBackend(reply=reply))
    result = writer.enhance("red fox, snowy forest", [ANIME])
    assert result.fell_back and reason_part in (result.reason or "")
    assert result.backend_label == RulesBackend.label
    assert result.text == "anm style, red fox, snowy forest, " + ", ".join(DETAIL_WORDS)


def test_off_topic_answer_falls_back(presets) -> None:
    backend = RecordingBackend(reply="A classic example of what I do best is vivid language")
    result = _writer(presets, backend).enhance("red fox, snowy forest", [])
    assert result.fell_back and "off-topic" in (result.reason or "")
    assert result.text.startswith("red fox, snowy forest, ")


def test_looping_answer_is_deduplicated(presets) -> None:
    backend = RecordingBackend(reply="foxes in the snow, snowy forest, Snowy Forest, snowy forest")
    result = _writer(presets, backend).enhance("fox", [])
    assert result.text == "foxes in the snow, snowy forest" and not result.fell_back


def test_rewrite_falls_back_to_preset_style_words(presets) -> None:
    writer = _writer(presets, RecordingBackend(reply=RuntimeError("boom")))
    result = writer.rewrite("a red fox, dramatic lighting", "cinematic", [])
    expected = [w for w in presets.get("cinematic").style_words if w != "dramatic lighting"]
    assert result.fell_back and "boom" in (result.reason or "")
    assert result.text == "a red fox, dramatic lighting, " + ", ".join(expected)


def test_a_hung_backend_times_out_and_falls_back(presets) -> None:
    release = threading.Event()  # the backend answers only when the test says so

    class HungBackend(RecordingBackend):
        answered = False

        def complete(self, *args, **kwargs) -> str:
            super().complete(*args, **kwargs)
            release.wait(60)
            self.answered = True
            return self.reply

    backend = HungBackend()
    writer = _writer(presets, backend, timeout_s=0.2, grace_s=0.1)
    try:
        result = writer.enhance("fox", [])
        assert not backend.answered  # the writer answered while the backend still hung
    finally:
        release.set()
    assert result.fell_back and "did not answer within 0.2 s" in (result.reason or "")
    assert backend.calls[0]["timeout_s"] == 0.2  # the backend was told the limit too


def test_model_loading_is_not_counted_against_the_timeout(presets) -> None:
    loaded = threading.Event()

    class SlowLoader(RecordingBackend):
        def ensure_loaded(self) -> None:
            time.sleep(0.5)
            loaded.set()

    result = _writer(presets, SlowLoader(), timeout_s=0.2, grace_s=0.1).enhance("fox", [])
    assert loaded.is_set() and not result.fell_back


def test_rules_backend_answers_directly_without_fell_back(presets) -> None:
    writer = _writer(presets, RulesBackend())
    result = writer.enhance("fox, snow", [INK])
    assert not result.fell_back
    assert result.text == "inkwash, sumi-e, fox, snow, " + ", ".join(DETAIL_WORDS)
    assert writer.rewrite("fox", "manga", []).text.startswith("fox, manga style, ")


def test_rules_rewrite_is_deduplicated(presets) -> None:
    writer = _writer(presets, RulesBackend())
    text = writer.rewrite("a fox, Oil Painting, impasto", "painted", []).text
    lowered = [p.lower() for p in text.split(", ")]
    assert lowered.count("oil painting") == 1 and lowered.count("impasto") == 1


# -- the 75-token budget ---------------------------------------------------------------------------


def test_long_answer_is_trimmed_to_75_tokens_keeping_triggers(presets, clip_tok) -> None:
    long_reply = ", ".join(f"zebra detail {n}" for n in range(40))
    writer = _writer(presets, RecordingBackend(reply=long_reply), tokenizer=clip_tok)
    result = writer.enhance("zebra", [ANIME, INK])
    assert result.text.startswith("anm style, inkwash, sumi-e, zebra detail 0, zebra detail 1")
    assert result.token_count == count_clip_tokens(result.text, clip_tok)
    assert result.token_count <= CLIP_CONTENT_LIMIT
    # The least important (last) phrases went; the kept ones are a prefix of the answer.
    kept = result.text.split(", ")[3:]
    assert kept == [f"zebra detail {n}" for n in range(len(kept))]
    assert result.truncated_words[0] == f"zebra detail {len(kept)}"
    assert count_clip_tokens(result.text + ", " + result.truncated_words[0], clip_tok) > CLIP_CONTENT_LIMIT


def test_short_answer_reports_its_token_count(presets, clip_tok) -> None:
    writer = _writer(presets, RecordingBackend(reply="cat, dog"), tokenizer=clip_tok)
    result = writer.enhance("cat", [])
    assert result.token_count == 3 and result.truncated_words == []


def test_without_tokenizer_there_is_no_count(presets) -> None:
    result = _writer(presets).enhance("fox", [])
    assert result.token_count is None and result.truncated_words == []


def test_keywords_the_model_dropped_are_put_back_in_front(presets) -> None:
    backend = RecordingBackend(reply="a red foxes den in a pine forest, golden hour, film grain")
    result = _writer(presets, backend).enhance("red fox, snowy forest, calm", [ANIME])
    assert not result.fell_back
    assert result.text == "anm style, snowy forest, calm, a red foxes den in a pine forest, golden hour, film grain"
