"""The tests' process factory (tests/process_factory.py) gives what a fresh interpreter gives."""

from __future__ import annotations

import subprocess
import sys

from tests import process_factory
from tests.process_factory import ROOT

# Prints what a test of the CLI could depend on: its arguments, working folder, a setting from the
# environment, whether gradio was imported, and an exit status of its own.
PROBE = [
    "-m",
    "tests.factory_probe",
    "first",
    "second arg",
]


def test_a_forked_cli_run_matches_a_fresh_one(tmp_path):
    env = process_factory.test_env(LORAPG_PROBE="from the environment")
    forked = process_factory.run(PROBE, cwd=ROOT, env=env, timeout=300)
    fresh = process_factory.run(PROBE, cwd=ROOT, env=env, timeout=300, fresh=True)
    assert forked.returncode == fresh.returncode == 3
    assert forked.stdout == fresh.stdout
    assert "gradio False" in forked.stdout and "LORAPG_PROBE from the environment" in forked.stdout
    assert forked.stderr.strip().splitlines()[-1] == "error: the probe's own message"


def test_an_environment_read_at_import_time_gets_a_fresh_interpreter(tmp_path):
    process = process_factory.start(
        PROBE, cwd=ROOT, env=process_factory.test_env(HF_HOME=str(tmp_path)), stdout=tmp_path / "out"
    )
    assert isinstance(process, subprocess.Popen)  # not forked: huggingface_hub reads HF_HOME when imported
    assert process.wait(300) == 3
    assert process.args[0] == sys.executable
