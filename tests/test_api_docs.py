"""The REST API's own documentation (``/openapi.json``, ``/docs``), its auth on every route and its
body limit, on a real app on 127.0.0.1.

The checks walk every operation the schema lists, so routes added by any router are covered too.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests
from fastapi import APIRouter
from fastapi.sse import EventSourceResponse, ServerSentEvent

from lorapg.api.auth import ApiAccess
from lorapg.api.docs import openapi_schema
from lorapg.api.errors import A1111Route
from lorapg.api.models import ErrorResponse
from tests.app_server import running_app

AUTH = ("u", "p")
LIMIT_MB = 1
LIMIT = LIMIT_MB * 2**20
ERROR_KEYS = {"error", "detail", "body", "errors"}


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("apidocs")
    shutil.copytree(tiny_models["loras"], root / "loras")
    with running_app(
        "--api",
        "--api-auth",
        "u:p",
        "--model",
        str(tiny_models["sd15"]),
        "--lora-dir",
        str(root / "loras"),
        "--outputs",
        str(root / "outputs"),
        "--no-preload",  # nothing here generates
        "--threads",
        "1",
        env={"LORAPG_MAX_UPLOAD_MB": str(LIMIT_MB)},
    ) as url:
        yield url.rstrip("/")


@pytest.fixture(scope="module")
def schema(app) -> dict:
    reply = requests.get(f"{app}/openapi.json", auth=AUTH, timeout=30)
    assert reply.status_code == 200
    return reply.json()


def operations(schema: dict) -> list[tuple[str, str, dict]]:
    return [(method, path, op) for path, ops in schema["paths"].items() for method, op in ops.items()]


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)  # any value: auth and the body limit come before the lookup


# --- the documentation ------------------------------------------------------------------------------


def test_openapi_describes_the_api_routes_only_and_docs_serve_swagger_ui(app, schema):
    paths = set(schema["paths"])
    assert "/sdapi/v1/txt2img" in paths and "/sdapi/v1/options" in paths
    api_prefixes = ("/sdapi/v1/", "/api/v1/", "/controlnet/")  # the last: the A1111 ControlNet extension's
    assert all(path.startswith(api_prefixes) for path in paths), sorted(paths)  # no Gradio internals
    assert schema["components"]["securitySchemes"]["basic"] == {"type": "http", "scheme": "basic"}
    page = requests.get(f"{app}/docs", auth=AUTH, timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "SwaggerUIBundle" in page.text and "url: 'openapi.json'" in page.text


def resolve(node: dict, schema: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def schema_has_example(node: dict, schema: dict) -> bool:
    node = resolve(node, schema)
    if "example" in node or node.get("examples"):
        return True
    # An array or an event stream is documented by an example of its items or events.
    return any(key in node and schema_has_example(node[key], schema) for key in ("items", "itemSchema"))


def content_has_example(content: dict, schema: dict) -> bool:
    return any(
        "example" in media or media.get("examples") or schema_has_example(media.get("schema", {}), schema)
        for media in content.values()
    )


def missing_examples(schema: dict) -> list[str]:
    missing = []
    for method, path, op in operations(schema):
        body = op.get("requestBody")
        if body and not content_has_example(body.get("content", {}), schema):
            missing.append(f"{method.upper()} {path}: request body")
        for status, reply in op.get("responses", {}).items():
            if status in ("200", "201", "202") and not content_has_example(reply.get("content", {}), schema):
                missing.append(f"{method.upper()} {path}: {status} response")
    return missing


def test_every_operation_documents_an_example_request_and_reply(schema):
    missing = missing_examples(schema)
    assert not missing, "add an example (model_config json_schema_extra or Field examples) for:\n" + "\n".join(missing)


def test_the_example_check_finds_an_operation_without_examples():
    bare = {
        "paths": {
            "/api/v1/thing": {
                "post": {
                    "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/T"}}}},
                    "responses": {"200": {"content": {"application/json": {"schema": {"type": "object"}}}}},
                }
            }
        },
        "components": {"schemas": {"T": {"type": "object"}}},
    }
    assert missing_examples(bare) == ["POST /api/v1/thing: request body", "POST /api/v1/thing: 200 response"]
    bare["components"]["schemas"]["T"]["examples"] = [{}]
    assert missing_examples(bare) == ["POST /api/v1/thing: 200 response"]


# --- auth -------------------------------------------------------------------------------------------


def every_route(schema: dict) -> list[tuple[str, str]]:
    return [(method, concrete(path)) for method, path, _ in operations(schema)] + [
        ("get", "/openapi.json"),
        ("get", "/docs"),
    ]


@pytest.mark.parametrize("auth", [None, ("u", "wrong"), ("nobody", "p")], ids=["none", "wrong-password", "wrong-user"])
def test_every_route_answers_401_with_basic_challenge_without_the_right_credentials(app, schema, auth):
    refused = []
    for method, path in every_route(schema):
        reply = requests.request(method, f"{app}{path}", auth=auth, json={}, timeout=30)
        if reply.status_code != 401 or reply.headers.get("WWW-Authenticate") != "Basic":
            refused.append(f"{method.upper()} {path}: {reply.status_code}")
        else:
            assert set(reply.json()) == ERROR_KEYS
    assert not refused, "routes open without the right credentials:\n" + "\n".join(refused)


def test_a_malformed_authorization_header_is_a_401_not_an_error(app):
    for header in ("Basic !!!", "Basic " + "A" * 10, "Bearer abc", "Basic"):
        reply = requests.get(f"{app}/sdapi/v1/options", headers={"Authorization": header}, timeout=30)
        assert reply.status_code == 401, header


# --- the body limit ---------------------------------------------------------------------------------


def raw_request(app: str, head: str, body: bytes = b"") -> tuple[int, str]:
    """Send ``head`` and ``body`` on a socket and read the reply, without finishing the body.

    The body is never completed, so a server that waited to read it all would never answer and
    the socket's timeout would fail the test.
    """
    parts = urlsplit(app)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply_complete(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode()


def reply_complete(reply: bytes) -> bool:
    head, _, body = reply.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    return bool(match) and len(body) >= int(match.group(1))


def head_of(method: str, path: str, framing: str) -> str:
    return (
        f"{method.upper()} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Authorization: Basic dTpw\r\n"  # u:p
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    )


def test_every_route_refuses_a_declared_oversized_body_before_reading_it(app, schema):
    wrong = []
    for method, path in every_route(schema):
        head = head_of(method, path, f"Content-Length: {10 * LIMIT}")
        status, body = raw_request(app, head, b'{"prompt": "')  # a start, and nothing more ever comes
        if status != 413:
            wrong.append(f"{method.upper()} {path}: {status}")
            continue
        error = json.loads(body)
        assert set(error) == ERROR_KEYS and f"upload limit of {LIMIT_MB} MB (setting max_upload_mb)" in error["errors"]
    assert not wrong, "routes that did not refuse an oversized body:\n" + "\n".join(wrong)


@pytest.mark.parametrize("path", ["/sdapi/v1/txt2img", "/sdapi/v1/png-info", "/sdapi/v1/options"])
def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(app, path):
    # Chunks past the limit, and never the last (zero-length) chunk: the answer must come anyway.
    chunk = b"a" * 65536
    sent = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // len(chunk) + 2))
    status, body = raw_request(app, head_of("post", path, "Transfer-Encoding: chunked"), sent)
    assert status == 413
    error = json.loads(body)
    assert set(error) == ERROR_KEYS and "upload limit" in error["errors"]


def test_a_body_within_the_limit_still_works_after_refusals(app):
    image = "data:image/png;base64," + "A" * (LIMIT // 2)  # under the limit: the route itself judges it
    reply = requests.post(f"{app}/sdapi/v1/png-info", json={"image": image}, auth=AUTH, timeout=30)
    assert reply.status_code == 400 and "image" in reply.json()["errors"]
    assert requests.get(f"{app}/sdapi/v1/options", auth=AUTH, timeout=30).status_code == 200


def test_error_replies_are_documented_as_json_on_event_stream_routes():
    """FastAPI files a route's error models under its own media type; the API's errors are JSON."""
    router = APIRouter(route_class=A1111Route)

    @router.get(
        "/api/v1/things/{thing}/events", response_class=EventSourceResponse, responses={404: {"model": ErrorResponse}}
    )
    def events(thing: str) -> Iterator[ServerSentEvent]:
        yield ServerSentEvent(event="progress", data={"thing": thing})

    replies = openapi_schema(list(router.routes), ApiAccess(True), None)["paths"]["/api/v1/things/{thing}/events"]
    replies = replies["get"]["responses"]
    assert list(replies["404"]["content"]) == ["application/json"]
    assert list(replies["422"]["content"]) == ["application/json"]
    assert "text/event-stream" in replies["200"]["content"]
