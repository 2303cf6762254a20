"""Start the app and the CLI as real processes without paying a fresh interpreter's imports each time.

A fresh ``python app.py`` spends ~10 s (on a loaded 2-core machine up to ~15 s) importing torch, diffusers,
transformers and gradio before it does anything a test looks at; the suite starts dozens of them. Here a
"factory" interpreter per pytest worker and entry point (app.py; the CLI, without gradio) imports those
libraries once, as the entry point does, and then forks a child per request. Each child is a whole
process: it gets the request's working folder, environment, arguments and output files, runs ``app.py``
(or ``python -m MODULE``) as ``__main__`` and ends through the interpreter's own shutdown, so serving,
signals and exit behave as in a process a user starts.

What a fork cannot reproduce is an environment read at import time (huggingface_hub's HF_* constants,
gradio's GRADIO_* settings, thread counts): a request whose environment differs from the factory's in
anything but the app's own ``LORAPG_*`` settings, or that asks for ``fresh=True``, starts a fresh
interpreter instead. Tests of start-up itself (tests/test_app_shutdown.py, the demo's first start) do that.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.forked_runs import HEAVY_MODULES

ROOT = Path(__file__).resolve().parent.parent

# What each entry point imports before it does anything, in its own order (ZeroGPU's hook, then the
# quiet-imports switch, then the libraries). The CLI never imports gradio (tests/test_services_layer.py),
# so its children come from a factory without it: an exit-time race must meet the modules a user's has.
CLI_PRELOAD = ("lorapg.hosting.zerogpu", "lorapg.quiet", *HEAVY_MODULES)
APP_PRELOAD = (*CLI_PRELOAD, "gradio", "lorapg.api", "lorapg.ui.app_ui")

# Environment variables the factory's children may differ in: the app's own settings, read when the app
# builds its Settings, never at import time.
RUNTIME_ENV_PREFIXES = ("LORAPG_",)

FACTORY = r"""
import json, os, runpy, socket, sys, threading

def serve(listener):
    # One request per connection: {"op": "spawn", ...} forks a child and answers its pid;
    # {"op": "status", "pid": N} answers its exit code once it has ended (null before).
    codes = {}
    while True:
        connection, _ = listener.accept()
        request = json.loads(connection.makefile().readline())
        if request["op"] == "stop":
            connection.sendall(b"{}\n")
            connection.close()
            return None
        if request["op"] == "spawn":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                connection.close()
                listener.close()
                return request  # the child leaves the loop and runs the program at the top level
            answer = {"pid": pid}
        else:
            while True:  # reap every child that has ended, keeping their codes
                try:
                    ended, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if ended == 0:
                    break
                codes[ended] = os.waitstatus_to_exitcode(status)
            answer = {"returncode": codes.get(request["pid"])}
        connection.sendall((json.dumps(answer) + "\n").encode())
        connection.close()

import lorapg.hosting.zerogpu
from lorapg.quiet import quiet_third_party_imports
quiet_third_party_imports()
import importlib
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
# fork() copies only the calling thread: a preload that started threads would give children a broken copy.
if threading.active_count() != 1:
    sys.exit(f"process factory: preloading started threads {threading.enumerate()}; cannot fork cleanly")
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen(16)
print("ready", flush=True)
request = serve(listener)
if request is None:
    sys.exit(0)
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
with open(os.devnull, "rb") as nothing:
    os.dup2(nothing.fileno(), 0)
for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
    with open(path, "ab") as stream:
        os.dup2(stream.fileno(), fd)
os.setpgid(0, 0)  # its own process group, as a fresh Popen child is not in the factory's
del serve, listener
if request["module"]:
    sys.argv = ["-m", *request["argv"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
else:
    sys.argv = [request["path"], *request["argv"]]
    sys.path[0] = os.path.dirname(request["path"])
    runpy.run_path(request["path"], run_name="__main__")
"""


class _Factory:
    """A factory interpreter of this pytest worker (one per entry point), started on first use."""

    def __init__(self, preload: tuple[str, ...]) -> None:
        folder = Path(tempfile.mkdtemp(prefix="lorapg-factory-"))
        self.address = str(folder / "socket")
        self.env = _base_env()
        self.log = folder / "factory.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", FACTORY, self.address, json.dumps(preload)],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        if self.process.stdout.readline().strip() != "ready":
            self.process.wait(30)
            raise RuntimeError(f"the process factory did not start:\n{self.log.read_text()[-3000:]}")
        atexit.register(self.stop)

    def ask(self, request: dict) -> dict:
        with socket.socket(socket.AF_UNIX) as connection:
            connection.connect(self.address)
            connection.sendall((json.dumps(request) + "\n").encode())
            return json.loads(connection.makefile().readline())

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.ask({"op": "stop"})
                self.process.wait(10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.process.kill()
        shutil.rmtree(self.log.parent, ignore_errors=True)


_factories: dict[str, _Factory] = {}  # "app" / "cli" -> its factory


def _base_env() -> dict[str, str]:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
    )


def test_env(**settings: str) -> dict[str, str]:
    """The environment tests give the app and the CLI (offline, one thread), plus ``settings``."""
    return {**_base_env(), **settings}


def _forkable(env: dict[str, str]) -> bool:
    """Whether ``env`` differs from the factory's only where children may differ (see the docstring)."""
    base = _base_env()
    changed = {key for key in env.keys() | base.keys() if env.get(key) != base.get(key)}
    return all(key.startswith(RUNTIME_ENV_PREFIXES) for key in changed)


class ForkedProcess:
    """The part of ``subprocess.Popen`` tests use, for a child of the factory."""

    def __init__(self, pid: int, factory: _Factory) -> None:
        self.pid = pid
        self.factory = factory
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.factory.ask({"op": "status", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    stdout: Path,
    stderr: Path | None = None,
    fresh: bool = False,
) -> subprocess.Popen | ForkedProcess:
    """``python *args`` (``app.py …`` or ``-m MODULE …``) with its output in ``stdout`` (and ``stderr``, or
    the same file); a factory child where the environment allows, a fresh interpreter otherwise."""
    stderr = stderr or stdout
    if fresh or not _forkable(env):
        with open(stdout, "ab") as out, open(stderr, "ab") as err:
            return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=out, stderr=err)
    kind = "cli" if args[0] == "-m" else "app"
    factory = _factories.get(kind)
    if factory is None or factory.process.poll() is not None:
        factory = _factories[kind] = _Factory(CLI_PRELOAD if kind == "cli" else APP_PRELOAD)
    if kind == "cli":
        request = {"module": args[1], "argv": list(args[2:])}
    else:
        request = {"module": None, "path": str(Path(cwd, args[0])), "argv": list(args[1:])}
    request.update(op="spawn", cwd=str(cwd), env=env, stdout=str(stdout), stderr=str(stderr))
    return ForkedProcess(factory.ask(request)["pid"], factory)


def run(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300.0, fresh: bool = False
) -> subprocess.CompletedProcess[str]:
    """Like ``subprocess.run([sys.executable, *args], capture_output=True, text=True)``, through the factory."""
    env = env if env is not None else _base_env()
    folder = Path(tempfile.mkdtemp(prefix="lorapg-run-"))
    out, err = folder / "out", folder / "err"
    process = start(args, cwd=cwd, env=env, stdout=out, stderr=err, fresh=fresh)
    try:
        returncode = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
        raise
    return subprocess.CompletedProcess(
        [sys.executable, *args], returncode, out.read_text(errors="replace"), err.read_text(errors="replace")
    )
