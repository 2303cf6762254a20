"""A property-based fuzzer over the API's own /openapi.json (schemathesis): a real app on 127.0.0.1
gets at least 500 generated requests across all operations, and none may answer 5xx or break
the schema's promises about replies (status codes, content types, bodies).

Every operation found in the schema is fuzzed, so routes added later are covered without edits
here. Routes that start GPU work are the exception (see ``GPU_ROUTES``): random valid requests there
would generate 512x512 images, load models, run the prompt LLM or train, for seconds to minutes
each. They are fuzzed with invalid data only (negative mode: refused before any work starts),
except txt2img, whose valid requests are fuzzed too, capped to a 64x64, 2-step, one-image job on
the tiny model, so that the real generation path meets random prompts, seeds and samplers at a
fraction of a second a request. The caps apply to invalid data as well: pydantic's lax mode takes
some of it as valid (``"seed": 1.0``), and then a default-sized job would run.
"""

from __future__ import annotations

import base64
import logging
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field

import pytest
import requests
import schemathesis  # requirements-dev.txt
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.app_server import running_app

log = logging.getLogger(__name__)

AUTH = ("u", "p")
BASIC = "Basic " + base64.b64encode(b"u:p").decode()
MIN_REQUESTS = 500
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass(frozen=True)
class Plan:
    modes: dict[GenerationMode, int]  # generation mode -> how many examples
    cap: bool = False  # make any body that would start GPU work a tiny job (see capped)


# Enough to find the 500s seen so far (an unbounded offset, a chunked oversized body) while the whole run
# stays about a minute: every operation gets its own budget, and there are dozens of operations.
DEFAULT = Plan({POSITIVE: 20, NEGATIVE: 20})
INVALID_ONLY = Plan({NEGATIVE: 40}, cap=True)
# Routes that start GPU work (or load a model or the prompt LLM), by method and path pattern.
GPU_ROUTES = [
    ("post", r"/sdapi/v1/txt2img", Plan({POSITIVE: 20, NEGATIVE: 60}, cap=True)),
    ("post", r"/sdapi/v1/img2img", Plan({POSITIVE: 10, NEGATIVE: 30}, cap=True)),
    ("post", r"/sdapi/v1/options", INVALID_ONLY),  # sd_model_checkpoint switches the base model
    ("post", r"/api/v1/generations", INVALID_ONLY),
    ("post", r"/api/v1/training(/.*)?", INVALID_ONLY),
    ("post", r"/api/v1/models(/.*)?", INVALID_ONLY),
    ("post", r"/api/v1/prompts(/.*)?", INVALID_ONLY),
    ("post", r"/api/v1/grids(/.*)?", INVALID_ONLY),  # a valid grid is up to 64 generations
    ("post", r"/api/v1/datasets/[^/]+/caption", INVALID_ONLY),  # loads (or downloads) a captioning model
]
# The most a fuzzed request may ask for; a field the route declares but the request leaves out is
# set to its cap too, since the route's default is a full-size job.
CAPS = {
    "width": 64,
    "height": 64,
    "resolution": 64,
    "steps": 2,
    "batch_size": 1,
    "n_iter": 1,
    "num_images": 1,
    "epochs": 1,
    "max_steps": 2,
    # Hires fix: a second pass at up to 4x the size (or hr_resize_x/y pixels) would be a full-size job.
    "hr_scale": 1,
    "hr_resize_x": 64,
    "hr_resize_y": 64,
    "hr_second_pass_steps": 2,
}
MODEL_SWITCHES = {"sd_model_checkpoint", "model"}


def plan(method: str, path: str) -> Plan:
    for gpu_method, pattern, chosen in GPU_ROUTES:
        if method == gpu_method and re.fullmatch(pattern, path):
            return chosen
    return DEFAULT


def capped(body, declared: set[str]):
    """``body`` made a tiny job on the loaded model (values under a cap are kept: 0 or -1 still get checked)."""
    if not isinstance(body, dict):
        return body
    body = {key: value for key, value in body.items() if key not in MODEL_SWITCHES}
    for key, cap in CAPS.items():
        if key not in body:
            if key in declared:
                body[key] = cap
        elif number(body[key]) is not None and number(body[key]) > cap:
            body[key] = cap
    if isinstance(body.get("override_settings"), dict):
        body["override_settings"] = capped(body["override_settings"], set())
    return body


def number(value) -> float | None:
    """What pydantic's lax mode reads as a number (``512``, ``512.0``, ``"512"``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def declared_fields(raw: dict, method: str, path: str) -> set[str]:
    """The property names of an operation's request body in the raw schema."""
    body = raw["paths"][path][method].get("requestBody", {})
    names: set[str] = set()
    for media in body.get("content", {}).values():
        node = media.get("schema", {})
        while "$ref" in node:
            node = raw["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
        names |= set(node.get("properties", {}))
    return names


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("apifuzz")
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
        "--threads",
        "1",
    ) as url:
        yield url.rstrip("/")


@dataclass
class Fuzzer:
    """Sends generated requests to the app and keeps what went wrong (all of it, not just the first)."""

    base: str
    session: requests.Session = field(default_factory=requests.Session)
    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    broken_promises: list[str] = field(default_factory=list)
    ungenerated: list[str] = field(default_factory=list)

    def run(self, operation, mode: GenerationMode, examples: int, caps_for: set[str] | None) -> None:
        """``caps_for``: the body fields of a GPU route (see capped); None for other routes."""

        @settings(
            max_examples=examples,
            derandomize=True,  # the same requests every run: a failure reproduces
            database=None,
            deadline=None,
            phases=[Phase.generate],  # failures are collected, not shrunk: one pass, bounded time
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
        )
        # The credentials are fixed, not generated: every request must get past auth to test anything.
        @given(case=operation.as_strategy(generation_mode=mode, headers={"Authorization": BASIC}))
        def send(case):
            if caps_for is not None:
                case.body = capped(case.body, caps_for)
            self.check(case, mode)

        try:
            send()
        except Unsatisfiable:
            # Some inputs have no invalid form schemathesis can make (a free-text path id: any
            # string is one); those operations get their positive requests only.
            self.ungenerated.append(f"{operation.label} ({mode.value})")

    def check(self, case, mode: GenerationMode) -> None:
        response = case.call(base_url=self.base, session=self.session, auth=AUTH, timeout=120)
        self.sent[case.operation.label] += 1
        self.statuses[case.operation.label, response.status_code] += 1
        if response.status_code >= 500 and not documented_not_built(case, response):
            self.server_errors.append(f"{response.status_code} {case.as_curl_command()}\n  {response.text[:300]}")
            return
        try:
            case.validate_response(response, checks=CONFORMANCE, transport_kwargs={"auth": AUTH})
        except FailureGroup as exc:  # its message lists each broken promise and a curl to reproduce it
            self.broken_promises.append(f"{case.operation.label} ({mode.value}): {str(exc)[:600]}")


def test_generated_requests_never_get_a_server_error(app):
    raw = requests.get(f"{app}/openapi.json", auth=AUTH, timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    fuzzer = Fuzzer(app)
    for result in schema.get_all_operations():
        operation = result.ok()
        chosen = plan(operation.method.lower(), operation.path)
        for mode, examples in chosen.modes.items():
            if not has_inputs(operation):
                if mode is NEGATIVE:
                    continue  # nothing to make invalid
                examples = 1  # every request would be the same one
            method = operation.method.lower()
            caps_for = declared_fields(raw, method, operation.path) if chosen.cap else None
            fuzzer.run(operation, mode, examples, caps_for)

    sent, total = fuzzer.sent, sum(fuzzer.sent.values())
    errors, broken = fuzzer.server_errors, fuzzer.broken_promises
    assert not errors, f"{len(errors)} of {total} requests got a 5xx:\n" + "\n".join(errors[:20])
    assert not broken, f"{len(broken)} replies break the schema:\n" + "\n".join(broken[:20])
    log.info("replies by operation and status: %s", dict(fuzzer.statuses))
    log.info("no requests could be generated for: %s", fuzzer.ungenerated)
    log.info("%d requests in all", total)
    assert total >= MIN_REQUESTS, f"only {total} requests were generated: {dict(sent)}"
    assert sent["POST /sdapi/v1/txt2img"] >= 60  # the GPU route is fuzzed too, within its caps


def documented_not_built(case, response) -> bool:
    """A 501 the schema promises (img2img until the engine has it) is an answer, not a server error."""
    return response.status_code == 501 and "501" in case.operation.responses.status_codes


def has_inputs(operation) -> bool:
    """Whether the operation takes anything to generate besides the credentials."""
    return bool(operation.body) or any(p.name != "Authorization" for p in operation.iter_parameters())
