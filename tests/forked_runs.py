"""Run one program many times, each run a whole process that exits, for the price of one interpreter start.

Tests of exit-time races (a daemon thread still inside torch while the interpreter shuts down) repeat the
same process several times, because one clean exit proves little about a race. A fresh ``python`` spends
most of its ~10 s importing torch, diffusers and transformers; here one driver interpreter imports them
once and forks a child per run. Each child is still a whole process that runs the program as ``python -m``
or ``python -c`` would and ends through the interpreter's own shutdown (``sys.exit`` reaching the top), so
the race the tests look for happens exactly as in a fresh process; only the imports were done earlier.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

# The modules every forked run would otherwise import itself (the slow part of a fresh interpreter);
# lorapg.diffusion.engine pulls in the diffusers pipeline classes that ``import diffusers`` defers.
HEAVY_MODULES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "lorapg.cli",
    "lorapg.services.build",
    "lorapg.outputs",
    "lorapg.diffusion.engine",
)

DRIVER = r"""
import importlib, json, os, runpy, sys, threading

spec = json.loads(sys.argv[1])
for name in spec["preload"]:
    importlib.import_module(name)
# fork() copies only the calling thread: a preload that started threads would give children a broken copy.
if threading.active_count() != 1:
    sys.exit(f"forked_runs: preloading started threads {threading.enumerate()}; cannot fork cleanly")
codes = []
for index in range(spec["runs"]):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        # The child: its output goes to its own files, then it runs the program and ends as a process does
        # (SystemExit or an exception propagates to the top level, never back into this loop).
        for fd, suffix in ((1, "out"), (2, "err")):
            with open(os.path.join(spec["dir"], f"{index}.{suffix}"), "wb") as stream:
                os.dup2(stream.fileno(), fd)
        sys.argv = ["-c", *spec["argv"]]
        if spec["module"]:
            runpy.run_module(spec["module"], run_name="__main__", alter_sys=True)
        else:
            exec(compile(spec["code"], "<string>", "exec"), {"__name__": "__main__"})
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    codes.append(os.waitstatus_to_exitcode(status))  # -6 for SIGABRT, as subprocess reports it
print(json.dumps(codes))
"""


def forked_runs(
    runs: int,
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    module: str | None = None,
    code: str | None = None,
    preload: tuple[str, ...] = HEAVY_MODULES,
    timeout: float = 300.0,
) -> list[subprocess.CompletedProcess]:
    """``runs`` processes of ``python -m module *argv`` (or ``python -c code *argv``), forked from one
    interpreter that imported ``preload`` first; one CompletedProcess per run, like ``subprocess.run``."""
    assert (module is None) != (code is None), "give a module or code"
    folder = Path(cwd) / f".forked-runs-{os.getpid()}-{id(argv)}"
    folder.mkdir()
    spec = {"preload": list(preload), "runs": runs, "argv": argv, "module": module, "code": code, "dir": str(folder)}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(spec)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a timeout ends the driver and any child still running, together
    )
    try:
        out, err = driver.communicate(timeout=timeout * (runs + 1))
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.communicate()
        raise
    assert driver.returncode == 0, err[-2000:]
    codes = json.loads(out.splitlines()[-1])
    return [
        subprocess.CompletedProcess(
            argv,
            returncode,
            (folder / f"{index}.out").read_text(errors="replace"),
            (folder / f"{index}.err").read_text(errors="replace"),
        )
        for index, returncode in enumerate(codes)
    ]
