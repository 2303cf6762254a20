"""Gradio's GRADIO_SERVER_PORT / GRADIO_SERVER_NAME are honoured, below LORAPG_* variables and flags."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lorapg.config import load_settings
from lorapg.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_gradio_port_and_name_are_used_when_nothing_else_says():
    settings = load_settings(environ={"GRADIO_SERVER_PORT": "7000", "GRADIO_SERVER_NAME": "0.0.0.0"})
    assert settings.port == 7000 and settings.host == "0.0.0.0"
    assert load_settings(environ={}).host == "127.0.0.1" and load_settings(environ={}).port == 7860


def test_precedence_defaults_toml_gradio_lorapg_flags(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text("port = 7100\nlisten = true\n")
    gradio = {"GRADIO_SERVER_PORT": "7200", "GRADIO_SERVER_NAME": "127.0.0.1"}
    assert load_settings(toml, environ={}).port == 7100
    above_toml = load_settings(toml, environ=gradio)
    assert above_toml.port == 7200 and above_toml.host == "127.0.0.1"  # GRADIO_* beat the TOML file
    lorapg = load_settings(toml, environ={**gradio, "LORAPG_PORT": "7300", "LORAPG_LISTEN": "1"})
    assert lorapg.port == 7300 and lorapg.host == "0.0.0.0"
    flags = load_settings(toml, {"port": 7400}, environ={**gradio, "LORAPG_PORT": "7300"})
    assert flags.port == 7400
    # An explicit "do not listen" wins over Gradio's name, as --listen does the other way.
    closed = load_settings(environ={"GRADIO_SERVER_NAME": "0.0.0.0", "LORAPG_LISTEN": "0"})
    assert closed.host == "127.0.0.1"
    opened = load_settings(None, {"listen": True}, environ={"GRADIO_SERVER_NAME": "127.0.0.1"})
    assert opened.host == "0.0.0.0"


def test_a_bad_gradio_port_names_the_setting():
    with pytest.raises(UserError, match="'port'"):
        load_settings(environ={"GRADIO_SERVER_PORT": "seventy"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_app_serves_on_gradio_server_port(tiny_models, tmp_path):
    port = _free_port()
    env = dict(
        os.environ,
        GRADIO_SERVER_PORT=str(port),
        GRADIO_SERVER_NAME="127.0.0.1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        PYTHONPATH=str(ROOT),
    )
    env.pop("LORAPG_PORT", None)
    app = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "app.py"),
            "--model",
            str(tiny_models["sd15"]),
            "--lora-dir",
            str(tiny_models["loras"]),
            "--outputs",
            str(tmp_path / "outputs"),
            "--no-preload",
            "--threads",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        answer = None
        for _ in range(600):  # polls until the server answers or the process ends (no time assertion)
            if app.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                    answer = response.status
                    break
            except OSError:
                time.sleep(0.5)
        assert answer == 200, app.stderr.read() if app.poll() is not None else "no answer"
    finally:
        app.terminate()
        app.wait(60)
