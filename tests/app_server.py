"""Start the real app (``python app.py``) on a free loopback port for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tests import process_factory

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_app(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    log_path: Path | None = None,
    fresh: bool = False,
):
    """Yield the base URL of an app process started with ``args``; stop it afterwards.

    The process's output goes to ``log_path`` (a temp file by default), for tests that read it. The process
    is forked from this worker's process factory (tests/process_factory.py: the same app, without a fresh
    interpreter's imports) unless ``env`` or ``fresh`` asks for a fresh interpreter.
    """
    port = free_port()
    if "--models-dir" not in args:  # datasets, training runs and LLM caches never land in the repo
        args = (*args, "--models-dir", tempfile.mkdtemp(prefix="lorapg-models-"))
    log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"lorapg-app-{port}.log"
    full_env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        **(env or {}),
    )
    log_path.write_text("")
    process = process_factory.start(
        [str(ROOT / "app.py"), "--port", str(port), *args], cwd=ROOT, env=full_env, stdout=log_path, fresh=fresh
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        yield wait_until_serving(process, url, log_path, timeout)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until_serving(process, url: str, log_path: Path, timeout: float = 120.0) -> str:
    """Wait until the app at ``url`` answers; raise with its log if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"app exited early:\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return url
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"app did not start in {timeout}s:\n{log_path.read_text()}") from None
            time.sleep(0.5)
