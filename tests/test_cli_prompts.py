"""``python -m lorapg enhance`` / ``rewrite``: prompt on stdout, who wrote it on stderr, exit 2 on bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorapg.cli import main
from tests import process_factory
from tests.test_prompting_streaming import closed_port, sse_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def base(tiny_models, tmp_path) -> list[str]:
    return ["--lora-dir", str(tiny_models["loras"]), "--outputs", str(tmp_path / "out")]


def test_enhance_prints_the_prompt_with_trigger_words(base, capsys) -> None:
    code = main(
        [
            "enhance",
            "--keywords",
            "red fox, snowy forest",
            "--lora",
            "triggered",
            "--lora",
            "notes",
            "--llm-backend",
            "rules",
            *base,
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert out.splitlines() == [out.strip()]  # one line, nothing else on stdout
    assert out.startswith("zqstyle, inkwash, brush, red fox, snowy forest, highly detailed")
    assert "Rules (no LLM)" in err


def test_rewrite_with_a_preset(base, capsys) -> None:
    assert main(["rewrite", "--preset", "hd", "--prompt", "a red fox", "--llm-backend", "rules", *base]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "a red fox, masterpiece, best quality, highly detailed, 8k"
    assert "HD preset (no LLM)" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rewrite", "--preset", "sepia", "--prompt", "a fox"], "Unknown rewrite preset 'sepia'"),
        (["rewrite", "--preset", "hd", "--prompt", "  "], "no prompt to rewrite"),
        (["enhance", "--keywords", " "], "Type a few keywords"),
        (["enhance", "--keywords", "fox", "--lora", "nope"], "Unknown LoRA 'nope'"),
        (["enhance", "--keywords", "fox", "--llm-backend", "gpt"], "Unknown LLM backend 'gpt'"),
        (["enhance", "--keywords", "fox", "--llm-backend", "openai"], "needs the server's base URL"),
    ],
)
def test_bad_input_exits_2_with_one_line(base, capsys, argv, message) -> None:
    assert main([*argv, *base, *(["--llm-backend", "rules"] if "--llm-backend" not in argv else [])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_openai_backend_via_flags_and_its_fallback(base, capsys) -> None:
    with sse_server() as server:
        assert (
            main(
                [
                    "enhance",
                    "--keywords",
                    "fox, snow",
                    "--llm-url",
                    server.base_url,
                    "--llm-model",
                    "qwen",
                    "--llm-api-key",
                    "k",
                    "--seed",
                    "4",
                    *base,
                ]
            )
            == 0
        )
        out, err = capsys.readouterr()
        assert out.strip() == "a red fox, snowy forest, soft light"
        assert "qwen @ " in err and "seed 4" in err and server.bodies[0]["model"] == "qwen"
    assert (
        main(
            [
                "enhance",
                "--keywords",
                "red fox",
                "--llm-backend",
                "openai",
                "--llm-url",
                f"http://127.0.0.1:{closed_port()}/v1",
                *base,
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out.startswith("red fox, highly detailed")
    assert re.search(r"rules used: Cannot reach the LLM server at http://127\.0\.0\.1:\d+/v1", err)


def test_as_a_subprocess(base) -> None:
    done = process_factory.run(
        ["-m", "lorapg", "rewrite", "--preset", "cinematic", "--prompt", "a red fox", *base],
        env=process_factory.test_env(LORAPG_LLM_BACKEND="rules"),
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("a red fox, cinematic") and "Rules (no LLM)" in done.stderr
