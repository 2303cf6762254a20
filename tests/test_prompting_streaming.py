"""Streaming: the OpenAI-compatible backend against a real SSE server on loopback, the in-process
model through TextIteratorStreamer, and the writer's fallback when a stream goes wrong."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lorapg.errors import UserError
from lorapg.prompting import OpenAICompatibleBackend, PromptResult, PromptWriter, TransformersBackend, load_presets
from lorapg.prompting.writer import LoraHint
from tests.test_prompting_backends import SHIPPED_PRESETS, SYSTEM, USER, build_tiny_chat_model

PIECES = ["Sure! Here is your prompt: ", "a red fox", ", snowy", " forest", ", soft light"]


class _SSEHandler(BaseHTTPRequestHandler):
    server: SSEServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.server.bodies.append(body)
        mode = self.server.mode
        if mode == "slow":
            self.server.release.wait(60)  # held until the test is done: only the client's timeout ends it
        if mode == "error":
            return self._json(500, {"error": {"message": "model exploded"}})
        if mode == "plain":  # a server that ignores "stream": true
            return self._json(200, {"choices": [{"message": {"content": "a red fox, snowy forest"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(b": keep-alive\n\n")
            for i, piece in enumerate(PIECES):
                if mode == "bad-chunk" and i == 2:
                    self._event("{this is not json")
                    return
                if mode == "stall" and i == 2:
                    self.server.release.wait(60)
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                self._event(json.dumps(chunk))
                time.sleep(0.01)
            self._event(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
            self._event("[DONE]")

    def _event(self, data: str) -> None:
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class SSEServer(ThreadingHTTPServer):
    daemon_threads = True
    mode = "ok"

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SSEHandler)
        self.bodies: list[dict[str, Any]] = []
        self.release = threading.Event()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


@contextlib.contextmanager
def sse_server() -> Iterator[SSEServer]:
    server = SSEServer()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def server() -> Iterator[SSEServer]:
    with sse_server() as running:
        yield running


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stream(backend: OpenAICompatibleBackend, timeout_s: float = 5) -> list[str]:
    return list(backend.stream(SYSTEM, USER, seed=7, max_new_tokens=50, timeout_s=timeout_s))


def _writer(backend, **kwargs) -> PromptWriter:
    return PromptWriter(backend, load_presets(SHIPPED_PRESETS), **kwargs)


def test_stream_yields_each_server_sent_piece(server: SSEServer) -> None:
    pieces = _stream(OpenAICompatibleBackend(server.base_url, "m", api_key="k"))
    assert pieces == PIECES
    (body,) = server.bodies
    assert body["stream"] is True and body["seed"] == 7 and body["max_tokens"] == 50


def test_server_that_ignores_stream_is_read_as_one_reply(server: SSEServer) -> None:
    server.mode = "plain"
    assert _stream(OpenAICompatibleBackend(server.base_url, "m")) == ["a red fox, snowy forest"]


def test_writer_streams_growing_text_then_the_cleaned_result(server: SSEServer) -> None:
    lora = LoraHint("wc", ["wtrclr"], "watercolor")
    items = list(_writer(OpenAICompatibleBackend(server.base_url, "m")).enhance_stream("fox, snow", [lora], seed=1))
    partials, result = items[:-1], items[-1]
    assert len(partials) >= 3 and all(isinstance(p, str) for p in partials)
    assert partials[0] == "a red fox" and partials[-1] == "a red fox, snowy forest, soft light"
    assert not any("Here is" in p for p in partials)  # shown cleaned while it grows
    assert isinstance(result, PromptResult) and not result.fell_back
    assert result.text == "wtrclr, a red fox, snowy forest, soft light"  # preamble gone, trigger in front


@pytest.mark.parametrize(
    ("mode", "timeout_s", "reason"),
    [
        ("error", 5.0, "HTTP 500"),
        ("bad-chunk", 5.0, "not an OpenAI chat completion chunk"),
        ("stall", 0.5, "did not answer within 0.5 s"),
        ("slow", 0.5, "did not answer within 0.5 s"),
    ],
)
def test_stream_failures_fall_back_to_rules_with_a_message(
    server: SSEServer, mode: str, timeout_s: float, reason: str
) -> None:
    server.mode = mode
    backend = OpenAICompatibleBackend(server.base_url, "m")
    *_, result = _writer(backend, timeout_s=timeout_s, grace_s=0.2).enhance_stream("red fox, snowy forest")
    assert isinstance(result, PromptResult)
    assert result.fell_back and reason in (result.reason or ""), result.reason
    assert result.text.startswith("red fox, snowy forest, ")  # the rules answered


def test_stream_errors_are_user_errors(server: SSEServer) -> None:
    server.mode = "error"
    with pytest.raises(UserError, match="HTTP 500.*model exploded"):
        _stream(OpenAICompatibleBackend(server.base_url, "m"))
    backend = OpenAICompatibleBackend(f"http://127.0.0.1:{closed_port()}/v1", "m")
    with pytest.raises(UserError, match="Cannot reach the LLM server"):
        _stream(backend)


def test_connection_refused_falls_back_with_a_message() -> None:
    backend = OpenAICompatibleBackend(f"http://127.0.0.1:{closed_port()}/v1", "m")
    result = _writer(backend).enhance("red fox", [LoraHint("a", ["zq"])])
    assert result.fell_back and "Cannot reach the LLM server" in (result.reason or "")
    assert result.text.startswith("zq, red fox")


def test_in_process_stream_matches_complete_for_the_same_seed(tmp_path: Path) -> None:
    backend = TransformersBackend(build_tiny_chat_model(tmp_path / "llm"), device="cpu")
    try:
        pieces = list(backend.stream(SYSTEM, USER, seed=11, max_new_tokens=16, timeout_s=30))
        whole = backend.complete(SYSTEM, USER, seed=11, max_new_tokens=16, timeout_s=30)
    finally:
        backend.release()
    assert len(pieces) >= 2
    assert "".join(pieces).split() == whole.split()
